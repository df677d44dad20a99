//! `fid-extractor`: prepares the feature extractor an `evaluate` stage computes FID with, and
//! the dataset's reference statistics under it — a cached artefact whose key holds the dataset's
//! digest and the extractor's (the TorchScript file's digest, or the classifier's training
//! parameters and data).
//!
//! Outputs: `extractor.json` ([`ExtractorSpec`]), the extractor itself (`extractor.pt`, a copy of
//! the TorchScript module, or `classifier.safetensors`) and `reference.npz` (pytorch-fid's
//! format, with the dataset's feature vectors as `features` for KID).

use anyhow::Context as _;
use tch::{Kind, Tensor};

pub use progdiff_kinds::fid_extractor::*;

use super::{
    Classifier, ClassifierConfig, Extractor, ExtractorSpec, features_from_tensor, rotate_quarters,
    statistics_from_features, write_stats_with_features,
};
use crate::context::StageContext;
use crate::data::Dataset;
use crate::sample::parse_device;

/// Runs the stage: prepares the extractor and writes the dataset's reference statistics.
pub fn run(ctx: &StageContext, inputs: &FidExtractorInputs) -> anyhow::Result<()> {
    let params = &inputs.stage.params();
    let device = parse_device(&ctx.device)?;
    let data = inputs.at.data_config(inputs.data.as_ref())?;
    let dataset = Dataset::open(&data, &inputs.at.dir).context("opening the dataset")?;
    let (c, h, w) = dataset.image_shape();
    let (spec, extractor) = match params.extractor {
        ExtractorKind::Torchscript => {
            let src = inputs.at.file("path")?;
            let dst = ctx.out_dir.join(MODULE_FILE);
            std::fs::copy(src, &dst).with_context(|| format!("copying `{}`", src.display()))?;
            let spec = ExtractorSpec::Torchscript { size: params.size };
            (spec, Extractor::torchscript(&dst, params.size, device)?)
        }
        ExtractorKind::Classifier => {
            anyhow::ensure!(h == w, "the classifier extractor needs square images, got {h}x{w}");
            let seed = inputs.seed.context("a classifier extractor's inputs carry the seed")?;
            let classifier = train_classifier(ctx, params, seed, &dataset, device)?;
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
    let features = Tensor::cat(&features, 0); // [N, D]
    let stats = statistics_from_features(&features)?;
    let features = features_from_tensor(&features)?;
    write_stats_with_features(&stats, Some(&features), &ctx.out_dir.join(REFERENCE_FILE))?;
    Ok(())
}

/// Float images in `[-1, 1]` as the uint8 images a sampler would save.
pub fn to_uint8(x: &Tensor) -> Tensor {
    ((x + 1.0) * 127.5).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

fn train_classifier(
    ctx: &StageContext,
    params: &ExtractorParams,
    seed: u64,
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
    // A stage instance owns its process (one job, one worker), so libtorch's global generator
    // is its own to seed.
    tch::manual_seed(seed as i64);
    let mut classifier = Classifier::new(config, device);
    let len = dataset.len() as u64;
    let b = params.batch_size;
    let mut batch = |step: usize| -> anyhow::Result<(Tensor, Tensor)> {
        // A fixed pseudo-random walk over the dataset, a function of (seed, step) only.
        let idx: Vec<usize> = (0..b as u64)
            .map(|i| (mix(seed ^ mix(step as u64 * b as u64 + i)) % len) as usize)
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
