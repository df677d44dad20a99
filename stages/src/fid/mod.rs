//! FID: the Fréchet Inception Distance as pytorch-fid 0.3.0 computes it, with the feature
//! extractors progdiff can use and the `fid-extractor` stage that prepares one together with the
//! dataset's reference statistics.
//!
//! - [`Statistics`], [`frechet_distance`] (on faer, pytorch-fid's `1e-6 * I` retry and
//!   imaginary-part check), KID ([`kernel_inception_distance`]) and the `.npz` files
//!   ([`read_stats`] / [`write_stats_with_features`], which also hold the feature vectors) are
//!   the torch-free `progdiff_kinds::fid`, re-exported; [`statistics_from_features`] computes
//!   statistics from a feature tensor on any device.
//! - [`Extractor`]: a TorchScript module (pytorch-fid's InceptionV3, exported by the user) or a
//!   [`Classifier`] progdiff trains on the dataset ([`stage`]).

mod classifier;
mod extractor;
mod folder;
pub mod stage;
mod stats;

pub use classifier::{Classifier, ClassifierConfig, rotate_quarters};
pub use extractor::{Extractor, ExtractorSpec};
pub use folder::load_folder;
pub use progdiff_kinds::fid::{
    Features, FidError, Kid, KidOptions, MAX_IMAGINARY, SQRTM_EPS, Statistics, frechet_distance,
    frechet_distance_with, kernel_inception_distance, read_features, read_stats,
    trace_sqrt_product, write_stats, write_stats_with_features,
};
pub use progdiff_kinds::fid_extractor::{INCEPTION_SIZE, Target};
pub use stats::{features_from_tensor, statistics_from_features};
