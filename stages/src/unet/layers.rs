//! The UNet's building blocks, each a plain struct built from an `nn::Path` under the parameter
//! names of improved-diffusion (`in_layers.2`, `emb_layers.1`, `qkv`, ...).
//!
//! Conv and linear layers add their multiply-accumulates to a [`Pass`]'s tally when it counts, from
//! the shapes they actually see at run time; [`crate::cost`] checks its analytic count against it.

use std::cell::Cell;

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use super::arch::{AttentionArch, GROUPS, ResBlockArch};

/// GroupNorm epsilon (PyTorch's default, used by the reference's `GroupNorm32`).
const GN_EPS: f64 = 1e-5;

/// What one forward pass carries besides the activations.
pub(crate) struct Pass<'a> {
    /// Timestep embedding after `time_embed`, `[B, time_embed_dim]`.
    pub emb: &'a Tensor,
    /// Dropout active.
    pub train: bool,
    /// Conv + linear MACs, summed over the batch, when counting.
    pub macs: Option<&'a Cell<u64>>,
}

impl Pass<'_> {
    fn add_macs(&self, n: i64) {
        if let Some(m) = self.macs {
            m.set(m.get() + n as u64);
        }
    }
}

/// PyTorch's default `Conv`/`Linear` init: weight and bias uniform in `±1/sqrt(fan_in)`
/// (`kaiming_uniform_(a=sqrt(5))` for the weight), or all zeros for the reference's
/// `zero_module` layers.
fn init(fan_in: i64, zero: bool) -> Init {
    if zero {
        Init::Const(0.0)
    } else {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Init::Uniform { lo: -bound, up: bound }
    }
}

/// Whether a layer starts at zero, like the reference's `zero_module(...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Zero {
    /// PyTorch default init.
    No,
    /// All parameters zero.
    Yes,
}

/// `nn.Conv1d` (kernel 1) or `nn.Conv2d` with bias.
#[derive(Debug)]
pub(crate) struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv {
    /// A 2-d conv `k x k`, weight `[out, in, k, k]`.
    pub fn new2d(
        p: &Path<'_>,
        in_ch: usize,
        out_ch: usize,
        k: i64,
        stride: i64,
        zero: Zero,
    ) -> Self {
        let (i, o) = (in_ch as i64, out_ch as i64);
        let fan_in = i * k * k;
        Conv {
            weight: p.var("weight", &[o, i, k, k], init(fan_in, zero == Zero::Yes)),
            bias: p.var("bias", &[o], init(fan_in, zero == Zero::Yes)),
            stride,
            padding: k / 2,
        }
    }

    /// A 1-d conv with kernel 1, weight `[out, in, 1]`.
    pub fn new1d(p: &Path<'_>, in_ch: usize, out_ch: usize, zero: Zero) -> Self {
        let (i, o) = (in_ch as i64, out_ch as i64);
        Conv {
            weight: p.var("weight", &[o, i, 1], init(i, zero == Zero::Yes)),
            bias: p.var("bias", &[o], init(i, zero == Zero::Yes)),
            stride: 1,
            padding: 0,
        }
    }

    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        let y = if self.weight.dim() == 3 {
            x.conv1d(&self.weight, Some(&self.bias), [self.stride], [self.padding], [1], 1)
        } else {
            x.conv2d(
                &self.weight,
                Some(&self.bias),
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            )
        };
        // out_elems * (in / groups) * kernel area, from the runtime shapes.
        let per_out: i64 = self.weight.size()[1..].iter().product();
        pass.add_macs(y.numel() as i64 * per_out);
        y
    }
}

/// `nn.Linear`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(p: &Path<'_>, in_dim: usize, out_dim: usize) -> Self {
        let (i, o) = (in_dim as i64, out_dim as i64);
        Linear {
            weight: p.var("weight", &[o, i], init(i, false)),
            bias: p.var("bias", &[o], init(i, false)),
        }
    }

    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        let y = x.linear(&self.weight, Some(&self.bias));
        pass.add_macs(y.numel() as i64 * self.weight.size()[1]);
        y
    }
}

/// The reference's `GroupNorm32`: 32 groups, eps 1e-5, computed in fp32 and cast back.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm {
    pub fn new(p: &Path<'_>, channels: usize) -> Self {
        let c = channels as i64;
        GroupNorm { weight: p.ones("weight", &[c]), bias: p.zeros("bias", &[c]) }
    }

    /// # Shapes
    /// `[B, C, ...]` -> same.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if x.kind() == Kind::Float && self.weight.kind() == Kind::Float {
            return x.group_norm(GROUPS as i64, Some(&self.weight), Some(&self.bias), GN_EPS, true);
        }
        let (w, b) = (self.weight.to_kind(Kind::Float), self.bias.to_kind(Kind::Float));
        x.to_kind(Kind::Float)
            .group_norm(GROUPS as i64, Some(&w), Some(&b), GN_EPS, true)
            .to_kind(x.kind())
    }
}

/// Sinusoidal timestep embedding, improved-diffusion's `timestep_embedding`: `[cos, sin]` of
/// `t * freqs` with `freqs_i = exp(-ln(10000) * i / half)`, zero-padded when `dim` is odd.
///
/// # Shapes
/// `t`: `[B]` (fractional timesteps allowed) -> `[B, dim]`, float32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Tensor {
    let half = (dim / 2) as i64;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * -(10000f64.ln()) / half as f64).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // [B, half]
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1); // [B, 2*half]
    if dim % 2 == 1 {
        let pad = emb.zeros_like().narrow(1, 0, 1);
        Tensor::cat(&[emb, pad], -1)
    } else {
        emb
    }
}

