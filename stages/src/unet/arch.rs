//! [`UNetArch`]: what a (possibly pruned) IDDPM UNet looks like, as plain serialisable numbers.
//!
//! The block layout (how many levels, ResBlocks per level, where attention and resampling sit)
//! is fixed by the `model:` flags ([`ModelConfig`]); the width of every layer is stored per layer.
//! [`UNetArch::from_config`] gives the unpruned widths of improved-diffusion's `UNetModel`; a
//! pruned model is the same layout with smaller numbers, so its parameter names are still the
//! reference's and only their shapes shrink.
//!
//! What pruning may change, and what stays tied:
//!
//! - a ResBlock's `hidden` width (conv1 out, the second GroupNorm, the `emb_layers` rows — both
//!   the scale and the shift halves — and conv2 in) is free;
//! - an attention block's `heads` and `head_dim` are free (its qkv has `3 * heads * head_dim`
//!   rows, its `proj_out` as many input columns);
//! - residual-stream widths are stored as each layer's `in_ch` / `out_ch`, and
//!   [`UNetArch::validate`] checks the ties: a layer's input equals the stream it reads, an
//!   identity skip or an attention block keeps the stream width, and an up-path ResBlock reads
//!   `h + skip` channels (the concatenation with the matching down-path output);
//! - whether a ResBlock has a 1x1 `skip_connection` conv is part of the layout: the reference adds
//!   one exactly where the unpruned block changes width, and a pruned block keeps that choice.
//!
//! GroupNorm always has 32 groups; every width a GroupNorm sees (a ResBlock's input and hidden
//! width, an attention block's width, the width before `out`) must be a positive multiple of 32,
//! so every group holds the same number of channels. Pruning therefore removes channels in steps
//! of 32 (one per group, or whole multiples); [`UNetArch::validate`] rejects anything else.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;

/// GroupNorm group count used everywhere in the IDDPM UNet.
pub const GROUPS: usize = 32;

/// A convolution's widths (the input conv, a Downsample's `op`, an Upsample's `conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvArch {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
}

/// A ResBlock's widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResBlockArch {
    /// Input channels (`in_layers.0` GroupNorm, `in_layers.2` conv in).
    pub in_ch: usize,
    /// Hidden channels: `in_layers.2` out, `emb_layers.1` rows (x2 with scale-shift),
    /// `out_layers.0` GroupNorm, `out_layers.3` in.
    pub hidden: usize,
    /// Output channels (`out_layers.3` out, the skip's out).
    pub out_ch: usize,
    /// Whether the skip path is a 1x1 `skip_connection` conv (else identity, `in_ch == out_ch`).
    pub skip_conv: bool,
}

/// An attention block's widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionArch {
    /// Residual-stream channels (`norm`, `qkv` in, `proj_out` out).
    pub channels: usize,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head for each of q, k and v.
    pub head_dim: usize,
}

impl AttentionArch {
    /// `heads * head_dim`: `qkv` has three times this many rows, `proj_out` this many inputs.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// One layer of a block (improved-diffusion's `TimestepEmbedSequential` children).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerArch {
    /// The input conv3x3 (`input_blocks.0.0`).
    Conv(ConvArch),
    /// A ResBlock.
    Res(ResBlockArch),
    /// A self-attention block.
    Attention(AttentionArch),
    /// A stride-2 conv3x3 (`op`).
    Downsample(ConvArch),
    /// Nearest x2 then conv3x3 (`conv`).
    Upsample(ConvArch),
}

impl LayerArch {
    /// The layer kind's name, as serialised.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerArch::Conv(_) => "conv",
            LayerArch::Res(_) => "res",
            LayerArch::Attention(_) => "attention",
            LayerArch::Downsample(_) => "downsample",
            LayerArch::Upsample(_) => "upsample",
        }
    }

    /// Channels the layer reads.
    pub fn in_ch(&self) -> usize {
        match self {
            LayerArch::Conv(c) | LayerArch::Downsample(c) | LayerArch::Upsample(c) => c.in_ch,
            LayerArch::Res(r) => r.in_ch,
            LayerArch::Attention(a) => a.channels,
        }
    }

    /// Channels the layer writes.
    pub fn out_ch(&self) -> usize {
        match self {
            LayerArch::Conv(c) | LayerArch::Downsample(c) | LayerArch::Upsample(c) => c.out_ch,
            LayerArch::Res(r) => r.out_ch,
            LayerArch::Attention(a) => a.channels,
        }
    }
}

