//! `snr-allocate`'s manifest parameters and their range checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::context::FieldError;
use crate::schedule::NoiseSchedule;

/// How the FLOPs upper limit varies over timesteps: the paper's SNR schedule (eq. 8) or one of
/// the Table 3 ablations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlopsSchedule {
    /// Paper eq. 8: the FLOPs ratio follows the min-max-normalised negative SNR, from `k` at the
    /// highest-SNR timestep to 1 at the lowest.
    #[default]
    Snr,
    /// Table 3 "constant": one FLOPs limit for every timestep, equal to the mean group bound of
    /// the `snr` schedule with the same `k` and `groups` (so both have the same average FLOPs);
    /// the timesteps are cut into `groups` contiguous, (nearly) equal-size groups.
    Constant,
    /// Table 3 "uni-increasing": the FLOPs ratio rises linearly in t from `k` at t = 0 to 1 at
    /// t = T-1.
    Increasing,
    /// Table 3 "uni-decreasing": the FLOPs ratio falls linearly in t from 1 at t = 0 to `k` at
    /// t = T-1.
    Decreasing,
}

impl FlopsSchedule {
    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            FlopsSchedule::Snr => "snr",
            FlopsSchedule::Constant => "constant",
            FlopsSchedule::Increasing => "increasing",
            FlopsSchedule::Decreasing => "decreasing",
        }
    }
}

/// What the `snr` schedule does with timesteps whose beta the noise schedule clipped (the cosine
/// schedule clips its last beta to 0.999, which drops that timestep's SNR far below its
/// neighbour's: -98.19 dB against -68.19 dB for T = 4000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClippedSteps {
    /// Leave clipped timesteps out of eq. 8's normalisation (mean, std, min, max) and give them
    /// the largest ratio, 1 (the full model): they are the hardest timesteps, and the
    /// clipping artefact no longer compresses every other timestep's ratio.
    #[default]
    Exclude,
    /// Normalise over every timestep, clipped ones included: eq. 8 taken literally.
    Include,
}

impl ClippedSteps {
    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            ClippedSteps::Exclude => "exclude",
            ClippedSteps::Include => "include",
        }
    }
}

/// The most timestep groups an allocation may have (the paper uses up to 20; one group per
/// timestep of IDDPM's 4000 is the extreme).
pub const MAX_GROUPS: usize = 4000;

/// The linear schedule's betas reach 1 at 20 steps (its last beta is 20/T): it needs more.
const LINEAR_MIN_STEPS: usize = 20;

/// Parameters of an `snr-allocate` stage (paper eq. 7-10 and the Table 3 schedules).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AllocateParams {
    /// Number of timestep groups N, each served by its own (pruned) model; at most the number of
    /// diffusion steps. The paper uses 10.
    pub groups: usize,
    /// Smallest FLOPs ratio k: the easiest timesteps get k times the base model's FLOPs, the
    /// hardest get all of them; in (0, 1]. 1 keeps the base model in every group (the paper's
    /// Table 2 setting). The paper uses 0.5.
    pub k: f64,
    /// How the FLOPs limit varies over timesteps: `snr` (paper eq. 8), or the Table 3 ablations
    /// `constant`, `increasing`, `decreasing`.
    pub schedule: FlopsSchedule,
    /// How the `snr` schedule treats timesteps whose beta was clipped (the cosine schedule's
    /// last one): `exclude` them from the normalisation and give them ratio 1, or `include` them
    /// as eq. 8 literally does.
    pub clipped: ClippedSteps,
    /// The noise schedule whose SNR eq. 7 takes (`linear` or `cosine`); the diffusion's own
    /// when unset. The paper trains with IDDPM's cosine schedule but draws its SNR (Fig. 3) and
    /// FLOPs curves (Fig. 4) from the linear one; `linear` with `snr_steps: 1000` is that
    /// reading. Only the SNR curve changes: the timesteps grouped are still the diffusion's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_schedule: Option<NoiseSchedule>,
    /// Timesteps of the SNR schedule; the diffusion's `steps` when unset. When it differs from
    /// the diffusion's T, diffusion timestep t takes the SNR of the schedule's timestep at the
    /// same relative position, `round(t (S-1) / (T-1))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_steps: Option<usize>,
}

