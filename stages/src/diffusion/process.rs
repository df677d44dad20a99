//! The Gaussian diffusion process of IDDPM (`gaussian_diffusion.py` + `SpacedDiffusion`): its
//! float64 tables, the forward process, the model's reverse distribution and the training losses.

use std::f64::consts::LN_2;

use tch::{Device, Kind, Tensor};

use super::DiffusionError;
use super::likelihood::{discretized_gaussian_log_likelihood, mean_flat, normal_kl};
use super::respacing::Respacing;
use crate::config::{DiffusionConfig, LossKind};
use crate::schedule::ScheduleTable;

/// How the reverse process's variance is chosen (IDDPM `ModelVarType`). The mean is always
/// predicted as epsilon (IDDPM `ModelMeanType.EPSILON`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceKind {
    /// `LEARNED_RANGE`: the model outputs 2C channels, the second half `v` interpolates the log
    /// variance between `posterior_log_variance_clipped` (v = -1) and `log beta_t` (v = 1).
    LearnedRange,
    /// `FIXED_LARGE`: `beta_t`, with t = 0 using the posterior variance of t = 1.
    FixedLarge,
    /// `FIXED_SMALL`: the posterior variance `beta~_t` (log clipped at t = 0).
    FixedSmall,
}

impl VarianceKind {
    /// IDDPM's choice from its flags: learned when `learn_sigma`, else fixed-large (IDDPM's
    /// default `sigma_small = False`).
    pub fn from_learn_sigma(learn_sigma: bool) -> Self {
        if learn_sigma { VarianceKind::LearnedRange } else { VarianceKind::FixedLarge }
    }

    /// Whether the model outputs the variance channels (2C outputs instead of C).
    pub fn is_learned(self) -> bool {
        self == VarianceKind::LearnedRange
    }
}

/// The per-timestep float64 tables of a process, indexed by the process's own timestep
/// (a respaced process's index, not the original timestep). Names follow IDDPM.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessTables {
    /// `beta_t`.
    pub betas: Vec<f64>,
    /// `log beta_t` (the learned range's upper end).
    pub log_betas: Vec<f64>,
    /// `alpha_bar_t = prod_{s<=t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
    /// `alpha_bar_{t-1}`, 1 at t = 0.
    pub alphas_cumprod_prev: Vec<f64>,
    /// `alpha_bar_{t+1}`, 0 at t = T-1.
    pub alphas_cumprod_next: Vec<f64>,
    /// `sqrt(alpha_bar_t)`.
    pub sqrt_alphas_cumprod: Vec<f64>,
    /// `sqrt(1 - alpha_bar_t)`.
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// `log(1 - alpha_bar_t)`.
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    /// `sqrt(1 / alpha_bar_t)`.
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// `sqrt(1 / alpha_bar_t - 1)`.
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// `beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`; 0 at t = 0.
    pub posterior_variance: Vec<f64>,
    /// `log beta~_t` with the t = 0 entry replaced by t = 1's (the log of 0 is not finite).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
    /// Fixed-large variance: `beta~_1` at t = 0, then `beta_t`.
    pub fixed_large_variance: Vec<f64>,
    /// Its log.
    pub fixed_large_log_variance: Vec<f64>,
}

