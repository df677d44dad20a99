//! The `snr-allocate` stage: how much of the base model each timestep gets, and which timesteps
//! share a model (paper section 4.1-4.2, eq. 7-10, and the Table 3 ablation schedules).
//!
//! # What it computes
//!
//! 1. **SNR** (eq. 7): `10 log10(alpha_bar_t / (1 - alpha_bar_t))` from the diffusion's noise
//!    schedule ([`crate::schedule::ScheduleTable::snr_db`]), or from the one `snr_schedule` and
//!    `snr_steps` name (below). It falls with t: later timesteps are noisier and harder.
//! 2. **FLOPs ratio** (eq. 8): the z-score of -SNR, min-max normalised to a `level` in [0, 1],
//!    mapped to `k + (1-k) * level`. The z-score is affine, so the level is simply the min-max
//!    of -SNR; it is still computed as printed.
//! 3. **Group bounds** (eq. 9) and **timestep groups** (eq. 10): N equal intervals over
//!    `[kF, F]`; group i holds the timesteps whose ratio lies in `(FLOPs_g(i-1), FLOPs_g(i)]`.
//!
//! # Decisions where the paper is ambiguous
//!
//! **Eq. 9 reading.** As printed, `FLOPs_g(i) = (i/N + (N-i)/N * k) F` for `0 <= i < N` gives
//! group 0 the bound kF (an interval holding only the single easiest timestep) and no group the
//! top interval `(FLOPs_g(N-1), F]`, so eq. 10 would leave the hardest timesteps unassigned,
//! contradicting "equal intervals over [kF, F]". We read it with i+1:
//! `FLOPs_g(i) = k + (1-k)(i+1)/N`, so the bounds are `k + (1-k)/N, ..., F` and the last group
//! keeps the base model. Group 0's interval is closed at k (eq. 10's `v(0) = 0`; no ratio is
//! below k), and its reported `lower_bound` is k.
//!
//! Groups are assigned by the level rather than by the FLOPs ratio: group i holds the levels in
//! `(i/N, (i+1)/N]` (level 0 in group 0). For k < 1 this is exactly eq. 10, since the ratio is an
//! increasing affine map of the level; for k = 1 every bound is F (the paper's Table 2 setting:
//! groups without pruning) and the timesteps are still split by difficulty instead of all
//! landing in group 0. A level within 1e-9 group widths of a boundary counts as on it.
//!
//! **The clipped cosine endpoint.** IDDPM's cosine schedule clips the last beta to 0.999; for
//! T = 4000 that puts t = 3999 at -98.19 dB against -68.19 dB at t = 3998, and a min-max over all
//! timesteps then squeezes every other ratio into the lower ~80% of `[k, 1]` (for k = 0.5 and
//! N = 10, group 8 gets no timestep). By default ([`ClippedSteps::Exclude`]) clipped timesteps
//! are left out of the normalisation and given ratio 1, the full model, which they would get
//! anyway as the lowest-SNR steps; `clipped: include` applies eq. 8 literally. Schedules without
//! clipping (linear) are unaffected.
//!
//! **Which schedule's SNR.** Eq. 7 is written for "the" noise schedule, and the paper trains with
//! IDDPM's T = 4000 cosine schedule, but its SNR and FLOPs figures (Fig. 3 and 4) are drawn
//! from the linear schedule with 1000 steps. By default the SNR is the diffusion's own; the
//! `snr_schedule` (`linear` | `cosine`) and `snr_steps` parameters take it from another schedule
//! instead. The timesteps grouped are always the diffusion's T: timestep t reads the SNR of the
//! other schedule's timestep at the same relative position, `round(t (S-1) / (T-1))` for S
//! steps (so t = 0 and t = T-1 meet the schedule's ends), and is clipped when that timestep is.
//! The readings differ a lot in what they allocate: for k = 0.5 and N = 10 on cosine T = 4000,
//! the mean group bound over timesteps is 0.738 F with the cosine SNR, 0.846 F with the linear
//! SNR at T = 4000 and 0.833 F with the linear SNR at 1000 steps — the last one reproduces the
//! FLOPs of the paper's Tables 1, 3 and 6 (`studies/paper-bookkeeping/`), and
//! `manifests/paper/` uses it. Values equal to the diffusion's own are dropped from the key, so
//! writing the default out changes nothing.
//!
//! **Ablation schedules** (Table 3: "a consistent FLOPs upper limit across all timesteps; a
//! uniformly increasing ...; a uniformly decreasing ..."). `increasing` uses the level t/(T-1)
//! (ratio from k at t = 0 to 1 at t = T-1), `decreasing` the level 1 - t/(T-1); both are grouped
//! by eq. 9-10 like `snr`, giving N contiguous groups of (nearly) equal size, with group 0 at the
//! end of the timesteps where the ratio is k. `constant` gives every timestep and every group
//! one bound, the timestep-mean of the `snr` schedule's group bounds for the same T, k, N and
//! `clipped`, so both schedules have the same average FLOPs, as the paper's comparison intends;
//! its groups are the same contiguous chunks as `increasing`'s. Every allocation records its
//! average as `mean_flops_bound` (cosine T = 4000, k = 0.5, N = 10: `snr` 0.738,
//! `increasing`/`decreasing` 0.775).
//!
//! **Empty groups.** With many groups, or a schedule whose ratios bunch up, an interval can hold
//! no timestep. That is an error ([`AllocateError::EmptyGroup`]) naming the group and the largest
//! group count that leaves none empty, rather than a silently smaller N.
//!
//! # Outputs
//!
//! [`ALLOCATION_JSON`] ([`Allocation`], read back with [`Allocation::read_json`]) and
//! [`ALLOCATION_PNG`] (SNR and FLOPs ratio over timesteps with the group boundaries and bounds,
//! the paper's Fig. 3 and 4).

