//! `evaluate`: what turns a run into a row of the paper's Table 1 — samples from the model
//! stage(s) it needs, with the progressive sampler when there is one model per timestep group,
//! their FID against the dataset's reference statistics and their KID against its reference
//! features (both from the same feature vectors), the params and MACs averaged over the sampled
//! timesteps, and the sampling wall time.
//!
//! Inputs (the stages it `needs`):
//! - models: one upstream with `model.safetensors` / `ema.safetensors` (a `train` or `import`
//!   stage: the baseline), or one per group of a `for_each: group` stage together with the
//!   `snr-allocate` stage (progressive: model i serves group i's timesteps);
//! - optionally an `fid-extractor` stage: the extractor and the reference statistics. Without
//!   one, `fid` is absent from the metrics.
//!
//! Outputs: `metrics.json` ([`EvaluateMetrics`]), `samples.png` (a grid of the first images)
//! and, with an extractor, `samples.npz` (the samples' statistics in pytorch-fid's format and
//! their feature vectors as `features`, for `progdiff fid`'s FID and KID).
//!
//! `samples: 0` is a cost-only evaluation: the models are loaded for their architectures and
//! only `metrics.json` is written, with the averaged params and MACs (no FID or KID, zero seconds).
//! It computes the paper's FLOPs and params columns without sampling, so it refuses an
//! `fid-extractor` upstream rather than silently reporting no FID.

pub use progdiff_kinds::evaluate::*;

use std::time::Instant;

use anyhow::Context as _;
use tch::Tensor;

use crate::allocate::{ALLOCATION_JSON, Allocation};
use crate::context::{StageContext, UpstreamOutputs};
use crate::diffusion::{GaussianDiffusion, SampleOptions, Sampler};
use crate::fid::stage::{MODULE_FILE, REFERENCE_FILE, SPEC_FILE, WEIGHTS_FILE};
use crate::fid::{
    Extractor, ExtractorSpec, Features, Statistics, features_from_tensor, frechet_distance,
    kernel_inception_distance, read_features, read_stats, statistics_from_features,
    write_stats_with_features,
};
use crate::image_io::write_png_grid;
use crate::sample::{ModelSet, SampleConfig, load_unet, parse_device, sample_batches};
use crate::train::{EMA_FILE, MODEL_FILE};

/// Runs the stage.
pub fn run(ctx: &StageContext, inputs: &EvaluateInputs) -> anyhow::Result<()> {
    let params = &inputs.stage;
    let device = parse_device(&ctx.device)?;
    let (models, sampler) = load_models(ctx, params.weights, device)?;
    let learn_sigma = models.models()[0].arch().config.learn_sigma;
    let diffusion = GaussianDiffusion::for_sampling(&inputs.diffusion, learn_sigma)?;
    let cost = models.average_cost(&diffusion)?;
    let fid_inputs = ctx.inputs.iter().find(|u| u.files.contains_key(SPEC_FILE));
    let sampled = match (params.samples, fid_inputs) {
        (0, Some(u)) => anyhow::bail!(
            "stage `{}` has `samples: 0` (cost only) but needs the FID extractor `{}`\nhint: \
             remove `{}` from its `needs`, or sample at least 2 images for an FID",
            ctx.id,
            u.id,
            u.id
        ),
        (0, None) => Sampled::default(),
        (_, fid_inputs) => sample_and_score(ctx, inputs, &models, &diffusion, fid_inputs, device)?,
    };
    let metrics = EvaluateMetrics {
        label: ctx.id.clone(),
        sampler: sampler.to_string(),
        models: models.len(),
        samples: params.samples,
        sample_steps: diffusion.num_timesteps(),
        fid: sampled.fid,
        kid: sampled.kid,
        extractor: sampled.extractor.map(str::to_string),
        params: cost.params,
        macs: cost.macs,
        steps_per_model: cost.steps_per_model,
        sampling_seconds: sampled.sampling_seconds,
        fid_seconds: sampled.fid_seconds,
        weights: params.weights,
    };
    tracing::info!(
        fid = ?metrics.fid,
        kid = ?metrics.kid.as_ref().map(|k| k.mean),
        params = metrics.params,
        macs = metrics.macs,
        seconds = metrics.sampling_seconds,
        "evaluated `{}`",
        metrics.label
    );
    std::fs::write(ctx.out_dir.join(METRICS_FILE), serde_json::to_vec_pretty(&metrics)?)?;
    Ok(())
}

