//! Feature extractors: networks that map uint8 images to feature vectors whose statistics the
//! FID compares.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{CModule, Device, IValue, Kind, Tensor};

use super::FidError;
use super::classifier::Classifier;

/// What an extractor is, as written next to it in the cache (`extractor.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ExtractorSpec {
    /// A TorchScript module (e.g. pytorch-fid's InceptionV3 exported with `torch.jit.trace`).
    Torchscript {
        /// Square input size the images are resized to (299 for Inception).
        size: usize,
    },
    /// A small classifier progdiff trained itself ([`Classifier`]).
    Classifier(super::classifier::ClassifierConfig),
}

/// A loaded feature extractor.
#[derive(Debug)]
pub enum Extractor {
    /// TorchScript: images resized bilinear (align_corners = false) to `size`, scaled to
    /// `[-1, 1]`, grayscale repeated to 3 channels; output flattened to `[N, D]`.
    Torchscript {
        /// The module, in eval mode.
        module: CModule,
        /// Square input size.
        size: usize,
        /// Where it runs.
        device: Device,
    },
    /// A trained [`Classifier`]'s penultimate features.
    Classifier(Classifier),
}

impl Extractor {
    /// Loads a TorchScript module from `path` onto `device`, inputs resized to `size`.
    pub fn torchscript(path: &Path, size: usize, device: Device) -> Result<Extractor, FidError> {
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            FidError::Extractor { path: path.to_path_buf(), message: e.to_string() }
        })?;
        module.set_eval();
        Ok(Extractor::Torchscript { module, size, device })
    }

    /// Loads what an `fid-extractor` stage wrote: `spec` and, for TorchScript, the module file
    /// `module` / for a classifier, its weights `weights`.
    pub fn load(spec: &ExtractorSpec, file: &Path, device: Device) -> Result<Extractor, FidError> {
        match spec {
            ExtractorSpec::Torchscript { size } => Extractor::torchscript(file, *size, device),
            ExtractorSpec::Classifier(config) => {
                Ok(Extractor::Classifier(Classifier::load(config, file, device)?))
            }
        }
    }

    /// Features of uint8 images `[N, C, H, W]` (any device), as float32 `[N, D]` on the CPU,
    /// computed in batches of `batch_size`.
    pub fn features(&self, images: &Tensor, batch_size: usize) -> Result<Tensor, FidError> {
        let n = images.size().first().copied().unwrap_or(0);
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let b = (batch_size.max(1) as i64).min(n - start);
            out.push(self.features_batch(&images.narrow(0, start, b))?);
            start += b;
        }
        if out.is_empty() {
            return Err(FidError::Shape("no images to extract features from".into()));
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// Features of one batch of uint8 images `[B, C, H, W]`, float32 `[B, D]` on the CPU.
    pub fn features_batch(&self, images: &Tensor) -> Result<Tensor, FidError> {
        let size = images.size();
        if size.len() != 4 {
            return Err(FidError::Shape(format!("images must be [N, C, H, W], got {size:?}")));
        }
        let _guard = tch::no_grad_guard();
        let features = match self {
            Extractor::Torchscript { module, size: s, device } => {
                let x = images.to_device(*device).to_kind(Kind::Float) / 255.0; // [B, C, H, W]
                let x = if size[1] == 1 { x.repeat([1, 3, 1, 1]) } else { x };
                let s = *s as i64;
                let x = x.upsample_bilinear2d([s, s], false, None, None); // [B, 3, s, s]
                let x = x * 2.0 - 1.0;
                let out = module
                    .forward_is(&[IValue::Tensor(x)])
                    .map_err(|e| FidError::Shape(format!("the extractor failed: {e}")))?;
                first_tensor(out).ok_or_else(|| {
                    FidError::Shape("the extractor returned no tensor".to_string())
                })?
            }
            Extractor::Classifier(c) => c.features(images),
        };
        Ok(features.flatten(1, -1).to_kind(Kind::Float).to_device(Device::Cpu)) // [B, D]
    }
}

/// The first tensor of a module's output: a tensor, or the first of a tuple / list.
fn first_tensor(v: IValue) -> Option<Tensor> {
    match v {
        IValue::Tensor(t) => Some(t),
        IValue::Tuple(vs) | IValue::GenericList(vs) => vs.into_iter().find_map(first_tensor),
        IValue::TensorList(ts) => ts.into_iter().next(),
        _ => None,
    }
}
