//! `evaluate`: what turns a run into a row of the paper's Table 1 — samples from the model
//! stage(s) it needs, with the progressive sampler when there is one model per timestep group,
//! their FID against the dataset's reference statistics, the params and MACs averaged over the
//! sampled timesteps, and the sampling wall time.
//!
//! Inputs (the stages it `needs`):
//! - models: one upstream with `model.safetensors` / `ema.safetensors` (a `train` or `import`
//!   stage: the baseline), or one per group of a `for_each: group` stage together with the
//!   `snr-allocate` stage (progressive: model i serves group i's timesteps);
//! - optionally an `fid-extractor` stage: the extractor and the reference statistics. Without
//!   one, `fid` is absent from the metrics.
//!
//! Outputs: `metrics.json` ([`EvaluateMetrics`]), `samples.png` (a grid of the first images)
//! and, with an extractor, `samples.npz` (the samples' statistics in pytorch-fid's format, for
//! `progdiff fid`).

use std::time::Instant;

use anyhow::Context as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::allocate::{ALLOCATION_JSON, Allocation};
use crate::config::DiffusionConfig;
use crate::context::{FieldError, StageContext, UpstreamOutputs};
use crate::diffusion::{GaussianDiffusion, SampleOptions, Sampler};
use crate::fid::stage::{MODULE_FILE, REFERENCE_FILE, SPEC_FILE, WEIGHTS_FILE};
use crate::fid::{Extractor, ExtractorSpec, Statistics, frechet_distance, read_stats, write_stats};
use crate::image_io::write_png_grid;
use crate::sample::{ModelSet, SampleConfig, load_unet, parse_device, sample_batches};
use crate::train::{EMA_FILE, MODEL_FILE};

/// Stage kind name.
pub const KIND: &str = "evaluate";
/// Implementation version: bump when results would change.
pub const VERSION: u32 = 1;
/// Output: [`EvaluateMetrics`] as JSON.
pub const METRICS_FILE: &str = "metrics.json";
/// Output: a PNG grid of the first samples.
pub const GRID_FILE: &str = "samples.png";
/// Output: the samples' feature statistics (pytorch-fid `.npz`).
pub const STATS_FILE: &str = "samples.npz";

/// Which weights of a trained model to sample with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// The EMA weights (how IDDPM evaluates), the raw weights when a stage has no EMA.
    #[default]
    Ema,
    /// The raw weights.
    Model,
}

/// Parameters of an `evaluate` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    /// Images to sample (the paper: 50,000).
    pub samples: usize,
    /// Images per model call.
    pub batch_size: usize,
    /// `ema` (default) or `model`.
    pub weights: Weights,
    /// Clamp each x_0 prediction to [-1, 1].
    pub clip_denoised: bool,
    /// DDIM with this eta instead of ancestral sampling.
    pub ddim_eta: Option<f64>,
    /// Images in the PNG grid (0: no grid).
    pub grid: usize,
    /// Name of the row in `progdiff report` (the stage id when absent).
    pub label: Option<String>,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        EvaluateParams {
            samples: 1000,
            batch_size: 64,
            weights: Weights::Ema,
            clip_denoised: true,
            ddim_eta: None,
            grid: 64,
            label: None,
        }
    }
}

impl EvaluateParams {
    /// Checks serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if self.samples == 0 {
            e.push(FieldError::at("samples", "must be at least 1, got 0"));
        }
        if self.batch_size == 0 {
            e.push(FieldError::at("batch_size", "must be at least 1, got 0"));
        }
        if let Some(eta) = self.ddim_eta
            && !(eta >= 0.0 && eta.is_finite())
        {
            e.push(FieldError::at("ddim_eta", format!("must be >= 0, got {eta}")));
        }
        e
    }

    /// The row name. It is not part of the stage's key (renaming a row re-uses the samples), so
    /// the `label` in a cached `metrics.json` is the one of the run that made it; reports take
    /// the manifest's.
    pub fn label_or<'a>(&'a self, id: &'a str) -> &'a str {
        self.label.as_deref().unwrap_or(id)
    }
}

