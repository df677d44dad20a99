//! The result of an allocation: per-timestep SNR and FLOPs ratio, and the timestep groups with
//! their FLOPs bounds. Written as `allocation.json`, read back by the stages downstream
//! (pruning takes a group's bound, fine-tuning and sampling its timesteps).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::AllocateError;
use super::params::{ClippedSteps, FlopsSchedule};
use crate::schedule::NoiseSchedule;

/// One timestep group (paper eq. 10): the timesteps one model serves and its FLOPs limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The group's index i; bounds never decrease with it.
    pub index: usize,
    /// The FLOPs limit below this group's, as a fraction of the base model's FLOPs F: eq. 10's
    /// v(i) = FLOPs_g(i-1), and `k` for group 0 (no timestep gets less); for the `constant`
    /// schedule, its one level.
    pub lower_bound: f64,
    /// The group's FLOPs limit w(i) = FLOPs_g(i) (eq. 9) as a fraction of F: the pruning target.
    pub flops_bound: f64,
    /// The group's smallest timestep.
    pub t_min: usize,
    /// The group's largest timestep.
    pub t_max: usize,
    /// The smallest SNR (dB, eq. 7) among the group's timesteps.
    pub snr_db_min: f64,
    /// The largest SNR (dB, eq. 7) among the group's timesteps.
    pub snr_db_max: f64,
    /// The group's timesteps, sorted, never empty.
    pub timesteps: Vec<usize>,
}

/// The noise schedule whose SNR eq. 7 took, when it is not the diffusion's own
/// (`snr_schedule`, `snr_steps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnrSource {
    /// Its noise schedule.
    pub schedule: NoiseSchedule,
    /// Its number of timesteps S; diffusion timestep t read its timestep `round(t (S-1)/(T-1))`.
    pub steps: usize,
}

/// What `snr-allocate` computes: the FLOPs limit of every timestep and the N groups that share a
/// model. Serialised with this field order; per-timestep vectors are indexed by t.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Number of diffusion timesteps T.
    pub steps: usize,
    /// The diffusion's noise schedule (`linear`, `cosine`).
    pub noise_schedule: NoiseSchedule,
    /// The FLOPs schedule that produced the ratios.
    pub flops_schedule: FlopsSchedule,
    /// The smallest FLOPs ratio k.
    pub k: f64,
    /// How clipped timesteps were treated (only the `snr` and `constant` schedules look at it).
    pub clipped: ClippedSteps,
    /// The timesteps whose SNR comes from a clipped beta (the cosine schedule's last).
    pub clipped_timesteps: Vec<usize>,
    /// The schedule eq. 7's SNR was taken from when it is not `noise_schedule` with `steps`
    /// timesteps (the `snr_schedule`/`snr_steps` parameters); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_source: Option<SnrSource>,
    /// The mean over timesteps of their group's FLOPs bound, as a fraction of F: the average
    /// FLOPs of a progressive model pruned exactly to its bounds (compare schedules by it).
    pub mean_flops_bound: f64,
    /// The groups, by index.
    pub groups: Vec<Group>,
    /// SNR of every timestep in dB (eq. 7), from the `snr_source` schedule when there is one.
    pub snr_db: Vec<f64>,
    /// The normalised level in [0, 1] that places each timestep in a group (group i holds the
    /// levels in (i/N, (i+1)/N], group 0 also level 0): eq. 8's `Ratio` for `snr`, t/(T-1) for
    /// `increasing` and `constant`, 1 - t/(T-1) for `decreasing`.
    pub level: Vec<f64>,
    /// Every timestep's FLOPs limit as a fraction of F (eq. 8): `k + (1-k) * level`, or the one
    /// constant level for `constant`.
    pub flops_ratio: Vec<f64>,
}

impl Allocation {
    /// The group that serves timestep `t`.
    ///
    /// # Panics
    /// When `t >= steps` (the groups cover exactly `0..steps`).
    pub fn group_of(&self, t: usize) -> usize {
        self.groups
            .iter()
            .position(|g| g.timesteps.binary_search(&t).is_ok())
            .unwrap_or_else(|| panic!("timestep {t} is outside 0..{}", self.steps))
    }

    /// The FLOPs bound (fraction of F) of the group that serves timestep `t`, for every t.
    pub fn bound_per_timestep(&self) -> Vec<f64> {
        let mut bounds = vec![f64::NAN; self.steps];
        for g in &self.groups {
            for &t in &g.timesteps {
                bounds[t] = g.flops_bound;
            }
        }
        bounds
    }

