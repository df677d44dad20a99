//! `snr-allocate`'s manifest parameters and their range checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::context::FieldError;

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

/// The most timestep groups an allocation may have (the paper uses up to 20).
pub const MAX_GROUPS: usize = 1000;

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
}

impl Default for AllocateParams {
    fn default() -> Self {
        AllocateParams {
            groups: 10,
            k: 0.5,
            schedule: FlopsSchedule::Snr,
            clipped: ClippedSteps::Exclude,
        }
    }
}

impl AllocateParams {
    /// Range checks that serde cannot express; `steps` is the diffusion's T.
    pub fn validate(&self, steps: usize) -> Vec<FieldError> {
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
        crate::context::at_most(&mut errs, "groups", self.groups, MAX_GROUPS);
        errs
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
        assert!(ok.validate(4000).is_empty());
        assert!(AllocateParams { k: 1.0, groups: 4000, ..ok.clone() }.validate(4000).is_empty());
        let bad = AllocateParams { k: 1.5, groups: 0, ..ok.clone() };
        assert_eq!(
            bad.validate(4000),
            vec![
                FieldError::at("groups", "must be at least 1, got 0"),
                FieldError::at("k", "must be in (0, 1], got 1.5"),
            ]
        );
        let bad = AllocateParams { k: 0.0, groups: 11, ..ok.clone() };
        assert_eq!(
            bad.validate(10),
            vec![
                FieldError::at(
                    "groups",
                    "must be at most the number of diffusion steps (10), got 11"
                ),
                FieldError::at("k", "must be in (0, 1], got 0"),
            ]
        );
        let nan = AllocateParams { k: f64::NAN, ..ok };
        assert_eq!(nan.validate(10), vec![FieldError::at("k", "must be in (0, 1], got NaN")]);
    }

    #[test]
    fn schema_documents_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(AllocateParams)).unwrap();
        let props = schema["properties"].as_object().unwrap();
        for field in ["groups", "k", "schedule", "clipped"] {
            let desc = props[field]["description"].as_str().unwrap_or_default();
            assert!(!desc.is_empty(), "`{field}` has no description in {schema:#}");
        }
        assert_eq!(props["groups"]["default"], 10);
        assert_eq!(props["k"]["default"], 0.5);
        assert_eq!(props["schedule"]["default"], "snr");
    }
}