impl ProcessTables {
    /// Computes every table from the betas exactly as IDDPM's `GaussianDiffusion.__init__`.
    pub fn new(betas: &[f64]) -> Result<Self, DiffusionError> {
        if betas.len() < 2 {
            return Err(DiffusionError::TooFewSteps(betas.len()));
        }
        if let Some((index, b)) = betas.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b <= 1.0))
        {
            return Err(DiffusionError::BadBeta { index, value: b.to_string() });
        }
        let n = betas.len();
        let map = |v: &[f64], f: &dyn Fn(f64) -> f64| v.iter().map(|&x| f(x)).collect::<Vec<_>>();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for &b in betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_cumprod[..n - 1].iter().copied()).collect();
        let alphas_cumprod_next: Vec<f64> =
            alphas_cumprod[1..].iter().copied().chain(std::iter::once(0.0)).collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t]))
            .collect();
        let mut clipped = posterior_variance.clone();
        clipped[0] = posterior_variance[1];
        let mut fixed_large_variance = betas.to_vec();
        fixed_large_variance[0] = posterior_variance[1];
        Ok(ProcessTables {
            betas: betas.to_vec(),
            log_betas: map(betas, &f64::ln),
            sqrt_alphas_cumprod: map(&alphas_cumprod, &f64::sqrt),
            sqrt_one_minus_alphas_cumprod: map(&alphas_cumprod, &|a| (1.0 - a).sqrt()),
            log_one_minus_alphas_cumprod: map(&alphas_cumprod, &|a| (1.0 - a).ln()),
            sqrt_recip_alphas_cumprod: map(&alphas_cumprod, &|a| (1.0 / a).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&alphas_cumprod, &|a| (1.0 / a - 1.0).sqrt()),
            posterior_log_variance_clipped: map(&clipped, &f64::ln),
            posterior_mean_coef1: (0..n)
                .map(|t| betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t]))
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|t| {
                    (1.0 - alphas_cumprod_prev[t]) * (1.0 - betas[t]).sqrt()
                        / (1.0 - alphas_cumprod[t])
                })
                .collect(),
            fixed_large_log_variance: map(&fixed_large_variance, &f64::ln),
            fixed_large_variance,
            posterior_variance,
            alphas_cumprod,
            alphas_cumprod_prev,
            alphas_cumprod_next,
        })
    }

    /// Whether `table` is one of these tables (the same vector, not equal values).
    fn owns(&self, table: &[f64]) -> bool {
        [
            &self.betas,
            &self.log_betas,
            &self.alphas_cumprod,
            &self.alphas_cumprod_prev,
            &self.alphas_cumprod_next,
            &self.sqrt_alphas_cumprod,
            &self.sqrt_one_minus_alphas_cumprod,
            &self.log_one_minus_alphas_cumprod,
            &self.sqrt_recip_alphas_cumprod,
            &self.sqrt_recipm1_alphas_cumprod,
            &self.posterior_variance,
            &self.posterior_log_variance_clipped,
            &self.posterior_mean_coef1,
            &self.posterior_mean_coef2,
            &self.fixed_large_variance,
            &self.fixed_large_log_variance,
        ]
        .iter()
        .any(|v| std::ptr::eq(v.as_ptr(), table.as_ptr()) && v.len() == table.len())
    }

    /// Number of timesteps of the process.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a process has at least two timesteps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }
}

/// The process's reverse distribution `p(x_{t-1} | x_t)` and its x_0 prediction.
#[derive(Debug)]
pub struct MeanVariance {
    /// Mean, `[B, C, H, W]`.
    pub mean: Tensor,
    /// Variance, `[B, C, H, W]`.
    pub variance: Tensor,
    /// Log variance, `[B, C, H, W]`.
    pub log_variance: Tensor,
    /// The x_0 prediction (clamped to [-1, 1] when asked), `[B, C, H, W]`.
    pub pred_xstart: Tensor,
}

/// The diffusion posterior `q(x_{t-1} | x_t, x_0)`.
#[derive(Debug)]
pub struct Posterior {
    /// Mean, `[B, C, H, W]`.
    pub mean: Tensor,
    /// Variance, `[B, C, H, W]`.
    pub variance: Tensor,
    /// Log variance (t = 0 clipped to t = 1's), `[B, C, H, W]`.
    pub log_variance_clipped: Tensor,
}

/// One VLB term per sample.
#[derive(Debug)]
pub struct VbTerms {
    /// In bits: the decoder NLL where t = 0, else `KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`,
    /// each averaged over the non-batch dimensions. `[B]`.
    pub output: Tensor,
    /// The x_0 prediction. `[B, C, H, W]`.
    pub pred_xstart: Tensor,
}

