//! FID: the Fréchet Inception Distance as pytorch-fid 0.3.0 computes it, with the feature
//! extractors progdiff can use and the `fid-extractor` stage that prepares one together with the
//! dataset's reference statistics.
//!
//! - [`Statistics`] (float64 `mu`, `sigma` with ddof 1) and [`frechet_distance`], whose matrix
//!   square root goes through symmetric eigendecompositions ([`trace_sqrt_product`]) rather
//!   than scipy's Schur method, with pytorch-fid's `1e-6 * I` retry and imaginary-part check.
//! - [`read_stats`] / [`write_stats`]: pytorch-fid's `.npz` statistics files, both ways.
//! - [`Extractor`]: a TorchScript module (pytorch-fid's InceptionV3, exported by the user) or a
//!   [`Classifier`] progdiff trains on the dataset ([`stage`]).
//!
//! # Agreement with pytorch-fid
//!
//! On well-conditioned statistics the two square roots agree to rounding. On singular ones
//! (fewer samples than feature dimensions) scipy's `sqrtm` may return non-finite values, after
//! which pytorch-fid retries with `1e-6` on the diagonals; the symmetric route stays finite there
//! and needs no retry, and the two results then differ by the retry's perturbation (about 1e-7
//! relative in the tests' fixture). The retry is kept for inputs whose square root still is not
//! finite.

mod classifier;
mod extractor;
mod folder;
mod npz;
pub mod stage;
mod stats;

use std::path::PathBuf;

pub use classifier::{Classifier, ClassifierConfig, Target, rotate_quarters};
pub use extractor::{Extractor, ExtractorSpec, INCEPTION_SIZE};
pub use folder::load_folder;
pub use npz::{read_stats, write_stats};
pub use stats::{
    MAX_IMAGINARY, SQRTM_EPS, Statistics, frechet_distance, frechet_distance_with,
    trace_sqrt_product,
};

/// Why an FID could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FidError {
    /// Arrays of the wrong shape.
    #[error("{0}")]
    Shape(String),
    /// The square root stayed non-finite after the eps retry.
    #[error("the FID's matrix square root is not finite, even with 1e-6 added to the diagonals")]
    NotFinite,
    /// pytorch-fid's imaginary-component check failed.
    #[error(
        "the FID's matrix square root has an imaginary component of {0:e} (more than 1e-3)\nhint: \
         are both covariances positive semi-definite?"
    )]
    Imaginary(f64),
    /// A statistics file that cannot be read or written.
    #[error("statistics file `{}`: {message}", path.display())]
    Stats {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An extractor that cannot be loaded or saved.
    #[error("feature extractor `{}`: {message}", path.display())]
    Extractor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image folder that cannot be read.
    #[error("image folder `{}`: {message}", path.display())]
    Folder {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
