//! Eq. 7-10: SNR per timestep, the FLOPs ratio each schedule gives it, and the groups.

use super::AllocateError;
use super::allocation::{Allocation, Group, SnrSource};
use super::params::{AllocateParams, ClippedSteps, FlopsSchedule};
use crate::schedule::{NoiseSchedule, ScheduleTable};

/// A level within this many group widths of a group boundary counts as on the boundary, so
/// that float noise (e.g. `0.5 * 3.0 / 9.0` against `1.0 / 3.0`) cannot move a timestep whose
/// exact level is `i/N` out of group i-1.
const BOUNDARY_TOLERANCE: f64 = 1e-9;

/// Computes the allocation of paper eq. 7-10 for a diffusion with `steps` timesteps.
///
/// Errors: invalid `params` (see [`AllocateParams::validate`]), a noise schedule whose SNR is not
/// finite (the linear schedule needs T > 20, or its last beta reaches 1), and a group that gets
/// no timesteps (the error names it and the largest group count that leaves none empty).
pub fn allocate(
    schedule: NoiseSchedule,
    steps: usize,
    params: &AllocateParams,
) -> Result<Allocation, AllocateError> {
    if steps == 0 {
        return Err(AllocateError::NoSteps);
    }
    let errors = params.validate(steps, schedule);
    if !errors.is_empty() {
        return Err(AllocateError::InvalidParams(errors));
    }
    // Eq. 7's SNR: the diffusion's own schedule, or the one `snr_schedule`/`snr_steps` name,
    // read at each diffusion timestep's relative position.
    let (snr_schedule, snr_steps) = params.snr_source(schedule, steps);
    let table = ScheduleTable::new(snr_schedule, snr_steps);
    let source_snr = table.snr_db();
    if let Some(s) = source_snr.iter().position(|s| !s.is_finite()) {
        return Err(AllocateError::NonFiniteSnr {
            schedule: snr_schedule,
            steps: snr_steps,
            t: s,
            alpha_bar: table.alphas_cumprod[s],
        });
    }
    let source: Vec<usize> = (0..steps).map(|t| source_step(t, steps, snr_steps)).collect();
    let snr_db: Vec<f64> = source.iter().map(|&s| source_snr[s]).collect();
    let clipped: Vec<bool> = source.iter().map(|&s| table.clipped[s]).collect();
    // Eq. 8's normalisation over the SNR schedule's own timesteps, read the same way.
    let snr_level = || -> Vec<f64> {
        let level = snr_levels(&source_snr, &table.clipped, params.clipped);
        source.iter().map(|&s| level[s]).collect()
    };
    let (n, k) = (params.groups, params.k);

    let (level, flops_ratio) = match params.schedule {
        FlopsSchedule::Snr => {
            let level = snr_level();
            let ratio = level.iter().map(|l| k + (1.0 - k) * l).collect();
            (level, ratio)
        }
        FlopsSchedule::Increasing => {
            let level: Vec<f64> = (0..steps).map(|t| position(t, steps)).collect();
            let ratio = level.iter().map(|l| k + (1.0 - k) * l).collect();
            (level, ratio)
        }
        FlopsSchedule::Decreasing => {
            let level: Vec<f64> = (0..steps).map(|t| 1.0 - position(t, steps)).collect();
            let ratio = level.iter().map(|l| k + (1.0 - k) * l).collect();
            (level, ratio)
        }
        FlopsSchedule::Constant => {
            // The mean group bound of the `snr` schedule, so both have the same average FLOPs.
            let sizes = partition(&snr_level(), n).iter().map(Vec::len).collect::<Vec<_>>();
            let c =
                mean_bound(sizes.iter().enumerate().map(|(i, &len)| (group_bound(i, n, k), len)));
            let level = (0..steps).map(|t| position(t, steps)).collect();
            (level, vec![c; steps])
        }
    };

    let members = partition(&level, n);
    if let Some(index) = members.iter().position(Vec::is_empty) {
        let max_groups = (1..n).rev().find(|&m| partition(&level, m).iter().all(|g| !g.is_empty()));
        return Err(AllocateError::EmptyGroup {
            index,
            groups: n,
            level_lower: index as f64 / n as f64,
            level_upper: (index + 1) as f64 / n as f64,
            max_groups: max_groups.unwrap_or(1),
        });
    }

    let groups: Vec<Group> = members
        .into_iter()
        .enumerate()
        .map(|(i, timesteps)| {
            let (flops_bound, lower_bound) = match params.schedule {
                FlopsSchedule::Constant => (flops_ratio[0], flops_ratio[0]),
                _ => (group_bound(i, n, k), if i == 0 { k } else { group_bound(i - 1, n, k) }),
            };
            let snrs = timesteps.iter().map(|&t| snr_db[t]);
            Group {
                index: i,
                lower_bound,
                flops_bound,
                t_min: timesteps[0],
                t_max: *timesteps.last().unwrap(),
                snr_db_min: snrs.clone().fold(f64::INFINITY, f64::min),
                snr_db_max: snrs.fold(f64::NEG_INFINITY, f64::max),
                timesteps,
            }
        })
        .collect();
    let mean_flops_bound = mean_bound(groups.iter().map(|g| (g.flops_bound, g.timesteps.len())));

    Ok(Allocation {
        steps,
        noise_schedule: schedule,
        flops_schedule: params.schedule,
        k,
        clipped: params.clipped,
        clipped_timesteps: (0..steps).filter(|&t| clipped[t]).collect(),
        snr_source: ((snr_schedule, snr_steps) != (schedule, steps))
            .then_some(SnrSource { schedule: snr_schedule, steps: snr_steps }),
        mean_flops_bound,
        groups,
        snr_db,
        level,
        flops_ratio,
    })
}