/// Per-sample training losses, each `[B]`, so a trainer can average them or bucket them by
/// timestep (IDDPM logs per-quartile losses).
#[derive(Debug)]
pub struct Losses {
    /// The loss to minimise, by [`LossKind`]: `mse` for simple; `mse + vb` for hybrid (just
    /// `mse` when the variance is fixed, as in IDDPM); `vb` for kl.
    pub loss: Tensor,
    /// `mean_flat((eps - eps_pred)^2)`. Under kl it is computed without gradient, for logging.
    pub mse: Tensor,
    /// The VLB term in bits as IDDPM logs it: for hybrid, computed on the detached mean and
    /// multiplied by `T / 1000`; for kl, equal to `loss`; for simple, the unscaled term computed
    /// without gradient, for logging.
    pub vb: Tensor,
}

/// An IDDPM Gaussian diffusion process, possibly respaced: its timestep `i` is the original
/// process's timestep `timestep_map()[i]`.
///
/// The tables stay float64; a tensor operation gathers the entries it needs at the timesteps
/// `t` (an int64 `[B]` tensor of this process's indices) and casts them to the input's dtype, as
/// IDDPM's `_extract_into_tensor` does (it casts to float32).
///
/// The tables are uploaded to a device once, per dtype, the first time a step there needs them
/// (not copied on every call: on a GPU each copy would stall the stream).
#[derive(Debug)]
pub struct GaussianDiffusion {
    tables: ProcessTables,
    variance: VarianceKind,
    loss: LossKind,
    rescale_timesteps: bool,
    timestep_map: Vec<usize>,
    original_num_timesteps: usize,
    uploaded: Uploaded,
}

/// Tables already on a device: `(table address, device, kind) -> tensor`. Keys are addresses
/// of `self.tables`' vectors, which never change while the process lives; a clone starts
/// empty (its tables live elsewhere).
#[derive(Debug, Default)]
struct Uploaded(std::sync::Mutex<Vec<(UploadKey, Tensor)>>);

/// `(table address, device, kind)`.
type UploadKey = (usize, Device, Kind);

impl Clone for GaussianDiffusion {
    fn clone(&self) -> Self {
        GaussianDiffusion {
            tables: self.tables.clone(),
            variance: self.variance,
            loss: self.loss,
            rescale_timesteps: self.rescale_timesteps,
            timestep_map: self.timestep_map.clone(),
            original_num_timesteps: self.original_num_timesteps,
            uploaded: Uploaded::default(),
        }
    }
}

impl GaussianDiffusion {
    /// A process over `betas` itself (IDDPM `GaussianDiffusion`): the identity timestep map.
    pub fn new(
        betas: &[f64],
        variance: VarianceKind,
        loss: LossKind,
        rescale_timesteps: bool,
    ) -> Result<Self, DiffusionError> {
        Ok(GaussianDiffusion {
            tables: ProcessTables::new(betas)?,
            variance,
            loss,
            rescale_timesteps,
            timestep_map: (0..betas.len()).collect(),
            original_num_timesteps: betas.len(),
            uploaded: Uploaded::default(),
        })
    }

    /// The process that keeps only `use_timesteps` of the process over `base_betas` (IDDPM
    /// `SpacedDiffusion`): `beta'_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}}` over the kept
    /// steps `k_0 < k_1 < ...` (with `alpha_bar_{k_{-1}} = 1`).
    pub fn spaced(
        base_betas: &[f64],
        use_timesteps: &[usize],
        variance: VarianceKind,
        loss: LossKind,
        rescale_timesteps: bool,
    ) -> Result<Self, DiffusionError> {
        let base = ProcessTables::new(base_betas)?;
        let mut keep = vec![false; base.len()];
        for &t in use_timesteps {
            if t >= base.len() {
                return Err(DiffusionError::TimestepOutOfRange { t, steps: base.len() });
            }
            keep[t] = true;
        }
        let mut last = 1.0;
        let mut betas = Vec::new();
        let mut timestep_map = Vec::new();
        for (i, &ac) in base.alphas_cumprod.iter().enumerate() {
            if keep[i] {
                betas.push(1.0 - ac / last);
                last = ac;
                timestep_map.push(i);
            }
        }
        Ok(GaussianDiffusion {
            tables: ProcessTables::new(&betas)?,
            variance,
            loss,
            rescale_timesteps,
            timestep_map,
            original_num_timesteps: base.len(),
            uploaded: Uploaded::default(),
        })
    }

