//! `train`: trains an IDDPM UNet — from scratch (base training) or from an upstream checkpoint
//! (fine-tuning a pruned or copied model), over all timesteps or, in a `for_each: group` stage,
//! over one group's timestep set from the allocation (uniform over that set).
//!
//! Faithful to improved-diffusion's `TrainLoop`: AdamW (weight decay 0 by default), constant
//! learning rate after an optional linear warm-up, EMA `ema <- rate * ema + (1 - rate) * params`
//! after every step, no gradient clipping unless asked, loss from [`GaussianDiffusion`]
//! (`hybrid` by default) and metrics logged as IDDPM does, including the loss per quarter of the
//! timestep range.
//!
//! **Reproducible and resumable.** Every random draw of step `s` comes from a stream derived
//! from `(seed, s)`: the batch order (shuffled epochs), flips, timesteps, noise, and dropout
//! (libtorch's global generator is re-seeded for each step's forward pass; a stage instance
//! runs alone in its worker process, so the generator is its own). Every `checkpoint_every`
//! steps, and when interrupted, the model, EMA, optimizer moments and sampler position go to the
//! stage's work area; a killed run resumes there and ends with the same weights, bit for bit on
//! the CPU, as a run that was never interrupted.
//!
//! Outputs: `model.safetensors`, `ema.safetensors` (what later stages use by default) and
//! `metrics.jsonl`.
//!
//! **`metrics.jsonl` is not reproducible byte for byte.** Each line's `samples_per_s` is
//! measured throughput (wall-clock), so two identical runs (or a resumed and an uninterrupted
//! one) store different `metrics.jsonl` objects, while their weights and every other metric
//! agree exactly. Nothing downstream depends on it: keys never hash outputs, and no stage reads
//! the field. It stays in the output rather than moving to the worker's log because taking it
//! out changes the train stage's outputs, which means bumping `train`'s VERSION and re-running
//! every cached training result; do that with the next change that needs a bump anyway.

pub use progdiff_kinds::train::*;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::allocate::{ALLOCATION_JSON, Allocation};
use crate::checkpoint::{self, Checkpoint};
use crate::config::ModelConfig;
use crate::context::StageContext;
use crate::data::{Dataset, EpochSampler};
use crate::diffusion::{GaussianDiffusion, NoiseSource, SeededNoise};
use crate::unet::{UNet, UNetArch};

/// Parses `cpu` / `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => match s.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) if tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count() => {
                Ok(Device::Cuda(i))
            }
            Some(_) => {
                bail!("device `{s}` is not available (CUDA devices: {})", tch::Cuda::device_count())
            }
            None => bail!("unknown device `{s}`, expected `cpu` or `cuda:N`"),
        },
    }
}

/// SplitMix64 finaliser: independent streams from `(seed, step, purpose)`.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn stream(seed: u64, step: u64, purpose: u64) -> u64 {
    mix(mix(mix(seed) ^ step) ^ purpose)
}

/// `n` uniform draws below `bound` from a stream (rejection-free multiply-shift; bias < 2^-32
/// for the bounds used here).
fn uniform_indices(state: u64, n: usize, bound: usize) -> Vec<usize> {
    (0..n as u64).map(|i| (((mix(state ^ i) >> 32) * bound as u64) >> 32) as usize).collect()
}