mod allocation;
mod compute;
mod params;
mod plot;

use std::path::PathBuf;

pub use allocation::{Allocation, Group, SnrSource};
pub use compute::allocate;
pub use params::{AllocateParams, ClippedSteps, FlopsSchedule};
pub use plot::plot_png;

use serde::{Deserialize, Serialize};

use crate::config::DiffusionConfig;
use crate::context::{FieldError, StageContext};
use crate::kind::{Sections, StageKind};
use crate::schedule::NoiseSchedule;

/// The stage kind in manifests.
pub const KIND: &str = "snr-allocate";

/// Implementation version: bump whenever the outputs for the same inputs would change.
pub const VERSION: u32 = 1;

/// The output holding the [`Allocation`].
pub const ALLOCATION_JSON: &str = "allocation.json";

/// The output holding the plot of SNR, FLOPs ratios and groups.
pub const ALLOCATION_PNG: &str = "allocation.png";

/// What can go wrong computing, reading or writing an allocation.
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// The parameters failed [`AllocateParams::validate`].
    #[error("invalid `snr-allocate` parameters: {}", describe(.0))]
    InvalidParams(Vec<FieldError>),
    /// The diffusion has no timesteps.
    #[error("the diffusion has no timesteps (`steps` is 0)")]
    NoSteps,
    /// The noise schedule gives a timestep an infinite or undefined SNR.
    #[error(
        "the {} schedule with {steps} steps has no finite SNR at t = {t} (alpha_bar = {alpha_bar}){}",
        schedule.name(),
        if *schedule == NoiseSchedule::Linear {
            "\nhint: the linear schedule's last beta is 20/T, so it needs more than 20 steps"
        } else {
            ""
        }
    )]
    NonFiniteSnr {
        /// The noise schedule.
        schedule: NoiseSchedule,
        /// Number of timesteps T.
        steps: usize,
        /// The first offending timestep.
        t: usize,
        /// Its `alpha_bar`.
        alpha_bar: f64,
    },
    /// A group got no timesteps.
    #[error(
        "group {index} of {groups} gets no timesteps: no timestep's normalised FLOPs ratio falls in \
         ({level_lower}, {level_upper}]\nhint: use fewer groups; at most `groups: {max_groups}` \
         leaves none empty with this schedule"
    )]
    EmptyGroup {
        /// The empty group's index.
        index: usize,
        /// The requested group count N.
        groups: usize,
        /// The lower end (exclusive) of the group's level interval, index/N.
        level_lower: f64,
        /// The upper end of the group's level interval, (index+1)/N.
        level_upper: f64,
        /// The largest group count below N with no empty group.
        max_groups: usize,
    },
    /// Reading or writing a file failed.
    #[error("cannot access `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not an allocation's JSON.
    #[error("`{}` is not an allocation", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A file parses but breaks an allocation's invariants.
    #[error("`{}` is not a consistent allocation: {message}", path.display())]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// The broken invariant.
        message: String,
    },
}

