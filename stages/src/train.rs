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
use crate::diffusion::{GaussianDiffusion, SeededNoise};
use crate::optim::{Trainer, Update};
use crate::transfer::{read_f64s, upload};
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

/// Everything one training step needs from the host, made ahead on a background thread (the
/// batch order, flips, timesteps and noise are functions of `(seed, step)`, so making them early
/// changes nothing).
struct HostStep {
    /// The sampler's position after this step's batch (saved with a checkpoint after it).
    position: (u64, usize),
    batch: HostBatch,
    /// Row 0: the timesteps, row 1: their quartile; int64 `[2, B]`.
    t_q: Tensor,
    /// How many of the batch's timesteps fall in each quartile.
    quartile_counts: [usize; 4],
    /// Float32 `[B, C, H, W]`.
    noise: Tensor,
}

/// A step's batch as the host makes it.
enum HostBatch {
    /// Decoded and flipped on the host (datasets not held on the device).
    Decoded(Tensor),
    /// Image indices, int64 `[B]`, and flips, bool `[B]`, of a dataset held on the device.
    Indices(Tensor, Tensor),
}

/// Where the loop gets each step's [`HostStep`]: made in line, or by a thread a step ahead.
enum Feed<F> {
    Inline(F, EpochSampler),
    Thread(std::sync::mpsc::Receiver<anyhow::Result<HostStep>>),
}

impl<F: FnMut(usize, &mut EpochSampler) -> anyhow::Result<HostStep>> Feed<F> {
    fn next(&mut self, step: usize) -> anyhow::Result<HostStep> {
        match self {
            Feed::Inline(make, sampler) => make(step, sampler),
            Feed::Thread(rx) => rx.recv().context("the data thread stopped")?,
        }
    }
}

/// Datasets up to this size are held on the training device whole.
const RESIDENT_MAX_BYTES: usize = 2 << 30;

/// Runs the stage.
pub fn run(ctx: &StageContext, inputs: &TrainInputs) -> anyhow::Result<()> {
    run_with(ctx, inputs, &How::default())
}

/// How [`run_with`] runs: the defaults are what [`run`] does; the tests compare the others.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct How {
    /// The update implementation.
    pub update: Update,
    /// Make each step's host share on a thread a step ahead (`None`: on GPUs only).
    pub host_thread: Option<bool>,
}

impl Default for How {
    fn default() -> Self {
        How { update: Update::Flat, host_thread: None }
    }
}

