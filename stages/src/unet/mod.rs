//! The IDDPM UNet (improved-diffusion's `UNetModel`) on tch, with per-layer widths so a pruned
//! model is the same type with smaller numbers.
//!
//! Parameter names and shapes are exactly the reference's state-dict keys
//! (`time_embed.0.weight`, `input_blocks.1.0.in_layers.2.weight`, `middle_block.1.qkv.weight`,
//! `out.2.weight`, ...), so an improved-diffusion checkpoint converted to safetensors loads
//! without renaming ([`crate::checkpoint`]). [`UNetArch`] says what to build; [`UNet::new`] builds
//! it under an `nn::Path` (normally a `VarStore`'s root) with the reference's initialisation,
//! including its zero-initialised `out_layers.3`, `proj_out` and `out.2`.

mod arch;
mod layers;

use std::cell::Cell;

use tch::Tensor;
use tch::nn::Path;

pub use arch::{
    ArchError, ArchIssue, AttentionArch, ConvArch, GROUPS, LayerArch, ResBlockArch, UNetArch,
};
pub use layers::timestep_embedding;

use layers::{Attention, Conv, GroupNorm, Linear, Pass, ResBlock, Zero};

/// One layer of a block.
#[derive(Debug)]
enum Layer {
    Res(ResBlock),
    Attention(Attention),
    /// The input conv or a Downsample's stride-2 conv.
    Conv(Conv),
    /// Nearest x2 upsampling, then a conv.
    Upsample(Conv),
}

impl Layer {
    fn new(p: &Path<'_>, l: &LayerArch, arch: &UNetArch) -> Layer {
        let c = &arch.config;
        match l {
            LayerArch::Conv(a) => Layer::Conv(Conv::new2d(p, a.in_ch, a.out_ch, 3, 1, Zero::No)),
            LayerArch::Res(a) => Layer::Res(ResBlock::new(
                p,
                a,
                arch.time_embed_dim,
                c.use_scale_shift_norm,
                c.dropout,
            )),
            LayerArch::Attention(a) => Layer::Attention(Attention::new(p, a)),
            LayerArch::Downsample(a) => {
                Layer::Conv(Conv::new2d(&(p / "op"), a.in_ch, a.out_ch, 3, 2, Zero::No))
            }
            LayerArch::Upsample(a) => {
                Layer::Upsample(Conv::new2d(&(p / "conv"), a.in_ch, a.out_ch, 3, 1, Zero::No))
            }
        }
    }

    fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        match self {
            Layer::Res(r) => r.forward(x, pass),
            Layer::Attention(a) => a.forward(x, pass),
            Layer::Conv(c) => c.forward(x, pass),
            Layer::Upsample(c) => {
                let (_, _, h, w) = x.size4().expect("upsample input is [B, C, H, W]");
                let up = x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0); // [B, C, 2H, 2W]
                c.forward(&up, pass)
            }
        }
    }
}

/// A block: improved-diffusion's `TimestepEmbedSequential`.
#[derive(Debug)]
struct Block(Vec<Layer>);

impl Block {
    fn new(p: &Path<'_>, layers: &[LayerArch], arch: &UNetArch) -> Block {
        Block(layers.iter().enumerate().map(|(j, l)| Layer::new(&(p / j), l, arch)).collect())
    }

    fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        let mut layers = self.0.iter();
        let first = layers.next().expect("a block has at least one layer");
        layers.fold(first.forward(x, pass), |h, l| l.forward(&h, pass))
    }
}

/// The IDDPM UNet.
///
/// The model does not own its parameters: they live in the `VarStore` whose path it was built
/// under, named as in the reference's state dict.
#[derive(Debug)]
pub struct UNet {
    arch: UNetArch,
    time_embed: [Linear; 2],
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv,
}

impl UNet {
    /// Builds the model described by `arch` under `p`, initialised as the reference does
    /// (PyTorch default conv/linear init, GroupNorm ones/zeros, zero-init `out_layers.3`,
    /// `proj_out` and `out.2`). Fails when `arch` does not validate.
    pub fn new(p: &Path<'_>, arch: &UNetArch) -> Result<UNet, ArchError> {
        arch.validate()?;
        let ch = arch.config.channels;
        let ted = arch.time_embed_dim;
        let blocks = |name: &str, blocks: &[Vec<LayerArch>]| -> Vec<Block> {
            blocks.iter().enumerate().map(|(i, b)| Block::new(&(p / name / i), b, arch)).collect()
        };
        Ok(UNet {
            arch: arch.clone(),
            time_embed: [
                Linear::new(&(p / "time_embed" / "0"), ch, ted),
                Linear::new(&(p / "time_embed" / "2"), ted, ted),
            ],
            input_blocks: blocks("input_blocks", &arch.input_blocks),
            middle_block: Block::new(&(p / "middle_block"), &arch.middle_block, arch),
            output_blocks: blocks("output_blocks", &arch.output_blocks),
            out_norm: GroupNorm::new(&(p / "out" / "0"), arch.out_in_ch),
            out_conv: Conv::new2d(
                &(p / "out" / "2"),
                arch.out_in_ch,
                arch.out_channels(),
                3,
                1,
                Zero::Yes,
            ),
        })
    }

    /// The architecture this model was built from.
    pub fn arch(&self) -> &UNetArch {
        &self.arch
    }