/// The architecture of an IDDPM UNet: the `model:` flags plus every layer's widths.
///
/// Layers are listed in improved-diffusion's module order, so the layer at
/// `input_blocks[i][j]` owns the parameters `input_blocks.{i}.{j}.*`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetArch {
    /// The flags of the unpruned model; they fix the block layout, the sinusoidal embedding width
    /// (`channels`), the image channels, dropout and the output head.
    pub config: ModelConfig,
    /// Width of the timestep-embedding MLP (`time_embed.0` out, `time_embed.2`, every
    /// `emb_layers.1` in); `4 * channels` unpruned.
    pub time_embed_dim: usize,
    /// `input_blocks`: the input conv, then per level its ResBlocks (each maybe with attention)
    /// and, but for the last level, a Downsample.
    pub input_blocks: Vec<Vec<LayerArch>>,
    /// `middle_block`: ResBlock, attention, ResBlock.
    pub middle_block: Vec<LayerArch>,
    /// `output_blocks`: per level from the bottom, `res_blocks + 1` ResBlocks on
    /// `cat([h, skip])` (each maybe with attention), the last of a level but the top one
    /// followed by an Upsample.
    pub output_blocks: Vec<Vec<LayerArch>>,
    /// Channels entering `out` (GroupNorm, SiLU, conv3x3 to [`UNetArch::out_channels`]).
    pub out_in_ch: usize,
}

/// One problem with a [`UNetArch`], at the parameter-name prefix of the offending layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchIssue {
    /// Layer path, e.g. `input_blocks.4.0`, or a field such as `config.channels`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ArchIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.message)
    }
}

/// A [`UNetArch`] that does not describe a valid IDDPM UNet.
#[derive(Debug, thiserror::Error)]
#[error("invalid UNet architecture: {}", .issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ArchError {
    /// Every problem found, in layer order.
    pub issues: Vec<ArchIssue>,
}

fn attention_at(config: &ModelConfig, ds: usize) -> bool {
    // improved-diffusion's `create_model`: attention where the downsample rate `ds` is one of
    // `image_size // res` (integer division, as the reference does).
    config.attention_resolutions.iter().any(|&r| r > 0 && config.image_size / r == ds)
}