/// [`run`], as `how` says.
#[doc(hidden)]
pub fn run_with(ctx: &StageContext, inputs: &TrainInputs, how: &How) -> anyhow::Result<()> {
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
    let mut trainer = Trainer::new(&init, ema_init.as_ref(), moments, params, device, how.update)?;
    drop(init);
    drop(ema_init);
    let resident = dataset.resident(device, RESIDENT_MAX_BYTES).context("loading the dataset")?;
    if let Some(r) = &resident {
        tracing::info!(stage = %ctx.id, mib = r.bytes() >> 20, "the dataset is held on the device");
    }

    let metrics_path = ctx.work_dir.join(METRICS_FILE);
    let mut metrics = open_metrics(&metrics_path, start)?;
    let total = params.steps as u64;
    ctx.report.progress(start as u64, total, "steps", String::new);
    let (c, h, w) = dataset.image_shape();
    let batch = params.batch_size;
    let hflip = dataset.hflip();
    let on_device = resident.is_some();

    // The host's share of each step, one step ahead.
    let make = move |step: usize, sampler: &mut EpochSampler| -> anyhow::Result<HostStep> {
        let s = step as u64;
        let idx = sampler.next_batch(batch);
        let position = sampler.position();
        let flips: Vec<bool> = if hflip {
            uniform_indices(stream(seed, s, 1), batch, 2).into_iter().map(|b| b == 1).collect()
        } else {
            vec![false; batch]
        };
        let t_idx = uniform_indices(stream(seed, s, 2), batch, allowed.len());
        let t_vals: Vec<i64> = t_idx.iter().map(|&i| allowed[i] as i64).collect();
        let mut quartile_counts = [0; 4];
        let q_vals: Vec<i64> = t_vals
            .iter()
            .map(|&tv| {
                let q = (4 * tv as usize / steps_t).min(3);
                quartile_counts[q] += 1;
                q as i64
            })
            .collect();
        let pin = |t: Tensor| crate::transfer::pin(t, device);
        let batch_of = if on_device {
            let indices: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
            HostBatch::Indices(pin(Tensor::from_slice(&indices)), pin(Tensor::from_slice(&flips)))
        } else {
            HostBatch::Decoded(pin(dataset.batch_with_flips(&idx, &flips)?))
        };
        let shape = [batch as i64, c as i64, h as i64, w as i64];
        Ok(HostStep {
            position,
            batch: batch_of,
            t_q: pin(Tensor::from_slice(&[t_vals, q_vals].concat()).view([2, batch as i64])),
            quartile_counts,
            noise: pin(SeededNoise::stream(seed, stream(seed, s, 3)).host(&shape, Kind::Float)),
        })
    };

    let steps = params.steps;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // On a GPU the host's share runs on its own thread, a step ahead; on the CPU it would
        // only take cores from libtorch's threads, so it runs in line.
        let mut feed = if how.host_thread.unwrap_or(device.is_cuda()) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<HostStep>>(1);
            scope.spawn(move || {
                let mut sampler = sampler;
                for step in start..steps {
                    let made = make(step, &mut sampler);
                    let failed = made.is_err();
                    if tx.send(made).is_err() || failed {
                        break;
                    }
                }
            });
            Feed::Thread(rx)
        } else {
            Feed::Inline(make, sampler)
        };
        let mut sums = Sums::new(&interval, device);
        let mut last_loss = f64::NAN;
        let mut t_log = Instant::now();
        // Interrupted before this process trained a step: nothing new to save. Later, an
        // interruption is seen once per step, after the update (below), so a request that
        // arrives at any moment saves the state of every step taken.
        ctx.cancel.check()?;
        for step in start..steps {
            let host = feed.next(step)?;
            let s = step as u64;
            let x0 = match (&host.batch, &resident) {
                (HostBatch::Decoded(x0), _) => upload(x0, device),
                (HostBatch::Indices(indices, flips), Some(r)) => {
                    r.batch(&upload(indices, device), &upload(flips, device))
                }
                (HostBatch::Indices(..), None) => unreachable!("indices only for resident data"),
            };
            let t_q = upload(&host.t_q, device);
            let (t, q) = (t_q.get(0), t_q.get(1));
            let noise = upload(&host.noise, device);

            let losses = {
                tch::manual_seed(stream(seed, s, 4) as i64);
                diffusion.training_losses(|x, tm| trainer.forward(x, tm), &x0, &t, &noise)
            };
            let loss = losses.loss.mean(Kind::Float);
            trainer.backward(&loss);
            if let Some(max) = params.grad_clip {
                trainer.clip_grad_norm(max);
            }
            let lr = if params.warmup > 0 {
                params.lr * ((step + 1) as f64 / params.warmup as f64).min(1.0)
            } else {
                params.lr
            };
            trainer.step(lr);

            // Metrics, as IDDPM logs them: means over the interval, and per timestep quartile;
            // summed on the device, read at logging and checkpoint steps only.
            sums.add(&loss, &losses, &q, host.quartile_counts);
            let done = step + 1;
            let log_now = done % params.log_every == 0 || done == steps;
            let cancelled = ctx.cancel.is_cancelled();
            let due = done.is_multiple_of(params.checkpoint_every) || cancelled;
            let save_now = params.checkpoint_every > 0 && due && done < steps;
            if log_now || save_now {
                let so_far = sums.read();
                if !so_far.loss.is_finite() {
                    bail!(
                        "the loss became {} in the {} steps up to step {done}; try a lower `lr`",
                        so_far.loss,
                        so_far.n,
                    );
                }
            }
            if log_now {
                let interval = sums.read();
                let n = interval.n as f64;
                let mut line = serde_json::json!({
                    "step": done,
                    "loss": interval.loss / n,
                    "mse": interval.mse / n,
                    "vb": interval.vb / n,
                    "lr": lr,
                    "samples_per_s": (sums.steps * batch) as f64 / t_log.elapsed().as_secs_f64().max(1e-9),
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
                sums = Sums::new(&Interval::default(), device);
                t_log = Instant::now();
            }
            ctx.report.progress(done as u64, total, "steps", || {
                if last_loss.is_finite() { format!("loss {last_loss:.4}") } else { String::new() }
            });

            // Resume state every `checkpoint_every` steps, and when interrupted (Ctrl-C forwarded
            // to the worker, or the coordinator gone), so the next run resumes where this one
            // stopped.
            if save_now {
                let (epoch, pos) = host.position;
                let state = ResumeState { step: done, epoch, pos, interval: sums.read() };
                let model =
                    Checkpoint::from_var_store(&arch, trainer.model(), step_state(done, None))?;
                let ema = Checkpoint::from_var_store(
                    &arch,
                    trainer.ema(),
                    step_state(done, Some(params.ema)),
                )?;
                resume.save(&state, &model, &ema, &trainer.moments())?;
            }
            if cancelled && done < steps {
                ctx.cancel.check()?;
            }
        }
        Ok(())
    })?;
    drop(metrics);

    let model = Checkpoint::from_var_store(&arch, trainer.model(), step_state(params.steps, None))?;
    model.save(&ctx.out_dir.join(MODEL_FILE))?;
    let ema = Checkpoint::from_var_store(
        &arch,
        trainer.ema(),
        step_state(params.steps, Some(params.ema)),
    )?;
    ema.save(&ctx.out_dir.join(EMA_FILE))?;
    std::fs::copy(&metrics_path, ctx.out_dir.join(METRICS_FILE))?;
    Ok(())
}

