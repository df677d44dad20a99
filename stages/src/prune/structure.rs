//! The prunable structure of an IDDPM UNet: its units, the weight slices each unit owns, and how
//! a [`Plan`] (kept width per unit) turns a checkpoint into a smaller one of the same family.
//!
//! Three unit kinds ([`UnitKind`]):
//!
//! - `hidden`: a ResBlock's hidden channels — `in_layers.2` rows, the `emb_layers.1` rows `c`
//!   and `c + hidden` (scale and shift), `out_layers.0` (GroupNorm) and `out_layers.3` columns;
//! - `heads`: an attention block's heads — head `i`'s `3 d` rows of `qkv` (its q, k and v are
//!   contiguous) and its `d` input columns of `proj_out`;
//! - `stream`: a residual-stream width, tied across everything that reads or writes it: the
//!   producer's output rows (the input conv, a Downsample/Upsample conv, a ResBlock with a 1x1
//!   skip), every identity-skip ResBlock and attention block on it (input and output), and every
//!   reader's input columns — including its slice of an up-path ResBlock's `cat([h, skip])`.
//!
//! **Granularity.** GroupNorm has 32 groups and every width it sees must stay a multiple of 32,
//! so `hidden` and `stream` units keep the same number of channels in every GroupNorm group: the
//! kept width moves in steps of 32 (one channel per group), from 32 to the full width, and a
//! group's channels stay together, so the pruned GroupNorm normalises subsets of the original
//! groups. (In an up-path ResBlock's GroupNorm over `cat([h, skip])` the groups straddle the two
//! streams; when the two shrink by different fractions, that GroupNorm regroups its channels —
//! an approximation fine-tuning absorbs.) `heads` move in steps of one head, at least one.
//!
//! Which channels go is decided by per-channel importance scores ([`Scores`]); with every unit at
//! full width [`Structure::apply`] returns the same tensors, so the model is unchanged exactly.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::unet::{GROUPS, LayerArch, UNetArch};

/// What a unit's width counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    /// A ResBlock's hidden channels.
    Hidden,
    /// An attention block's heads.
    Heads,
    /// A residual-stream width.
    Stream,
}

/// One prunable unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// `input_blocks.1.0.hidden`, `middle_block.1.heads`, `input_blocks.0.0.stream` (a stream is
    /// named after the layer that writes it).
    pub name: String,
    /// What the width counts.
    pub kind: UnitKind,
    /// Width in the base model (channels or heads).
    pub full: usize,
    /// Granularity: widths are multiples of this (32 for channels, 1 for heads).
    pub step: usize,
    /// Channels per head (`heads` units), else 1.
    pub block: usize,
}

impl Unit {
    /// The smallest width the unit may keep.
    pub fn min(&self) -> usize {
        self.step
    }

    /// `w` rounded down to the unit's granularity and clamped to `[min, full]`.
    pub fn clamp(&self, w: usize) -> usize {
        (w / self.step * self.step).clamp(self.min(), self.full)
    }
}

/// Kept width per unit, by unit name. Units left out keep their full width.
pub type Plan = BTreeMap<String, usize>;

/// Where a unit lives in one parameter: along `dim`, unit element `c` owns the indices
/// `offset + c * block .. offset + (c + 1) * block`.
#[derive(Clone, Debug)]
struct Slot {
    unit: usize,
    param: String,
    dim: usize,
    offset: usize,
    block: usize,
}

/// Per-unit importance of each element (channel or head), higher is more important.
pub type Scores = Vec<Vec<f64>>;

/// The units of a base architecture and the slices they own.
#[derive(Clone, Debug)]
pub struct Structure {
    base: UNetArch,
    units: Vec<Unit>,
    slots: Vec<Slot>,
    /// Per layer (module order): the streams it reads (concatenated) and the stream it writes.
    layer_streams: Vec<(Vec<usize>, usize)>,
    /// The stream `out` reads.
    out_stream: usize,
}

/// Along one dimension of one parameter: which indices some unit covers, and which it keeps.
type Masks = (Vec<bool>, Vec<bool>);

/// The image input: a stream that is not a unit.
const IMAGE: usize = usize::MAX;