/// Where training starts: scratch (seeded init) or an upstream checkpoint.
fn initial_checkpoint(ctx: &StageContext, inputs: &TrainInputs) -> anyhow::Result<Checkpoint> {
    let params = &inputs.stage;
    let upstream: Vec<_> = ctx.inputs.iter().filter(|u| u.files.contains_key(MODEL_FILE)).collect();
    match upstream.as_slice() {
        [] => {
            let arch = UNetArch::from_config(&inputs.model)?;
            let vs = VarStore::new(Device::Cpu);
            // One stage instance per process: libtorch's global generator is this stage's.
            tch::manual_seed(stream(inputs.seed, u64::MAX, 0) as i64);
            let _net = UNet::new(&vs.root(), &arch)?;
            Ok(Checkpoint::from_var_store(&arch, &vs, BTreeMap::new())?)
        }
        [u] => {
            let file = match params.init {
                InitFrom::Ema if u.files.contains_key(EMA_FILE) => EMA_FILE,
                _ => MODEL_FILE,
            };
            let path = u.file(file)?;
            Checkpoint::load(path)
                .with_context(|| format!("loading `{file}` of upstream `{}`", u.id))
        }
        many => bail!(
            "stage `{}` needs several checkpoints ({}); a train stage starts from at most one",
            ctx.id,
            many.iter().map(|u| format!("`{}`", u.id)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The original timesteps this instance trains on.
fn timestep_set(ctx: &StageContext, steps: usize) -> anyhow::Result<Vec<usize>> {
    let Some(g) = ctx.group else { return Ok((0..steps).collect()) };
    let alloc = ctx
        .inputs
        .iter()
        .find_map(|u| u.files.get(ALLOCATION_JSON))
        .with_context(|| format!("group stage `{}` has no upstream allocation", ctx.id))?;
    let alloc = Allocation::read_json(alloc)?;
    anyhow::ensure!(
        alloc.steps == steps,
        "the allocation covers {} timesteps but `diffusion.steps` is {steps}",
        alloc.steps
    );
    let group = alloc.groups.get(g).with_context(|| format!("the allocation has no group {g}"))?;
    Ok(group.timesteps.clone())
}

/// Resume state in the work area: `latest` names a complete `ckpt-<step>` directory.
struct ResumeDir {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct ResumeState {
    step: usize,
    epoch: u64,
    pos: usize,
    /// The logging interval in progress, so a resumed run logs the same means.
    #[serde(default)]
    interval: Interval,
}

impl ResumeDir {
    fn latest(&self) -> Option<(ResumeState, PathBuf)> {
        let name = std::fs::read_to_string(self.root.join("latest")).ok()?;
        let dir = self.root.join(name.trim());
        let state = std::fs::read(dir.join("state.json")).ok()?;
        Some((serde_json::from_slice(&state).ok()?, dir))
    }

    fn save(
        &self,
        state: &ResumeState,
        model: &Checkpoint,
        ema: &Checkpoint,
        moments: &[(String, Tensor)],
    ) -> anyhow::Result<()> {
        let name = format!("ckpt-{}", state.step);
        let dir = self.root.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        model.save(&dir.join(MODEL_FILE))?;
        ema.save(&dir.join(EMA_FILE))?;
        Tensor::write_safetensors(moments, dir.join("adam.safetensors"))?;
        std::fs::write(dir.join("state.json"), serde_json::to_vec(state)?)?;
        sync_dir(&dir);
        let tmp = self.root.join("latest.tmp");
        std::fs::write(&tmp, &name)?;
        std::fs::rename(&tmp, self.root.join("latest"))?;
        sync_dir(&self.root);
        // Older checkpoints are no longer needed.
        for e in std::fs::read_dir(&self.root)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ckpt-") && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Running sums for one logging interval.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Interval {
    n: usize,
    loss: f64,
    mse: f64,
    vb: f64,
    quartile: [(f64, usize); 4],
}

/// Runs the stage.
pub fn run(ctx: &StageContext, inputs: &TrainInputs) -> anyhow::Result<()> {
    let params = &inputs.stage;
    let seed = inputs.seed;
    let device = parse_device(&ctx.device)?;
    let data = inputs.at.data_config(inputs.data.as_ref())?;
    let dataset = Dataset::open(&data, &inputs.at.dir).context("opening the dataset")?;
    check_shapes(&dataset, &inputs.model)?;
    let diffusion =
        GaussianDiffusion::from_config(&inputs.diffusion.config(), inputs.model.learn_sigma)?;
    let steps_t = inputs.diffusion.steps;
    let allowed = timestep_set(ctx, steps_t)?;
    anyhow::ensure!(!allowed.is_empty(), "stage `{}` has no timesteps to train on", ctx.id);

    let resume = ResumeDir { root: ctx.work_dir.clone() };
    let mut sampler = EpochSampler::new(dataset.len(), seed);
    let mut interval = Interval::default();
    let (start, init, ema_init, moments) = match resume.latest() {
        Some((state, dir)) => {
            interval = state.interval.clone();
            tracing::info!(stage = %ctx.id, step = state.step, "resuming from the work area");
            sampler.seek(state.epoch, state.pos);
            let moments = Tensor::read_safetensors(dir.join("adam.safetensors"))?;
            (
                state.step,
                Checkpoint::load(&dir.join(MODEL_FILE))?,
                Some(Checkpoint::load(&dir.join(EMA_FILE))?),
                Some(moments),
            )
        }
        None => (0, initial_checkpoint(ctx, inputs)?, None, None),
    };
    let arch = init.arch.clone();

    let vs = VarStore::new(device);
    let net = init.build(&vs)?;
    let ema_vs = VarStore::new(device);
    let _ema_net = UNet::new(&ema_vs.root(), &arch)?;
    ema_init.as_ref().unwrap_or(&init).copy_into(&ema_vs)?;
    drop(init);
    drop(ema_init);

    // Parameters in a fixed (name) order, with their EMA twins and Adam moments.
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let ema_vars = ema_vs.variables();
    let mut adam = Adam::new(&named, params, moments)?;
    let half = match params.precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(HalfModel::new(&arch, device, &named)?),
    };

    let metrics_path = ctx.work_dir.join(METRICS_FILE);
    let mut metrics = open_metrics(&metrics_path, start)?;
    let total = params.steps as u64;
    let mut last_loss = f64::NAN;
    ctx.report.progress(start as u64, total, "steps", String::new);
    let mut t_log = Instant::now();
    let (c, h, w) = dataset.image_shape();
    let batch = params.batch_size;

    for step in start..params.steps {
        ctx.cancel.check()?;
        let s = step as u64;
        let indices = sampler.next_batch(batch);
        let flips: Vec<bool> = if dataset.hflip() {
            uniform_indices(stream(seed, s, 1), batch, 2).into_iter().map(|b| b == 1).collect()
        } else {
            vec![false; batch]
        };
        let x0 = dataset.batch_with_flips(&indices, &flips)?.to_device(device);
        let t_idx = uniform_indices(stream(seed, s, 2), batch, allowed.len());
        let t_vals: Vec<i64> = t_idx.iter().map(|&i| allowed[i] as i64).collect();
        let t = Tensor::from_slice(&t_vals).to_device(device);
        let noise = SeededNoise::stream(seed, stream(seed, s, 3))
            .randn(&[batch as i64, c as i64, h as i64, w as i64], (Kind::Float, device));

        if let Some(h) = &half {
            h.load(&named);
        }
        let losses = {
            tch::manual_seed(stream(seed, s, 4) as i64);
            match &half {
                None => {
                    diffusion.training_losses(|x, tm| net.forward_t(x, tm, true), &x0, &t, &noise)
                }
                Some(h) => diffusion.training_losses(|x, tm| h.forward(x, tm), &x0, &t, &noise),
            }
        };
        let loss = losses.loss.mean(Kind::Float);
        let loss_value = loss.double_value(&[]);
        if !loss_value.is_finite() {
            bail!("loss is {loss_value} at step {step}; try a lower `lr`");
        }
        let trained: Vec<Tensor> = match &half {
            None => named.iter().map(|(_, p)| p.shallow_clone()).collect(),
            Some(h) => h.vars.iter().map(Tensor::shallow_clone).collect(),
        };
        zero_grads(&trained);
        loss.backward();
        let grads: Vec<Tensor> = trained
            .iter()
            .map(|v| {
                let g = v.grad();
                if g.defined() { g.to_kind(Kind::Float) } else { g }
            })
            .collect();
        if let Some(max) = params.grad_clip {
            clip_grad_norm(&grads, max);
        }
        let lr = if params.warmup > 0 {
            params.lr * ((step + 1) as f64 / params.warmup as f64).min(1.0)
        } else {
            params.lr
        };
        adam.step(lr, &grads);
        tch::no_grad(|| {
            for (name, p) in &named {
                let mut e = ema_vars[name].shallow_clone();
                let _ = e.g_mul_scalar_(params.ema).g_add_(&(p * (1.0 - params.ema)));
            }
        });

        // Metrics, as IDDPM logs them: means over the interval, and per timestep quartile.
        let per = Vec::<f64>::try_from(
            losses.loss.detach().to_kind(Kind::Double).to_device(Device::Cpu),
        )?;
        interval.n += 1;
        interval.loss += loss_value;
        interval.mse += losses.mse.detach().mean(Kind::Double).double_value(&[]);
        interval.vb += losses.vb.detach().mean(Kind::Double).double_value(&[]);
        for (l, &tv) in per.iter().zip(&t_vals) {
            let q = (4 * tv as usize / steps_t).min(3);
            interval.quartile[q].0 += l;
            interval.quartile[q].1 += 1;
        }
        let done = step + 1;
        if done % params.log_every == 0 || done == params.steps {
            let n = interval.n as f64;
            let mut line = serde_json::json!({
                "step": done,
                "loss": interval.loss / n,
                "mse": interval.mse / n,
                "vb": interval.vb / n,
                "lr": lr,
                "samples_per_s": (interval.n * batch) as f64 / t_log.elapsed().as_secs_f64().max(1e-9),
            });
            for (q, (sum, count)) in interval.quartile.iter().enumerate() {
                if *count > 0 {
                    line[format!("loss_q{q}")] = (sum / *count as f64).into();
                }
            }
            writeln!(metrics, "{line}")?;
            metrics.flush()?;
            ctx.report.metrics(&line);
            last_loss = interval.loss / n;
            interval = Interval::default();
            t_log = Instant::now();
        }
        ctx.report.progress(done as u64, total, "steps", || {
            if last_loss.is_finite() { format!("loss {last_loss:.4}") } else { String::new() }
        });

        // Resume state every `checkpoint_every` steps, and when interrupted (Ctrl-C forwarded to
        // the worker, or the coordinator gone), so the next run resumes where this one stopped.
        let due = done.is_multiple_of(params.checkpoint_every) || ctx.cancel.is_cancelled();
        if params.checkpoint_every > 0 && due && done < params.steps {
            let (epoch, pos) = sampler.position();
            let state = ResumeState { step: done, epoch, pos, interval: interval.clone() };
            let model = Checkpoint::from_var_store(&arch, &vs, step_state(done, None))?;
            let ema =
                Checkpoint::from_var_store(&arch, &ema_vs, step_state(done, Some(params.ema)))?;
            resume.save(&state, &model, &ema, &adam.moments())?;
        }
    }
    drop(metrics);

    let model = Checkpoint::from_var_store(&arch, &vs, step_state(params.steps, None))?;
    model.save(&ctx.out_dir.join(MODEL_FILE))?;
    let ema =
        Checkpoint::from_var_store(&arch, &ema_vs, step_state(params.steps, Some(params.ema)))?;
    ema.save(&ctx.out_dir.join(EMA_FILE))?;
    std::fs::copy(&metrics_path, ctx.out_dir.join(METRICS_FILE))?;
    Ok(())
}

fn step_state(step: usize, ema: Option<f64>) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([(checkpoint::STEP.to_string(), step.to_string())]);
    if let Some(rate) = ema {
        s.insert(checkpoint::EMA_RATE.to_string(), rate.to_string());
    }
    s
}

fn check_shapes(dataset: &Dataset, model: &ModelConfig) -> anyhow::Result<()> {
    let (c, h, w) = dataset.image_shape();
    if c != model.in_channels || h != model.image_size || w != model.image_size {
        bail!(
            "the dataset gives {c}x{h}x{w} images but the model takes {}x{}x{}; set `data.image_size` / `data.channels` or `model.image_size` / `model.in_channels` to match",
            model.in_channels,
            model.image_size,
            model.image_size
        );
    }
    Ok(())
}

/// Opens the metrics log for appending, keeping only lines up to `step` (a resumed run
/// rewrites what the killed one logged after its last checkpoint).
fn open_metrics(path: &Path, step: usize) -> anyhow::Result<std::fs::File> {
    let kept: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(String::from)
        .collect();
    let mut f = std::fs::File::create(path)?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}

fn zero_grads(vars: &[Tensor]) {
    for p in vars {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.detach_().zero_();
        }
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max` (as
/// `torch.nn.utils.clip_grad_norm_`).
fn clip_grad_norm(grads: &[Tensor], max: f64) {
    tch::no_grad(|| {
        let norms: Vec<Tensor> =
            grads.iter().filter(|g| g.defined()).map(|g| g.norm().to_kind(Kind::Double)).collect();
        if norms.is_empty() {
            return;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = max / (total + 1e-6);
        if coef < 1.0 {
            for g in grads.iter().filter(|g| g.defined()) {
                let _ = g.shallow_clone().g_mul_scalar_(coef);
            }
        }
    });
}

/// The bfloat16 working copy of the model for [`Precision::Bf16`]: convolution weights and
/// biases in bfloat16 (IDDPM's `convert_module_to_f16` converts exactly the convolutions), the
/// rest in float32; refreshed from the float32 master weights before every step.
struct HalfModel {
    net: UNet,
    /// Aligned with the master parameters (same names, same order).
    vars: Vec<Tensor>,
    _vs: VarStore,
}

impl HalfModel {
    fn new(arch: &UNetArch, device: Device, master: &[(String, Tensor)]) -> anyhow::Result<Self> {
        let vs = VarStore::new(device);
        let net = UNet::new(&vs.root(), arch)?;
        let by_name = vs.variables();
        // A layer is a convolution when its weight has 3 or more dimensions.
        let conv_layers: std::collections::BTreeSet<String> = master
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.dim() >= 3)
            .map(|(n, _)| n.trim_end_matches(".weight").to_string())
            .collect();
        let mut vars = Vec::with_capacity(master.len());
        for (name, _) in master {
            let mut v = by_name[name].shallow_clone();
            let layer = name.rsplit_once('.').map(|(l, _)| l).unwrap_or(name);
            if conv_layers.contains(layer) {
                tch::no_grad(|| v.set_data(&v.to_kind(Kind::BFloat16)));
            }
            vars.push(v);
        }
        Ok(HalfModel { net, vars, _vs: vs })
    }

    fn load(&self, master: &[(String, Tensor)]) {
        tch::no_grad(|| {
            for (v, (_, p)) in self.vars.iter().zip(master) {
                v.shallow_clone().copy_(p);
            }
        });
    }

    /// Model input in bfloat16, output back in float32 (IDDPM's `x.type(inner_dtype)` /
    /// `h.type(x.dtype)`).
    fn forward(&self, x: &Tensor, t: &Tensor) -> Tensor {
        self.net.forward_t(&x.to_kind(Kind::BFloat16), t, true).to_kind(Kind::Float)
    }
}

/// AdamW exactly as `torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8), with its moments exposed
/// so a resumed run continues with the same state.
struct Adam {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i64,
    weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Adam {
    fn new(
        params: &[(String, Tensor)],
        p: &TrainParams,
        saved: Option<Vec<(String, Tensor)>>,
    ) -> anyhow::Result<Adam> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        let mut t = 0;
        let saved: BTreeMap<String, Tensor> = saved.unwrap_or_default().into_iter().collect();
        for (name, x) in params {
            match (saved.get(&format!("m.{name}")), saved.get(&format!("v.{name}"))) {
                (Some(sm), Some(sv)) => {
                    m.push(sm.to_device(x.device()));
                    v.push(sv.to_device(x.device()));
                }
                _ => {
                    m.push(x.zeros_like());
                    v.push(x.zeros_like());
                }
            }
        }
        if let Some(st) = saved.get("t") {
            t = st.int64_value(&[]);
        }
        Ok(Adam {
            params: params.iter().map(|(n, x)| (n.clone(), x.shallow_clone())).collect(),
            m,
            v,
            t,
            weight_decay: p.weight_decay,
        })
    }

    /// One update with `grads[i]` the gradient of parameter `i` (undefined: no update).
    fn step(&mut self, lr: f64, grads: &[Tensor]) {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2 = 1.0 - BETA2.powi(self.t as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter().enumerate() {
                let g = &grads[i];
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = self.m[i].g_mul_scalar_(BETA1).g_add_(&(g * (1.0 - BETA1)));
                let _ = self.v[i].g_mul_scalar_(BETA2).g_add_(&(g * g * (1.0 - BETA2)));
                let denom = self.v[i].sqrt() / bc2.sqrt() + EPS;
                let _ = p.g_add_(&(&self.m[i] / denom * (-lr / bc1)));
            }
        });
    }

    fn moments(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].to_device(Device::Cpu)));
            out.push((format!("v.{name}"), self.v[i].to_device(Device::Cpu)));
        }
        out.push(("t".to_string(), Tensor::from(self.t)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_torch_adamw_by_hand() {
        // One parameter, two steps, gradient 2*p (loss p^2), lr 0.1, wd 0.01: the reference
        // values follow torch.optim.AdamW's update written out by hand.
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let params = vec![("p".to_string(), p.shallow_clone())];
        let tp = TrainParams { weight_decay: 0.01, ..TrainParams::default() };
        let mut adam = Adam::new(&params, &tp, None).unwrap();
        let (mut x, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=2 {
            zero_grads(std::slice::from_ref(&p));
            (&p * &p).sum(Kind::Float).backward();
            adam.step(0.1, &[p.grad()]);
            let g = 2.0 * x;
            x *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            x -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            assert!(
                (p.double_value(&[0]) - x).abs() < 1e-6,
                "step {t}: {} vs {x}",
                p.double_value(&[0])
            );
        }
    }

    #[test]
    fn streams_are_independent_and_stable() {
        assert_ne!(stream(0, 1, 2), stream(0, 2, 1));
        assert_eq!(
            uniform_indices(stream(5, 3, 2), 4, 10),
            uniform_indices(stream(5, 3, 2), 4, 10)
        );
        assert!(uniform_indices(stream(5, 3, 2), 1000, 7).iter().all(|&i| i < 7));
        let counts =
            uniform_indices(stream(1, 1, 1), 7000, 7).iter().fold([0usize; 7], |mut c, &i| {
                c[i] += 1;
                c
            });
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn validation_names_fields() {
        let p = TrainParams {
            steps: 0,
            ema: 1.0,
            lr: -1.0,
            grad_clip: Some(0.0),
            ..TrainParams::default()
        };
        let fields: Vec<String> = p.validate().into_iter().map(|e| e.path.join(".")).collect();
        assert_eq!(fields, ["steps", "lr", "ema", "grad_clip"]);
    }
}
