//! Noise schedules of IDDPM (`gaussian_diffusion.get_named_beta_schedule`), in float64.
//!
//! Both the SNR allocation (paper eq. 7) and the diffusion process read these tables, so they live
//! in one place and are computed exactly as the reference does: `linspace` for `linear`, the
//! `alpha_bar` ratio with `max_beta = 0.999` for `cosine`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The largest beta the cosine schedule allows (IDDPM `betas_for_alpha_bar(max_beta=0.999)`).
pub const MAX_BETA: f64 = 0.999;

/// Which beta schedule a diffusion process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSchedule {
    /// DDPM's linear betas, scaled by 1000/T so any T behaves like T=1000.
    #[default]
    Linear,
    /// IDDPM's cosine `alpha_bar(t) = cos((t/T + 0.008)/1.008 * pi/2)^2`.
    Cosine,
}

impl NoiseSchedule {
    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            NoiseSchedule::Linear => "linear",
            NoiseSchedule::Cosine => "cosine",
        }
    }
}

/// The per-timestep tables of a schedule with `steps` timesteps.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleTable {
    /// Which schedule produced the table.
    pub schedule: NoiseSchedule,
    /// `beta_t`, t = 0..T-1.
    pub betas: Vec<f64>,
    /// `alpha_bar_t = prod_{s<=t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
    /// Whether `beta_t` was clipped to [`MAX_BETA`] (only the cosine schedule clips, at its end).
    pub clipped: Vec<bool>,
}

impl ScheduleTable {
    /// Computes the tables for `steps` timesteps. `steps` must be at least 1.
    pub fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        assert!(steps >= 1, "a noise schedule needs at least one timestep");
        let (betas, clipped) = match schedule {
            NoiseSchedule::Linear => {
                let scale = 1000.0 / steps as f64;
                let (start, end) = (scale * 0.0001, scale * 0.02);
                let betas = linspace(start, end, steps);
                (betas, vec![false; steps])
            }
            NoiseSchedule::Cosine => {
                let alpha_bar = |t: f64| {
                    let x = (t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2;
                    x.cos().powi(2)
                };
                let mut betas = Vec::with_capacity(steps);
                let mut clipped = Vec::with_capacity(steps);
                for i in 0..steps {
                    let t1 = i as f64 / steps as f64;
                    let t2 = (i + 1) as f64 / steps as f64;
                    let beta = 1.0 - alpha_bar(t2) / alpha_bar(t1);
                    clipped.push(beta > MAX_BETA);
                    betas.push(beta.min(MAX_BETA));
                }
                (betas, clipped)
            }
        };
        let mut alphas_cumprod = Vec::with_capacity(steps);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        ScheduleTable { schedule, betas, alphas_cumprod, clipped }
    }

    /// Number of timesteps T.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio in decibels, paper eq. 7: `10 log10(alpha_bar / (1 - alpha_bar))`.
    pub fn snr_db(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|&a| 10.0 * (a / (1.0 - a)).log10()).collect()
    }
}

/// numpy's `linspace(start, end, n)` for float64 (endpoint included, last value exact).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = end;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_iddpm_endpoints() {
        let t = ScheduleTable::new(NoiseSchedule::Linear, 1000);
        assert_eq!(t.betas[0], 0.0001);
        assert_eq!(t.betas[999], 0.02);
        assert!((t.betas[1] - (0.0001 + (0.02 - 0.0001) / 999.0)).abs() < 1e-18);
        // T=4000 scales betas by 1000/T.
        let t = ScheduleTable::new(NoiseSchedule::Linear, 4000);
        assert!((t.betas[0] - 0.000025).abs() < 1e-18);
        assert!((t.betas[3999] - 0.005).abs() < 1e-18);
        assert!(t.clipped.iter().all(|c| !c));
    }

    #[test]
    fn cosine_snr_matches_reference_values() {
        // REFERENCE.md: T=4000 cosine, SNR from +50.06 dB (t=0) to -68.19 dB (t=3998) and
        // -98.19 dB at t=3999, where beta is clipped to 0.999.
        let t = ScheduleTable::new(NoiseSchedule::Cosine, 4000);
        let snr = t.snr_db();
        assert!((snr[0] - 50.06).abs() < 0.005, "{}", snr[0]);
        assert!((snr[3998] - -68.19).abs() < 0.005, "{}", snr[3998]);
        assert!((snr[3999] - -98.19).abs() < 0.005, "{}", snr[3999]);
        assert_eq!(t.betas[3999], MAX_BETA);
        assert!(t.clipped[3999]);
        assert_eq!(t.clipped.iter().filter(|c| **c).count(), 1);
        // First beta by hand: 1 - abar(1/T)/abar(0).
        let ab = |x: f64| ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
        assert!((t.betas[0] - (1.0 - ab(1.0 / 4000.0) / ab(0.0))).abs() < 1e-18);
    }

    #[test]
    fn alphas_cumprod_is_the_running_product() {
        let t = ScheduleTable::new(NoiseSchedule::Linear, 10);
        let mut acc = 1.0;
        for i in 0..10 {
            acc *= 1.0 - t.betas[i];
            assert_eq!(t.alphas_cumprod[i], acc);
        }
    }
}