/// What an `evaluate` stage measured (`metrics.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateMetrics {
    /// Row name.
    pub label: String,
    /// `single` or `progressive`.
    pub sampler: String,
    /// Number of models (1, or the group count).
    pub models: usize,
    /// Images sampled.
    pub samples: usize,
    /// Steps of the (respaced) sampling process.
    pub sample_steps: usize,
    /// FID against the reference statistics; absent without an extractor.
    pub fid: Option<f64>,
    /// The extractor, as `torchscript` or `classifier`, when there is one.
    pub extractor: Option<String>,
    /// Params averaged over the sampled timesteps.
    pub params: f64,
    /// Conv + linear MACs per image averaged over the sampled timesteps.
    pub macs: f64,
    /// Steps each model runs.
    pub steps_per_model: Vec<usize>,
    /// Wall-clock seconds spent sampling (without feature extraction).
    pub sampling_seconds: f64,
    /// Seconds spent extracting features and computing the FID.
    pub fid_seconds: f64,
    /// Which weights were sampled.
    pub weights: Weights,
}

/// Runs the stage.
pub fn run(
    ctx: &StageContext,
    params: &EvaluateParams,
    diffusion_cfg: &DiffusionConfig,
) -> anyhow::Result<()> {
    let device = parse_device(&ctx.device)?;
    let (models, sampler) = load_models(ctx, params.weights, device)?;
    let learn_sigma = models.models()[0].arch().config.learn_sigma;
    let diffusion = GaussianDiffusion::for_sampling(diffusion_cfg, learn_sigma)?;
    let cost = models.average_cost(&diffusion)?;
    let fid_inputs = ctx.inputs.iter().find(|u| u.files.contains_key(SPEC_FILE));
    let extractor = fid_inputs.map(|u| load_extractor(u, device)).transpose()?;
    anyhow::ensure!(
        extractor.is_none() || params.samples >= 2,
        "an FID needs at least 2 samples, got {}",
        params.samples
    );

    let mut cfg = SampleConfig::new(params.samples, ctx.seed);
    cfg.batch_size = params.batch_size;
    cfg.device = device;
    cfg.progress = ctx.progress;
    cfg.cancel = ctx.cancel.clone();
    cfg.options = SampleOptions {
        sampler: params.ddim_eta.map_or(Sampler::Ancestral, |eta| Sampler::Ddim { eta }),
        clip_denoised: params.clip_denoised,
    };
    let mut grid: Vec<Tensor> = Vec::new();
    let mut kept = 0;
    let mut features: Vec<Tensor> = Vec::new();
    let mut fid_seconds = 0.0;
    let started = Instant::now();
    sample_batches(&models, &diffusion, &cfg, &mut |_, images| {
        if kept < params.grid {
            let take = (params.grid - kept).min(images.size()[0] as usize);
            grid.push(images.narrow(0, 0, take as i64));
            kept += take;
        }
        if let Some((e, _, _)) = &extractor {
            let t = Instant::now();
            features.push(e.features_batch(images)?);
            fid_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    let sampling_seconds = started.elapsed().as_secs_f64() - fid_seconds;
    if !grid.is_empty() {
        let columns = (kept as f64).sqrt().ceil() as usize;
        write_png_grid(&Tensor::cat(&grid, 0), &ctx.out_dir.join(GRID_FILE), columns.max(1))?;
    }
    let fid = match &extractor {
        None => None,
        Some((_, reference, _)) => {
            let t = Instant::now();
            let stats = Statistics::from_features(&Tensor::cat(&features, 0))?;
            write_stats(&stats, &ctx.out_dir.join(STATS_FILE))?;
            let fid = frechet_distance(&stats, reference)?;
            fid_seconds += t.elapsed().as_secs_f64();
            Some(fid)
        }
    };
    let metrics = EvaluateMetrics {
        label: params.label_or(&ctx.id).to_string(),
        sampler: sampler.to_string(),
        models: models.len(),
        samples: params.samples,
        sample_steps: diffusion.num_timesteps(),
        fid,
        extractor: extractor.as_ref().map(|(_, _, kind)| kind.to_string()),
        params: cost.params,
        macs: cost.macs,
        steps_per_model: cost.steps_per_model,
        sampling_seconds,
        fid_seconds,
        weights: params.weights,
    };
    tracing::info!(
        fid = ?metrics.fid,
        params = metrics.params,
        macs = metrics.macs,
        seconds = metrics.sampling_seconds,
        "evaluated `{}`",
        metrics.label
    );
    std::fs::write(ctx.out_dir.join(METRICS_FILE), serde_json::to_vec_pretty(&metrics)?)?;
    Ok(())
}

/// The model set of the upstream model stages: one model, or one per group with the
/// allocation.
fn load_models(
    ctx: &StageContext,
    weights: Weights,
    device: tch::Device,
) -> anyhow::Result<(ModelSet, &'static str)> {
    let mut ups: Vec<&UpstreamOutputs> = ctx
        .inputs
        .iter()
        .filter(|u| u.files.contains_key(MODEL_FILE) || u.files.contains_key(EMA_FILE))
        .collect();
    let file_of = |u: &UpstreamOutputs| -> anyhow::Result<std::path::PathBuf> {
        let name = match weights {
            Weights::Ema if u.files.contains_key(EMA_FILE) => EMA_FILE,
            _ => MODEL_FILE,
        };
        Ok(u.file(name)?.to_path_buf())
    };
    match ups.as_slice() {
        [] => anyhow::bail!(
            "stage `{}` needs a model: a `train` or `import` stage, or a `for_each: group` stage \
             of models with the allocation",
            ctx.id
        ),
        [u] if u.group.is_none() => {
            let model = load_unet(&file_of(u)?, device)?;
            Ok((ModelSet::single(model), "single"))
        }
        _ => {
            let alloc = ctx.inputs.iter().find_map(|u| u.files.get(ALLOCATION_JSON)).with_context(
                || {
                    format!(
                        "stage `{}` samples with {} models, one per group: it needs the \
                         `snr-allocate` stage too\nhint: add the allocation stage to its `needs`",
                        ctx.id,
                        ups.len()
                    )
                },
            )?;
            let alloc = Allocation::read_json(alloc)?;
            if let Some(u) = ups.iter().find(|u| u.group.is_none()) {
                anyhow::bail!(
                    "stage `{}` mixes the ungrouped model `{}` with per-group models",
                    ctx.id,
                    u.id
                );
            }
            ups.sort_by_key(|u| u.group);
            let models = ups
                .iter()
                .map(|u| Ok(load_unet(&file_of(u)?, device)?))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((ModelSet::progressive(models, &alloc)?, "progressive"))
        }
    }
}

/// The extractor of an `fid-extractor` upstream, its reference statistics and its kind.
fn load_extractor(
    u: &UpstreamOutputs,
    device: tch::Device,
) -> anyhow::Result<(Extractor, Statistics, &'static str)> {
    let spec: ExtractorSpec = serde_json::from_slice(&std::fs::read(u.file(SPEC_FILE)?)?)
        .with_context(|| format!("reading `{SPEC_FILE}` of `{}`", u.id))?;
    let (file, kind) = match spec {
        ExtractorSpec::Torchscript { .. } => (u.file(MODULE_FILE)?, "torchscript"),
        ExtractorSpec::Classifier(_) => (u.file(WEIGHTS_FILE)?, "classifier"),
    };
    let extractor = Extractor::load(&spec, file, device)?;
    let reference = read_stats(u.file(REFERENCE_FILE)?)?;
    Ok((extractor, reference, kind))
}
