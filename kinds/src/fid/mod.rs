//! FID on statistics, torch-free: pytorch-fid's `.npz` statistics files both ways, the
//! statistics of feature vectors, and the Fréchet distance between two Gaussians on `faer`
//! ([`frechet_distance`]; the method and its agreement with pytorch-fid are in its module).
//! Feature extraction (which needs a network) is `progdiff_stages::fid`.

mod frechet;
mod npz;

use std::path::PathBuf;

pub use frechet::{
    MAX_IMAGINARY, SQRTM_EPS, frechet_distance, frechet_distance_with, trace_sqrt_product,
};
pub use npz::{read_stats, write_stats};

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
    /// A tensor library error (feature extraction).
    #[error("{0}")]
    Tensor(String),
}

/// Mean and covariance of `D`-dimensional features, in float64: pytorch-fid's `mu` and `sigma`.
#[derive(Clone, Debug, PartialEq)]
pub struct Statistics {
    /// `mean(act, 0)`, length `D`.
    pub mu: Vec<f64>,
    /// `cov(act, rowvar=False)` with ddof 1, `D x D` row-major.
    pub sigma: Vec<f64>,
}

impl Statistics {
    /// Statistics from the mean `mu` and the row-major covariance `sigma`; errors when `sigma`
    /// is not `D x D` for `D = mu.len()`.
    pub fn new(mu: Vec<f64>, sigma: Vec<f64>) -> Result<Statistics, FidError> {
        if sigma.len() != mu.len() * mu.len() {
            return Err(FidError::Shape(format!(
                "`sigma` has {} entries, but `mu` has {} so it needs {}",
                sigma.len(),
                mu.len(),
                mu.len() * mu.len()
            )));
        }
        Ok(Statistics { mu, sigma })
    }

    /// Feature dimension `D`.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }
}
