//! `fid-extractor`: the FID feature extractor and the dataset's reference statistics —
//! parameters and inputs (the work is `progdiff_stages::fid::stage`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::DiffusionConfig;
use crate::context::FieldError;
use crate::data::DataValues;
use crate::kind::{Locations, Sections, StageKind};

/// Square input size of InceptionV3 (pytorch-fid resizes to it).
pub const INCEPTION_SIZE: usize = 299;

/// What the classifier learns to predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The dataset's labels when it has them, rotations otherwise.
    #[default]
    Auto,
    /// The dataset's labels (an error when it has none).
    Labels,
    /// Four-way rotation prediction.
    Rotation,
}

/// Stage kind name.
pub const KIND: &str = "fid-extractor";
/// Implementation version: bump when outputs would change. 2: `reference.npz` also holds the
/// dataset's feature vectors (`features`, for KID).
pub const VERSION: u32 = 2;
/// Output: the [`ExtractorSpec`].
pub const SPEC_FILE: &str = "extractor.json";
/// Output: the TorchScript module.
pub const MODULE_FILE: &str = "extractor.pt";
/// Output: the classifier's weights.
pub const WEIGHTS_FILE: &str = "classifier.safetensors";
/// Output: the dataset's statistics under the extractor, and its feature vectors (`features`).
pub const REFERENCE_FILE: &str = "reference.npz";

/// Which extractor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExtractorKind {
    /// A TorchScript module from `path`.
    Torchscript,
    /// A classifier trained here on the manifest's data.
    #[default]
    Classifier,
}

/// Parameters of an `fid-extractor` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractorParams {
    /// `classifier` (default) or `torchscript`.
    pub extractor: ExtractorKind,
    /// TorchScript: the module file, relative to the manifest.
    pub path: Option<String>,
    /// TorchScript: square input size (299 for InceptionV3).
    pub size: usize,
    /// Classifier: training steps.
    pub steps: usize,
    /// Classifier: images per training step; also the feature-extraction batch.
    pub batch_size: usize,
    /// Classifier: Adam learning rate.
    pub lr: f64,
    /// Classifier: feature dimension.
    pub features: usize,
    /// Classifier: `auto` (labels if the dataset has them, else rotations), `labels`, `rotation`.
    pub target: Target,
    /// Dataset images the reference statistics are computed over (all when absent).
    pub reference_samples: Option<usize>,
    /// Classifier: the seed it is trained with, instead of the manifest's `seed:`. With it, every
    /// variant of a `seeds:` study measures its samples with one extractor (one shared instance)
    /// rather than one classifier per seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for ExtractorParams {
    fn default() -> Self {
        ExtractorParams {
            extractor: ExtractorKind::Classifier,
            path: None,
            size: INCEPTION_SIZE,
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            features: 128,
            target: Target::Auto,
            reference_samples: None,
            seed: None,
        }
    }
}

impl ExtractorParams {
    /// Checks serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if self.extractor == ExtractorKind::Torchscript && self.path.is_none() {
            e.push(FieldError::at("path", "is required when `extractor` is `torchscript`"));
        }
        if self.extractor == ExtractorKind::Classifier && self.path.is_some() {
            e.push(FieldError::at("path", "is only read when `extractor` is `torchscript`"));
        }
        if self.extractor == ExtractorKind::Torchscript && self.seed.is_some() {
            e.push(FieldError::at("seed", "is only read when `extractor` is `classifier`"));
        }
        for (name, v) in [("size", self.size), ("batch_size", self.batch_size)] {
            if v == 0 {
                e.push(FieldError::at(name, "must be at least 1, got 0"));
            }
        }
        if self.extractor == ExtractorKind::Classifier {
            for (name, v) in [("steps", self.steps), ("features", self.features)] {
                if v == 0 {
                    e.push(FieldError::at(name, "must be at least 1, got 0"));
                }
            }
            if !(self.lr > 0.0 && self.lr.is_finite()) {
                e.push(FieldError::at("lr", format!("must be positive, got {}", self.lr)));
            }
        }
        crate::context::at_most(&mut e, "size", self.size, 1024);
        crate::context::at_most(&mut e, "batch_size", self.batch_size, 65_536);
        crate::context::at_most(&mut e, "features", self.features, 65_536);
        crate::context::at_most(&mut e, "steps", self.steps, 1_000_000_000);
        if self.reference_samples.is_some_and(|n| n < 2) {
            e.push(FieldError::at("reference_samples", "must be at least 2"));
        }
        e
    }
}

/// The parameters that make the extractor and its statistics what they are: the classifier's
/// training fields for a classifier, the input size for a TorchScript module (whose file is an
/// input by content, not by name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExtractorKey {
    /// `classifier` or `torchscript`.
    pub extractor: ExtractorKind,
    /// TorchScript: square input size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// Classifier: training steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Images per step / per extraction batch.
    pub batch_size: usize,
    /// Classifier: learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Classifier: feature dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<usize>,
    /// Classifier: what it learns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Dataset images the reference statistics use (all when absent).
    pub reference_samples: Option<usize>,
}

impl ExtractorKey {
    /// The key's parameters of `p`.
    pub fn of(p: &ExtractorParams) -> ExtractorKey {
        let classifier = p.extractor == ExtractorKind::Classifier;
        ExtractorKey {
            extractor: p.extractor,
            size: (!classifier).then_some(p.size),
            steps: classifier.then_some(p.steps),
            batch_size: p.batch_size,
            lr: classifier.then_some(p.lr),
            features: classifier.then_some(p.features),
            target: classifier.then_some(p.target),
            reference_samples: p.reference_samples,
        }
    }

    /// Full parameters (defaults where this extractor reads nothing; no `path`: the module is
    /// the inputs' `at.files["path"]`).
    pub fn params(&self) -> ExtractorParams {
        let d = ExtractorParams::default();
        ExtractorParams {
            extractor: self.extractor,
            path: None,
            size: self.size.unwrap_or(d.size),
            steps: self.steps.unwrap_or(d.steps),
            batch_size: self.batch_size,
            lr: self.lr.unwrap_or(d.lr),
            features: self.features.unwrap_or(d.features),
            target: self.target.unwrap_or(d.target),
            reference_samples: self.reference_samples,
            seed: None,
        }
    }
}

/// What an `fid-extractor` stage reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FidExtractorInputs {
    /// Its parameters, as the extractor reads them.
    pub stage: ExtractorKey,
    /// The classifier's seed (its `seed` parameter, or the manifest's `seed:`); absent for a
    /// TorchScript module, which draws nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `data:` without its file locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataValues>,
    /// Where the data and the TorchScript module (`path`) are.
    pub at: Locations,
}

/// The `fid-extractor` kind.
pub struct FidExtractor;

impl StageKind for FidExtractor {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &["model", "diffusion", "stage.path"];
    const NEEDS_DATA: bool = true;
    type Params = ExtractorParams;
    type Inputs = FidExtractorInputs;

    fn validate(params: &ExtractorParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &ExtractorParams, m: &Sections<'_>) -> FidExtractorInputs {
        let mut at = m.locations();
        let data = m.data_values(&mut at);
        if let Some(path) = &params.path {
            at.files.insert("path".into(), m.resolve(path));
        }
        FidExtractorInputs {
            stage: ExtractorKey::of(params),
            seed: (params.extractor == ExtractorKind::Classifier)
                .then_some(params.seed.unwrap_or(m.seed)),
            data,
            at,
        }
    }
}
