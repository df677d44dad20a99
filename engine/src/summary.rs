//! Summaries of a metric over seeds: the mean, the sample standard deviation, the half-width of
//! the two-sided 95% confidence interval of the mean from Student's t distribution, and n.
//!
//! With `n` values `x_i`, mean `m` and sample standard deviation `s` (`n - 1` in the
//! denominator), the interval is `m ± t_{0.975, n-1} s / sqrt(n)`: it assumes the per-seed
//! values are independent draws from a normal distribution, which is the usual reading of "mean
//! ± CI over seeds" and is honest about how little three seeds say (`t_{0.975, 2} = 4.30`).
//! With one value there is neither a standard deviation nor an interval.
//!
//! The t quantile is computed here (Student's t CDF through the regularised incomplete beta
//! function, Lentz's continued fraction, and bisection), to 1e-12: no statistics crate needed.

use serde::Serialize;

/// A metric over the seeds of one report row.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (`n - 1` in the denominator); absent for one value.
    pub std: Option<f64>,
    /// Half-width of the two-sided 95% confidence interval of the mean,
    /// `t_{0.975, n-1} std / sqrt(n)`; absent for one value.
    pub ci95: Option<f64>,
    /// Number of values.
    pub n: usize,
}

impl Summary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Some(Summary { mean, std: None, ci95: None, n });
        }
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
        let std = var.sqrt();
        let ci95 = student_t_quantile(0.975, (n - 1) as f64) * std / (n as f64).sqrt();
        Some(Summary { mean, std: Some(std), ci95: Some(ci95), n })
    }

    /// `[mean - ci95, mean + ci95]` (the mean twice for one value).
    pub fn interval(&self) -> (f64, f64) {
        let h = self.ci95.unwrap_or(0.0);
        (self.mean - h, self.mean + h)
    }
}

/// The `p` quantile of Student's t distribution with `df` degrees of freedom, for `p` in
/// (0, 1) and `df > 0`.
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0 && df > 0.0, "t quantile of p = {p}, df = {df}");
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    if p == 0.5 {
        return 0.0;
    }
    let mut hi = 1.0;
    while student_t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-13 * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Student's t CDF: `1 - I_{df/(df+t²)}(df/2, 1/2) / 2` for `t >= 0`.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(df / (df + t * t), 0.5 * df, 0.5);
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// The regularised incomplete beta function `I_x(a, b)`.
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    // I_x(a, b) = 1 - I_{1-x}(b, a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Even step.
        let aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 coefficients; about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = COEF[0];
    let t = x + G + 0.5;
    for (i, c) in COEF.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_the_tables() {
        // scipy.stats.t.ppf(0.975, df).
        for (df, q) in [
            (1.0, 12.706204736174694),
            (2.0, 4.302652729749462),
            (3.0, 3.1824463052837078),
            (4.0, 2.7764451051977934),
            (9.0, 2.262157162798205),
            (29.0, 2.045229642132703),
            (100.0, 1.9839715185235518),
            (1000.0, 1.9623390808264083),
        ] {
            let got = student_t_quantile(0.975, df);
            assert!((got - q).abs() <= 1e-9 * q, "df {df}: {got} vs {q}");
        }
        assert!((student_t_quantile(0.025, 3.0) + 3.1824463052837078).abs() < 1e-9);
        assert_eq!(student_t_quantile(0.5, 5.0), 0.0);
    }

    #[test]
    fn summary_of_three_values_by_hand() {
        // 10, 12, 17: mean 13, deviations -3, -1, 4, sum of squares 26, variance 26 / 2 = 13.
        let s = Summary::of(&[10.0, 12.0, 17.0]).unwrap();
        assert_eq!(s.n, 3);
        assert_eq!(s.mean, 13.0);
        let sd = 13f64.sqrt();
        assert!((s.std.unwrap() - sd).abs() < 1e-12);
        let ci = 4.302652729749462 * sd / 3f64.sqrt();
        assert!((s.ci95.unwrap() - ci).abs() < 1e-9, "{} vs {ci}", s.ci95.unwrap());
        assert_eq!(s.interval(), (13.0 - s.ci95.unwrap(), 13.0 + s.ci95.unwrap()));
    }

    #[test]
    fn one_value_has_no_spread_and_none_no_summary() {
        let s = Summary::of(&[4.0]).unwrap();
        assert_eq!((s.mean, s.std, s.ci95, s.n), (4.0, None, None, 1));
        assert_eq!(Summary::of(&[]), None);
        let same = Summary::of(&[2.0, 2.0]).unwrap();
        assert_eq!((same.std, same.ci95), (Some(0.0), Some(0.0)));
    }
}