fn describe(errors: &[FieldError]) -> String {
    let parts: Vec<String> =
        errors.iter().map(|e| format!("`{}` {}", e.path.join("."), e.message)).collect();
    parts.join("; ")
}

/// The part of `diffusion:` eq. 7 reads: the schedule whose SNR it takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnrProcess {
    /// `diffusion.steps`.
    pub steps: usize,
    /// `diffusion.schedule`.
    pub schedule: NoiseSchedule,
}

/// What an `snr-allocate` stage reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocateInputs {
    /// Its parameters.
    pub stage: AllocateParams,
    /// The noise schedule.
    pub diffusion: SnrProcess,
}

/// The `snr-allocate` kind.
pub struct SnrAllocate;

impl StageKind for SnrAllocate {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &[
        "seed",
        "data",
        "model",
        "diffusion.loss",
        "diffusion.sample_steps",
        "diffusion.rescale_timesteps",
    ];
    type Params = AllocateParams;
    type Inputs = AllocateInputs;

    fn validate(params: &AllocateParams, diffusion: Option<&DiffusionConfig>) -> Vec<FieldError> {
        let (steps, schedule) = diffusion
            .map(|d| (d.steps, d.schedule))
            .unwrap_or((usize::MAX, NoiseSchedule::default()));
        params.validate(steps, schedule)
    }

    fn inputs(params: &AllocateParams, m: &Sections<'_>) -> AllocateInputs {
        AllocateInputs {
            stage: params.normalised(m.diffusion.schedule, m.diffusion.steps),
            diffusion: SnrProcess { steps: m.diffusion.steps, schedule: m.diffusion.schedule },
        }
    }

    fn groups(params: &AllocateParams) -> Option<usize> {
        Some(params.groups)
    }
}

/// Runs an `snr-allocate` stage instance: computes the allocation and writes
/// [`ALLOCATION_JSON`] and [`ALLOCATION_PNG`] into `ctx.out_dir`.
pub fn run(ctx: &StageContext, inputs: &AllocateInputs) -> anyhow::Result<()> {
    let alloc = allocate(inputs.diffusion.schedule, inputs.diffusion.steps, &inputs.stage)?;
    for g in &alloc.groups {
        tracing::info!(
            stage = %ctx.id,
            group = g.index,
            flops_bound = g.flops_bound,
            t_min = g.t_min,
            t_max = g.t_max,
            timesteps = g.timesteps.len(),
            "group"
        );
    }
    tracing::info!(stage = %ctx.id, mean_flops_bound = alloc.mean_flops_bound, "allocated");
    alloc.write_json(&ctx.out_dir.join(ALLOCATION_JSON))?;
    plot_png(&alloc, &ctx.out_dir.join(ALLOCATION_PNG))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_writes_both_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StageContext::new("allocate", dir.path().join("out"), dir.path().join("work"));
        std::fs::create_dir_all(&ctx.out_dir).unwrap();
        let diffusion = SnrProcess { steps: 4000, schedule: NoiseSchedule::Cosine };
        let inputs = AllocateInputs { stage: AllocateParams::default(), diffusion };
        run(&ctx, &inputs).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&ctx.out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [ALLOCATION_JSON, ALLOCATION_PNG]);
        let a = Allocation::read_json(&ctx.out_dir.join(ALLOCATION_JSON)).unwrap();
        assert_eq!(a, allocate(NoiseSchedule::Cosine, 4000, &AllocateParams::default()).unwrap());

        let bad = AllocateParams { groups: 5000, ..AllocateParams::default() };
        let err = run(&ctx, &AllocateInputs { stage: bad, ..inputs }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `snr-allocate` parameters: `groups` must be at most the number of diffusion \
             steps (4000), got 5000"
        );
    }
}