impl UNetArch {
    /// The unpruned architecture of improved-diffusion's `UNetModel` for these flags.
    ///
    /// Attention goes where the downsample rate `ds` (1, 2, 4, ...) equals
    /// `image_size / r` (integer division) for some `r` in `attention_resolutions`, exactly as the
    /// reference's `create_model` maps resolutions to rates. Every attention block gets
    /// `heads` heads of `width / heads` channels. Fails when the flags are invalid
    /// ([`ModelConfig::validate`]) or a width is not divisible by `heads`.
    pub fn from_config(config: &ModelConfig) -> Result<UNetArch, ArchError> {
        let issues: Vec<ArchIssue> = config
            .validate()
            .into_iter()
            .map(|e| ArchIssue { path: format!("config.{}", e.path.join(".")), message: e.message })
            .collect();
        if !issues.is_empty() {
            return Err(ArchError { issues });
        }
        let ch = config.channels;
        let heads = config.heads;
        let attention = |channels: usize| {
            LayerArch::Attention(AttentionArch { channels, heads, head_dim: channels / heads })
        };
        let res = |in_ch: usize, out_ch: usize| {
            LayerArch::Res(ResBlockArch {
                in_ch,
                hidden: out_ch,
                out_ch,
                skip_conv: in_ch != out_ch,
            })
        };

        let mut input_blocks =
            vec![vec![LayerArch::Conv(ConvArch { in_ch: config.in_channels, out_ch: ch })]];
        let mut skips = vec![ch];
        let mut w = ch;
        let mut ds = 1;
        let levels = config.channel_mult.len();
        for (level, &mult) in config.channel_mult.iter().enumerate() {
            for _ in 0..config.res_blocks {
                let mut block = vec![res(w, mult * ch)];
                w = mult * ch;
                if attention_at(config, ds) {
                    block.push(attention(w));
                }
                input_blocks.push(block);
                skips.push(w);
            }
            if level + 1 != levels {
                input_blocks.push(vec![LayerArch::Downsample(ConvArch { in_ch: w, out_ch: w })]);
                skips.push(w);
                ds *= 2;
            }
        }
        let middle_block = vec![res(w, w), attention(w), res(w, w)];
        let mut output_blocks = Vec::new();
        for (level, &mult) in config.channel_mult.iter().enumerate().rev() {
            for i in 0..=config.res_blocks {
                let skip = skips.pop().expect("one skip per input block");
                let mut block = vec![res(w + skip, mult * ch)];
                w = mult * ch;
                if attention_at(config, ds) {
                    block.push(attention(w));
                }
                if level > 0 && i == config.res_blocks {
                    block.push(LayerArch::Upsample(ConvArch { in_ch: w, out_ch: w }));
                    ds /= 2;
                }
                output_blocks.push(block);
            }
        }
        let arch = UNetArch {
            config: config.clone(),
            time_embed_dim: 4 * ch,
            input_blocks,
            middle_block,
            output_blocks,
            out_in_ch: w,
        };
        let issues: Vec<ArchIssue> = arch
            .layers()
            .into_iter()
            .filter_map(|(path, l)| match l {
                LayerArch::Attention(a) if a.inner() != a.channels => Some(ArchIssue {
                    path,
                    message: format!("width {} is not divisible by `heads` = {heads}", a.channels),
                }),
                _ => None,
            })
            .collect();
        if issues.is_empty() { Ok(arch) } else { Err(ArchError { issues }) }
    }

    /// Output channels: `2 * in_channels` with a learned variance, else `in_channels`.
    pub fn out_channels(&self) -> usize {
        self.config.in_channels * if self.config.learn_sigma { 2 } else { 1 }
    }

    /// Every layer with its parameter-name prefix (`input_blocks.1.0`), in module order.
    pub fn layers(&self) -> Vec<(String, &LayerArch)> {
        let mut out = Vec::new();
        for (i, block) in self.input_blocks.iter().enumerate() {
            out.extend(block.iter().enumerate().map(|(j, l)| (format!("input_blocks.{i}.{j}"), l)));
        }
        out.extend(
            self.middle_block.iter().enumerate().map(|(j, l)| (format!("middle_block.{j}"), l)),
        );
        for (i, block) in self.output_blocks.iter().enumerate() {
            out.extend(
                block.iter().enumerate().map(|(j, l)| (format!("output_blocks.{i}.{j}"), l)),
            );
        }
        out
    }

    /// Every layer, mutable, with its parameter-name prefix, in module order (for pruning).
    pub fn layers_mut(&mut self) -> Vec<(String, &mut LayerArch)> {
        let mut out = Vec::new();
        for (i, block) in self.input_blocks.iter_mut().enumerate() {
            out.extend(
                block.iter_mut().enumerate().map(|(j, l)| (format!("input_blocks.{i}.{j}"), l)),
            );
        }
        out.extend(
            self.middle_block.iter_mut().enumerate().map(|(j, l)| (format!("middle_block.{j}"), l)),
        );
        for (i, block) in self.output_blocks.iter_mut().enumerate() {
            out.extend(
                block.iter_mut().enumerate().map(|(j, l)| (format!("output_blocks.{i}.{j}"), l)),
            );
        }
        out
    }

