//! Fitting a plan to a MACs bound.
//!
//! Every plan a proxy produces goes through [`fit`]: widths are clamped to the units'
//! granularity, then units shrink one step at a time while the model is over the bound, then
//! grow one step at a time while a step still fits. The result is **tight**
//! ([`is_tight`]): at most the bound, and no unit can grow by one granularity step without
//! exceeding it. Which unit moves is the caller's [`Priority`]: importance-based proxies shrink
//! the step that loses the least importance per MAC saved ([`ScorePriority`]); plan-proposing
//! proxies (search, llm) keep the proposal's proportions ([`ShapePriority`]).

use crate::cost::cost;

use super::structure::{Plan, Scores, Structure, UnitKind};
use crate::unet::GROUPS;

/// MACs of the model `widths` (per unit index) gives.
pub fn macs_of(s: &Structure, widths: &[usize]) -> u64 {
    cost(&s.arch_for(&plan_of(s, widths))).macs
}

/// The plan with these widths (per unit index).
pub fn plan_of(s: &Structure, widths: &[usize]) -> Plan {
    s.units().iter().zip(widths).map(|(u, &w)| (u.name.clone(), w)).collect()
}

/// The smallest model the units allow: every unit at its minimum.
pub fn min_plan(s: &Structure) -> Plan {
    s.units().iter().map(|u| (u.name.clone(), u.min())).collect()
}

/// Orders candidate moves: the move with the smallest key goes first.
pub trait Priority {
    /// Key of shrinking unit `u` from `widths[u]` by one step, saving `saved` MACs.
    fn shrink(&self, s: &Structure, widths: &[usize], u: usize, saved: u64) -> f64;
    /// Key of growing unit `u` from `widths[u]` by one step, adding `added` MACs.
    fn grow(&self, s: &Structure, widths: &[usize], u: usize, added: u64) -> f64;
}

/// Keeps a proposal's shape: shrink the unit that keeps the largest fraction of its width, grow
/// the one that keeps the smallest (ties: the earlier unit).
pub struct ShapePriority;

impl Priority for ShapePriority {
    fn shrink(&self, s: &Structure, w: &[usize], u: usize, _saved: u64) -> f64 {
        -(w[u] as f64 / s.units()[u].full as f64)
    }
    fn grow(&self, s: &Structure, w: &[usize], u: usize, _added: u64) -> f64 {
        w[u] as f64 / s.units()[u].full as f64
    }
}

/// Global importance ranking: each unit's element scores are divided by the unit's mean (so
/// units of different magnitude compare), and a step's key is the normalised importance of the
/// elements it removes (or restores) per MAC; shrink the cheapest loss, grow the best gain.
pub struct ScorePriority {
    /// Per unit: normalised scores of each GroupNorm group's elements (heads: one group), sorted
    /// descending.
    ranked: Vec<Vec<Vec<f64>>>,
}

impl ScorePriority {
    /// From per-element scores.
    pub fn new(s: &Structure, scores: &Scores) -> ScorePriority {
        let ranked = s
            .units()
            .iter()
            .zip(scores)
            .map(|(u, sc)| {
                let mean = sc.iter().sum::<f64>() / sc.len().max(1) as f64;
                let norm = |x: f64| if mean > 0.0 && mean.is_finite() { x / mean } else { 0.0 };
                let groups = if u.kind == UnitKind::Heads { 1 } else { GROUPS };
                let per = u.full / groups;
                (0..groups)
                    .map(|g| {
                        let mut v: Vec<f64> =
                            sc[g * per..(g + 1) * per].iter().map(|&x| norm(x)).collect();
                        v.sort_by(|a, b| b.total_cmp(a));
                        v
                    })
                    .collect()
            })
            .collect();
        ScorePriority { ranked }
    }

    /// Normalised importance of the elements ranked `k` (0-based, per group) in unit `u`.
    fn at(&self, u: usize, k: usize) -> f64 {
        self.ranked[u].iter().map(|g| g[k]).sum()
    }
}

impl Priority for ScorePriority {
    fn shrink(&self, _: &Structure, w: &[usize], u: usize, saved: u64) -> f64 {
        let groups = self.ranked[u].len();
        let k = w[u] / groups - 1; // the last kept rank in each group goes
        self.at(u, k) / saved.max(1) as f64
    }
    fn grow(&self, _: &Structure, w: &[usize], u: usize, added: u64) -> f64 {
        let groups = self.ranked[u].len();
        let k = w[u] / groups; // the best dropped rank in each group comes back
        -(self.at(u, k) / added.max(1) as f64)
    }
}

/// Why a bound cannot be met.
#[derive(Debug, thiserror::Error)]
#[error(
    "the bound of {bound} MACs is below the smallest model the pruning units allow ({min} MACs, \
     {ratio:.3} of the base model)"
)]
pub struct Infeasible {
    /// The bound.
    pub bound: u64,
    /// MACs of the smallest plan.
    pub min: u64,
    /// `min` over the base model's MACs.
    pub ratio: f64,
}

/// Fits `plan` to `bound` MACs (see the module docs). Fails only when even the smallest plan is
/// over the bound.
pub fn fit(
    s: &Structure,
    plan: &Plan,
    bound: u64,
    prio: &dyn Priority,
) -> Result<Plan, Infeasible> {
    let units = s.units();
    let min = macs_of(s, &s.widths(&min_plan(s)));
    if min > bound {
        let base = cost(s.base()).macs;
        return Err(Infeasible { bound, min, ratio: min as f64 / base as f64 });
    }
    let mut w: Vec<usize> = units.iter().zip(s.widths(plan)).map(|(u, w)| u.clamp(w)).collect();
    let mut macs = macs_of(s, &w);
    while macs > bound {
        let mut best: Option<(f64, usize, u64)> = None;
        for (i, u) in units.iter().enumerate() {
            if w[i] <= u.min() {
                continue;
            }
            w[i] -= u.step;
            let m = macs_of(s, &w);
            w[i] += u.step;
            let key = prio.shrink(s, &w, i, macs.saturating_sub(m));
            if best.is_none_or(|(k, _, _)| key < k) {
                best = Some((key, i, m));
            }
        }
        let (_, i, m) = best.expect("the smallest plan fits, so some unit can shrink");
        w[i] -= units[i].step;
        macs = m;
    }
    loop {
        let mut best: Option<(f64, usize, u64)> = None;
        for (i, u) in units.iter().enumerate() {
            if w[i] >= u.full {
                continue;
            }
            w[i] += u.step;
            let m = macs_of(s, &w);
            w[i] -= u.step;
            if m > bound {
                continue;
            }
            let key = prio.grow(s, &w, i, m.saturating_sub(macs));
            if best.is_none_or(|(k, _, _)| key < k) {
                best = Some((key, i, m));
            }
        }
        match best {
            Some((_, i, m)) => {
                w[i] += units[i].step;
                macs = m;
            }
            None => break,
        }
    }
    Ok(plan_of(s, &w))
}

/// Whether `plan` is at most `bound` MACs and no unit can grow one step without exceeding it.
pub fn is_tight(s: &Structure, plan: &Plan, bound: u64) -> bool {
    let mut w = s.widths(plan);
    if macs_of(s, &w) > bound {
        return false;
    }
    for (i, u) in s.units().iter().enumerate() {
        if w[i] < u.full {
            w[i] += u.step;
            let fits = macs_of(s, &w) <= bound;
            w[i] -= u.step;
            if fits {
                return false;
            }
        }
    }
    true
}