impl Default for AllocateParams {
    fn default() -> Self {
        AllocateParams {
            groups: 10,
            k: 0.5,
            schedule: FlopsSchedule::Snr,
            clipped: ClippedSteps::Exclude,
            snr_schedule: None,
            snr_steps: None,
        }
    }
}

impl AllocateParams {
    /// Range checks that serde cannot express; `steps` is the diffusion's T and `schedule` its
    /// noise schedule (the defaults of `snr_steps` and `snr_schedule`).
    pub fn validate(&self, steps: usize, schedule: NoiseSchedule) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if self.groups == 0 {
            errs.push(FieldError::at("groups", "must be at least 1, got 0"));
        } else if steps > 0 && self.groups > steps {
            errs.push(FieldError::at(
                "groups",
                format!(
                    "must be at most the number of diffusion steps ({steps}), got {}",
                    self.groups
                ),
            ));
        }
        if !(self.k > 0.0 && self.k <= 1.0) {
            errs.push(FieldError::at("k", format!("must be in (0, 1], got {}", self.k)));
        }
        if self.groups <= steps {
            crate::context::at_most(&mut errs, "groups", self.groups, MAX_GROUPS);
        }
        let snr_steps = self.snr_steps.unwrap_or(0);
        crate::context::at_most(&mut errs, "snr_steps", snr_steps, crate::config::MAX_STEPS);
        if self.snr_steps == Some(0) {
            errs.push(FieldError::at("snr_steps", "must be at least 1, got 0"));
        } else if self.snr_schedule.is_some() || self.snr_steps.is_some() {
            let (snr_schedule, snr_steps) = self.snr_source(schedule, steps);
            if snr_schedule == NoiseSchedule::Linear && snr_steps <= LINEAR_MIN_STEPS {
                errs.push(match self.snr_steps {
                    Some(s) => FieldError::at(
                        "snr_steps",
                        format!(
                            "must be more than {LINEAR_MIN_STEPS} for the linear schedule (its \
                             last beta is 20/T), got {s}"
                        ),
                    ),
                    None => FieldError::at(
                        "snr_schedule",
                        format!(
                            "`linear` needs more than {LINEAR_MIN_STEPS} steps (its last beta is \
                             20/T), and the diffusion has {snr_steps}\nhint: give it its own \
                             `snr_steps`"
                        ),
                    ),
                });
            }
        }
        errs
    }

    /// The schedule and step count whose SNR eq. 7 takes for a diffusion of `steps` timesteps
    /// with noise schedule `schedule`.
    pub fn snr_source(&self, schedule: NoiseSchedule, steps: usize) -> (NoiseSchedule, usize) {
        (self.snr_schedule.unwrap_or(schedule), self.snr_steps.unwrap_or(steps))
    }

    /// These parameters with `snr_schedule` and `snr_steps` unset where they equal the
    /// diffusion's own (`schedule`, `steps`): writing the default out does not change the key.
    pub fn normalised(&self, schedule: NoiseSchedule, steps: usize) -> AllocateParams {
        AllocateParams {
            snr_schedule: self.snr_schedule.filter(|&s| s != schedule),
            snr_steps: self.snr_steps.filter(|&s| s != steps),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let p: AllocateParams = serde_json::from_str("{}").unwrap();
        assert_eq!(p, AllocateParams::default());
        assert_eq!(p.groups, 10);
        assert_eq!(p.k, 0.5);
        assert_eq!(p.schedule, FlopsSchedule::Snr);
        assert_eq!(p.clipped, ClippedSteps::Exclude);
    }

    #[test]
    fn parses_lowercase_names_and_rejects_unknown_fields() {
        let p: AllocateParams = serde_json::from_str(
            r#"{"groups": 4, "k": 0.25, "schedule": "decreasing", "clipped": "include"}"#,
        )
        .unwrap();
        assert_eq!(p.schedule, FlopsSchedule::Decreasing);
        assert_eq!(p.clipped, ClippedSteps::Include);
        for (s, name) in [
            (FlopsSchedule::Snr, "snr"),
            (FlopsSchedule::Constant, "constant"),
            (FlopsSchedule::Increasing, "increasing"),
            (FlopsSchedule::Decreasing, "decreasing"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
            assert_eq!(s.name(), name);
        }
        let err = serde_json::from_str::<AllocateParams>(r#"{"group": 4}"#).unwrap_err();
        assert!(err.to_string().starts_with("unknown field `group`"), "{err}");
        let err = serde_json::from_str::<AllocateParams>(r#"{"schedule": "linear"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `linear`"), "{err}");
    }

    #[test]
    fn validate_messages() {
        let ok = AllocateParams::default();
        assert!(ok.validate(4000, NoiseSchedule::Cosine).is_empty());
        assert!(
            AllocateParams { k: 1.0, groups: 4000, ..ok.clone() }
                .validate(4000, NoiseSchedule::Cosine)
                .is_empty()
        );
        let bad = AllocateParams { k: 1.5, groups: 0, ..ok.clone() };
        assert_eq!(
            bad.validate(4000, NoiseSchedule::Cosine),
            vec![
                FieldError::at("groups", "must be at least 1, got 0"),
                FieldError::at("k", "must be in (0, 1], got 1.5"),
            ]
        );
        let bad = AllocateParams { k: 0.0, groups: 11, ..ok.clone() };
        assert_eq!(
            bad.validate(10, NoiseSchedule::Cosine),
            vec![
                FieldError::at(
                    "groups",
                    "must be at most the number of diffusion steps (10), got 11"
                ),
                FieldError::at("k", "must be in (0, 1], got 0"),
            ]
        );
        let nan = AllocateParams { k: f64::NAN, ..ok };
        assert_eq!(
            nan.validate(10, NoiseSchedule::Cosine),
            vec![FieldError::at("k", "must be in (0, 1], got NaN")]
        );
    }

    #[test]
    fn snr_source_defaults_to_the_diffusion_and_validates_its_steps() {
        let cos = NoiseSchedule::Cosine;
        let p: AllocateParams =
            serde_json::from_str(r#"{"snr_schedule": "linear", "snr_steps": 1000}"#).unwrap();
        assert_eq!(p.snr_source(cos, 4000), (NoiseSchedule::Linear, 1000));
        assert_eq!(AllocateParams::default().snr_source(cos, 4000), (cos, 4000));
        // Unset, they are absent from the JSON (the key of a manifest without them is unchanged).
        let json = serde_json::to_value(AllocateParams::default()).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 4, "{json}");
        // Written out, the diffusion's own values are the same as unset.
        let own = AllocateParams {
            snr_schedule: Some(cos),
            snr_steps: Some(4000),
            ..AllocateParams::default()
        };
        assert_eq!(own.normalised(cos, 4000), AllocateParams::default());
        assert_eq!(p.normalised(cos, 4000), p);
        assert_eq!(p.normalised(NoiseSchedule::Linear, 4000).snr_schedule, None);

        assert!(p.validate(4000, cos).is_empty());
        let zero = AllocateParams { snr_steps: Some(0), ..p.clone() };
        assert_eq!(
            zero.validate(4000, cos),
            vec![FieldError::at("snr_steps", "must be at least 1, got 0")]
        );
        let short = AllocateParams { snr_steps: Some(20), groups: 2, ..p.clone() };
        assert_eq!(
            short.validate(4000, cos),
            vec![FieldError::at(
                "snr_steps",
                "must be more than 20 for the linear schedule (its last beta is 20/T), got 20"
            )]
        );
        // The cosine schedule has a finite SNR at any T.
        let cosine = AllocateParams { snr_schedule: Some(cos), ..short.clone() };
        assert!(cosine.validate(4000, NoiseSchedule::Linear).is_empty());
        let inherited = AllocateParams { snr_steps: None, groups: 2, ..p };
        assert_eq!(
            inherited.validate(20, cos),
            vec![FieldError::at(
                "snr_schedule",
                "`linear` needs more than 20 steps (its last beta is 20/T), and the diffusion \
                 has 20\nhint: give it its own `snr_steps`"
            )]
        );
    }

    #[test]
    fn schema_documents_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(AllocateParams)).unwrap();
        let props = schema["properties"].as_object().unwrap();
        for field in ["groups", "k", "schedule", "clipped", "snr_schedule", "snr_steps"] {
            let desc = props[field]["description"].as_str().unwrap_or_default();
            assert!(!desc.is_empty(), "`{field}` has no description in {schema:#}");
        }
        assert_eq!(props["groups"]["default"], 10);
        assert_eq!(props["k"]["default"], 0.5);
        assert_eq!(props["schedule"]["default"], "snr");
    }
}