/// What sampling measured: nothing for a cost-only evaluation (`samples: 0`).
#[derive(Default)]
struct Sampled {
    fid: Option<f64>,
    kid: Option<crate::fid::Kid>,
    /// The FID extractor's kind.
    extractor: Option<&'static str>,
    sampling_seconds: f64,
    fid_seconds: f64,
}

/// Samples `inputs.stage.samples` images, writes the grid and, with an `fid-extractor` upstream,
/// the samples' statistics, and measures the FID.
fn sample_and_score(
    ctx: &StageContext,
    inputs: &EvaluateInputs,
    models: &ModelSet,
    diffusion: &GaussianDiffusion,
    fid_inputs: Option<&UpstreamOutputs>,
    device: tch::Device,
) -> anyhow::Result<Sampled> {
    let params = &inputs.stage;
    let extractor = fid_inputs.map(|u| load_extractor(u, device)).transpose()?;
    anyhow::ensure!(
        extractor.is_none() || params.samples >= 2,
        "an FID needs at least 2 samples, got {}",
        params.samples
    );

    let mut cfg = SampleConfig::new(params.samples, inputs.seed);
    cfg.batch_size = params.batch_size;
    cfg.device = device;
    cfg.report = ctx.report.clone();
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
    sample_batches(models, diffusion, &cfg, &mut |_, images| {
        if kept < params.grid {
            let take = (params.grid - kept).min(images.size()[0] as usize);
            grid.push(images.narrow(0, 0, take as i64));
            kept += take;
        }
        if let Some(e) = &extractor {
            let t = Instant::now();
            features.push(e.extractor.features_batch(images)?);
            fid_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    let sampling_seconds = started.elapsed().as_secs_f64() - fid_seconds;
    if !grid.is_empty() {
        let columns = (kept as f64).sqrt().ceil() as usize;
        write_png_grid(&Tensor::cat(&grid, 0), &ctx.out_dir.join(GRID_FILE), columns.max(1))?;
    }
    let (fid, kid) = match &extractor {
        None => (None, None),
        Some(e) => {
            let t = Instant::now();
            let features = Tensor::cat(&features, 0); // [N, D]
            let stats = statistics_from_features(&features)?;
            let features = features_from_tensor(&features)?;
            write_stats_with_features(&stats, Some(&features), &ctx.out_dir.join(STATS_FILE))?;
            let fid = frechet_distance(&stats, &e.reference)?;
            let kid = match &e.reference_features {
                Some(r) => Some(kernel_inception_distance(&features, r, &params.kid)?),
                None => None,
            };
            fid_seconds += t.elapsed().as_secs_f64();
            (Some(fid), kid)
        }
    };
    Ok(Sampled {
        fid,
        kid,
        extractor: extractor.as_ref().map(|e| e.kind),
        sampling_seconds,
        fid_seconds,
    })
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

/// An `fid-extractor` upstream's extractor and what it measured of the dataset.
struct LoadedExtractor {
    extractor: Extractor,
    /// The dataset's statistics (FID).
    reference: Statistics,
    /// The dataset's feature vectors (KID), when the stage stored them.
    reference_features: Option<Features>,
    /// `torchscript` or `classifier`.
    kind: &'static str,
}

/// The extractor of an `fid-extractor` upstream, its reference statistics and features, and
/// its kind.
fn load_extractor(u: &UpstreamOutputs, device: tch::Device) -> anyhow::Result<LoadedExtractor> {
    let spec: ExtractorSpec = serde_json::from_slice(&std::fs::read(u.file(SPEC_FILE)?)?)
        .with_context(|| format!("reading `{SPEC_FILE}` of `{}`", u.id))?;
    let (file, kind) = match spec {
        ExtractorSpec::Torchscript { .. } => (u.file(MODULE_FILE)?, "torchscript"),
        ExtractorSpec::Classifier(_) => (u.file(WEIGHTS_FILE)?, "classifier"),
    };
    let extractor = Extractor::load(&spec, file, device)?;
    let reference = read_stats(u.file(REFERENCE_FILE)?)?;
    let reference_features = read_features(u.file(REFERENCE_FILE)?)?;
    Ok(LoadedExtractor { extractor, reference, reference_features, kind })
}