impl Structure {
    /// Finds the units of `base` (normally an unpruned architecture, but any valid one works).
    pub fn new(base: &UNetArch) -> Structure {
        let mut s = Structure {
            base: base.clone(),
            units: Vec::new(),
            slots: Vec::new(),
            layer_streams: Vec::new(),
            out_stream: IMAGE,
        };
        let scale_shift = base.config.use_scale_shift_norm;
        let mut w = IMAGE;
        let mut skips = Vec::new();
        let n_in: usize = base.input_blocks.iter().map(Vec::len).sum();
        let n_mid = base.middle_block.len();
        let mut block_ends = Vec::new(); // layer index at the end of each input block
        let mut k = 0;
        for b in &base.input_blocks {
            k += b.len();
            block_ends.push(k);
        }
        let mut up_first = BTreeSet::new(); // first layer of each output block
        let mut k = n_in + n_mid;
        for b in &base.output_blocks {
            up_first.insert(k);
            k += b.len();
        }
        for (li, (path, layer)) in base.layers().into_iter().enumerate() {
            let mut reads = vec![w];
            if up_first.contains(&li) {
                reads.push(skips.pop().expect("one skip per output block"));
            }
            let new_stream = |s: &mut Structure, full: usize| {
                s.push_unit(format!("{path}.stream"), UnitKind::Stream, full, GROUPS, 1)
            };
            let writes = match layer {
                LayerArch::Conv(c) => {
                    let o = new_stream(&mut s, c.out_ch);
                    s.conv(&path, &reads, o);
                    o
                }
                LayerArch::Downsample(c) | LayerArch::Upsample(c) => {
                    let o = new_stream(&mut s, c.out_ch);
                    let p = if layer.kind() == "downsample" { "op" } else { "conv" };
                    s.conv(&format!("{path}.{p}"), &reads, o);
                    o
                }
                LayerArch::Res(r) => {
                    let o = if r.skip_conv { new_stream(&mut s, r.out_ch) } else { reads[0] };
                    let h = s.push_unit(
                        format!("{path}.hidden"),
                        UnitKind::Hidden,
                        r.hidden,
                        GROUPS,
                        1,
                    );
                    s.norm(&format!("{path}.in_layers.0"), &reads);
                    s.slot(h, &format!("{path}.in_layers.2.weight"), 0, 0, 1);
                    s.slot(h, &format!("{path}.in_layers.2.bias"), 0, 0, 1);
                    s.columns(&format!("{path}.in_layers.2.weight"), &reads);
                    for half in 0..if scale_shift { 2 } else { 1 } {
                        for p in ["weight", "bias"] {
                            s.slot(h, &format!("{path}.emb_layers.1.{p}"), 0, half * r.hidden, 1);
                        }
                    }
                    s.slot(h, &format!("{path}.out_layers.0.weight"), 0, 0, 1);
                    s.slot(h, &format!("{path}.out_layers.0.bias"), 0, 0, 1);
                    s.slot(h, &format!("{path}.out_layers.3.weight"), 1, 0, 1);
                    s.rows(&format!("{path}.out_layers.3"), o);
                    if r.skip_conv {
                        s.conv(&format!("{path}.skip_connection"), &reads, o);
                    }
                    o
                }
                LayerArch::Attention(a) => {
                    let o = reads[0];
                    let h = s.push_unit(
                        format!("{path}.heads"),
                        UnitKind::Heads,
                        a.heads,
                        1,
                        a.head_dim,
                    );
                    s.norm(&format!("{path}.norm"), &reads);
                    s.columns(&format!("{path}.qkv.weight"), &reads);
                    s.slot(h, &format!("{path}.qkv.weight"), 0, 0, 3 * a.head_dim);
                    s.slot(h, &format!("{path}.qkv.bias"), 0, 0, 3 * a.head_dim);
                    s.slot(h, &format!("{path}.proj_out.weight"), 1, 0, a.head_dim);
                    s.rows(&format!("{path}.proj_out"), o);
                    o
                }
            };
            s.layer_streams.push((reads, writes));
            w = writes;
            if block_ends.contains(&(li + 1)) {
                skips.push(w);
            }
        }
        s.norm("out.0", &[w]);
        s.columns("out.2.weight", &[w]);
        s.out_stream = w;
        s
    }

    fn push_unit(
        &mut self,
        name: String,
        kind: UnitKind,
        full: usize,
        step: usize,
        block: usize,
    ) -> usize {
        self.units.push(Unit { name, kind, full, step, block });
        self.units.len() - 1
    }