    /// Every parameter's state-dict name and shape, as the reference (and [`super::UNet::new`])
    /// lays them out: `time_embed.0.weight` -> `[4ch, ch]`, `input_blocks.0.0.weight` ->
    /// `[ch, in_channels, 3, 3]`, ...
    pub fn param_shapes(&self) -> BTreeMap<String, Vec<i64>> {
        let mut s = Shapes::default();
        let ted = self.time_embed_dim;
        s.affine("time_embed.0", self.config.channels, ted, &[]);
        s.affine("time_embed.2", ted, ted, &[]);
        for (p, layer) in self.layers() {
            match layer {
                LayerArch::Conv(c) => s.affine(&p, c.in_ch, c.out_ch, &[3, 3]),
                LayerArch::Downsample(c) => {
                    s.affine(&format!("{p}.op"), c.in_ch, c.out_ch, &[3, 3])
                }
                LayerArch::Upsample(c) => {
                    s.affine(&format!("{p}.conv"), c.in_ch, c.out_ch, &[3, 3])
                }
                LayerArch::Res(r) => {
                    let rows =
                        if self.config.use_scale_shift_norm { 2 * r.hidden } else { r.hidden };
                    s.norm(&format!("{p}.in_layers.0"), r.in_ch);
                    s.affine(&format!("{p}.in_layers.2"), r.in_ch, r.hidden, &[3, 3]);
                    s.affine(&format!("{p}.emb_layers.1"), ted, rows, &[]);
                    s.norm(&format!("{p}.out_layers.0"), r.hidden);
                    s.affine(&format!("{p}.out_layers.3"), r.hidden, r.out_ch, &[3, 3]);
                    if r.skip_conv {
                        s.affine(&format!("{p}.skip_connection"), r.in_ch, r.out_ch, &[1, 1]);
                    }
                }
                LayerArch::Attention(a) => {
                    s.norm(&format!("{p}.norm"), a.channels);
                    s.affine(&format!("{p}.qkv"), a.channels, 3 * a.inner(), &[1]);
                    s.affine(&format!("{p}.proj_out"), a.inner(), a.channels, &[1]);
                }
            }
        }
        s.norm("out.0", self.out_in_ch);
        s.affine("out.2", self.out_in_ch, self.out_channels(), &[3, 3]);
        s.0
    }

    /// Checks that this is the layout [`UNetArch::from_config`] gives for `config` with widths that
    /// fit together; lists every problem.
    ///
    /// Rules: same blocks, layer kinds and `skip_conv` choices as the unpruned model; every width
    /// positive; each layer reads the stream width before it (an up-path ResBlock reads `h + skip`);
    /// identity skips and attention keep the width; GroupNorm widths are multiples of
    /// [`GROUPS`]; `time_embed_dim` positive.
    pub fn validate(&self) -> Result<(), ArchError> {
        let (want, got) = (UNetArch::from_config(&self.config)?.layout(), self.layout());
        if want != got {
            let show =
                |l: &[Vec<String>]| l.iter().map(|b| b.join(",")).collect::<Vec<_>>().join(" | ");
            let message = format!(
                "layout differs from the IDDPM UNet of `config`: expected `{}`, got `{}`",
                show(&want),
                show(&got)
            );
            return Err(ArchError { issues: vec![ArchIssue { path: "blocks".into(), message }] });
        }

        let mut issues = Vec::new();
        if self.time_embed_dim == 0 {
            let message = "must be at least 1, got 0".to_string();
            issues.push(ArchIssue { path: "time_embed_dim".into(), message });
        }
        // Walk the residual stream: a layer reads what the one before wrote; an output block
        // first reads `cat([h, skip])` with the matching input block's output.
        let mut visit = |path: String, layer: &LayerArch, stream: usize| {
            for message in layer_issues(layer, stream) {
                issues.push(ArchIssue { path: path.clone(), message });
            }
            layer.out_ch()
        };
        let mut w = self.config.in_channels;
        let mut skips = Vec::new();
        for (i, block) in self.input_blocks.iter().enumerate() {
            for (j, l) in block.iter().enumerate() {
                w = visit(format!("input_blocks.{i}.{j}"), l, w);
            }
            skips.push(w);
        }
        for (j, l) in self.middle_block.iter().enumerate() {
            w = visit(format!("middle_block.{j}"), l, w);
        }
        for (i, block) in self.output_blocks.iter().enumerate() {
            w += skips.pop().unwrap_or(0);
            for (j, l) in block.iter().enumerate() {
                w = visit(format!("output_blocks.{i}.{j}"), l, w);
            }
        }
        let out = [
            (self.out_in_ch != w).then(|| reads(self.out_in_ch, w)),
            group_norm_issue("out_in_ch", self.out_in_ch),
        ];
        let out =
            out.into_iter().flatten().map(|message| ArchIssue { path: "out".into(), message });
        issues.extend(out);
        if issues.is_empty() { Ok(()) } else { Err(ArchError { issues }) }
    }

