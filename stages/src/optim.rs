//! The state `train` updates every step: the model, its EMA twin and AdamW's moments, and the
//! bfloat16 working copy of [`Precision::Bf16`].
//!
//! [`Trainer`] keeps parameters, gradients, moments and EMA weights as views into a few flat
//! buffers ([`Update::Flat`], what `train` uses): zeroing the gradients, one AdamW step and one
//! EMA update are then a handful of kernels over the whole model, not ~17 small kernels for each
//! of its hundreds of tensors. The per-tensor loops it replaces stay as [`Update::PerTensor`]
//! for the tests, which pin that both give the same weights bit for bit on the CPU (every
//! operation is elementwise and in the same order, so how the elements are grouped into tensors
//! does not change a single rounding), and for the benchmark.
//!
//! Gradients land in the flat buffer without a copy: after the first backward pass each
//! parameter's `.grad` is re-pointed (`set_data`) at its slice of the buffer, and autograd
//! accumulates into an existing gradient in place.

use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::train::{Precision, TrainParams};
use crate::unet::UNet;

/// How [`Trainer`] updates its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Views into flat buffers: a few kernels per step.
    Flat,
    /// One tensor at a time, as `train` did before the flat buffers (the reference).
    PerTensor,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// A model being trained: master weights (float32), EMA weights, AdamW (as
/// `torch.optim.AdamW`: betas 0.9/0.999, eps 1e-8) and, for bf16, the working copy.
pub struct Trainer {
    net: UNet,
    vs: VarStore,
    ema_vs: VarStore,
    half: Option<HalfModel>,
    /// Master parameters in layout order (bf16: convolution parameters first).
    named: Vec<(String, Tensor)>,
    /// EMA twins, aligned with `named`.
    ema: Vec<Tensor>,
    /// Moments, aligned with `named` (views into `flat.m`/`flat.v` when flat).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i64,
    weight_decay: f64,
    ema_rate: f64,
    flat: Option<Flat>,
    /// Per-tensor: this step's float32 gradients (undefined: none).
    pt_grads: Vec<Tensor>,
}

/// The flat buffers of [`Update::Flat`].
struct Flat {
    p: Tensor,
    ema: Tensor,
    m: Tensor,
    v: Tensor,
    /// `(offset, numel)` of each parameter, aligned with `Trainer::named`.
    segments: Vec<(i64, i64)>,
    /// Gradients, once the first backward pass made them: float32 over every parameter, and
    /// for bf16 the convolutions' bfloat16 gradients (cast into the head of `g`).
    grads: Option<FlatGrads>,
}

struct FlatGrads {
    g: Tensor,
    g16: Option<Tensor>,
    /// Parameters that got no gradient (never updated, as `torch.optim` skips them).
    unused: Vec<usize>,
}

/// The bfloat16 working copy: convolution weights and biases in bfloat16 (IDDPM's
/// `convert_module_to_f16` converts exactly the convolutions), the rest in float32.
struct HalfModel {
    net: UNet,
    /// Aligned with the master parameters.
    vars: Vec<Tensor>,
    /// How many leading parameters (of the layout) are bfloat16.
    n16: usize,
    /// Flat: the bfloat16 weights, refreshed from the head of the master buffer in one cast.
    flat16: Option<Tensor>,
    _vs: VarStore,
}

/// One `torch.optim.AdamW` update of `p` in place, with moments `m`, `v` and bias corrections
/// `bc1`, `bc2`: the same elementwise operations whether the tensors are one parameter or the
/// flat buffer of all of them, so both give the same bits.
#[allow(clippy::too_many_arguments)]
fn adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, lr: f64, wd: f64, bc1: f64, bc2: f64) {
    let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
    if wd != 0.0 {
        let _ = p.g_mul_scalar_(1.0 - lr * wd);
    }
    let _ = m.g_mul_scalar_(BETA1).g_add_(&(g * (1.0 - BETA1)));
    let _ = v.g_mul_scalar_(BETA2).g_add_(&(g * g * (1.0 - BETA2)));
    let denom = v.sqrt() / bc2.sqrt() + EPS;
    let _ = p.g_add_(&(&m / denom * (-lr / bc1)));
}

