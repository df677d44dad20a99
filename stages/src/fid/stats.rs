//! Feature statistics on libtorch (any device), as pytorch-fid 0.3.0 computes them; the
//! distance between two is `progdiff_kinds::fid`'s.

use tch::{Device, Kind, Tensor};

use super::{Features, FidError, Statistics};

/// A `[N, D]` feature tensor (any float kind, any device) as float32 [`Features`] on the host,
/// the form `.npz` files store and KID reads.
pub fn features_from_tensor(features: &Tensor) -> Result<Features, FidError> {
    let size = features.size();
    let [n, d] = size[..] else {
        return Err(FidError::Shape(format!("features must be [N, D], got {size:?}")));
    };
    let t = features.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
    let values = Vec::<f32>::try_from(&t).map_err(|e| FidError::Tensor(e.to_string()))?;
    Features::new(values, n as usize, d as usize)
}

/// The statistics of features `[N, D]` (any float kind, any device): float64 mean and
/// covariance with ddof 1, as pytorch-fid's `calculate_activation_statistics`.
///
/// # Shapes
/// `features`: `[N, D]` with `N >= 2`.
pub fn statistics_from_features(features: &Tensor) -> Result<Statistics, FidError> {
    let size = features.size();
    let [n, _d] = size[..] else {
        return Err(FidError::Shape(format!("features must be [N, D], got {size:?}")));
    };
    if n < 2 {
        return Err(FidError::Shape(format!(
            "a covariance needs at least 2 feature vectors, got {n}"
        )));
    }
    let _guard = tch::no_grad_guard();
    let x = features.to_kind(Kind::Double); // [N, D]
    let mu = x.mean_dim(0, false, Kind::Double); // [D]
    let centred = &x - mu.unsqueeze(0); // [N, D]
    let sigma = centred.tr().matmul(&centred) / (n - 1) as f64; // [D, D]
    Ok(Statistics { mu: to_vec(&mu), sigma: to_vec(&sigma) })
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous().view([-1]);
    Vec::<f64>::try_from(&t).expect("a float64 CPU tensor converts to Vec<f64>")
}
