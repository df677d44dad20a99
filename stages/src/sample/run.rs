//! The sampling loop over batches: noise per image, model per step, progress and cancellation.

use tch::{Device, Kind, Tensor};

use super::noise::ImageNoise;
use super::{ModelSet, SampleError};
use crate::context::{CancelToken, Reporter};
use crate::diffusion::{GaussianDiffusion, NoiseSource, SampleOptions, Sampler, to_uint8_images};

/// What to sample and how.
#[derive(Clone, Debug)]
pub struct SampleConfig {
    /// Number of images.
    pub n: usize,
    /// Images per model call (the last batch may be smaller).
    pub batch_size: usize,
    /// Seed of the per-image noise streams.
    pub seed: u64,
    /// Index of the first image: the run produces images `first..first + n` of `seed` (to resume
    /// or shard a large sample).
    pub first: usize,
    /// Where the models live and the sampling runs.
    pub device: Device,
    /// Ancestral or DDIM, and `clip_denoised`.
    pub options: SampleOptions,
    /// Where progress over images goes.
    pub report: Reporter,
    /// Checked before every step; a cancelled run stops with [`SampleError::Interrupted`].
    pub cancel: CancelToken,
}

impl SampleConfig {
    /// `n` images of `seed` from image 0, in batches of 64, on the CPU, ancestral sampling with
    /// `clip_denoised`, no progress reports, never cancelled.
    pub fn new(n: usize, seed: u64) -> Self {
        SampleConfig {
            n,
            batch_size: 64,
            seed,
            first: 0,
            device: Device::Cpu,
            options: SampleOptions::default(),
            report: Reporter::none(),
            cancel: CancelToken::new(),
        }
    }
}

/// What [`sample`] returns.
#[derive(Debug)]
pub struct Samples {
    /// The images as IDDPM saves them ([`to_uint8_images`]): uint8 `[N, C, H, W]`, on the CPU.
    pub images: Tensor,
    /// The model that ran at each step, recorded from the calls the sampler made, indexed by the
    /// process's timestep (as [`ModelSet::models_per_step`]).
    pub models_per_step: Vec<usize>,
}

/// Samples `cfg.n` images with `models` through every step of `diffusion` (normally
/// [`GaussianDiffusion::for_sampling`], respaced), running at each step the model whose group
/// holds the step's original timestep. The models must live on `cfg.device`.
///
/// See the [module docs](super) for what the seed makes reproducible.
pub fn sample(
    models: &ModelSet,
    diffusion: &GaussianDiffusion,
    cfg: &SampleConfig,
) -> Result<Samples, SampleError> {
    let mut batches = Vec::new();
    let models_per_step = sample_batches(models, diffusion, cfg, &mut |_, images| {
        batches.push(images.shallow_clone());
        Ok(())
    })?;
    let images = if batches.is_empty() {
        let [c, h, w] = models.image_shape();
        Tensor::zeros([0, c, h, w], (Kind::Uint8, Device::Cpu))
    } else {
        Tensor::cat(&batches, 0)
    };
    Ok(Samples { images, models_per_step })
}

/// [`sample`], handing each batch to `on_batch(first_index, images)` as soon as it is done
/// instead of keeping them (`images`: uint8 `[B, C, H, W]` on the CPU; `first_index` counts
/// from [`SampleConfig::first`]). Returns the model that ran at each step, as
/// [`Samples::models_per_step`].
pub fn sample_batches(
    models: &ModelSet,
    diffusion: &GaussianDiffusion,
    cfg: &SampleConfig,
    on_batch: &mut dyn FnMut(usize, &Tensor) -> anyhow::Result<()>,
) -> Result<Vec<usize>, SampleError> {
    models.check(diffusion)?;
    if cfg.batch_size == 0 {
        return Err(SampleError::ZeroBatch);
    }
    let _no_grad = tch::no_grad_guard();
    let total = diffusion.num_timesteps();
    // Entry i: the model called at process timestep i (usize::MAX until it runs).
    let mut recorded = vec![usize::MAX; total];
    let [c, h, w] = models.image_shape();
    let mut start = 0;
    while start < cfg.n {
        let b = cfg.batch_size.min(cfg.n - start);
        let first = cfg.first + start;
        let mut noise = ImageNoise::new(cfg.seed, first, b);
        let mut x = noise.randn(&[b as i64, c, h, w], (Kind::Float, cfg.device));
        for (done, index) in (0..total).rev().enumerate() {
            cfg.cancel.check().map_err(|_| SampleError::Interrupted)?;
            let mut model = |x: &Tensor, t_model: &Tensor, original_t: usize| {
                let m = models.model_of(original_t);
                recorded[index] = m;
                models.models()[m].forward_t(x, t_model, false)
            };
            let clip = cfg.options.clip_denoised;
            let step = match cfg.options.sampler {
                Sampler::Ancestral => diffusion.p_sample(&mut model, &x, index, clip, &mut noise),
                Sampler::Ddim { eta } => {
                    diffusion.ddim_sample(&mut model, &x, index, clip, eta, &mut noise)
                }
            };
            x = step.sample;
            cfg.report.progress(start as u64, cfg.n as u64, "images", || {
                format!("step {}/{total}", done + 1)
            });
        }
        let images = to_uint8_images(&x).to_device(Device::Cpu);
        on_batch(first, &images)?;
        start += b;
        cfg.report.progress(start as u64, cfg.n as u64, "images", String::new);
    }
    if cfg.n == 0 {
        return models.models_per_step(diffusion);
    }
    Ok(recorded)
}

/// Parses a stage context's device string: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, SampleError> {
    match s.trim() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| SampleError::Device(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        assert_eq!(
            parse_device("tpu").unwrap_err().to_string(),
            "unknown device `tpu`, expected `cpu`, `cuda` or `cuda:N`"
        );
    }
}