/// `ema <- rate * ema + (1 - rate) * p`, in place.
fn ema_update(ema: &Tensor, p: &Tensor, rate: f64) {
    let _ = ema.shallow_clone().g_mul_scalar_(rate).g_add_(&(p * (1.0 - rate)));
}

/// A layer is a convolution when its weight has 3 or more dimensions.
fn conv_layers(named: &[(String, Tensor)]) -> std::collections::BTreeSet<String> {
    named
        .iter()
        .filter(|(n, t)| n.ends_with(".weight") && t.dim() >= 3)
        .map(|(n, _)| n.trim_end_matches(".weight").to_string())
        .collect()
}

fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map(|(l, _)| l).unwrap_or(name)
}

/// Segments start at multiples of this many elements (256 bytes of float32, 128 of bfloat16):
/// vectorised kernels, oneDNN and cuDNN are slower on (or refuse to vectorise) unaligned
/// weights. The padding stays zero: it gets zero gradients, moments and updates.
const ALIGN: i64 = 64;

/// `(offset, numel)` of each tensor in a flat buffer, and the buffer's length.
fn layout(tensors: &[Tensor]) -> (Vec<(i64, i64)>, i64) {
    let mut offset = 0;
    let segments = tensors
        .iter()
        .map(|t| {
            let n = t.numel() as i64;
            let seg = (offset, n);
            offset = (offset + n + ALIGN - 1) / ALIGN * ALIGN;
            seg
        })
        .collect();
    (segments, offset)
}

/// A flat buffer of `kind` laid out as `segments`, holding `tensors`, each tensor re-pointed at
/// its slice (its values unchanged).
fn flatten(
    tensors: &[Tensor],
    segments: &[(i64, i64)],
    total: i64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let flat = Tensor::zeros([total], (kind, device));
    tch::no_grad(|| {
        for (t, &(offset, n)) in tensors.iter().zip(segments) {
            let view = flat.narrow(0, offset, n).view(t.size().as_slice());
            view.shallow_clone().copy_(t);
            t.shallow_clone().set_data(&view);
        }
    });
    flat
}

impl Trainer {
    /// The state of a run starting from `init` (model), `ema_init` (EMA weights; `init` when
    /// `None`) and `moments` (AdamW's state as [`Trainer::moments`] wrote it), on `device`.
    pub fn new(
        init: &Checkpoint,
        ema_init: Option<&Checkpoint>,
        moments: Option<Vec<(String, Tensor)>>,
        params: &TrainParams,
        device: Device,
        update: Update,
    ) -> anyhow::Result<Trainer> {
        let arch = init.arch.clone();
        let vs = VarStore::new(device);
        let net = init.build(&vs)?;
        let ema_vs = VarStore::new(device);
        let _ema_net = UNet::new(&ema_vs.root(), &arch)?;
        ema_init.unwrap_or(init).copy_into(&ema_vs)?;

        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let bf16 = params.precision == Precision::Bf16;
        let mut n16 = 0;
        if bf16 {
            // Convolutions first: their bfloat16 copies are then one slice of the buffer.
            let convs = conv_layers(&named);
            named.sort_by_key(|(n, _)| !convs.contains(layer_of(n)));
            n16 = named.iter().filter(|(n, _)| convs.contains(layer_of(n))).count();
        }
        let ema_vars = ema_vs.variables();
        let ema: Vec<Tensor> = named.iter().map(|(n, _)| ema_vars[n].shallow_clone()).collect();

        let saved: BTreeMap<String, Tensor> = moments.unwrap_or_default().into_iter().collect();
        let mut m = Vec::with_capacity(named.len());
        let mut v = Vec::with_capacity(named.len());
        for (name, x) in &named {
            match (saved.get(&format!("m.{name}")), saved.get(&format!("v.{name}"))) {
                (Some(sm), Some(sv)) => {
                    m.push(sm.to_device(device));
                    v.push(sv.to_device(device));
                }
                _ => {
                    m.push(x.zeros_like());
                    v.push(x.zeros_like());
                }
            }
        }
        let t = saved.get("t").map_or(0, |st| st.int64_value(&[]));

        let flat = (update == Update::Flat).then(|| {
            let params: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
            let (segments, total) = layout(&params);
            Flat {
                p: flatten(&params, &segments, total, Kind::Float, device),
                ema: flatten(&ema, &segments, total, Kind::Float, device),
                m: flatten(&m, &segments, total, Kind::Float, device),
                v: flatten(&v, &segments, total, Kind::Float, device),
                segments,
                grads: None,
            }
        });
        let half = if bf16 {
            let hvs = VarStore::new(device);
            let hnet = UNet::new(&hvs.root(), &arch)?;
            let by_name = hvs.variables();
            let vars: Vec<Tensor> = named.iter().map(|(n, _)| by_name[n].shallow_clone()).collect();
            let flat16 = match &flat {
                None => {
                    for v in &vars[..n16] {
                        tch::no_grad(|| v.shallow_clone().set_data(&v.to_kind(Kind::BFloat16)));
                    }
                    None
                }
                Some(f) => {
                    let n = f.segments.get(n16).map_or(f.p.numel() as i64, |s| s.0);
                    let flat16 = f.p.narrow(0, 0, n).to_kind(Kind::BFloat16);
                    tch::no_grad(|| {
                        for (i, v) in vars.iter().enumerate() {
                            let (off, len) = f.segments[i];
                            let src = if i < n16 { &flat16 } else { &f.p };
                            let view = src.narrow(0, off, len).view(v.size().as_slice());
                            v.shallow_clone().set_data(&view);
                        }
                    });
                    Some(flat16)
                }
            };
            Some(HalfModel { net: hnet, vars, n16, flat16, _vs: hvs })
        } else {
            None
        };
        Ok(Trainer {
            net,
            vs,
            ema_vs,
            half,
            named,
            ema,
            m,
            v,
            t,
            weight_decay: params.weight_decay,
            ema_rate: params.ema,
            flat,
            pt_grads: Vec::new(),
        })
    }