/// The running sums of a logging interval, on the device: `[loss, mse, vb, q0..q3]` in
/// float64, added to in the order the host added them before (so the logged means are the
/// same), read back only when logging or checkpointing (once per step at most).
struct Sums {
    acc: Tensor,
    /// Steps in the interval and samples per quartile, counted on the host (including a
    /// resumed run's steps before it started).
    n: usize,
    counts: [usize; 4],
    /// Steps added by this process (for the throughput).
    steps: usize,
    /// The last read, while nothing was added since.
    read: Option<Interval>,
}

impl Sums {
    /// Sums continuing `interval` (a resumed run's interval in progress).
    fn new(interval: &Interval, device: Device) -> Sums {
        let mut init = vec![interval.loss, interval.mse, interval.vb];
        init.extend(interval.quartile.iter().map(|q| q.0));
        Sums {
            acc: upload(&Tensor::from_slice(&init), device),
            n: interval.n,
            counts: interval.quartile.map(|q| q.1),
            steps: 0,
            read: Some(interval.clone()),
        }
    }

    fn add(
        &mut self,
        loss: &Tensor,
        losses: &crate::diffusion::Losses,
        q: &Tensor,
        counts: [usize; 4],
    ) {
        tch::no_grad(|| {
            let head = Tensor::stack(
                &[
                    loss.detach().to_kind(Kind::Double),
                    losses.mse.detach().mean(Kind::Double),
                    losses.vb.detach().mean(Kind::Double),
                ],
                0,
            );
            let _ = self.acc.narrow(0, 0, 3).g_add_(&head);
            let per = losses.loss.detach().to_kind(Kind::Double);
            let _ = self.acc.narrow(0, 3, 4).index_add_(0, q, &per);
        });
        self.n += 1;
        self.steps += 1;
        for (c, n) in self.counts.iter_mut().zip(counts) {
            *c += n;
        }
        self.read = None;
    }

    /// The interval so far (one device read, unless nothing was added since the last).
    fn read(&mut self) -> Interval {
        if let Some(read) = &self.read {
            return read.clone();
        }
        let v = read_f64s(&self.acc);
        let mut out =
            Interval { n: self.n, loss: v[0], mse: v[1], vb: v[2], ..Interval::default() };
        for q in 0..4 {
            out.quartile[q] = (v[3 + q], self.counts[q]);
        }
        self.read = Some(out.clone());
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
