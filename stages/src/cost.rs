//! Parameters and MACs of a [`UNetArch`], computed from its widths without building the model.
//!
//! The paper's "FLOPs" are multiply-accumulates of conv and linear layers only, for one image:
//! a conv adds `out_elems * in_ch * k * k` (the qkv and `proj_out` Conv1d layers of attention
//! included), a linear `out_features * in_features`; attention's two matmuls, GroupNorm,
//! activations, biases and resampling are not counted. [`crate::unet::UNet::forward_counting_macs`]
//! counts the same thing from the shapes a real forward pass sees; the tests check the two agree.
//!
//! Reference values (improved-diffusion, unpruned): CIFAR-10 52,546,438 params and
//! 8,137,015,296 MACs; ImageNet-64 121,063,942 params and 39,350,501,376 MACs (39,339,950,080 of
//! them in convs, 10,551,296 in linears).

use serde::{Deserialize, Serialize};

use crate::unet::{LayerArch, UNetArch};

/// The cost of a model or of one of its layers, per image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// Trainable parameters.
    pub params: u64,
    /// Conv + linear multiply-accumulates for one image at the model's `image_size`.
    pub macs: u64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost { params: self.params + o.params, macs: self.macs + o.macs }
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::default(), |a, b| a + b)
    }
}

/// The cost of one layer, named by its parameter-name prefix (`time_embed`, `input_blocks.1.0`,
/// `middle_block.1`, `out`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCost {
    /// Parameter-name prefix.
    pub path: String,
    /// Its cost.
    pub cost: Cost,
}

/// A conv with bias, `k x k`, producing `out_ch x pixels` outputs.
fn conv(in_ch: usize, out_ch: usize, k: usize, pixels: usize) -> Cost {
    let (i, o, k, n) = (in_ch as u64, out_ch as u64, k as u64, pixels as u64);
    Cost { params: o * i * k * k + o, macs: n * o * i * k * k }
}

fn linear(in_dim: usize, out_dim: usize) -> Cost {
    let (i, o) = (in_dim as u64, out_dim as u64);
    Cost { params: o * i + o, macs: o * i }
}

fn group_norm(ch: usize) -> Cost {
    Cost { params: 2 * ch as u64, macs: 0 }
}

/// The cost of `layer` when its input is `side x side` pixels; also returns the output side.
fn layer_cost(arch: &UNetArch, layer: &LayerArch, side: usize) -> (Cost, usize) {
    let px = side * side;
    match layer {
        LayerArch::Conv(c) => (conv(c.in_ch, c.out_ch, 3, px), side),
        LayerArch::Res(r) => {
            let emb_rows = if arch.config.use_scale_shift_norm { 2 * r.hidden } else { r.hidden };
            let skip = if r.skip_conv { conv(r.in_ch, r.out_ch, 1, px) } else { Cost::default() };
            let cost = group_norm(r.in_ch)
                + conv(r.in_ch, r.hidden, 3, px)
                + linear(arch.time_embed_dim, emb_rows)
                + group_norm(r.hidden)
                + conv(r.hidden, r.out_ch, 3, px)
                + skip;
            (cost, side)
        }
        LayerArch::Attention(a) => {
            let cost = group_norm(a.channels)
                + conv(a.channels, 3 * a.inner(), 1, px)
                + conv(a.inner(), a.channels, 1, px);
            (cost, side)
        }
        LayerArch::Downsample(c) => {
            // conv3x3, stride 2, padding 1.
            let out = (side - 1) / 2 + 1;
            (conv(c.in_ch, c.out_ch, 3, out * out), out)
        }
        LayerArch::Upsample(c) => (conv(c.in_ch, c.out_ch, 3, 4 * px), 2 * side),
    }
}

/// The cost of every layer, in module order: `time_embed`, each block layer, `out`.
///
/// Spatial sizes follow the layers: a Downsample halves the side (stride-2 conv3x3 with padding
/// 1), an Upsample doubles it; [`crate::config::ModelConfig::validate`] makes the image side
/// divisible by `2^(levels - 1)`, so the up path meets its skips at equal sizes.
pub fn layer_costs(arch: &UNetArch) -> Vec<LayerCost> {
    let mut out = vec![LayerCost {
        path: "time_embed".into(),
        cost: linear(arch.config.channels, arch.time_embed_dim)
            + linear(arch.time_embed_dim, arch.time_embed_dim),
    }];
    let mut side = arch.config.image_size;
    for (path, layer) in arch.layers() {
        let (cost, next) = layer_cost(arch, layer, side);
        out.push(LayerCost { path, cost });
        side = next;
    }
    out.push(LayerCost {
        path: "out".into(),
        cost: group_norm(arch.out_in_ch)
            + conv(arch.out_in_ch, arch.out_channels(), 3, side * side),
    });
    out
}

/// Total params and per-image conv + linear MACs of `arch`.
pub fn cost(arch: &UNetArch) -> Cost {
    layer_costs(arch).into_iter().map(|l| l.cost).sum()
}