    /// Refreshes the working copy (bf16) and runs the model in training mode:
    /// `(x_t [B, C, H, W] float32, t_model [B]) -> [B, 2C or C, H, W]` float32.
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Tensor {
        match &self.half {
            None => self.net.forward_t(x, t, true),
            Some(h) => {
                tch::no_grad(|| match (&h.flat16, &self.flat) {
                    (Some(f16), Some(f)) => {
                        f16.shallow_clone().copy_(&f.p.narrow(0, 0, f16.numel() as i64));
                    }
                    _ => {
                        for (v, (_, p)) in h.vars.iter().zip(&self.named) {
                            v.shallow_clone().copy_(p);
                        }
                    }
                });
                // Input in bfloat16, output back in float32 (IDDPM's `x.type(inner_dtype)` /
                // `h.type(x.dtype)`).
                h.net.forward_t(&x.to_kind(Kind::BFloat16), t, true).to_kind(Kind::Float)
            }
        }
    }

    /// The tensors autograd computes gradients for (the working copy's under bf16).
    fn trained(&self) -> Vec<Tensor> {
        match &self.half {
            None => self.named.iter().map(|(_, p)| p.shallow_clone()).collect(),
            Some(h) => h.vars.iter().map(Tensor::shallow_clone).collect(),
        }
    }

