//! Ancestral (IDDPM `p_sample`) and DDIM sampling, one step or a whole loop, with noise from a
//! caller-chosen [`NoiseSource`] so runs are reproducible.
//!
//! The model is a closure `model(x_t, t_model, original_t)`: besides the timesteps it sees
//! ([`GaussianDiffusion::model_timesteps`]), it gets the original timestep of the step, so the
//! progressive sampler can pick the model of that timestep's group. Both samplers draw one noise
//! tensor per step even at the last step (where it is multiplied by zero), in IDDPM's order, so
//! with [`TorchNoise::seeded`](super::noise::TorchNoise::seeded) a loop reproduces IDDPM's
//! samples on CPU for the same seed.

use tch::{Device, Kind, Tensor};

use super::noise::NoiseSource;
use super::process::GaussianDiffusion;

/// The denoising model as the samplers call it: `(x_t [B, C, H, W], t_model [B] float32,
/// original timestep) -> [B, 2C or C, H, W]`.
pub type SampleModel<'a> = dyn FnMut(&Tensor, &Tensor, usize) -> Tensor + 'a;

/// The result of one reverse step.
#[derive(Debug)]
pub struct SampleStep {
    /// `x_{t-1}`, `[B, C, H, W]`.
    pub sample: Tensor,
    /// The step's x_0 prediction, `[B, C, H, W]`.
    pub pred_xstart: Tensor,
}

/// Which reverse step a loop takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// IDDPM's ancestral `p_sample`.
    Ancestral,
    /// DDIM (eq. 12 of the DDIM paper); `eta = 0` is deterministic, `eta = 1` matches the
    /// ancestral variance of the fixed-small process.
    Ddim {
        /// Scale of the step's noise.
        eta: f64,
    },
}

/// How a sampling loop runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Which reverse step.
    pub sampler: Sampler,
    /// Clamp each x_0 prediction to [-1, 1] (IDDPM's `clip_denoised`, on by default).
    pub clip_denoised: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions { sampler: Sampler::Ancestral, clip_denoised: true }
    }
}

/// What the per-step callback of a loop sees.
#[derive(Debug)]
pub struct StepProgress<'a> {
    /// Steps done so far, 1 after the first.
    pub done: usize,
    /// Steps in the loop.
    pub total: usize,
    /// The process's timestep index this step started from.
    pub index: usize,
    /// The original timestep of `index`.
    pub original_t: usize,
    /// The new sample.
    pub sample: &'a Tensor,
    /// The step's x_0 prediction.
    pub pred_xstart: &'a Tensor,
}

impl GaussianDiffusion {
    /// Calls the model at this process's timestep `index` for the whole batch `x`; returns the
    /// timestep tensor and the model's output.
    fn call_model(
        &self,
        model: &mut SampleModel<'_>,
        x: &Tensor,
        index: usize,
    ) -> (Tensor, Tensor) {
        assert!(index < self.num_timesteps(), "timestep index {index} out of range");
        let t = Tensor::full([x.size()[0]], index as i64, (Kind::Int64, x.device()));
        let out = model(x, &self.model_timesteps(&t), self.timestep_map()[index]);
        (t, out)
    }

    /// One ancestral step from `x` at this process's timestep `index` to `index - 1`:
    /// `mean + [index > 0] exp(log_variance / 2) noise`.
    pub fn p_sample(
        &self,
        model: &mut SampleModel<'_>,
        x: &Tensor,
        index: usize,
        clip_denoised: bool,
        noise: &mut dyn NoiseSource,
    ) -> SampleStep {
        let (t, out) = self.call_model(model, x, index);
        let out = self.p_mean_variance(&out, x, &t, clip_denoised);
        let z = noise.randn(&x.size(), (x.kind(), x.device()));
        let sample =
            if index > 0 { &out.mean + (0.5f64 * &out.log_variance).exp() * z } else { out.mean };
        SampleStep { sample, pred_xstart: out.pred_xstart }
    }

    /// One DDIM step from `x` at this process's timestep `index` to `index - 1`.
    pub fn ddim_sample(
        &self,
        model: &mut SampleModel<'_>,
        x: &Tensor,
        index: usize,
        clip_denoised: bool,
        eta: f64,
        noise: &mut dyn NoiseSource,
    ) -> SampleStep {
        let (t, out) = self.call_model(model, x, index);
        let out = self.p_mean_variance(&out, x, &t, clip_denoised);
        // Re-derive eps from the (possibly clipped) x_0 prediction.
        let eps = self.predict_eps_from_xstart(x, &t, &out.pred_xstart);
        let alpha_bar = self.extract(&self.tables().alphas_cumprod, &t, x);
        let alpha_bar_prev = self.extract(&self.tables().alphas_cumprod_prev, &t, x);
        let sigma = ((1.0f64 - &alpha_bar_prev) / (1.0f64 - &alpha_bar)).sqrt()
            * eta
            * (1.0f64 - &alpha_bar / &alpha_bar_prev).sqrt();
        let z = noise.randn(&x.size(), (x.kind(), x.device()));
        let mean_pred = &out.pred_xstart * alpha_bar_prev.sqrt()
            + (1.0f64 - &alpha_bar_prev - sigma.square()).sqrt() * eps;
        let sample = if index > 0 { mean_pred + sigma * z } else { mean_pred };
        SampleStep { sample, pred_xstart: out.pred_xstart }
    }

    /// Samples a batch of `shape` from pure noise through every timestep of this process, last
    /// to first, without gradients. `on_step` runs after each step.
    pub fn sample_loop(
        &self,
        model: &mut SampleModel<'_>,
        shape: &[i64],
        options: (Kind, Device),
        sample: &SampleOptions,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(&StepProgress<'_>),
    ) -> Tensor {
        let _guard = tch::no_grad_guard();
        let mut x = noise.randn(shape, options);
        let total = self.num_timesteps();
        for (done, index) in (0..total).rev().enumerate() {
            let step = match sample.sampler {
                Sampler::Ancestral => self.p_sample(model, &x, index, sample.clip_denoised, noise),
                Sampler::Ddim { eta } => {
                    self.ddim_sample(model, &x, index, sample.clip_denoised, eta, noise)
                }
            };
            on_step(&StepProgress {
                done: done + 1,
                total,
                index,
                original_t: self.timestep_map()[index],
                sample: &step.sample,
                pred_xstart: &step.pred_xstart,
            });
            x = step.sample;
        }
        x
    }
}

/// Samples in [-1, 1] to 8-bit pixels as IDDPM saves them: `((x + 1) * 127.5).clamp(0, 255)`
/// truncated to uint8. The layout is unchanged (`[B, C, H, W]`).
pub fn to_uint8_images(x: &Tensor) -> Tensor {
    ((x + 1.0) * 127.5).clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_conversion_truncates_and_clamps() {
        let x = Tensor::from_slice(&[-1.5f32, -1.0, 0.0, 0.999, 1.0, 2.0]);
        let u = Vec::<u8>::try_from(&to_uint8_images(&x)).unwrap();
        assert_eq!(u, vec![0, 0, 127, 254, 255, 255]);
    }
}