    /// The training process of a manifest's `diffusion:` section: all `steps` timesteps,
    /// built like IDDPM's `create_gaussian_diffusion` (a `SpacedDiffusion` keeping every step,
    /// so its betas are recomputed from `alpha_bar` exactly as the reference's are).
    pub fn from_config(cfg: &DiffusionConfig, learn_sigma: bool) -> Result<Self, DiffusionError> {
        Self::from_config_respaced(cfg, learn_sigma, &Respacing::All)
    }

    /// The sampling process of a manifest's `diffusion:` section: respaced by `sample_steps`.
    pub fn for_sampling(cfg: &DiffusionConfig, learn_sigma: bool) -> Result<Self, DiffusionError> {
        Self::from_config_respaced(cfg, learn_sigma, &Respacing::parse(&cfg.sample_steps)?)
    }

    /// The process of `cfg` respaced by `respacing`.
    pub fn from_config_respaced(
        cfg: &DiffusionConfig,
        learn_sigma: bool,
        respacing: &Respacing,
    ) -> Result<Self, DiffusionError> {
        let schedule = ScheduleTable::new(cfg.schedule, cfg.steps);
        let keep = respacing.timesteps(cfg.steps)?;
        Self::spaced(
            &schedule.betas,
            &keep,
            VarianceKind::from_learn_sigma(learn_sigma),
            cfg.loss,
            cfg.rescale_timesteps,
        )
    }

    /// The float64 tables, indexed by this process's timesteps.
    pub fn tables(&self) -> &ProcessTables {
        &self.tables
    }

    /// Number of timesteps of this (possibly respaced) process.
    pub fn num_timesteps(&self) -> usize {
        self.tables.len()
    }

    /// Number of timesteps of the original process.
    pub fn original_num_timesteps(&self) -> usize {
        self.original_num_timesteps
    }

    /// This process's timestep `i` is the original process's `timestep_map()[i]`; ascending.
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    /// How the variance is chosen.
    pub fn variance(&self) -> VarianceKind {
        self.variance
    }

    /// The training loss.
    pub fn loss(&self) -> LossKind {
        self.loss
    }

    /// Whether the model sees `t * 1000 / T` rather than `t`.
    pub fn rescale_timesteps(&self) -> bool {
        self.rescale_timesteps
    }

    /// The timesteps the model is called with for this process's timesteps `t`: the original
    /// timestep, times `1000 / T_original` when rescaling. Always float32 (IDDPM passes int64
    /// when not rescaling; the UNet's embedding converts to float either way).
    ///
    /// # Shapes
    /// `t: [B]` int64 -> `[B]` float32.
    pub fn model_timesteps(&self, t: &Tensor) -> Tensor {
        let map =
            self.on_device(self.timestep_map.as_ptr() as usize, t.device(), Kind::Int64, || {
                let map: Vec<i64> = self.timestep_map.iter().map(|&i| i as i64).collect();
                Tensor::from_slice(&map)
            });
        let original = map.index_select(0, t).to_kind(Kind::Float);
        if self.rescale_timesteps {
            original * (1000.0 / self.original_num_timesteps as f64)
        } else {
            original
        }
    }

