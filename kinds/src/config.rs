//! The manifest sections stages share: `model:` (IDDPM UNet flags) and `diffusion:` (the process).
//!
//! Defaults follow improved-diffusion's `script_util.py` where the paper does not override them.
//! Every field is read by name into cache keys, so renaming one changes keys: bump the stage
//! versions when you do.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::context::{FieldError, at_most};
use crate::schedule::NoiseSchedule;

/// `model:` — the IDDPM UNet hyper-parameters (improved-diffusion's flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Image side in pixels the model works at (data is padded/resized to it).
    pub image_size: usize,
    /// Image channels (1 for grayscale, 3 for RGB).
    pub in_channels: usize,
    /// Base channel count (`num_channels`).
    pub channels: usize,
    /// Width multiplier per resolution level.
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the way down (`num_res_blocks`).
    pub res_blocks: usize,
    /// Resolutions (in pixels) that get self-attention, e.g. `[16, 8]`.
    pub attention_resolutions: Vec<usize>,
    /// Attention heads (`num_heads`).
    pub heads: usize,
    /// Dropout inside ResBlocks.
    pub dropout: f64,
    /// Predict the variance interpolation as well (output has 2x channels).
    pub learn_sigma: bool,
    /// FiLM-style `GN(h) * (1 + scale) + shift` in ResBlocks.
    pub use_scale_shift_norm: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            image_size: 32,
            in_channels: 3,
            channels: 128,
            channel_mult: vec![1, 2, 2, 2],
            res_blocks: 3,
            attention_resolutions: vec![16, 8],
            heads: 4,
            dropout: 0.3,
            learn_sigma: true,
            use_scale_shift_norm: true,
        }
    }
}

impl ModelConfig {
    /// Range checks that serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if self.image_size == 0 {
            errs.push(FieldError::at("image_size", "must be at least 1, got 0"));
        }
        if !matches!(self.in_channels, 1 | 3) {
            errs.push(FieldError::at(
                "in_channels",
                format!("must be 1 or 3, got {}", self.in_channels),
            ));
        }
        if self.channels == 0 || !self.channels.is_multiple_of(32) {
            errs.push(FieldError::at(
                "channels",
                format!(
                    "must be a positive multiple of 32 (GroupNorm uses 32 groups), got {}",
                    self.channels
                ),
            ));
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            errs.push(FieldError::at(
                "channel_mult",
                "must be a non-empty list of positive integers",
            ));
        }
        if self.heads == 0 {
            errs.push(FieldError::at("heads", "must be at least 1, got 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            errs.push(FieldError::at(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        at_most(&mut errs, "image_size", self.image_size, 1024);
        at_most(&mut errs, "channels", self.channels, 4096);
        at_most(&mut errs, "res_blocks", self.res_blocks, 64);
        at_most(&mut errs, "heads", self.heads, 256);
        if self.channel_mult.len() > 8 || self.channel_mult.iter().any(|m| *m > 64) {
            errs.push(FieldError::at(
                "channel_mult",
                "must have at most 8 levels, each at most 64",
            ));
        }
        if self.attention_resolutions.len() > 16 {
            errs.push(FieldError::at("attention_resolutions", "must have at most 16 entries"));
        }
        let levels = self.channel_mult.len();
        if levels > 0 && !self.image_size.is_multiple_of(1 << (levels - 1)) {
            errs.push(FieldError::at(
                "image_size",
                format!(
                    "must be divisible by 2^{} for {levels} levels, got {}",
                    levels - 1,
                    self.image_size
                ),
            ));
        }
        errs
    }
}

/// The training loss (IDDPM `LossType` + learned variance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// MSE on epsilon.
    Simple,
    /// MSE + VLB (stop-grad on the mean), the paper's `L_hybrid`.
    #[default]
    Hybrid,
    /// The variational bound alone.
    Kl,
}

/// The most diffusion timesteps a manifest may ask for (IDDPM uses up to 4000).
pub const MAX_STEPS: usize = 100_000;

/// `diffusion:` — the diffusion process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// Number of diffusion timesteps T.
    pub steps: usize,
    /// Beta schedule.
    pub schedule: NoiseSchedule,
    /// Training loss.
    pub loss: LossKind,
    /// Respacing used for sampling (improved-diffusion's `timestep_respacing`): `"100"` (100
    /// evenly strided steps), `"10,15,20"` (per-section counts over equal thirds of T),
    /// `"ddim100"` (exact stride T/100), or an explicit list `"list:0,40,3999"`; empty means all
    /// T steps.
    pub sample_steps: String,
    /// Feed the model `t * 1000 / T` instead of `t`.
    pub rescale_timesteps: bool,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        DiffusionConfig {
            steps: 1000,
            schedule: NoiseSchedule::Linear,
            loss: LossKind::Hybrid,
            sample_steps: String::new(),
            rescale_timesteps: true,
        }
    }
}

impl DiffusionConfig {
    /// Range checks that serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if self.steps > MAX_STEPS {
            errs.push(FieldError::at(
                "steps",
                format!("must be at most {MAX_STEPS} (IDDPM uses up to 4000), got {}", self.steps),
            ));
            return errs;
        }
        if self.steps > 0 {
            let spaced = crate::diffusion::Respacing::parse(&self.sample_steps)
                .and_then(|r| r.timesteps(self.steps));
            if let Err(e) = spaced {
                errs.push(FieldError::at("sample_steps", e.to_string()));
            }
        }
        if self.steps == 0 {
            errs.push(FieldError::at("steps", "must be at least 1, got 0"));
        } else if self.schedule == NoiseSchedule::Linear && self.steps <= 20 {
            // The linear schedule's last beta is 0.02 * 1000 / T, which reaches 1 at T = 20.
            errs.push(FieldError::at(
                "steps",
                format!(
                    "the linear schedule needs more than 20 steps (its last beta is 20/T), got {}",
                    self.steps
                ),
            ));
        }
        errs
    }
}
