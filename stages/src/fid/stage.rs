//! `fid-extractor`: prepares the feature extractor an `evaluate` stage computes FID with, and
//! the dataset's reference statistics under it — a cached artefact whose key holds the dataset's
//! digest and the extractor's (the TorchScript file's digest, or the classifier's training
//! parameters and data).
//!
//! Outputs: `extractor.json` ([`ExtractorSpec`]), the extractor itself (`extractor.pt`, a copy of
//! the TorchScript module, or `classifier.safetensors`) and `reference.npz` (pytorch-fid's
//! format).

use std::path::Path;

use anyhow::Context as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{
    Classifier, ClassifierConfig, Extractor, ExtractorSpec, INCEPTION_SIZE, Statistics, Target,
    rotate_quarters, write_stats,
};
use crate::context::{FieldError, StageContext};
use crate::data::{DataConfig, Dataset};
use crate::sample::parse_device;

/// Stage kind name.
pub const KIND: &str = "fid-extractor";
/// Implementation version: bump when outputs would change.
pub const VERSION: u32 = 1;
/// Output: the [`ExtractorSpec`].
pub const SPEC_FILE: &str = "extractor.json";
/// Output: the TorchScript module.
pub const MODULE_FILE: &str = "extractor.pt";
/// Output: the classifier's weights.
pub const WEIGHTS_FILE: &str = "classifier.safetensors";
/// Output: the dataset's statistics under the extractor.
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
        if self.reference_samples.is_some_and(|n| n < 2) {
            e.push(FieldError::at("reference_samples", "must be at least 2"));
        }
        e
    }

    /// The parameters that make the extractor and its statistics what they are (what the cache
    /// key should hold): the TorchScript `path` is left out (its content digest is an input) and
    /// so are the classifier's fields for a TorchScript extractor.
    pub fn key_values(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("parameters serialise");
        let o = v.as_object_mut().expect("an object");
        o.remove("path");
        match self.extractor {
            ExtractorKind::Torchscript => {
                for f in ["steps", "lr", "features", "target"] {
                    o.remove(f);
                }
            }
            ExtractorKind::Classifier => {
                o.remove("size");
            }
        }
        v
    }
}

/// Runs the stage: prepares the extractor and writes the dataset's reference statistics.
pub fn run(
    ctx: &StageContext,
    params: &ExtractorParams,
    data: &DataConfig,
    manifest_dir: &Path,
) -> anyhow::Result<()> {
    let device = parse_device(&ctx.device)?;
    let dataset = data.open(manifest_dir).context("opening the dataset")?;
    let (c, h, w) = dataset.image_shape();
    let (spec, extractor) = match params.extractor {
        ExtractorKind::Torchscript => {
            let rel = params.path.as_deref().context("`path` is required")?;
            let src = manifest_dir.join(rel);
            let dst = ctx.out_dir.join(MODULE_FILE);
            std::fs::copy(&src, &dst).with_context(|| format!("copying `{}`", src.display()))?;
            let spec = ExtractorSpec::Torchscript { size: params.size };
            (spec, Extractor::torchscript(&dst, params.size, device)?)
        }
        ExtractorKind::Classifier => {
            anyhow::ensure!(h == w, "the classifier extractor needs square images, got {h}x{w}");
            let classifier = train_classifier(ctx, params, &dataset, device)?;
            classifier.save(&ctx.out_dir.join(WEIGHTS_FILE))?;
            (
                ExtractorSpec::Classifier(classifier.config().clone()),
                Extractor::Classifier(classifier),
            )
        }
    };
    std::fs::write(ctx.out_dir.join(SPEC_FILE), serde_json::to_vec_pretty(&spec)?)?;
    let n = params.reference_samples.unwrap_or(usize::MAX).min(dataset.len());
    anyhow::ensure!(n >= 2, "the dataset has {n} images; reference statistics need at least 2");
    tracing::info!(images = n, channels = c, "reference statistics");
    let mut features = Vec::new();
    for start in (0..n).step_by(params.batch_size) {
        ctx.cancel.check()?;
        let idx: Vec<usize> = (start..(start + params.batch_size).min(n)).collect();
        let x = dataset.batch_unaugmented(&idx)?; // [B, C, H, W] in [-1, 1]
        features.push(extractor.features_batch(&to_uint8(&x))?);
    }
    let stats = Statistics::from_features(&Tensor::cat(&features, 0))?;
    write_stats(&stats, &ctx.out_dir.join(REFERENCE_FILE))?;
    Ok(())
}

/// Float images in `[-1, 1]` as the uint8 images a sampler would save.
pub fn to_uint8(x: &Tensor) -> Tensor {
    ((x + 1.0) * 127.5).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

fn train_classifier(
    ctx: &StageContext,
    params: &ExtractorParams,
    dataset: &Dataset,
    device: tch::Device,
) -> anyhow::Result<Classifier> {
    let (c, h, _) = dataset.image_shape();
    let target = match params.target {
        Target::Auto if dataset.has_labels() => Target::Labels,
        Target::Auto => Target::Rotation,
        Target::Labels if !dataset.has_labels() => {
            anyhow::bail!(
                "`target: labels` needs a dataset with labels; `{}` has none",
                data_kind(dataset)
            )
        }
        t => t,
    };
    let classes = match target {
        Target::Labels => {
            let all: Vec<usize> = (0..dataset.len()).collect();
            let labels = dataset.labels(&all)?.context("labels")?;
            (i64::try_from(labels.max())? + 1) as usize
        }
        _ => 4,
    };
    let config = ClassifierConfig {
        in_channels: c,
        image_size: h,
        features: params.features,
        classes,
        target,
        train_accuracy: None,
    };
    let mut classifier = {
        let _rng = crate::train::TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(ctx.seed as i64);
        Classifier::new(config, device)
    };
    let len = dataset.len() as u64;
    let b = params.batch_size;
    let mut batch = |step: usize| -> anyhow::Result<(Tensor, Tensor)> {
        // A fixed pseudo-random walk over the dataset, a function of (seed, step) only.
        let idx: Vec<usize> = (0..b as u64)
            .map(|i| (mix(ctx.seed ^ mix(step as u64 * b as u64 + i)) % len) as usize)
            .collect();
        let x = dataset.batch_unaugmented(&idx)?;
        match target {
            Target::Labels => Ok((x, dataset.labels(&idx)?.context("labels")?)),
            _ => {
                let k: Vec<i64> =
                    idx.iter().map(|&i| (mix(i as u64 ^ step as u64) % 4) as i64).collect();
                Ok((rotate_quarters(&x, &k), Tensor::from_slice(&k)))
            }
        }
    };
    let accuracy = classifier.train(params.steps, params.lr, &mut batch, &ctx.cancel)?;
    tracing::info!(accuracy, ?target, "trained the FID feature classifier");
    Ok(classifier)
}

fn data_kind(d: &Dataset) -> &'static str {
    d.kind()
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
