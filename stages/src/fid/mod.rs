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
pub mod stage;
mod stats;

pub use classifier::{Classifier, ClassifierConfig, rotate_quarters};
pub use extractor::{Extractor, ExtractorSpec};
pub use folder::load_folder;
pub use progdiff_kinds::fid::{FidError, Statistics, read_stats, write_stats};
pub use progdiff_kinds::fid_extractor::{INCEPTION_SIZE, Target};
pub use stats::{
    MAX_IMAGINARY, SQRTM_EPS, frechet_distance, frechet_distance_with, statistics_from_features,
    trace_sqrt_product,
};