    /// Each block's layer kinds, `res+skip_conv` for ResBlocks with a skip conv.
    fn layout(&self) -> Vec<Vec<String>> {
        let label = |l: &LayerArch| match l {
            LayerArch::Res(r) if r.skip_conv => "res+skip_conv".to_string(),
            l => l.kind().to_string(),
        };
        let blocks =
            self.input_blocks.iter().chain([&self.middle_block]).chain(&self.output_blocks);
        blocks.map(|b| b.iter().map(label).collect()).collect()
    }
}

fn reads(got: usize, stream: usize) -> String {
    format!("reads {got} channels, but the stream has {stream}")
}

/// The problem with a GroupNorm over `width` channels, if any.
fn group_norm_issue(what: &str, width: usize) -> Option<String> {
    (width == 0 || !width.is_multiple_of(GROUPS)).then(|| {
        format!("{what} {width} must be a positive multiple of {GROUPS} (GroupNorm groups)")
    })
}

/// What is wrong with `layer` reading a stream of `stream` channels.
fn layer_issues(layer: &LayerArch, stream: usize) -> Vec<String> {
    let mut out = Vec::new();
    if layer.in_ch() != stream {
        out.push(reads(layer.in_ch(), stream));
    }
    match layer {
        LayerArch::Conv(c) | LayerArch::Downsample(c) | LayerArch::Upsample(c) => {
            if c.out_ch == 0 {
                out.push("out_ch must be at least 1, got 0".into());
            }
        }
        LayerArch::Res(r) => {
            out.extend(group_norm_issue("in_ch", r.in_ch));
            out.extend(group_norm_issue("hidden", r.hidden));
            if r.out_ch == 0 {
                out.push("out_ch must be at least 1, got 0".into());
            }
            if !r.skip_conv && r.in_ch != r.out_ch {
                out.push(format!(
                    "identity skip needs in_ch == out_ch, got {} and {}",
                    r.in_ch, r.out_ch
                ));
            }
        }
        LayerArch::Attention(a) => {
            out.extend(group_norm_issue("channels", a.channels));
            if a.heads == 0 || a.head_dim == 0 {
                out.push(format!(
                    "heads and head_dim must be at least 1, got {} and {}",
                    a.heads, a.head_dim
                ));
            }
        }
    }
    out
}

/// Collects parameter shapes for [`UNetArch::param_shapes`].
#[derive(Default)]
struct Shapes(BTreeMap<String, Vec<i64>>);

impl Shapes {
    /// A linear (`kernel` empty) or conv: `weight` `[out, in, kernel...]` and `bias` `[out]`.
    fn affine(&mut self, prefix: &str, in_ch: usize, out_ch: usize, kernel: &[i64]) {
        let mut w = vec![out_ch as i64, in_ch as i64];
        w.extend_from_slice(kernel);
        self.0.insert(format!("{prefix}.weight"), w);
        self.0.insert(format!("{prefix}.bias"), vec![out_ch as i64]);
    }

    /// A GroupNorm's `weight` and `bias`, `[channels]` each.
    fn norm(&mut self, prefix: &str, channels: usize) {
        self.0.insert(format!("{prefix}.weight"), vec![channels as i64]);
        self.0.insert(format!("{prefix}.bias"), vec![channels as i64]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            image_size: 8,
            in_channels: 1,
            channels: 32,
            channel_mult: vec![1, 2],
            res_blocks: 1,
            attention_resolutions: vec![4],
            heads: 2,
            dropout: 0.0,
            learn_sigma: true,
            use_scale_shift_norm: true,
        }
    }