    /// Writes the allocation as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), AllocateError> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|source| AllocateError::Json { path: path.to_path_buf(), source })?;
        text.push('\n');
        std::fs::write(path, text)
            .map_err(|source| AllocateError::Io { path: path.to_path_buf(), source })
    }

    /// Reads an allocation written by [`Allocation::write_json`] and checks that it is
    /// consistent (see [`Allocation::check`]).
    pub fn read_json(path: &Path) -> Result<Self, AllocateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AllocateError::Io { path: path.to_path_buf(), source })?;
        let alloc: Allocation = serde_json::from_str(&text)
            .map_err(|source| AllocateError::Json { path: path.to_path_buf(), source })?;
        alloc
            .check()
            .map_err(|message| AllocateError::Inconsistent { path: path.to_path_buf(), message })?;
        Ok(alloc)
    }

    /// Checks the invariants downstream stages rely on: per-timestep vectors of length T, groups
    /// indexed 0..N whose sorted, non-empty timestep lists partition 0..T, bounds in (0, 1] that
    /// never decrease, and `t_min`/`t_max` that match the lists.
    pub fn check(&self) -> Result<(), String> {
        let t = self.steps;
        for (name, len) in [
            ("snr_db", self.snr_db.len()),
            ("level", self.level.len()),
            ("flops_ratio", self.flops_ratio.len()),
        ] {
            if len != t {
                return Err(format!("`{name}` has {len} values for {t} steps"));
            }
        }
        if self.groups.is_empty() {
            return Err("no groups".into());
        }
        let mut seen = vec![false; t];
        let mut prev_bound = 0.0;
        for (i, g) in self.groups.iter().enumerate() {
            if g.index != i {
                return Err(format!("group at position {i} has index {}", g.index));
            }
            if !(g.flops_bound > 0.0 && g.flops_bound <= 1.0) || g.flops_bound < prev_bound {
                return Err(format!("group {i} has bound {} after {prev_bound}", g.flops_bound));
            }
            prev_bound = g.flops_bound;
            if g.timesteps.is_empty() || !g.timesteps.is_sorted() {
                return Err(format!("group {i}'s timesteps are empty or unsorted"));
            }
            if g.t_min != g.timesteps[0] || g.t_max != *g.timesteps.last().unwrap() {
                return Err(format!("group {i}'s `t_min`/`t_max` do not match its timesteps"));
            }
            for &s in &g.timesteps {
                if s >= t || std::mem::replace(&mut seen[s], true) {
                    return Err(format!("timestep {s} of group {i} is out of range or repeated"));
                }
            }
        }
        if let Some(s) = seen.iter().position(|s| !s) {
            return Err(format!("timestep {s} is in no group"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::{AllocateParams, allocate};

    fn cosine() -> Allocation {
        allocate(NoiseSchedule::Cosine, 4000, &AllocateParams::default()).unwrap()
    }

    #[test]
    fn json_round_trips_exactly_with_stable_field_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allocation.json");
        let a = cosine();
        a.write_json(&path).unwrap();
        assert_eq!(Allocation::read_json(&path).unwrap(), a);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\n  \"steps\": 4000,\n  \"noise_schedule\": \"cosine\",\n"));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "steps",
                "noise_schedule",
                "flops_schedule",
                "k",
                "clipped",
                "clipped_timesteps",
                "mean_flops_bound",
                "groups",
                "snr_db",
                "level",
                "flops_ratio"
            ]
        );
        let group_keys: Vec<&str> =
            value["groups"][0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            group_keys,
            [
                "index",
                "lower_bound",
                "flops_bound",
                "t_min",
                "t_max",
                "snr_db_min",
                "snr_db_max",
                "timesteps"
            ]
        );
        assert_eq!(value["flops_schedule"], "snr");
        assert_eq!(value["clipped"], "exclude");
    }

    #[test]
    fn group_of_finds_every_timestep() {
        let a = cosine();
        assert_eq!(a.group_of(0), 0);
        assert_eq!(a.group_of(3999), 9);
        assert_eq!(a.group_of(a.groups[4].t_min), 4);
        assert_eq!(a.group_of(a.groups[4].t_min - 1), 3);
        let bounds = a.bound_per_timestep();
        for t in (0..4000).step_by(7) {
            assert_eq!(bounds[t], a.groups[a.group_of(t)].flops_bound);
        }
    }

    #[test]
    #[should_panic(expected = "timestep 4000 is outside 0..4000")]
    fn group_of_panics_out_of_range() {
        cosine().group_of(4000);
    }

    #[test]
    fn read_json_rejects_inconsistent_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allocation.json");
        let mut a = cosine();
        let moved = a.groups[1].timesteps.remove(0);
        a.groups[0].timesteps.push(moved);
        a.groups[0].timesteps.push(moved);
        a.groups[0].t_max = moved;
        a.groups[1].t_min = a.groups[1].timesteps[0];
        a.write_json(&path).unwrap();
        let err = Allocation::read_json(&path).unwrap_err();
        assert!(
            err.to_string().ends_with(&format!(
                "is not a consistent allocation: timestep {moved} of group 0 is out of range or repeated"
            )),
            "{err}"
        );
        std::fs::write(&path, "{}").unwrap();
        let err = Allocation::read_json(&path).unwrap_err();
        assert!(matches!(err, AllocateError::Json { .. }), "{err}");
        let err = Allocation::read_json(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(err, AllocateError::Io { .. }), "{err}");

        let mut a = cosine();
        a.groups.swap(2, 3);
        assert_eq!(a.check().unwrap_err(), "group at position 2 has index 3");
        let mut a = cosine();
        a.level.pop();
        assert_eq!(a.check().unwrap_err(), "`level` has 3999 values for 4000 steps");
        let mut a = cosine();
        a.groups.pop();
        assert_eq!(a.check().unwrap_err(), "timestep 3996 is in no group");
    }
}
