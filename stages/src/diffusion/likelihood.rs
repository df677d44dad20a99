//! Gaussian KL and the discretized decoder likelihood of the variational bound (IDDPM
//! `losses.py`, itself from Ho et al.'s `diffusion_tf/utils.py`), plus `mean_flat`.
//!
//! Every function is elementwise on broadcastable tensors and keeps the input dtype; the
//! operation order follows the reference so float32 results match it to rounding.

use tch::Tensor;

/// `KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))` elementwise, in nats.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    let diff = mean1 - mean2;
    0.5 * (logvar2 - 1.0 - logvar1 + (logvar1 - logvar2).exp() + diff.square() * (-logvar2).exp())
}

/// The tanh approximation of the standard normal CDF:
/// `0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let inner = x + x.pow_tensor_scalar(3) * 0.044715;
    0.5 * ((inner * (2.0 / std::f64::consts::PI).sqrt()).tanh() + 1.0)
}

/// Log-likelihood (nats, elementwise) of images `x` in [-1, 1] that were 8-bit values, under a
/// Gaussian with `means` and log standard deviations `log_scales` discretised to the 256 bins
/// of width 2/255; the outermost bins extend to infinity.
///
/// # Shapes
/// `x`, `means` and `log_scales` all have the same shape, and so does the result.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Tensor {
    assert_eq!(x.size(), means.size(), "x and means must have the same shape");
    assert_eq!(x.size(), log_scales.size(), "x and log_scales must have the same shape");
    let centered = x - means;
    let inv_stdv = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (1.0f64 - &cdf_min).clamp_min(1e-12).log();
    let log_cdf_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_cdf_delta);
    log_cdf_plus.where_self(&x.lt(-0.999), &upper)
}

/// The mean over every dimension but the first: `[B, ...] -> [B]`.
pub fn mean_flat(x: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    if dims.is_empty() {
        return x.shallow_clone();
    }
    x.mean_dim(dims.as_slice(), false, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn kl_of_identical_gaussians_is_zero_and_of_unit_shift_is_half() {
        let zero = t(&[0.0, 0.0]);
        let kl = normal_kl(&zero, &zero, &zero, &zero);
        assert_eq!(Vec::<f64>::try_from(&kl).unwrap(), vec![0.0, 0.0]);
        let kl = normal_kl(&t(&[1.0]), &t(&[0.0]), &t(&[0.0]), &t(&[0.0]));
        assert!((kl.double_value(&[0]) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn cdf_is_close_to_the_normal_cdf() {
        let x = t(&[-2.0, 0.0, 1.0]);
        let c = Vec::<f64>::try_from(&approx_standard_normal_cdf(&x)).unwrap();
        for (got, want) in c.iter().zip([0.022750131948179, 0.5, 0.841344746068543]) {
            assert!((got - want).abs() < 2e-4, "{got} vs {want}");
        }
    }

    #[test]
    fn decoder_likelihood_sums_to_one_over_the_256_bins() {
        let bins = Tensor::arange(256, (Kind::Double, Device::Cpu)) / 127.5 - 1.0;
        let means = Tensor::full([256], 0.1, (Kind::Double, Device::Cpu));
        let log_scales = Tensor::full([256], (0.3f64).ln(), (Kind::Double, Device::Cpu));
        let p = discretized_gaussian_log_likelihood(&bins, &means, &log_scales).exp();
        assert!((p.sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn mean_flat_averages_all_but_the_batch_dimension() {
        let x = Tensor::arange(8, (Kind::Double, Device::Cpu)).view([2, 2, 2]);
        assert_eq!(Vec::<f64>::try_from(&mean_flat(&x)).unwrap(), vec![1.5, 5.5]);
    }
}
