//! Feature statistics and the Fréchet distance between two of them, following pytorch-fid 0.3.0.

use tch::{Device, Kind, Tensor};

use super::{FidError, Statistics};

/// What pytorch-fid adds to both covariances' diagonals when the square root is not finite.
pub const SQRTM_EPS: f64 = 1e-6;

/// The largest imaginary part the square root's diagonal may have before the distance is
/// refused (pytorch-fid's `np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)`).
pub const MAX_IMAGINARY: f64 = 1e-3;

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

fn sigma_tensor(s: &Statistics) -> Tensor {
    let d = s.dim() as i64;
    Tensor::from_slice(&s.sigma).view([d, d])
}

/// The trace of `sqrtm(s1 s2)`, computed as `tr sqrt(sqrt(s1) s2 sqrt(s1))` by two symmetric
/// eigendecompositions in float64: the real part, and the largest imaginary part a negative
/// eigenvalue contributes (0 for positive semi-definite inputs, up to rounding).
///
/// `s1 s2` is similar to the symmetric positive semi-definite `sqrt(s1) s2 sqrt(s1)`, so both
/// have the same eigenvalues and the square root's trace is the sum of their square roots; the
/// symmetric route never meets the non-diagonalisable products that make the Schur method of
/// `scipy.linalg.sqrtm` return `inf`/`nan` on singular covariances.
pub fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> (f64, f64) {
    let _guard = tch::no_grad_guard();
    let s1 = symmetrise(&s1.to_kind(Kind::Double));
    let s2 = symmetrise(&s2.to_kind(Kind::Double));
    let (w, v) = s1.linalg_eigh("L"); // w: [D], v: [D, D]
    let root = (&v * w.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.tr()); // sqrt(s1)
    let m = symmetrise(&root.matmul(&s2).matmul(&root));
    let mu = m.linalg_eigvalsh("L"); // [D]
    let real = f64::try_from(mu.clamp_min(0.0).sqrt().sum(Kind::Double)).unwrap_or(f64::NAN);
    let imag = f64::try_from((-&mu).clamp_min(0.0).sqrt().max()).unwrap_or(f64::NAN);
    (real, imag)
}

fn symmetrise(m: &Tensor) -> Tensor {
    (m + m.tr()) * 0.5
}

/// The Fréchet distance between two Gaussians, pytorch-fid 0.3.0's
/// `calculate_frechet_distance`:
/// `|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))`.
///
/// When the square root's trace is not finite, [`SQRTM_EPS`] times the identity is added to
/// both covariances for the square root only and it is computed again (with a warning); when
/// its imaginary part exceeds [`MAX_IMAGINARY`] (covariances that are not positive
/// semi-definite) the distance is refused; otherwise the real part is used.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64, FidError> {
    frechet_distance_with(a, b, false)
}

/// [`frechet_distance`] with the [`SQRTM_EPS`] offset applied from the start (`force_eps`), as
/// pytorch-fid's retry computes it; `force_eps = false` is [`frechet_distance`].
pub fn frechet_distance_with(
    a: &Statistics,
    b: &Statistics,
    force_eps: bool,
) -> Result<f64, FidError> {
    if a.dim() != b.dim() {
        return Err(FidError::Shape(format!(
            "the statistics have different dimensions: {} and {}",
            a.dim(),
            b.dim()
        )));
    }
    let _guard = tch::no_grad_guard();
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |s: &Statistics| (0..s.dim()).map(|i| s.sigma[i * s.dim() + i]).sum::<f64>();
    let (s1, s2) = (sigma_tensor(a), sigma_tensor(b));
    let with_eps = || {
        let offset = Tensor::eye(a.dim() as i64, (Kind::Double, Device::Cpu)) * SQRTM_EPS;
        trace_sqrt_product(&(&s1 + &offset), &(&s2 + &offset))
    };
    let (mut real, mut imag) = if force_eps { with_eps() } else { trace_sqrt_product(&s1, &s2) };
    let finite = real.is_finite() && imag.is_finite();
    if !force_eps && !finite {
        tracing::warn!(
            "the FID's matrix square root is not finite; adding {SQRTM_EPS} to the diagonal of \
             both covariances"
        );
        (real, imag) = with_eps();
    }
    if !(real.is_finite() && imag.is_finite()) {
        return Err(FidError::NotFinite);
    }
    if imag > MAX_IMAGINARY {
        return Err(FidError::Imaginary(imag));
    }
    Ok(diff + trace(a) + trace(b) - 2.0 * real)
}