/// A ResBlock: `GN -> SiLU -> conv3x3(in -> hidden)`, plus the timestep embedding
/// (`SiLU -> Linear`) as FiLM scale/shift or as an added bias, then
/// `GN -> SiLU -> Dropout -> zero-init conv3x3(hidden -> out)`, plus the skip path.
#[derive(Debug)]
pub(crate) struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv,
    emb: Linear,
    out_norm: GroupNorm,
    out_conv: Conv,
    skip: Option<Conv>,
    scale_shift: bool,
    dropout: f64,
}

impl ResBlock {
    pub fn new(
        p: &Path<'_>,
        a: &ResBlockArch,
        emb_dim: usize,
        scale_shift: bool,
        dropout: f64,
    ) -> Self {
        let emb_rows = if scale_shift { 2 * a.hidden } else { a.hidden };
        ResBlock {
            in_norm: GroupNorm::new(&(p / "in_layers" / "0"), a.in_ch),
            in_conv: Conv::new2d(&(p / "in_layers" / "2"), a.in_ch, a.hidden, 3, 1, Zero::No),
            emb: Linear::new(&(p / "emb_layers" / "1"), emb_dim, emb_rows),
            out_norm: GroupNorm::new(&(p / "out_layers" / "0"), a.hidden),
            out_conv: Conv::new2d(&(p / "out_layers" / "3"), a.hidden, a.out_ch, 3, 1, Zero::Yes),
            skip: a
                .skip_conv
                .then(|| Conv::new2d(&(p / "skip_connection"), a.in_ch, a.out_ch, 1, 1, Zero::No)),
            scale_shift,
            dropout,
        }
    }

    /// # Shapes
    /// `x`: `[B, in, H, W]` -> `[B, out, H, W]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        let h = self.in_conv.forward(&self.in_norm.forward(x).silu(), pass); // [B, hidden, H, W]
        let e = self.emb.forward(&pass.emb.silu(), pass).to_kind(h.kind()); // [B, rows]
        let e = e.unsqueeze(-1).unsqueeze(-1); // [B, rows, 1, 1]
        let h = if self.scale_shift {
            let (scale, shift) = match e.chunk(2, 1).as_slice() {
                [s, b] => (s.shallow_clone(), b.shallow_clone()),
                _ => unreachable!("chunk(2) of an even width gives two halves"),
            };
            self.out_norm.forward(&h) * (scale + 1.0) + shift
        } else {
            self.out_norm.forward(&(h + e))
        };
        let h = h.silu().dropout(self.dropout, pass.train);
        let h = self.out_conv.forward(&h, pass); // [B, out, H, W]
        match &self.skip {
            Some(skip) => skip.forward(x, pass) + h,
            None => x + h,
        }
    }
}

/// Multi-head self-attention over the spatial positions: `GN -> qkv Conv1d`, heads laid out as
/// improved-diffusion's `QKVAttention` reads them (head `i` owns qkv rows
/// `[3 d i, 3 d (i + 1))`, split into its q, k and v), `q` and `k` each scaled by `d^-1/4`, softmax
/// in fp32, zero-init `proj_out`, residual add.
#[derive(Debug)]
pub(crate) struct Attention {
    norm: GroupNorm,
    qkv: Conv,
    proj_out: Conv,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    pub fn new(p: &Path<'_>, a: &AttentionArch) -> Self {
        Attention {
            norm: GroupNorm::new(&(p / "norm"), a.channels),
            qkv: Conv::new1d(&(p / "qkv"), a.channels, 3 * a.inner(), Zero::No),
            proj_out: Conv::new1d(&(p / "proj_out"), a.inner(), a.channels, Zero::Yes),
            heads: a.heads as i64,
            head_dim: a.head_dim as i64,
        }
    }

    /// # Shapes
    /// `x`: `[B, C, H, W]` -> same.
    pub fn forward(&self, x: &Tensor, pass: &Pass<'_>) -> Tensor {
        let (b, c, hh, ww) = x.size4().expect("attention input is [B, C, H, W]");
        let (heads, d, t) = (self.heads, self.head_dim, hh * ww);
        let xs = x.reshape([b, c, t]); // [B, C, T]
        let qkv = self.qkv.forward(&self.norm.forward(&xs), pass); // [B, 3*heads*d, T]
        let qkv = qkv.reshape([b * heads, 3 * d, t]); // [B*heads, 3d, T]
        let parts = qkv.split(d, 1); // 3 x [B*heads, d, T]
        let a = if crate::fast::fused_attention(x.device()) {
            // The same softmax(q^T k / sqrt(d)) v, in libtorch's fused kernel ([.., T, d]).
            let [q, k, v] = [0, 1, 2].map(|i| parts[i].transpose(1, 2));
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            ); // [B*heads, T, d]
            a.transpose(1, 2)
        } else {
            let scale = 1.0 / (d as f64).sqrt().sqrt();
            let q = &parts[0] * scale;
            let k = &parts[1] * scale;
            let w = q.transpose(1, 2).matmul(&k); // [B*heads, T, T]
            let w = w.softmax(-1, Kind::Float).to_kind(q.kind());
            parts[2].matmul(&w.transpose(1, 2)) // [B*heads, d, T]
        };
        let a = a.reshape([b, heads * d, t]); // [B, heads*d, T]
        let h = self.proj_out.forward(&a, pass); // [B, C, T]
        (xs + h).reshape([b, c, hh, ww])
    }
}
