//! A small convolutional classifier progdiff trains itself, so that FID works where no
//! Inception weights exist: its penultimate activations are the features.
//!
//! Trained on the dataset's labels when it has them (Fashion-MNIST, CIFAR-10), otherwise on a
//! self-supervised pretext task that needs no labels: which of four rotations (0, 90, 180, 270
//! degrees) an image was given.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use super::{FidError, Target};

/// The shape of a trained classifier, saved next to its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Image height and width.
    pub image_size: usize,
    /// Width of the penultimate layer: the feature dimension.
    pub features: usize,
    /// Number of classes of the head.
    pub classes: usize,
    /// `labels` or `rotation`: what it was trained on.
    pub target: Target,
    /// Accuracy on the last training batches, for the record.
    #[serde(default)]
    pub train_accuracy: Option<f64>,
}

/// The network: three 3x3 convolutions (32, 64, 64 channels; the last two with stride 2), global
/// average pooling, a ReLU layer of `features` units (the features), a linear head.
#[derive(Debug)]
pub struct Classifier {
    config: ClassifierConfig,
    vs: VarStore,
    body: nn::Sequential,
    head: nn::Linear,
}

impl Classifier {
    /// A freshly initialised classifier on `device` (seed libtorch's generator first for a
    /// reproducible start). The weights are drawn on the CPU, then moved: the CPU and GPU
    /// generators give different streams, and the same key must start from the same weights
    /// wherever it runs.
    pub fn new(config: ClassifierConfig, device: Device) -> Classifier {
        let mut vs = VarStore::new(Device::Cpu);
        let p = vs.root();
        let conv = |c_in, c_out, stride, name: &str| {
            nn::conv2d(
                &p / name,
                c_in,
                c_out,
                3,
                nn::ConvConfig { stride, padding: 1, ..Default::default() },
            )
        };
        let f = config.features as i64;
        let body = nn::seq()
            .add(conv(config.in_channels as i64, 32, 1, "conv1"))
            .add_fn(|x| x.relu())
            .add(conv(32, 64, 2, "conv2"))
            .add_fn(|x| x.relu())
            .add(conv(64, 64, 2, "conv3"))
            .add_fn(|x| x.relu())
            .add_fn(|x| x.mean_dim([2i64, 3].as_slice(), false, Kind::Float)) // [B, 64]
            .add(nn::linear(&p / "fc", 64, f, Default::default()))
            .add_fn(|x| x.relu()); // [B, features]
        let head = nn::linear(&p / "head", f, config.classes as i64, Default::default());
        vs.set_device(device);
        Classifier { config, vs, body, head }
    }

    /// Loads weights saved by [`Classifier::save`] (a safetensors file, whatever its name: cached
    /// objects have none).
    pub fn load(config: &ClassifierConfig, path: &Path, device: Device) -> Result<Self, FidError> {
        let err = |message: String| FidError::Extractor { path: path.to_path_buf(), message };
        let c = Classifier::new(config.clone(), device);
        let saved = Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?;
        let mut vars = c.vs.variables();
        let _guard = tch::no_grad_guard();
        for (name, t) in saved {
            let v =
                vars.get_mut(&name).ok_or_else(|| err(format!("unexpected tensor `{name}`")))?;
            v.f_copy_(&t).map_err(|e| err(format!("`{name}`: {e}")))?;
        }
        if vars.len() != c.vs.variables().len() {
            return Err(err("missing tensors".into()));
        }
        Ok(c)
    }

    /// Saves the weights (safetensors when `path` ends in `.safetensors`).
    pub fn save(&self, path: &Path) -> Result<(), FidError> {
        self.vs
            .save(path)
            .map_err(|e| FidError::Extractor { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The configuration.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// Class logits of float images in `[-1, 1]`, `[B, C, H, W]` -> `[B, classes]`.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.body.forward(x))
    }

    /// Penultimate features of uint8 images `[B, C, H, W]` -> float32 `[B, features]`.
    pub fn features(&self, images: &Tensor) -> Tensor {
        let x = images.to_device(self.vs.device()).to_kind(Kind::Float) / 127.5 - 1.0;
        self.body.forward(&x)
    }

    /// Trains with Adam for `steps` steps on batches from `batch(step)`, which returns float
    /// images in `[-1, 1]` `[B, C, H, W]` and int64 targets `[B]`; returns the accuracy over the
    /// last tenth of the steps. Checks `cancel` between steps.
    pub fn train(
        &mut self,
        steps: usize,
        lr: f64,
        batch: &mut dyn FnMut(usize) -> anyhow::Result<(Tensor, Tensor)>,
        cancel: &crate::context::CancelToken,
    ) -> anyhow::Result<f64> {
        let mut opt = nn::Adam::default().build(&self.vs, lr)?;
        let tail = (steps / 10).max(1);
        let (mut right, mut total) = (0i64, 0i64);
        for step in 0..steps {
            cancel.check()?;
            let (x, y) = batch(step)?;
            let (x, y) = (x.to_device(self.vs.device()), y.to_device(self.vs.device()));
            let logits = self.logits(&x);
            let loss = logits.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            if step + tail >= steps {
                right += i64::try_from(logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64))?;
                total += y.size()[0];
            }
            if step % 100 == 0 {
                tracing::debug!(step, loss = f64::try_from(&loss)?, "extractor training");
            }
        }
        let accuracy = right as f64 / total.max(1) as f64;
        self.config.train_accuracy = Some(accuracy);
        Ok(accuracy)
    }
}

/// Images rotated by `k[i]` quarter turns (the rotation pretext task's inputs), `[B, C, H, W]`.
pub fn rotate_quarters(x: &Tensor, k: &[i64]) -> Tensor {
    let parts: Vec<Tensor> =
        k.iter().enumerate().map(|(i, &k)| x.narrow(0, i as i64, 1).rot90(k, [2, 3])).collect();
    Tensor::cat(&parts, 0)
}