    /// Predicts the noise (and, with `learn_sigma`, the variance interpolation `v`) for noisy
    /// images `x` at timesteps `t`.
    ///
    /// `t` is what the network sees: the caller rescales (`t * 1000 / T`) when the diffusion asks
    /// for it. `train` turns dropout on.
    ///
    /// # Shapes
    /// `x`: `[B, in_channels, H, W]` with `H`, `W` divisible by `2^(levels - 1)`; `t`: `[B]`
    /// (float or integer) -> `[B, out_channels, H, W]`, where `out_channels` is
    /// `2 * in_channels` with `learn_sigma` (eps first, then `v`), else `in_channels`.
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.run(x, t, train, None)
    }

    /// An eval-mode forward that also counts conv + linear multiply-accumulates per image, from
    /// the shapes each layer sees at run time (the paper's FLOPs convention:
    /// `out_elems * in_ch/groups * k*k` per conv, `out_elems * in_features` per linear;
    /// attention matmuls, norms and activations not counted).
    ///
    /// # Shapes
    /// As [`UNet::forward_t`]; the count is divided by `B`.
    pub fn forward_counting_macs(&self, x: &Tensor, t: &Tensor) -> (Tensor, u64) {
        let macs = Cell::new(0);
        let y = self.run(x, t, false, Some(&macs));
        let batch = x.size()[0].max(1) as u64;
        (y, macs.get() / batch)
    }

    fn run(&self, x: &Tensor, t: &Tensor, train: bool, macs: Option<&Cell<u64>>) -> Tensor {
        let empty = Tensor::new();
        let mut pass = Pass { emb: &empty, train, macs };
        let [te0, te2] = &self.time_embed;
        let sinus = timestep_embedding(t, self.arch.config.channels); // [B, ch]
        let emb = te2.forward(&te0.forward(&sinus, &pass).silu(), &pass); // [B, 4ch]
        pass.emb = &emb;

        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = crate::fast::layout(x);
        for block in &self.input_blocks {
            h = block.forward(&h, &pass);
            skips.push(h.shallow_clone());
        }
        h = self.middle_block.forward(&h, &pass);
        for block in &self.output_blocks {
            let skip = skips.pop().expect("one skip per output block");
            h = block.forward(&Tensor::cat(&[h, skip], 1), &pass); // cat: [B, h + skip, H, W]
        }
        self.out_conv.forward(&self.out_norm.forward(&h).silu(), &pass) // [B, out_channels, H, W]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use tch::{Device, Kind, nn};

    pub(crate) fn tiny_config() -> ModelConfig {
        ModelConfig {
            image_size: 8,
            in_channels: 1,
            channels: 32,
            channel_mult: vec![1, 2],
            res_blocks: 1,
            attention_resolutions: vec![4],
            heads: 2,
            dropout: 0.1,
            learn_sigma: true,
            use_scale_shift_norm: true,
        }
    }

    #[test]
    fn output_shape_and_zero_init() {
        let vs = nn::VarStore::new(Device::Cpu);
        let arch = UNetArch::from_config(&tiny_config()).unwrap();
        let net = UNet::new(&vs.root(), &arch).unwrap();
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1.0f32, 500.0]);
        let y = net.forward_t(&x, &t, true);
        assert_eq!(y.size(), [2, 2, 8, 8]);
        // `out.2` starts at zero, like the reference.
        assert_eq!(y.abs().max().double_value(&[]), 0.0);
    }

    /// The tiny UNet with every weight drawn from N(0, scale^2) after `manual_seed(seed)` (so
    /// the zero-initialised layers are not zero).
    fn random_net(seed: i64, scale: f64) -> (nn::VarStore, UNet) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &UNetArch::from_config(&tiny_config()).unwrap()).unwrap();
        tch::manual_seed(seed);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * scale));
            }
        });
        (vs, net)
    }

    /// Every parameter gets a gradient once the zero-initialised layers are not zero.
    #[test]
    fn gradients_reach_every_parameter() {
        let (vs, net) = random_net(0, 0.1);
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3i64, 999]);
        net.forward_t(&x, &t, true).square().mean(None).backward();
        for (name, v) in vs.variables() {
            let g = v.grad();
            assert!(g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}");
        }
    }

    /// Issue 16: `--fast fused_attention` computes the written-out attention.
    #[test]
    fn fused_attention_computes_the_written_out_attention() {
        let (_vs, net) = random_net(1, 0.2);
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3.0f32, 700.0]);
        let plain = net.forward_t(&x, &t, false);
        crate::fast::fused_attention_on_this_thread(true);
        let fused = net.forward_t(&x, &t, false);
        crate::fast::fused_attention_on_this_thread(false);
        assert!(plain.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(fused.allclose(&plain, 1e-4, 1e-5, false), "{}", (&fused - &plain).abs().max());
    }

    #[test]
    fn rejects_invalid_arch() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut arch = UNetArch::from_config(&tiny_config()).unwrap();
        if let LayerArch::Res(r) = &mut arch.input_blocks[1][0] {
            r.hidden = 40;
        }
        let err = UNet::new(&vs.root(), &arch).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid UNet architecture: `input_blocks.1.0`: hidden 40 must be a positive multiple \
             of 32 (GroupNorm groups)"
        );
    }
}
