//! Sampling images from one UNet or from a progressive set of them (the paper's step-adaptive
//! sampler): each reverse step runs the model whose timestep group holds the step's ORIGINAL
//! timestep.
//!
//! - [`ModelSet`]: the models and which original timesteps each serves ([`ModelSet::single`], or
//!   [`ModelSet::progressive`] from an [`Allocation`](crate::allocate::Allocation): model i serves
//!   group i). It also answers which model runs at each step of a (respaced) process
//!   ([`ModelSet::models_per_step`]) and the params / MACs averaged over those steps
//!   ([`ModelSet::average_cost`]), the paper's cost of a progressive model.
//! - [`sample`] / [`sample_batches`]: batched sampling with a progress bar and cancellation,
//!   returning 8-bit images as IDDPM saves them.
//! - [`ImageNoise`]: the noise source that makes image `i` of seed `s` independent of the batch
//!   it was drawn in.
//!
//! # Reproducibility
//!
//! Every image has its own noise stream, [`SeededNoise::stream`](crate::diffusion::SeededNoise)
//! `(seed, i)` for image index `i` (counted from [`SampleConfig::first`]): its starting noise
//! and the noise of every step are drawn from that stream alone. So for a fixed model set,
//! process, options and device:
//!
//! - two runs with the same seed give the same images, bit for bit;
//! - the noise an image gets does not depend on `batch_size`, on the other images of its batch,
//!   or on other users of libtorch's global generator (dropout, initialisation, other threads);
//! - images `first..first + n` of a run are the images a run from 0 would produce at those
//!   indices (resume or shard a large sample by `first`), as far as the model gives each image of
//!   a batch the same output whatever the batch's size. It does up to the last float bits only:
//!   batched kernels (libtorch's CPU kernels included, depending even on the process) round
//!   differently between batch sizes, which now and then moves an 8-bit pixel by one level.

mod model_set;
mod noise;
mod run;

pub use model_set::{AverageCost, ModelSet, load_unet};
pub use noise::ImageNoise;
pub use run::{SampleConfig, Samples, parse_device, sample, sample_batches};

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;

/// Why a model set could not be built or could not sample.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A model set with no models.
    #[error("a model set needs at least one model")]
    NoModels,
    /// A progressive set whose model count is not the allocation's group count.
    #[error(
        "a progressive model set needs one model per timestep group: {models} models for \
         {groups} groups"
    )]
    ModelCount {
        /// Models given.
        models: usize,
        /// Groups in the allocation.
        groups: usize,
    },
    /// Models of one set that differ in what they read or write.
    #[error(
        "model {index} of the set has `{field}` = {found}, but model 0 has {expected}\nhint: \
         every model of a progressive set must come from the same `model:` section (only \
         widths may differ)"
    )]
    ModelsDiffer {
        /// The offending model.
        index: usize,
        /// The `model:` field that differs.
        field: &'static str,
        /// Model 0's value.
        expected: String,
        /// The offending model's value.
        found: String,
    },
    /// The allocation and the diffusion process have different step counts.
    #[error(
        "the allocation covers {allocation} timesteps, but the diffusion process has {diffusion}"
    )]
    StepsMismatch {
        /// T of the allocation.
        allocation: usize,
        /// T of the diffusion's original process.
        diffusion: usize,
    },
    /// The models and the process disagree on whether the variance is learned.
    #[error(
        "the models have `learn_sigma` = {model}, but the diffusion process {}",
        if *.model { "has a fixed variance" } else { "expects a learned variance" }
    )]
    LearnSigma {
        /// The models' `learn_sigma`.
        model: bool,
    },
    /// `batch_size` of 0.
    #[error("`batch_size` must be at least 1, got 0")]
    ZeroBatch,
    /// Cancelled between two steps.
    #[error("interrupted")]
    Interrupted,
    /// Loading a checkpoint failed.
    #[error("cannot load the model `{}`", path.display())]
    Load {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// A device string that is neither `cpu` nor `cuda:N`.
    #[error("unknown device `{0}`, expected `cpu`, `cuda` or `cuda:N`")]
    Device(String),
    /// The per-batch callback of [`sample_batches`] failed.
    #[error(transparent)]
    Batch(#[from] anyhow::Error),
}
