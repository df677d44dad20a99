//! `evaluate`: samples, FID and KID, averaged params/MACs and sampling time — parameters,
//! inputs and the metrics file (the work is `progdiff_stages::evaluate`). With `samples: 0` it
//! is a cost-only evaluation: the averaged params and MACs, no sampling, no FID or KID.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::DiffusionConfig;
use crate::context::FieldError;
use crate::fid::{Kid, KidOptions};
use crate::kind::{Sections, StageKind};

/// Stage kind name.
pub const KIND: &str = "evaluate";
/// Implementation version: bump when results would change. 2: KID beside FID in
/// `metrics.json`, and the samples' feature vectors in `samples.npz` (`features`).
pub const VERSION: u32 = 2;
/// Output: [`EvaluateMetrics`] as JSON.
pub const METRICS_FILE: &str = "metrics.json";
/// Output: a PNG grid of the first samples.
pub const GRID_FILE: &str = "samples.png";
/// Output: the samples' feature statistics (pytorch-fid `.npz`) and feature vectors (its
/// `features` array).
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
    /// Images to sample (the paper: 50,000). 0 samples nothing and computes only the params and
    /// MACs averaged over the sampled timesteps (the paper's cost columns, in seconds); such a
    /// stage must not need an `fid-extractor`.
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
    /// KID's subsets of the samples' and the reference's features (Bińkowski et al.;
    /// torch-fidelity's and clean-fid's defaults: 100 subsets of min(1000, samples)).
    pub kid: KidOptions,
    /// Name of the row in `progdiff report` (the stage id when absent). Not part of the key
    /// and not given to the stage: renaming a row re-uses its samples.
    #[serde(skip_serializing_if = "Option::is_none")]
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
            kid: KidOptions::default(),
            label: None,
        }
    }
}

impl EvaluateParams {
    /// Checks serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if self.batch_size == 0 {
            e.push(FieldError::at("batch_size", "must be at least 1, got 0"));
        }
        crate::context::at_most(&mut e, "samples", self.samples, 100_000_000);
        crate::context::at_most(&mut e, "batch_size", self.batch_size, 65_536);
        crate::context::at_most(&mut e, "grid", self.grid, 10_000);
        let kid = |field: &str, message: String| FieldError {
            path: vec!["kid".into(), field.into()],
            message,
        };
        if self.kid.subsets == 0 {
            e.push(kid("subsets", "must be at least 1, got 0".into()));
        }
        if self.kid.subset_size < 2 {
            e.push(kid("subset_size", format!("must be at least 2, got {}", self.kid.subset_size)));
        }
        for (field, value) in [("subsets", self.kid.subsets), ("subset_size", self.kid.subset_size)]
        {
            if value > 100_000 {
                e.push(kid(field, format!("must be at most 100000, got {value}")));
            }
        }
        if let Some(eta) = self.ddim_eta
            && !(eta >= 0.0 && eta.is_finite())
        {
            e.push(FieldError::at("ddim_eta", format!("must be >= 0, got {eta}")));
        }
        e
    }

    /// The row name. It is not part of the stage's key (renaming a row re-uses the samples):
    /// reports take the manifest's.
    pub fn label_or<'a>(&'a self, id: &'a str) -> &'a str {
        self.label.as_deref().unwrap_or(id)
    }
}

/// What an `evaluate` stage measured (`metrics.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateMetrics {
    /// The instance id (older results: the row name of the run that made them); reports take
    /// the manifest's label.
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
    /// KID against the reference features (mean and standard deviation over subsets); absent
    /// without an extractor, and in results of version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<Kid>,
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
    /// Seconds spent extracting features and computing the FID and KID.
    pub fid_seconds: f64,
    /// Which weights were sampled.
    pub weights: Weights,
}

/// What an `evaluate` stage reads. The models' architectures come with their checkpoints
/// (upstream keys); the sampling process is the manifest's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateInputs {
    /// Its parameters, without `label`.
    pub stage: EvaluateParams,
    /// `seed:`.
    pub seed: u64,
    /// `diffusion:`, sampling respacing included.
    pub diffusion: DiffusionConfig,
}

/// The `evaluate` kind.
pub struct Evaluate;

impl StageKind for Evaluate {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &["data", "model", "stage.label"];
    type Params = EvaluateParams;
    type Inputs = EvaluateInputs;

    fn validate(params: &EvaluateParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &EvaluateParams, m: &Sections<'_>) -> EvaluateInputs {
        EvaluateInputs {
            stage: EvaluateParams { label: None, ..params.clone() },
            seed: m.seed,
            diffusion: m.diffusion.clone(),
        }
    }
}