    fn messages(err: ArchError) -> Vec<String> {
        err.issues.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn cifar10_layout() {
        let arch = UNetArch::from_config(&ModelConfig::default()).unwrap();
        let layout = arch.layout();
        // Input conv, 4 levels x 3 ResBlocks, 3 Downsamples; middle; 4 levels x 4 ResBlocks.
        assert_eq!(arch.input_blocks.len(), 16);
        assert_eq!(arch.output_blocks.len(), 16);
        assert_eq!(layout[0], ["conv"]);
        assert_eq!(layout[1], ["res"]);
        assert_eq!(layout[4], ["downsample"]);
        assert_eq!(layout[5], ["res+skip_conv", "attention"]); // 16x16, 128 -> 256
        assert_eq!(layout[9], ["res", "attention"]); // 8x8
        assert_eq!(layout[13], ["res"]); // 4x4: no attention
        assert_eq!(layout[16], ["res", "attention", "res"]);
        assert_eq!(layout[16 + 8], ["res+skip_conv", "attention", "upsample"]);
        assert_eq!(arch.out_in_ch, 128);
        assert_eq!(arch.time_embed_dim, 512);
        assert_eq!(
            arch.middle_block[1],
            LayerArch::Attention(AttentionArch { channels: 256, heads: 4, head_dim: 64 })
        );
        arch.validate().unwrap();
    }

    #[test]
    fn json_round_trip() {
        let arch = UNetArch::from_config(&tiny()).unwrap();
        let json = serde_json::to_string(&arch).unwrap();
        assert!(
            json.contains(r#"{"kind":"res","in_ch":32,"hidden":32,"out_ch":32,"skip_conv":false}"#)
        );
        assert!(json.contains(r#"{"kind":"attention","channels":64,"heads":2,"head_dim":32}"#));
        assert_eq!(serde_json::from_str::<UNetArch>(&json).unwrap(), arch);
        let bad = json.replace(r#""skip_conv":false"#, r#""skip_conv":false,"bogus":1"#);
        assert!(serde_json::from_str::<UNetArch>(&bad).is_err());
    }

    #[test]
    fn invalid_config_is_reported_under_config() {
        let err = UNetArch::from_config(&ModelConfig { channels: 40, ..tiny() }).unwrap_err();
        assert_eq!(
            messages(err),
            ["`config.channels`: must be a positive multiple of 32 (GroupNorm uses 32 groups), \
              got 40"]
        );
    }

    #[test]
    fn heads_must_divide_attention_width() {
        let err = UNetArch::from_config(&ModelConfig { heads: 3, ..tiny() }).unwrap_err();
        assert_eq!(
            messages(err),
            [
                "`input_blocks.3.1`: width 64 is not divisible by `heads` = 3",
                "`middle_block.1`: width 64 is not divisible by `heads` = 3",
                "`output_blocks.0.1`: width 64 is not divisible by `heads` = 3",
                "`output_blocks.1.1`: width 64 is not divisible by `heads` = 3",
            ]
        );
    }

    #[test]
    fn layout_must_match_config() {
        let mut arch = UNetArch::from_config(&tiny()).unwrap();
        arch.middle_block.remove(1);
        assert_eq!(
            messages(arch.validate().unwrap_err()),
            ["`blocks`: layout differs from the IDDPM UNet of `config`: expected \
              `conv | res | downsample | res+skip_conv,attention | res,attention,res | \
              res+skip_conv,attention | res+skip_conv,attention,upsample | res+skip_conv | \
              res+skip_conv`, got `conv | res | downsample | res+skip_conv,attention | res,res | \
              res+skip_conv,attention | res+skip_conv,attention,upsample | res+skip_conv | \
              res+skip_conv`"]
        );
    }

    #[test]
    fn identity_skip_keeps_width_and_group_norm_widths_divide() {
        let mut arch = UNetArch::from_config(&tiny()).unwrap();
        if let LayerArch::Res(r) = &mut arch.input_blocks[1][0] {
            r.out_ch = 64;
            r.hidden = 0;
        }
        assert_eq!(
            messages(arch.validate().unwrap_err()),
            [
                "`input_blocks.1.0`: hidden 0 must be a positive multiple of 32 (GroupNorm groups)",
                "`input_blocks.1.0`: identity skip needs in_ch == out_ch, got 32 and 64",
                "`input_blocks.2.0`: reads 32 channels, but the stream has 64",
                "`output_blocks.2.0`: reads 96 channels, but the stream has 128",
            ]
        );
    }
}