    fn slot(&mut self, unit: usize, param: &str, dim: usize, offset: usize, block: usize) {
        if unit != IMAGE {
            self.slots.push(Slot { unit, param: param.to_string(), dim, offset, block });
        }
    }

    fn stream_width(&self, s: usize) -> usize {
        if s == IMAGE { self.base.config.in_channels } else { self.units[s].full }
    }

    /// Input columns (dim 1) of `param` over the concatenated streams `reads`.
    fn columns(&mut self, param: &str, reads: &[usize]) {
        let mut off = 0;
        for &r in reads {
            self.slot(r, param, 1, off, 1);
            off += self.stream_width(r);
        }
    }

    /// A GroupNorm's weight and bias over the concatenated streams `reads`.
    fn norm(&mut self, prefix: &str, reads: &[usize]) {
        let mut off = 0;
        for &r in reads {
            self.slot(r, &format!("{prefix}.weight"), 0, off, 1);
            self.slot(r, &format!("{prefix}.bias"), 0, off, 1);
            off += self.stream_width(r);
        }
    }

    /// Output rows of the conv `prefix` (weight and bias) into stream `o`.
    fn rows(&mut self, prefix: &str, o: usize) {
        self.slot(o, &format!("{prefix}.weight"), 0, 0, 1);
        self.slot(o, &format!("{prefix}.bias"), 0, 0, 1);
    }

    fn conv(&mut self, prefix: &str, reads: &[usize], o: usize) {
        self.columns(&format!("{prefix}.weight"), reads);
        self.rows(prefix, o);
    }

    /// The base architecture.
    pub fn base(&self) -> &UNetArch {
        &self.base
    }

    /// The units, in module order of the layer that owns them.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// The index of the unit named `name`.
    pub fn unit_index(&self, name: &str) -> Option<usize> {
        self.units.iter().position(|u| u.name == name)
    }

    /// The plan that keeps everything.
    pub fn full_plan(&self) -> Plan {
        self.units.iter().map(|u| (u.name.clone(), u.full)).collect()
    }

    /// Kept width per unit index, from `plan` (full where absent).
    pub fn widths(&self, plan: &Plan) -> Vec<usize> {
        self.units.iter().map(|u| plan.get(&u.name).copied().unwrap_or(u.full)).collect()
    }

    /// What is wrong with `plan`: unknown units, widths off the granularity or out of range.
    pub fn check(&self, plan: &Plan) -> Result<(), String> {
        let mut issues = Vec::new();
        for (name, &w) in plan {
            match self.unit_index(name) {
                None => issues.push(format!("unknown unit `{name}`")),
                Some(i) => {
                    let u = &self.units[i];
                    if w < u.min() || w > u.full || w % u.step != 0 {
                        issues.push(format!(
                            "`{name}` keeps {w}, expected a multiple of {} in [{}, {}]",
                            u.step,
                            u.min(),
                            u.full
                        ));
                    }
                }
            }
        }
        if issues.is_empty() { Ok(()) } else { Err(issues.join("; ")) }
    }

    /// The architecture `plan` gives (the plan must pass [`Structure::check`]).
    pub fn arch_for(&self, plan: &Plan) -> UNetArch {
        let widths = self.widths(plan);
        let sw = |s: usize| if s == IMAGE { self.base.config.in_channels } else { widths[s] };
        let mut arch = self.base.clone();
        let layers = arch.layers_mut();
        for ((path, layer), (reads, writes)) in layers.into_iter().zip(&self.layer_streams) {
            let in_ch: usize = reads.iter().map(|&r| sw(r)).sum();
            let out_ch = sw(*writes);
            match layer {
                LayerArch::Conv(c) | LayerArch::Downsample(c) | LayerArch::Upsample(c) => {
                    c.in_ch = in_ch;
                    c.out_ch = out_ch;
                }
                LayerArch::Res(r) => {
                    r.in_ch = in_ch;
                    r.out_ch = out_ch;
                    r.hidden = widths[self.index(&format!("{path}.hidden"))];
                }
                LayerArch::Attention(a) => {
                    a.channels = in_ch;
                    a.heads = widths[self.index(&format!("{path}.heads"))];
                }
            }
        }
        arch.out_in_ch = sw(self.out_stream);
        arch
    }

    fn index(&self, name: &str) -> usize {
        self.unit_index(name).expect("every layer's units exist")
    }