    /// `key`'s tensor on `device` as `kind`, made by `make` (on the CPU) and uploaded the first
    /// time.
    fn on_device(
        &self,
        key: usize,
        device: Device,
        kind: Kind,
        make: impl FnOnce() -> Tensor,
    ) -> Tensor {
        let mut cache = self.uploaded.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == (key, device, kind)) {
            return t.shallow_clone();
        }
        let t = crate::transfer::upload(&make().to_kind(kind), device);
        cache.push(((key, device, kind), t.shallow_clone()));
        t
    }

    /// [`extract`] for `table`, one of this process's own tables (uploaded once per device and
    /// dtype; the values are the same: the cast to `like`'s dtype commutes with the gather).
    pub(crate) fn extract(&self, table: &[f64], t: &Tensor, like: &Tensor) -> Tensor {
        if !self.tables.owns(table) {
            return extract(table, t, like);
        }
        let mut shape = vec![1i64; like.dim()];
        shape[0] = t.size()[0];
        self.on_device(table.as_ptr() as usize, t.device(), like.kind(), || {
            Tensor::from_slice(table)
        })
        .index_select(0, t)
        .view(shape.as_slice())
    }

    /// `q(x_t | x_0)`: mean, variance and log variance.
    pub fn q_mean_variance(&self, x_start: &Tensor, t: &Tensor) -> (Tensor, Tensor, Tensor) {
        let tb = &self.tables;
        let mean = self.extract(&tb.sqrt_alphas_cumprod, t, x_start) * x_start;
        let one_minus: Vec<f64> = tb.alphas_cumprod.iter().map(|a| 1.0 - a).collect();
        let shape = x_start.size();
        let variance = self.extract(&one_minus, t, x_start).expand(&shape, false);
        let log_variance =
            self.extract(&tb.log_one_minus_alphas_cumprod, t, x_start).expand(&shape, false);
        (mean, variance, log_variance)
    }

    /// Samples `x_t ~ q(x_t | x_0)` with the given standard normal `noise`.
    ///
    /// # Shapes
    /// `x_start, noise: [B, C, H, W]`, `t: [B]` -> `[B, C, H, W]`.
    pub fn q_sample(&self, x_start: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        assert_eq!(x_start.size(), noise.size(), "noise must have x_start's shape");
        self.extract(&self.tables.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(&self.tables.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    }

    /// The diffusion posterior `q(x_{t-1} | x_t, x_0)`.
    pub fn q_posterior_mean_variance(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Posterior {
        assert_eq!(x_start.size(), x_t.size(), "x_start and x_t must have the same shape");
        let tb = &self.tables;
        let shape = x_t.size();
        Posterior {
            mean: self.extract(&tb.posterior_mean_coef1, t, x_t) * x_start
                + self.extract(&tb.posterior_mean_coef2, t, x_t) * x_t,
            variance: self.extract(&tb.posterior_variance, t, x_t).expand(&shape, false),
            log_variance_clipped: self
                .extract(&tb.posterior_log_variance_clipped, t, x_t)
                .expand(&shape, false),
        }
    }

    /// `x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps`.
    pub fn predict_xstart_from_eps(&self, x_t: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
        assert_eq!(x_t.size(), eps.size(), "eps must have x_t's shape");
        self.extract(&self.tables.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(&self.tables.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    }

    /// The epsilon that maps `x_t` to `pred_xstart`.
    pub fn predict_eps_from_xstart(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        pred_xstart: &Tensor,
    ) -> Tensor {
        (self.extract(&self.tables.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
            / self.extract(&self.tables.sqrt_recipm1_alphas_cumprod, t, x_t)
    }

    /// Splits a model output into (eps, variance values): `[B, 2C, ...]` when the variance is
    /// learned, `[B, C, ...]` otherwise.
    pub fn split_model_output(&self, model_out: &Tensor, x: &Tensor) -> (Tensor, Option<Tensor>) {
        let (b, c) = (x.size()[0], x.size()[1]);
        let mut want = x.size();
        if self.variance.is_learned() {
            want[1] = 2 * c;
            assert_eq!(
                model_out.size(),
                want,
                "a learned-variance model must output 2C channels (eps, v) for x of shape {:?}",
                x.size()
            );
            let parts = model_out.split(c, 1);
            let [eps, v]: [Tensor; 2] = parts.try_into().expect("two halves");
            (eps, Some(v))
        } else {
            assert_eq!(
                model_out.size(),
                want,
                "a fixed-variance model must output C channels for x of shape {:?} (batch {b})",
                x.size()
            );
            (model_out.shallow_clone(), None)
        }
    }

    /// The model's reverse distribution `p(x_{t-1} | x_t)` from its output at `(x_t, t)`.
    ///
    /// # Shapes
    /// `model_out: [B, 2C or C, H, W]`, `x: [B, C, H, W]`, `t: [B]`; every result `[B, C, H, W]`.
    pub fn p_mean_variance(
        &self,
        model_out: &Tensor,
        x: &Tensor,
        t: &Tensor,
        clip_denoised: bool,
    ) -> MeanVariance {
        let tb = &self.tables;
        let shape = x.size();
        let (eps, var_values) = self.split_model_output(model_out, x);
        let (variance, log_variance) = match (self.variance, var_values) {
            (VarianceKind::LearnedRange, Some(v)) => {
                let min_log = self.extract(&tb.posterior_log_variance_clipped, t, x);
                let max_log = self.extract(&tb.log_betas, t, x);
                // v in [-1, 1] spans [min_var, max_var].
                let frac = (v + 1.0) / 2.0;
                let log_variance = &frac * max_log + (1.0f64 - &frac) * min_log;
                (log_variance.exp(), log_variance)
            }
            (VarianceKind::FixedLarge, _) => (
                self.extract(&tb.fixed_large_variance, t, x).expand(&shape, false),
                self.extract(&tb.fixed_large_log_variance, t, x).expand(&shape, false),
            ),
            (VarianceKind::FixedSmall, _) => (
                self.extract(&tb.posterior_variance, t, x).expand(&shape, false),
                self.extract(&tb.posterior_log_variance_clipped, t, x).expand(&shape, false),
            ),
            (VarianceKind::LearnedRange, None) => unreachable!("split_model_output checks this"),
        };
        let pred_xstart = self.predict_xstart_from_eps(x, t, &eps);
        let pred_xstart = if clip_denoised { pred_xstart.clamp(-1.0, 1.0) } else { pred_xstart };
        let mean = self.q_posterior_mean_variance(&pred_xstart, x, t).mean;
        MeanVariance { mean, variance, log_variance, pred_xstart }
    }

    /// One term of the variational bound in bits (IDDPM `_vb_terms_bpd`), from the model's
    /// output at `(x_t, t)`.
    pub fn vb_terms_bpd(
        &self,
        model_out: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip_denoised: bool,
    ) -> VbTerms {
        let posterior = self.q_posterior_mean_variance(x_start, x_t, t);
        let out = self.p_mean_variance(model_out, x_t, t, clip_denoised);
        let kl = normal_kl(
            &posterior.mean,
            &posterior.log_variance_clipped,
            &out.mean,
            &out.log_variance,
        );
        let kl = mean_flat(&kl) / LN_2;
        let decoder_nll =
            -discretized_gaussian_log_likelihood(x_start, &out.mean, &(0.5 * &out.log_variance));
        let decoder_nll = mean_flat(&decoder_nll) / LN_2;
        let output = decoder_nll.where_self(&t.eq(0), &kl);
        VbTerms { output, pred_xstart: out.pred_xstart }
    }

    /// The training losses at timesteps `t` (this process's indices) for the given noise.
    ///
    /// `model(x_t, t_model)` is called once, with [`GaussianDiffusion::model_timesteps`].
    ///
    /// # Shapes
    /// `x_start, noise: [B, C, H, W]`, `t: [B]` int64; the model returns `[B, 2C or C, H, W]`.
    pub fn training_losses(
        &self,
        model: impl FnOnce(&Tensor, &Tensor) -> Tensor,
        x_start: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Losses {
        let x_t = self.q_sample(x_start, t, noise);
        let model_out = model(&x_t, &self.model_timesteps(t));
        let (eps, var_values) = self.split_model_output(&model_out, x_start);
        let mse = || mean_flat(&(noise - &eps).square());
        // The VLB term with a stop-gradient on the mean: only the variance learns from it.
        let frozen = || match &var_values {
            Some(v) => Tensor::cat(&[eps.detach(), v.shallow_clone()], 1),
            None => eps.detach(),
        };
        match self.loss {
            LossKind::Simple => {
                let mse = mse();
                let vb =
                    tch::no_grad(|| self.vb_terms_bpd(&frozen(), x_start, &x_t, t, false).output);
                Losses { loss: mse.shallow_clone(), mse, vb }
            }
            LossKind::Hybrid => {
                let mse = mse();
                if var_values.is_some() {
                    let vb = self.vb_terms_bpd(&frozen(), x_start, &x_t, t, false).output
                        * (self.num_timesteps() as f64 / 1000.0);
                    Losses { loss: &mse + &vb, mse, vb }
                } else {
                    let vb = tch::no_grad(|| {
                        self.vb_terms_bpd(&frozen(), x_start, &x_t, t, false).output
                            * (self.num_timesteps() as f64 / 1000.0)
                    });
                    Losses { loss: mse.shallow_clone(), mse, vb }
                }
            }
            LossKind::Kl => {
                let vb = self.vb_terms_bpd(&model_out, x_start, &x_t, t, false).output;
                let mse = tch::no_grad(mse);
                Losses { loss: vb.shallow_clone(), mse, vb }
            }
        }
    }

    /// The prior term `KL(q(x_T | x_0) || N(0, I))` in bits, per sample (IDDPM `_prior_bpd`).
    pub fn prior_bpd(&self, x_start: &Tensor) -> Tensor {
        let b = x_start.size()[0];
        let t = Tensor::full([b], self.num_timesteps() as i64 - 1, (Kind::Int64, x_start.device()));
        let (mean, _, log_variance) = self.q_mean_variance(x_start, &t);
        let zeros = mean.zeros_like();
        mean_flat(&normal_kl(&mean, &log_variance, &zeros, &zeros)) / LN_2
    }
}

/// `table[t]` as a `[B, 1, ..., 1]` tensor of `like`'s dtype and device, broadcastable against
/// `like` (IDDPM `_extract_into_tensor`).
pub(crate) fn extract(table: &[f64], t: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![1i64; like.dim()];
    shape[0] = t.size()[0];
    Tensor::from_slice(table)
        .to_device(t.device())
        .index_select(0, t)
        .to_kind(like.kind())
        .view(shape.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::NoiseSchedule;
    use tch::Device;

    fn cosine(steps: usize) -> Vec<f64> {
        ScheduleTable::new(NoiseSchedule::Cosine, steps).betas
    }

    #[test]
    fn tables_are_consistent() {
        let d = GaussianDiffusion::new(
            &cosine(100),
            VarianceKind::LearnedRange,
            LossKind::Hybrid,
            true,
        )
        .unwrap();
        let tb = d.tables();
        assert_eq!(tb.posterior_variance[0], 0.0);
        assert_eq!(tb.posterior_log_variance_clipped[0], tb.posterior_log_variance_clipped[1]);
        assert_eq!(tb.alphas_cumprod_prev[0], 1.0);
        assert_eq!(tb.alphas_cumprod_next[99], 0.0);
        for t in 1..100 {
            assert_eq!(tb.alphas_cumprod_prev[t], tb.alphas_cumprod[t - 1]);
            assert!(tb.posterior_variance[t] <= tb.betas[t] * (1.0 + 1e-12));
        }
    }

    #[test]
    fn spacing_every_step_keeps_the_process() {
        let betas = cosine(50);
        let all: Vec<usize> = (0..50).collect();
        let plain =
            GaussianDiffusion::new(&betas, VarianceKind::FixedLarge, LossKind::Simple, true)
                .unwrap();
        let spaced = GaussianDiffusion::spaced(
            &betas,
            &all,
            VarianceKind::FixedLarge,
            LossKind::Simple,
            true,
        )
        .unwrap();
        for (a, b) in plain.tables().alphas_cumprod.iter().zip(&spaced.tables().alphas_cumprod) {
            assert!((a - b).abs() <= 1e-14 * a.abs().max(1e-300), "{a} vs {b}");
        }
        assert_eq!(spaced.timestep_map(), all.as_slice());
    }

    #[test]
    fn rejects_degenerate_betas() {
        let err = |b: &[f64]| {
            GaussianDiffusion::new(b, VarianceKind::FixedLarge, LossKind::Simple, false)
                .unwrap_err()
        };
        assert_eq!(err(&[0.1]), DiffusionError::TooFewSteps(1));
        assert!(matches!(err(&[0.1, 0.0]), DiffusionError::BadBeta { index: 1, .. }));
        assert!(matches!(err(&[0.1, 1.5]), DiffusionError::BadBeta { index: 1, .. }));
    }

    #[test]
    fn model_timesteps_map_and_rescale() {
        let betas = cosine(4000);
        let keep = [0usize, 40, 3999];
        let d = GaussianDiffusion::spaced(
            &betas,
            &keep,
            VarianceKind::FixedLarge,
            LossKind::Simple,
            true,
        )
        .unwrap();
        let t = Tensor::from_slice(&[0i64, 1, 2]);
        let mt = d.model_timesteps(&t);
        assert_eq!(mt.kind(), Kind::Float);
        assert_eq!(Vec::<f32>::try_from(&mt).unwrap(), vec![0.0, 10.0, 999.75]);
        let d = GaussianDiffusion::spaced(
            &betas,
            &keep,
            VarianceKind::FixedLarge,
            LossKind::Simple,
            false,
        )
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(&d.model_timesteps(&t)).unwrap(), vec![0.0, 40.0, 3999.0]);
    }

    #[test]
    fn extract_casts_to_the_input_dtype_and_broadcasts() {
        let x = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let e = extract(&[0.5, 0.25, 0.125], &Tensor::from_slice(&[2i64, 0]), &x);
        assert_eq!(e.size(), vec![2, 1, 1, 1]);
        assert_eq!(e.kind(), Kind::Float);
        assert_eq!(Vec::<f32>::try_from(&e.flatten(0, -1)).unwrap(), vec![0.125, 0.5]);
    }

    #[test]
    fn hybrid_mse_gradient_ignores_the_vb_term_on_the_mean() {
        // d(loss)/d(eps) must equal d(mse)/d(eps): the vb term sees a detached mean.
        let d = GaussianDiffusion::new(
            &cosine(100),
            VarianceKind::LearnedRange,
            LossKind::Hybrid,
            true,
        )
        .unwrap();
        let opts = (Kind::Double, Device::Cpu);
        let x0 = Tensor::linspace(-1.0, 1.0, 8, opts).view([2, 1, 2, 2]);
        let noise = Tensor::arange(8, opts).view([2, 1, 2, 2]).sin();
        let out = Tensor::arange(16, opts).view([2, 2, 2, 2]).cos().set_requires_grad(true);
        let t = Tensor::from_slice(&[0i64, 50]);
        let losses = d.training_losses(|_, _| out.shallow_clone(), &x0, &t, &noise);
        losses.loss.sum(Kind::Double).backward();
        let grad = out.grad();
        let eps = out.narrow(1, 0, 1).detach();
        let want = (&eps - &noise) * 2.0 / 4.0;
        let got = grad.narrow(1, 0, 1);
        assert!(got.allclose(&want, 1e-12, 1e-12, false));
        assert!(grad.narrow(1, 1, 1).abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}
