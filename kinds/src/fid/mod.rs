//! FID and KID on stored features and statistics, torch-free: pytorch-fid's `.npz` statistics
//! files both ways (with the feature vectors themselves as an extra `features` array, which
//! pytorch-fid ignores and KID needs), the statistics of feature vectors, the Fréchet distance
//! between two Gaussians on `faer` ([`frechet_distance`]; the method and its agreement with
//! pytorch-fid are in its module), and the Kernel Inception Distance ([`kid`]: the unbiased MMD²
//! with the cubic polynomial kernel over seeded subsets). Feature extraction (which needs a
//! network) is `progdiff_stages::fid`.

mod frechet;
pub mod kid;
mod npz;

use std::path::PathBuf;

pub use frechet::{
    MAX_IMAGINARY, SQRTM_EPS, frechet_distance, frechet_distance_with, trace_sqrt_product,
};
pub use kid::{Kid, KidOptions, kernel_inception_distance};
pub use npz::{read_features, read_stats, write_stats, write_stats_with_features};

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

/// Feature vectors, `n` rows of dimension `dim` in float32 (what feature networks produce and
/// what `.npz` files store as `features`).
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// Row-major `[n, dim]`.
    pub values: Vec<f32>,
    /// Feature dimension.
    pub dim: usize,
}

impl Features {
    /// `n` rows of `dim` values; errors when `values` does not hold `n * dim`, or `dim` is 0.
    pub fn new(values: Vec<f32>, n: usize, dim: usize) -> Result<Features, FidError> {
        if dim == 0 || values.len() != n * dim {
            return Err(FidError::Shape(format!(
                "features must be [N, D] = [{n}, {dim}] with D >= 1, got {} values",
                values.len()
            )));
        }
        Ok(Features { values, dim })
    }

    /// Number of feature vectors.
    pub fn len(&self) -> usize {
        self.values.len() / self.dim
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Their statistics ([`Statistics::from_features`], in float64).
    pub fn statistics(&self) -> Result<Statistics, FidError> {
        let rows: Vec<f64> = self.values.iter().map(|&v| v as f64).collect();
        Statistics::from_features(&rows, self.len(), self.dim)
    }
}