/// Eq. 8's `Ratio` in [0, 1]: z-score of -SNR, then min-max, over the timesteps `clipped` says
/// to normalise over; excluded (clipped) timesteps get 1. When the normalised values do not
/// spread (one timestep, or all equal) they all get 0, as the minimum of a min-max does.
fn snr_levels(snr_db: &[f64], clipped: &[bool], policy: ClippedSteps) -> Vec<f64> {
    let normalised: Vec<usize> =
        (0..snr_db.len()).filter(|&t| policy == ClippedSteps::Include || !clipped[t]).collect();
    let mut level = vec![1.0; snr_db.len()];
    if normalised.is_empty() {
        return level;
    }
    let neg: Vec<f64> = normalised.iter().map(|&t| -snr_db[t]).collect();
    let count = neg.len() as f64;
    let mean = neg.iter().sum::<f64>() / count;
    let std = (neg.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / count).sqrt();
    let z: Vec<f64> = neg.iter().map(|x| (x - mean) / std).collect();
    let (lo, hi) =
        z.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    for (&t, &zt) in normalised.iter().zip(&z) {
        level[t] = if std > 0.0 && hi > lo { ((zt - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.0 };
    }
    level
}

/// The timestep-weighted mean of group bounds, from `(bound, timesteps in the group)` pairs.
/// `snr`'s `mean_flops_bound` and `constant`'s level both come from here, so they are equal.
fn mean_bound(groups: impl Iterator<Item = (f64, usize)>) -> f64 {
    let (sum, count) =
        groups.fold((0.0, 0usize), |(sum, count), (b, len)| (sum + b * len as f64, count + len));
    sum / count as f64
}

/// The timestep of an `snr_steps`-step schedule at the relative position of diffusion timestep
/// `t` of `steps`: `round(t (S-1) / (T-1))`, so the first and last timesteps meet; `t` itself
/// when S = T.
fn source_step(t: usize, steps: usize, snr_steps: usize) -> usize {
    if steps == snr_steps {
        return t;
    }
    if steps == 1 {
        return 0;
    }
    // Integer round-half-up of t (S-1) / (T-1).
    let (num, den) = (t as u128 * (snr_steps as u128 - 1), steps as u128 - 1);
    ((2 * num + den) / (2 * den)) as usize
}

/// t / (T-1): 0 at the first timestep, 1 at the last (0 when T = 1).
fn position(t: usize, steps: usize) -> f64 {
    if steps == 1 { 0.0 } else { t as f64 / (steps - 1) as f64 }
}

/// Eq. 9 read with i+1: `FLOPs_g(i) = ((i+1)/N + (N-i-1)/N * k)`, i.e. `k + (1-k)(i+1)/N`, as a
/// fraction of F; the last group's bound is exactly 1.
fn group_bound(i: usize, n: usize, k: f64) -> f64 {
    if i + 1 == n { 1.0 } else { k + (1.0 - k) * (i + 1) as f64 / n as f64 }
}

/// The group whose level interval (i/N, (i+1)/N] holds `level` (level 0 goes to group 0).
fn group_index(level: f64, n: usize) -> usize {
    let x = level * n as f64;
    let nearest = x.round();
    let x = if (x - nearest).abs() <= BOUNDARY_TOLERANCE * n as f64 { nearest } else { x };
    (x.ceil().max(0.0) as usize).saturating_sub(1).min(n - 1)
}

/// The timesteps of each of `n` groups, sorted.
fn partition(level: &[f64], n: usize) -> Vec<Vec<usize>> {
    let mut members = vec![Vec::new(); n];
    for (t, &l) in level.iter().enumerate() {
        members[group_index(l, n)].push(t);
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        groups: usize,
        k: f64,
        schedule: FlopsSchedule,
        clipped: ClippedSteps,
    ) -> AllocateParams {
        AllocateParams { groups, k, schedule, clipped, ..AllocateParams::default() }
    }

    fn snr_from(
        schedule: NoiseSchedule,
        steps: Option<usize>,
        p: AllocateParams,
    ) -> AllocateParams {
        AllocateParams { snr_schedule: Some(schedule), snr_steps: steps, ..p }
    }

    fn snr_params(groups: usize, k: f64) -> AllocateParams {
        params(groups, k, FlopsSchedule::Snr, ClippedSteps::Exclude)
    }

    fn timesteps(a: &Allocation) -> Vec<Vec<usize>> {
        a.groups.iter().map(|g| g.timesteps.clone()).collect()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Every timestep is in exactly one group, and eq. 10's interval test holds in FLOPs
    /// (for k < 1): `lower_bound < flops_ratio(t) <= flops_bound`, group 0 closed at k.
    fn assert_partition(a: &Allocation) {
        a.check().unwrap();
        let mut count = vec![0; a.steps];
        for g in &a.groups {
            for &t in &g.timesteps {
                count[t] += 1;
                assert_eq!(a.group_of(t), g.index);
                if a.k < 1.0 && a.flops_schedule != FlopsSchedule::Constant {
                    let r = a.flops_ratio[t];
                    let tol = 1e-9;
                    assert!(r <= g.flops_bound + tol, "t={t} ratio {r} > bound {}", g.flops_bound);
                    if g.index == 0 {
                        assert!(r >= a.k - tol);
                    } else {
                        assert!(r > g.lower_bound - tol, "t={t} ratio {r} <= {}", g.lower_bound);
                    }
                }
            }
        }
        assert!(count.iter().all(|&c| c == 1), "{count:?}");
    }

    #[test]
    fn linear_t25_n3_matches_hand_computation() {
        // Eq. 7-10 by hand for linear T=25, N=3, k=0.5. Linear betas are scaled by 1000/T = 40:
        // linspace(0.004, 0.8, 25).
        let steps = 25;
        let betas: Vec<f64> = (0..steps).map(|i| 0.004 + (0.8 - 0.004) * i as f64 / 24.0).collect();
        let mut alpha_bar = Vec::new();
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alpha_bar.push(acc);
        }
        let snr: Vec<f64> = alpha_bar.iter().map(|a| 10.0 * (a / (1.0 - a)).log10()).collect();
        // The same values from an independent numpy-free Python computation (4 decimals).
        assert!(close(snr[0], 23.9620, 5e-5) && close(snr[12], -13.3122, 5e-5));
        assert!(close(snr[24], -66.1559, 5e-5));
        // SNR falls monotonically, so min(-SNR) is at t=0 and max(-SNR) at t=24, and
        // Ratio(t) = (SNR(0) - SNR(t)) / (SNR(0) - SNR(24)).
        let ratio: Vec<f64> = snr.iter().map(|s| (snr[0] - s) / (snr[0] - snr[24])).collect();
        // Eq. 9 (i+1 reading): bounds 0.5 + 0.5 * (i+1)/3 = 2/3, 5/6, 1.
        // Eq. 10: group 0 holds Ratio <= 1/3, group 1 holds 1/3 < Ratio <= 2/3, group 2 the rest.
        // Ratio(8) = 0.3176, Ratio(9) = 0.3397, Ratio(18) = 0.6289, Ratio(19) = 0.6774.
        assert!(ratio[8] <= 1.0 / 3.0 && ratio[9] > 1.0 / 3.0);
        assert!(ratio[18] <= 2.0 / 3.0 && ratio[19] > 2.0 / 3.0);

        let a = allocate(NoiseSchedule::Linear, steps, &snr_params(3, 0.5)).unwrap();
        for t in 0..steps {
            assert!(close(a.snr_db[t], snr[t], 1e-9), "t={t}");
            assert!(close(a.level[t], ratio[t], 1e-12), "t={t}");
            assert!(close(a.flops_ratio[t], 0.5 + 0.5 * ratio[t], 1e-12), "t={t}");
        }
        assert_eq!(
            timesteps(&a),
            vec![(0..=8).collect::<Vec<_>>(), (9..=18).collect(), (19..=24).collect()]
        );
        let bounds: Vec<f64> = a.groups.iter().map(|g| g.flops_bound).collect();
        assert!(close(bounds[0], 2.0 / 3.0, 1e-15) && close(bounds[1], 5.0 / 6.0, 1e-15));
        assert_eq!(bounds[2], 1.0);
        let lowers: Vec<f64> = a.groups.iter().map(|g| g.lower_bound).collect();
        assert_eq!(lowers[0], 0.5);
        assert_eq!((lowers[1], lowers[2]), (bounds[0], bounds[1]));
        assert_eq!((a.groups[1].t_min, a.groups[1].t_max), (9, 18));
        assert!(close(a.groups[1].snr_db_max, snr[9], 1e-9));
        assert!(close(a.groups[1].snr_db_min, snr[18], 1e-9));
        // Mean bound: (9 * 2/3 + 10 * 5/6 + 6 * 1) / 25.
        assert!(close(
            a.mean_flops_bound,
            (9.0 * 2.0 / 3.0 + 10.0 * 5.0 / 6.0 + 6.0) / 25.0,
            1e-12
        ));
        assert_partition(&a);
    }

    #[test]
    fn z_score_is_affine_so_ratio_is_min_max_of_negative_snr() {
        for (schedule, steps) in [(NoiseSchedule::Linear, 1000), (NoiseSchedule::Cosine, 4000)] {
            let p = params(1, 0.5, FlopsSchedule::Snr, ClippedSteps::Include);
            let a = allocate(schedule, steps, &p).unwrap();
            let neg: Vec<f64> = a.snr_db.iter().map(|s| -s).collect();
            let lo = neg.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = neg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            for (t, (&level, &x)) in a.level.iter().zip(&neg).enumerate() {
                assert!(close(level, (x - lo) / (hi - lo), 1e-12), "t={t}");
            }
            assert_eq!(a.level[0], 0.0);
            assert_eq!(a.flops_ratio[0], 0.5);
            assert_eq!(a.flops_ratio[steps - 1], 1.0);
        }
    }

    #[test]
    fn cosine_t10_clipped_endpoint_both_ways() {
        // Cosine T=10 clips beta at t=9 (SNR -46.18 dB against -16.08 dB at t=8).
        // Exclude: normalise over t=0..8, t=9 gets 1; levels (Python, 4 decimals)
        // 0, .1886, .3095, .4058, .4930, .5806, .6781, .8019, 1, 1.
        let ex = allocate(NoiseSchedule::Cosine, 10, &snr_params(3, 0.5)).unwrap();
        assert_eq!(ex.clipped_timesteps, vec![9]);
        assert!(close(ex.snr_db[8], -16.0754, 5e-5) && close(ex.snr_db[9], -46.1812, 5e-5));
        assert!(close(ex.level[1], 0.1886, 5e-5) && close(ex.level[7], 0.8019, 5e-5));
        assert_eq!((ex.level[8], ex.level[9]), (1.0, 1.0));
        assert_eq!(timesteps(&ex), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8, 9]]);
        assert_partition(&ex);
        // Include: eq. 8 literally; t=9 alone at 1, the rest squeezed into [0, 0.5113].
        let p = params(3, 0.5, FlopsSchedule::Snr, ClippedSteps::Include);
        let inc = allocate(NoiseSchedule::Cosine, 10, &p).unwrap();
        assert!(close(inc.level[8], 0.5113, 5e-5) && close(inc.level[5], 0.2968, 5e-5));
        assert_eq!(timesteps(&inc), vec![(0..=5).collect::<Vec<_>>(), vec![6, 7, 8], vec![9]]);
        assert_partition(&inc);
    }

    #[test]
    fn cosine_t4000_clipped_endpoint_both_ways() {
        // Exclude (default): t=3998 (-68.19 dB) is the normalisation's maximum, so it gets
        // ratio 1 like the clipped t=3999.
        let ex = allocate(NoiseSchedule::Cosine, 4000, &snr_params(10, 0.5)).unwrap();
        assert_eq!(ex.clipped_timesteps, vec![3999]);
        assert_eq!((ex.flops_ratio[3998], ex.flops_ratio[3999]), (1.0, 1.0));
        assert_eq!(ex.flops_ratio[0], 0.5);
        let sizes: Vec<usize> = ex.groups.iter().map(|g| g.timesteps.len()).collect();
        assert_eq!(sizes, vec![12, 82, 348, 1141, 1547, 638, 172, 44, 12, 4]);
        assert_eq!(ex.groups[9].timesteps, vec![3996, 3997, 3998, 3999]);
        assert!(close(ex.mean_flops_bound, 0.7381375, 1e-9), "{}", ex.mean_flops_bound);
        assert_partition(&ex);

        // Include: min-max over all 4000 steps; t=3998's ratio drops to
        // 0.5 + 0.5 * (68.19 + 50.06) / (98.19 + 50.06) ~ 0.899, so no timestep falls in
        // group 8's (0.9, 0.95] and N=10 fails; one group always works.
        let include = |groups| params(groups, 0.5, FlopsSchedule::Snr, ClippedSteps::Include);
        let inc = allocate(NoiseSchedule::Cosine, 4000, &include(1)).unwrap();
        let (s0, s3998, s3999) = (inc.snr_db[0], inc.snr_db[3998], inc.snr_db[3999]);
        assert!(close(inc.flops_ratio[3998], 0.5 + 0.5 * (s0 - s3998) / (s0 - s3999), 1e-12));
        assert!(close(inc.flops_ratio[3998], 0.5 + 0.5 * 118.25 / 148.25, 1e-4));
        assert_eq!(inc.flops_ratio[3999], 1.0);
        let err = allocate(NoiseSchedule::Cosine, 4000, &include(10)).unwrap_err();
        let AllocateError::EmptyGroup { index, groups, max_groups, .. } = err else {
            panic!("{err}")
        };
        assert_eq!((index, groups), (8, 10));
        let inc = allocate(NoiseSchedule::Cosine, 4000, &include(max_groups)).unwrap();
        assert_partition(&inc);
        assert!(allocate(NoiseSchedule::Cosine, 4000, &include(max_groups + 1)).is_err());
        // Excluding the endpoint spreads the other timesteps over the whole range: more of
        // them get large ratios than under `include`.
        let hard = |a: &Allocation| a.flops_ratio.iter().filter(|&&r| r > 0.75).count();
        assert!(hard(&ex) > hard(&inc) + 500, "{} vs {}", hard(&ex), hard(&inc));
    }

    #[test]
    fn eq9_as_printed_leaves_the_top_interval_unassigned() {
        // Printed: FLOPs_g(i) = i/N + (N-i)/N * k for 0 <= i < N: bounds k, ..., k + (1-k)(N-1)/N.
        let (n, k) = (10, 0.5);
        let printed: Vec<f64> =
            (0..n).map(|i| i as f64 / 10.0 + (10 - i) as f64 / 10.0 * k).collect();
        assert_eq!(printed[0], k);
        assert!(close(printed[9], 0.95, 1e-15));
        // With eq. 10 the hardest timesteps (ratio in (0.95, 1]) would get no group: on cosine
        // T=4000 that is 4 timesteps (3996..=3999), on linear T=1000, 101.
        let a = allocate(NoiseSchedule::Cosine, 4000, &snr_params(n, k)).unwrap();
        let orphans = a.flops_ratio.iter().filter(|&&r| r > printed[9]).count();
        assert_eq!(orphans, 4);
        // The i+1 reading shifts every bound up one step, ending at F, and every timestep is in
        // exactly one group.
        for (i, g) in a.groups.iter().enumerate() {
            let expected = if i == 9 { 1.0 } else { printed[i] + (1.0 - k) / 10.0 };
            assert!(close(g.flops_bound, expected, 1e-15), "group {i}");
        }
        assert_eq!(a.groups[9].flops_bound, 1.0);
        assert_partition(&a);
        let lin = allocate(NoiseSchedule::Linear, 1000, &snr_params(n, k)).unwrap();
        assert_eq!(lin.flops_ratio.iter().filter(|&&r| r > printed[9]).count(), 101);
        assert_eq!(lin.groups[9].timesteps.len(), 101);
        assert_partition(&lin);
    }

    #[test]
    fn k_one_keeps_the_base_model_and_still_splits_by_snr() {
        let a = allocate(NoiseSchedule::Cosine, 4000, &snr_params(10, 1.0)).unwrap();
        assert!(a.flops_ratio.iter().all(|&r| r == 1.0));
        assert!(a.groups.iter().all(|g| g.flops_bound == 1.0 && g.lower_bound == 1.0));
        assert_eq!(a.mean_flops_bound, 1.0);
        // Same timestep sets as k = 0.5: grouping follows the normalised SNR, not k.
        let half = allocate(NoiseSchedule::Cosine, 4000, &snr_params(10, 0.5)).unwrap();
        assert_eq!(timesteps(&a), timesteps(&half));
        assert_partition(&a);
    }

    #[test]
    fn one_group_holds_everything_at_f() {
        for schedule in [FlopsSchedule::Snr, FlopsSchedule::Increasing, FlopsSchedule::Decreasing] {
            let a = allocate(
                NoiseSchedule::Linear,
                1000,
                &params(1, 0.5, schedule, ClippedSteps::Exclude),
            )
            .unwrap();
            assert_eq!(timesteps(&a), vec![(0..1000).collect::<Vec<_>>()]);
            assert_eq!((a.groups[0].lower_bound, a.groups[0].flops_bound), (0.5, 1.0));
            assert_eq!(a.mean_flops_bound, 1.0);
        }
        // Constant with one group: the `snr` schedule's mean bound is 1, so constant is 1 too.
        let p = params(1, 0.5, FlopsSchedule::Constant, ClippedSteps::Exclude);
        let c = allocate(NoiseSchedule::Linear, 1000, &p).unwrap();
        assert_eq!(c.groups[0].flops_bound, 1.0);
    }

    #[test]
    fn groups_equal_to_steps() {
        // Linear in t: one timestep per group, group i = {i} (level i/9 sits on boundary
        // interval (i/10, (i+1)/10] because 0.9i < i <= 0.9(i+1)).
        for schedule in [FlopsSchedule::Increasing, FlopsSchedule::Constant] {
            let p = params(10, 0.5, schedule, ClippedSteps::Exclude);
            let a = allocate(NoiseSchedule::Cosine, 10, &p).unwrap();
            assert_eq!(timesteps(&a), (0..10).map(|t| vec![t]).collect::<Vec<_>>());
            assert_partition(&a);
        }
        let p = params(10, 0.5, FlopsSchedule::Decreasing, ClippedSteps::Exclude);
        let a = allocate(NoiseSchedule::Cosine, 10, &p).unwrap();
        assert_eq!(timesteps(&a), (0..10).rev().map(|t| vec![t]).collect::<Vec<_>>());
        // SNR: T=2 linear is degenerate (beta 10 > 1); T=21 linear, cosine T=2 work.
        let a = allocate(NoiseSchedule::Cosine, 2, &snr_params(2, 0.5)).unwrap();
        assert_eq!(timesteps(&a), vec![vec![0], vec![1]]);
        assert_eq!(a.flops_ratio, vec![0.5, 1.0]);
        // The SNR of cosine T=10 is not spread evenly enough for 10 non-empty groups.
        let err = allocate(NoiseSchedule::Cosine, 10, &snr_params(10, 0.5)).unwrap_err();
        assert!(matches!(err, AllocateError::EmptyGroup { .. }), "{err}");
    }

    #[test]
    fn ablation_schedules() {
        let (steps, n, k) = (4000, 10, 0.5);
        let run = |s| {
            allocate(NoiseSchedule::Cosine, steps, &params(n, k, s, ClippedSteps::Exclude)).unwrap()
        };
        let snr = run(FlopsSchedule::Snr);
        let inc = run(FlopsSchedule::Increasing);
        let dec = run(FlopsSchedule::Decreasing);
        let con = run(FlopsSchedule::Constant);
        for a in [&inc, &dec, &con] {
            assert_partition(a);
        }
        // Increasing: ratio k + (1-k) t/(T-1), 10 contiguous groups of 400 in time order.
        assert_eq!((inc.flops_ratio[0], inc.flops_ratio[steps - 1]), (0.5, 1.0));
        assert!(close(inc.flops_ratio[1999], 0.5 + 0.5 * 1999.0 / 3999.0, 1e-15));
        let chunks: Vec<Vec<usize>> = (0..n).map(|i| (400 * i..400 * (i + 1)).collect()).collect();
        assert_eq!(timesteps(&inc), chunks);
        // Decreasing: the mirror image; group 0 (bound 0.55) is the last 400 timesteps.
        assert_eq!((dec.flops_ratio[0], dec.flops_ratio[steps - 1]), (1.0, 0.5));
        let mirrored: Vec<Vec<usize>> = chunks.iter().rev().cloned().collect();
        assert_eq!(timesteps(&dec), mirrored);
        assert_eq!(dec.groups[0].t_min, 3600);
        for (a, b) in inc.groups.iter().zip(&dec.groups) {
            assert_eq!(a.flops_bound, b.flops_bound);
        }
        // Both average (1/N) sum_i (k + (1-k)(i+1)/N) = k + (1-k)(N+1)/(2N) = 0.775.
        assert!(close(inc.mean_flops_bound, 0.775, 1e-12));
        assert!(close(dec.mean_flops_bound, 0.775, 1e-12));
        // Constant: one level, the snr schedule's mean bound (0.7381375 here), in the same
        // 400-step chunks as increasing.
        assert!(con.flops_ratio.iter().all(|&r| r == snr.mean_flops_bound));
        assert!(close(con.mean_flops_bound, snr.mean_flops_bound, 1e-12));
        assert!(con.groups.iter().all(|g| g.flops_bound == snr.mean_flops_bound));
        assert_eq!(timesteps(&con), chunks);
    }

    #[test]
    fn empty_group_names_the_group_and_a_group_count_that_works() {
        let err = allocate(NoiseSchedule::Cosine, 4000, &snr_params(100, 0.5)).unwrap_err();
        let AllocateError::EmptyGroup { index, groups, max_groups, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*groups, 100);
        assert!(*max_groups < 100);
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("group {index} of 100 gets no timesteps")), "{msg}");
        assert!(
            msg.contains(&format!("\nhint: use fewer groups; at most `groups: {max_groups}`")),
            "{msg}"
        );
        assert!(allocate(NoiseSchedule::Cosine, 4000, &snr_params(*max_groups, 0.5)).is_ok());
    }

    #[test]
    fn rejects_invalid_params_and_degenerate_schedules() {
        let err = allocate(NoiseSchedule::Cosine, 100, &snr_params(10, 1.5)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `snr-allocate` parameters: `k` must be in (0, 1], got 1.5"
        );
        assert!(matches!(
            allocate(NoiseSchedule::Cosine, 0, &snr_params(1, 0.5)),
            Err(AllocateError::NoSteps)
        ));
        // Linear betas end at 20/T: T=10 ends at 2, alpha_bar goes negative.
        let err = allocate(NoiseSchedule::Linear, 10, &snr_params(3, 0.5)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the linear schedule with 10 steps has no finite SNR at t = "),
            "{msg}"
        );
        assert!(msg.ends_with(
            "hint: the linear schedule's last beta is 20/T, so it needs more than 20 steps"
        ));
        assert!(allocate(NoiseSchedule::Linear, 20, &snr_params(3, 0.5)).is_err());
        assert!(allocate(NoiseSchedule::Linear, 21, &snr_params(3, 0.5)).is_ok());
    }

    #[test]
    fn single_timestep() {
        // Linear T=1: one unclipped timestep, no spread: level 0, ratio k, bound F.
        let a = allocate(NoiseSchedule::Linear, 1, &snr_params(1, 0.5)).unwrap();
        assert_eq!((a.level.clone(), a.flops_ratio.clone()), (vec![0.0], vec![0.5]));
        assert_eq!(a.groups[0].timesteps, vec![0]);
        // Cosine T=1 clips its only beta: excluded, so ratio 1.
        let a = allocate(NoiseSchedule::Cosine, 1, &snr_params(1, 0.5)).unwrap();
        assert_eq!((a.clipped_timesteps.clone(), a.flops_ratio.clone()), (vec![0], vec![1.0]));
    }

    /// Issue 14: a linear-schedule SNR on a cosine diffusion gives the linear curve's groups.
    #[test]
    fn linear_snr_on_a_cosine_diffusion_gives_the_linear_groups() {
        // Same T: exactly the allocation of a linear diffusion, only `noise_schedule` (the
        // diffusion's) and `snr_source` differ.
        for (steps, n) in [(25, 3), (1000, 10), (4000, 10)] {
            let p = snr_from(NoiseSchedule::Linear, None, snr_params(n, 0.5));
            let on_cosine = allocate(NoiseSchedule::Cosine, steps, &p).unwrap();
            let linear = allocate(NoiseSchedule::Linear, steps, &snr_params(n, 0.5)).unwrap();
            assert_eq!(on_cosine.noise_schedule, NoiseSchedule::Cosine);
            assert_eq!(
                on_cosine.snr_source,
                Some(SnrSource { schedule: NoiseSchedule::Linear, steps })
            );
            assert_eq!(linear.snr_source, None);
            assert_eq!(timesteps(&on_cosine), timesteps(&linear), "T={steps}");
            assert_eq!(on_cosine.snr_db, linear.snr_db);
            assert_eq!(on_cosine.flops_ratio, linear.flops_ratio);
            assert_eq!(on_cosine.mean_flops_bound, linear.mean_flops_bound);
            // The linear schedule clips nothing: the cosine endpoint is not excluded any more.
            assert!(on_cosine.clipped_timesteps.is_empty());
            assert_partition(&on_cosine);
        }
        // The hand-computed linear T=25 groups ({0..=8}, {9..=18}, {19..=24}, see
        // `linear_t25_n3_matches_hand_computation`) stretched over a cosine T=40 diffusion:
        // t reads s = round(24 t / 39), so s <= 8 is t <= 13 (24 * 13 / 39 = 8) and s <= 18 is
        // t <= 30 (24 * 30 / 39 = 18.46; t = 31 gives 19.08).
        let p = snr_from(NoiseSchedule::Linear, Some(25), snr_params(3, 0.5));
        let a = allocate(NoiseSchedule::Cosine, 40, &p).unwrap();
        assert_eq!(
            timesteps(&a),
            vec![(0..=13).collect::<Vec<_>>(), (14..=30).collect(), (31..=39).collect()]
        );
        let linear = allocate(NoiseSchedule::Linear, 25, &snr_params(3, 0.5)).unwrap();
        for t in 0..40 {
            let s = source_step(t, 40, 25);
            assert_eq!(a.snr_db[t], linear.snr_db[s], "t={t}");
            assert_eq!(a.flops_ratio[t], linear.flops_ratio[s], "t={t}");
        }
        assert_eq!((source_step(0, 40, 25), source_step(39, 40, 25)), (0, 24));
        assert_eq!(a.snr_source, Some(SnrSource { schedule: NoiseSchedule::Linear, steps: 25 }));
        assert_partition(&a);
    }

    #[test]
    fn snr_readings_of_the_papers_setting() {
        // T = 4000 cosine, k = 0.5, N = 10: the mean group bound of each reading (the cosine one
        // is pinned above), and the Table 1 FLOPs it implies for a model pruned to its bounds.
        let base = snr_params(10, 0.5);
        let mean =
            |p: &AllocateParams| allocate(NoiseSchedule::Cosine, 4000, p).unwrap().mean_flops_bound;
        let cosine = mean(&base);
        let linear_4000 = mean(&snr_from(NoiseSchedule::Linear, None, base.clone()));
        let linear_1000 = mean(&snr_from(NoiseSchedule::Linear, Some(1000), base.clone()));
        assert!(close(cosine, 0.7381375, 1e-9), "{cosine}");
        assert!(close(linear_4000, 0.8459, 5e-5), "{linear_4000}");
        assert!(close(linear_1000, 0.8328, 5e-5), "{linear_1000}");
        // A cosine SNR with fewer steps clips the timesteps that read its last one.
        let p = snr_from(NoiseSchedule::Cosine, Some(1000), base);
        let a = allocate(NoiseSchedule::Cosine, 4000, &p).unwrap();
        assert_eq!(a.clipped_timesteps, vec![3997, 3998, 3999]);
        assert_eq!(a.flops_ratio[3997..], [1.0, 1.0, 1.0]);
        assert_partition(&a);
    }

    #[test]
    fn source_step_rounds_to_the_same_relative_position() {
        assert_eq!((0..5).map(|t| source_step(t, 5, 5)).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        // 4000 -> 1000: 999 t / 3999; t = 2 gives 0.4996 -> 0, t = 3 gives 0.749 -> 1.
        let s: Vec<usize> = (0..6).map(|t| source_step(t, 4000, 1000)).collect();
        assert_eq!(s, [0, 0, 0, 1, 1, 1]);
        assert_eq!(source_step(3999, 4000, 1000), 999);
        // 1000 -> 4000: every fourth-ish step; ends meet.
        assert_eq!(source_step(1, 1000, 4000), 4);
        assert_eq!(source_step(999, 1000, 4000), 3999);
        assert_eq!(source_step(0, 1, 7), 0);
    }

    #[test]
    fn group_index_snaps_to_boundaries() {
        assert_eq!(group_index(0.0, 3), 0);
        assert_eq!(group_index(1.0 / 3.0, 3), 0);
        assert_eq!(group_index(1.0 / 3.0 + 1e-6, 3), 1);
        // 0.1 * 3 = 0.30000000000000004: on the boundary between groups 2 and 3 of 10.
        assert_eq!(group_index(0.1 * 3.0, 10), 2);
        assert_eq!(group_index(1.0, 10), 9);
        // Linear in t with T-1 a multiple of N puts the boundary timesteps exactly on i/N.
        let p = params(3, 0.5, FlopsSchedule::Increasing, ClippedSteps::Exclude);
        let a = allocate(NoiseSchedule::Cosine, 10, &p).unwrap();
        assert_eq!(timesteps(&a), vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]);
    }
}
