//! `train`: IDDPM training, from scratch or from an upstream checkpoint, over all timesteps or
//! one group's — its parameters and inputs (the work is `progdiff_stages::train`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{DiffusionConfig, LossKind, ModelConfig};
use crate::context::FieldError;
use crate::data::DataValues;
use crate::kind::{Locations, Sections, StageKind};
use crate::schedule::NoiseSchedule;

/// Stage kind name.
pub const KIND: &str = "train";
/// Implementation version: bump when training results would change.
pub const VERSION: u32 = 1;
/// Output: the trained weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// Output: the EMA weights.
pub const EMA_FILE: &str = "ema.safetensors";
/// Output: one JSON object per logged step. Its `samples_per_s` is wall-clock throughput, so
/// this file (unlike the weights) differs between identical runs.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Which upstream weights fine-tuning starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitFrom {
    /// The upstream EMA weights (what the base model is evaluated with).
    #[default]
    Ema,
    /// The upstream raw weights.
    Model,
}

/// Numeric precision of training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    Fp32,
    /// Mixed precision as improved-diffusion's `use_fp16`, with bfloat16 (no loss scaling
    /// needed): convolutions run on a bfloat16 copy of the weights, linear layers, GroupNorm,
    /// softmax and the loss stay in float32, and the optimizer updates float32 master weights.
    /// Meant for CUDA; works (slowly) on the CPU.
    Bf16,
}

/// Parameters of a `train` stage (improved-diffusion's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Optimisation steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// EMA rate.
    pub ema: f64,
    /// Clip the global gradient norm to this value (off when absent).
    pub grad_clip: Option<f64>,
    /// Linear learning-rate warm-up over this many steps (0: none).
    pub warmup: usize,
    /// Save resume state every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Log metrics every this many steps.
    pub log_every: usize,
    /// Upstream weights to start from when fine-tuning.
    pub init: InitFrom,
    /// `fp32` or `bf16` mixed precision.
    pub precision: Precision,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            steps: 1000,
            batch_size: 128,
            lr: 1e-4,
            weight_decay: 0.0,
            ema: 0.9999,
            grad_clip: None,
            warmup: 0,
            checkpoint_every: 1000,
            log_every: 100,
            init: InitFrom::Ema,
            precision: Precision::Fp32,
        }
    }
}

impl TrainParams {
    /// Range checks serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if self.steps == 0 {
            e.push(FieldError::at("steps", "must be at least 1, got 0"));
        }
        if self.batch_size == 0 {
            e.push(FieldError::at("batch_size", "must be at least 1, got 0"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            e.push(FieldError::at("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            e.push(FieldError::at(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            ));
        }
        if !(0.0..1.0).contains(&self.ema) {
            e.push(FieldError::at("ema", format!("must be in [0, 1), got {}", self.ema)));
        }
        if let Some(c) = self.grad_clip
            && !(c > 0.0 && c.is_finite())
        {
            e.push(FieldError::at("grad_clip", format!("must be positive, got {c}")));
        }
        if self.log_every == 0 {
            e.push(FieldError::at("log_every", "must be at least 1, got 0"));
        }
        crate::context::at_most(&mut e, "batch_size", self.batch_size, 65_536);
        crate::context::at_most(&mut e, "steps", self.steps, 1_000_000_000);
        e
    }
}

/// The part of `diffusion:` that training (and every stage computing the training loss) reads:
/// not the sampling respacing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingProcess {
    /// `diffusion.steps`.
    pub steps: usize,
    /// `diffusion.schedule`.
    pub schedule: NoiseSchedule,
    /// `diffusion.loss`.
    pub loss: LossKind,
    /// `diffusion.rescale_timesteps`.
    pub rescale_timesteps: bool,
}

impl TrainingProcess {
    /// The training part of a `diffusion:` section.
    pub fn of(d: &DiffusionConfig) -> TrainingProcess {
        TrainingProcess {
            steps: d.steps,
            schedule: d.schedule,
            loss: d.loss,
            rescale_timesteps: d.rescale_timesteps,
        }
    }

    /// A `diffusion:` section with these values and no sampling respacing.
    pub fn config(&self) -> DiffusionConfig {
        DiffusionConfig {
            steps: self.steps,
            schedule: self.schedule,
            loss: self.loss,
            rescale_timesteps: self.rescale_timesteps,
            sample_steps: String::new(),
        }
    }
}

/// What a `train` stage reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainInputs {
    /// Its parameters.
    pub stage: TrainParams,
    /// `model:` (the architecture of a model trained from scratch; an upstream checkpoint's
    /// must match it).
    pub model: ModelConfig,
    /// `seed:`.
    pub seed: u64,
    /// The training process.
    pub diffusion: TrainingProcess,
    /// `data:` without its file locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataValues>,
    /// Where the data is.
    pub at: Locations,
}

/// The `train` kind.
pub struct Train;

impl StageKind for Train {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &["diffusion.sample_steps"];
    const NEEDS_DATA: bool = true;
    type Params = TrainParams;
    type Inputs = TrainInputs;

    fn validate(params: &TrainParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &TrainParams, m: &Sections<'_>) -> TrainInputs {
        let mut at = m.locations();
        TrainInputs {
            stage: params.clone(),
            model: m.model.clone(),
            seed: m.seed,
            diffusion: TrainingProcess::of(m.diffusion),
            data: m.data_values(&mut at),
            at,
        }
    }
}