    /// Per-unit element importance from per-parameter importance tensors (same shapes as the
    /// weights, e.g. `w^2` or `|w * grad|`): the sum over every slice a unit element owns.
    /// Parameters missing from `per_param` contribute nothing.
    pub fn scores(&self, per_param: &BTreeMap<String, Tensor>) -> Scores {
        let mut out: Scores = self.units.iter().map(|u| vec![0.0; u.full]).collect();
        let mut reduced: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
        for slot in &self.slots {
            let Some(t) = per_param.get(&slot.param) else { continue };
            let v = reduced.entry((slot.param.as_str(), slot.dim)).or_insert_with(|| {
                let dims: Vec<i64> =
                    (0..t.dim() as i64).filter(|&d| d != slot.dim as i64).collect();
                let r = if dims.is_empty() {
                    t.to_kind(Kind::Double)
                } else {
                    t.to_kind(Kind::Double).sum_dim_intlist(dims, false, Kind::Double)
                };
                Vec::<f64>::try_from(r.to_device(tch::Device::Cpu)).expect("a vector")
            });
            for (c, s) in out[slot.unit].iter_mut().enumerate() {
                let from = slot.offset + c * slot.block;
                *s += v[from..from + slot.block].iter().sum::<f64>();
            }
        }
        out
    }

    /// Which elements each unit keeps under `plan`: channel units keep the same number of their
    /// highest-scoring channels in each GroupNorm group, heads units their highest-scoring heads;
    /// ties go to the lower index. Sorted ascending.
    pub fn kept(&self, plan: &Plan, scores: &Scores) -> Vec<Vec<usize>> {
        let widths = self.widths(plan);
        self.units
            .iter()
            .zip(widths)
            .zip(scores)
            .map(|((u, w), s)| {
                let groups = if u.kind == UnitKind::Heads { 1 } else { GROUPS };
                let per = u.full / groups;
                let keep = w / groups;
                let mut kept = Vec::with_capacity(w);
                for g in 0..groups {
                    let mut idx: Vec<usize> = (g * per..(g + 1) * per).collect();
                    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                    kept.extend_from_slice(&idx[..keep]);
                }
                kept.sort_unstable();
                kept
            })
            .collect()
    }

    /// Slices `base` (a checkpoint of this structure's base architecture) down to `plan`, keeping
    /// the elements [`Structure::kept`] picks by `scores`. With a full plan the tensors are
    /// returned unchanged.
    pub fn apply(
        &self,
        base: &Checkpoint,
        plan: &Plan,
        scores: &Scores,
    ) -> anyhow::Result<Checkpoint> {
        anyhow::ensure!(
            base.arch == self.base,
            "the checkpoint's architecture is not the structure's base"
        );
        self.check(plan).map_err(|e| anyhow::anyhow!("invalid pruning plan: {e}"))?;
        let kept = self.kept(plan, scores);
        // Per (param, dim): the indices each covering slot keeps; uncovered indices stay.
        let mut keep: BTreeMap<(&str, usize), Masks> = BTreeMap::new();
        for slot in &self.slots {
            let t = base
                .tensors
                .get(&slot.param)
                .ok_or_else(|| anyhow::anyhow!("checkpoint has no `{}`", slot.param))?;
            let len = t.size()[slot.dim] as usize;
            let (covered, kept_mask) = keep
                .entry((slot.param.as_str(), slot.dim))
                .or_insert_with(|| (vec![false; len], vec![false; len]));
            let u = &self.units[slot.unit];
            for c in 0..u.full {
                for j in 0..slot.block {
                    covered[slot.offset + c * slot.block + j] = true;
                }
            }
            for &c in &kept[slot.unit] {
                for j in 0..slot.block {
                    kept_mask[slot.offset + c * slot.block + j] = true;
                }
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in &base.tensors {
            let mut t = t.shallow_clone();
            for dim in 0..t.dim().min(2) {
                if let Some((covered, kept)) = keep.get(&(name.as_str(), dim)) {
                    let idx: Vec<i64> = (0..covered.len())
                        .filter(|&i| !covered[i] || kept[i])
                        .map(|i| i as i64)
                        .collect();
                    if idx.len() != covered.len() {
                        t = t.index_select(dim as i64, &Tensor::from_slice(&idx));
                    }
                }
            }
            tensors.insert(name.clone(), t.contiguous());
        }
        Ok(Checkpoint::from_tensors(self.arch_for(plan), tensors, base.state.clone())?)
    }
}