    /// Zeroes the gradients, then backpropagates `loss`.
    pub fn backward(&mut self, loss: &Tensor) {
        match self.flat.as_ref().and_then(|f| f.grads.as_ref()) {
            Some(g) => {
                let _ = g.g.shallow_clone().zero_();
                if let Some(g16) = &g.g16 {
                    let _ = g16.shallow_clone().zero_();
                }
            }
            None => {
                for p in self.trained() {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.detach_().zero_();
                    }
                }
            }
        }
        loss.backward();
        match &self.flat {
            None => {
                // Float32 gradients of the master parameters (bf16: cast), undefined: none.
                let grads = self.trained().iter().map(|v| v.grad()).collect::<Vec<_>>();
                self.pt_grads = grads
                    .into_iter()
                    .map(|g| if g.defined() { g.to_kind(Kind::Float) } else { g })
                    .collect();
            }
            Some(f) if f.grads.is_none() => self.adopt_grads(),
            Some(_) => {}
        }
        if let Some(g) = self.flat.as_ref().and_then(|f| f.grads.as_ref())
            && let Some(g16) = &g.g16
        {
            tch::no_grad(|| g.g.narrow(0, 0, g16.numel() as i64).copy_(g16));
        }
    }

    /// After the first backward pass: moves every gradient into the flat buffers and re-points
    /// `.grad` there, so later passes accumulate in place.
    fn adopt_grads(&mut self) {
        let trained = self.trained();
        let n16 = self.half.as_ref().map_or(0, |h| h.n16);
        // The bfloat16 gradients mirror the bfloat16 weights.
        let g16 = self.half.as_ref().and_then(|h| h.flat16.as_ref()).map(Tensor::zeros_like);
        let f = self.flat.as_mut().expect("flat");
        let g = f.p.zeros_like();
        let mut unused = Vec::new();
        tch::no_grad(|| {
            for (i, v) in trained.iter().enumerate() {
                let mut grad = v.grad();
                if !grad.defined() {
                    unused.push(i);
                    continue;
                }
                let (off, len) = f.segments[i];
                let buf = if i < n16 { g16.as_ref().expect("bf16 buffer") } else { &g };
                let view = buf.narrow(0, off, len).view(grad.size().as_slice());
                view.shallow_clone().copy_(&grad);
                grad.set_data(&view);
            }
        });
        f.grads = Some(FlatGrads { g, g16, unused });
    }

    /// Scales the gradients so their global L2 norm is at most `max`, as
    /// `torch.nn.utils.clip_grad_norm_`, without reading anything back to the host.
    pub fn clip_grad_norm(&mut self, max: f64) {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = match self.flat_grads() {
                Some(g) => vec![g],
                None => self
                    .pt_grads
                    .iter()
                    .filter(|g| g.defined())
                    .map(Tensor::shallow_clone)
                    .collect(),
            };
            if grads.is_empty() {
                return;
            }
            let norms: Vec<Tensor> =
                grads.iter().map(|g| g.norm_scalaropt_dtype(2.0, Kind::Double)).collect();
            let total = Tensor::stack(&norms, 0).norm();
            let coef = ((total + 1e-6).reciprocal() * max).clamp_max(1.0);
            for g in &grads {
                let _ = g.shallow_clone().g_mul_(&coef);
            }
        });
    }

    /// The flat float32 gradient (flat, after the first backward pass).
    fn flat_grads(&self) -> Option<Tensor> {
        Some(self.flat.as_ref()?.grads.as_ref()?.g.shallow_clone())
    }

    /// One AdamW step at learning rate `lr`, then the EMA update
    /// `ema <- rate * ema + (1 - rate) * params`.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2 = 1.0 - BETA2.powi(self.t as i32);
        let wd = self.weight_decay;
        let rate = self.ema_rate;
        tch::no_grad(|| match self.flat_grads() {
            Some(g) => {
                let f = self.flat.as_ref().expect("flat");
                let unused = &f.grads.as_ref().expect("grads").unused;
                if wd != 0.0 && !unused.is_empty() {
                    for (i, &(off, len)) in f.segments.iter().enumerate() {
                        if !unused.contains(&i) {
                            let _ = f.p.narrow(0, off, len).g_mul_scalar_(1.0 - lr * wd);
                        }
                    }
                }
                // Unused parameters have zero gradients and keep zero moments: the update adds
                // exactly zero to them (and they were not decayed above).
                let decay = if unused.is_empty() { wd } else { 0.0 };
                adamw(&f.p, &g, &f.m, &f.v, lr, decay, bc1, bc2);
                ema_update(&f.ema, &f.p, rate);
            }
            None => {
                for (i, (_, p)) in self.named.iter().enumerate() {
                    if self.pt_grads[i].defined() {
                        adamw(p, &self.pt_grads[i], &self.m[i], &self.v[i], lr, wd, bc1, bc2);
                    }
                }
                for (e, (_, p)) in self.ema.iter().zip(&self.named) {
                    ema_update(e, p, rate);
                }
            }
        });
    }

    /// The model's weights.
    pub fn model(&self) -> &VarStore {
        &self.vs
    }

    /// The EMA weights.
    pub fn ema(&self) -> &VarStore {
        &self.ema_vs
    }

    /// AdamW's state on the CPU: `m.<name>`, `v.<name>` and the step count `t`.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.named.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].to_device(Device::Cpu).copy()));
            out.push((format!("v.{name}"), self.v[i].to_device(Device::Cpu).copy()));
        }
        out.push(("t".to_string(), Tensor::from(self.t)));
        out
    }
}
