//! What a stage instance asks a cluster for: GPUs, CPUs, memory, time, partition. Set per stage
//! in the manifest (`resources:`), per kind or for every stage in a profile; not part of any
//! cache key (where a result was computed does not change it).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use progdiff_kinds::context::FieldError;

/// A stage's cluster resources. Unset fields fall back to the profile's per-kind and default
/// values, then to the cluster's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs per instance (`--gpus` or `--gres=gpu:N`, as the profile says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// GPU type, e.g. `a100` (`--gres=gpu:a100:N` / `--gpus=a100:N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// CPUs per instance (`--cpus-per-task`); also the worker's thread count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory per instance, Slurm's `--mem`: a number with an optional unit `K`, `M`, `G` or
    /// `T` (megabytes when none), e.g. `16G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Time limit, Slurm's `--time`: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` or
    /// `D-HH:MM:SS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Node features (`--constraint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
    /// Further `sbatch` arguments, e.g. `["--exclusive"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<String>,
}

impl Resources {
    /// Range and format checks.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if let Some(m) = &self.mem
            && parse_mem_mb(m).is_none()
        {
            e.push(FieldError::at(
                "mem",
                format!("`{m}` is not a memory size: a number with an optional unit K, M, G or T"),
            ));
        }
        if let Some(t) = &self.time
            && parse_time_s(t).is_none()
        {
            e.push(FieldError::at(
                "time",
                format!(
                    "`{t}` is not a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
                ),
            ));
        }
        if self.cpus == Some(0) {
            e.push(FieldError::at("cpus", "must be at least 1, got 0"));
        }
        if self.gpu_type.is_some() && self.gpus.is_none_or(|g| g == 0) {
            e.push(FieldError::at("gpu_type", "needs `gpus` of at least 1"));
        }
        for (i, a) in self.extra.iter().enumerate() {
            if !a.starts_with('-') {
                e.push(FieldError {
                    path: vec!["extra".into(), i.to_string()],
                    message: format!("`{a}` is not an sbatch option (they start with `-`)"),
                });
            }
        }
        e
    }

    /// `self` with every field `over` sets replaced by `over`'s (`extra` appended).
    pub fn overlay(&self, over: &Resources) -> Resources {
        Resources {
            gpus: over.gpus.or(self.gpus),
            gpu_type: over.gpu_type.clone().or_else(|| self.gpu_type.clone()),
            cpus: over.cpus.or(self.cpus),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            constraint: over.constraint.clone().or_else(|| self.constraint.clone()),
            extra: self.extra.iter().chain(&over.extra).cloned().collect(),
        }
    }

    /// The time limit in seconds, when one is set.
    pub fn time_s(&self) -> Option<u64> {
        self.time.as_deref().and_then(parse_time_s)
    }
}

/// Slurm's `--mem` value in megabytes: digits with an optional `K`/`M`/`G`/`T` (any case).
pub fn parse_mem_mb(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let factor = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" => 1.0,
        "K" | "KB" => 1.0 / 1024.0,
        "G" | "GB" => 1024.0,
        "T" | "TB" => 1024.0 * 1024.0,
        _ => return None,
    };
    (n > 0).then(|| ((n as f64) * factor).ceil() as u64)
}

/// Slurm's `--time` formats in seconds.
pub fn parse_time_s(s: &str) -> Option<u64> {
    let s = s.trim();
    let num = |x: &str| -> Option<u64> {
        (!x.is_empty() && x.chars().all(|c| c.is_ascii_digit())).then(|| x.parse().ok()).flatten()
    };
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(num(d)?), r),
        None => (None, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let secs = match (days, parts.as_slice()) {
        (None, [m]) => num(m)? * 60,
        (None, [m, sec]) => num(m)? * 60 + num(sec)?,
        (None, [h, m, sec]) => num(h)? * 3600 + num(m)? * 60 + num(sec)?,
        (Some(d), [h]) => d * 86400 + num(h)? * 3600,
        (Some(d), [h, m]) => d * 86400 + num(h)? * 3600 + num(m)? * 60,
        (Some(d), [h, m, sec]) => d * 86400 + num(h)? * 3600 + num(m)? * 60 + num(sec)?,
        _ => return None,
    };
    (secs > 0).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_times_parse() {
        assert_eq!(parse_time_s("30"), Some(1800));
        assert_eq!(parse_time_s("1:30"), Some(90));
        assert_eq!(parse_time_s("12:00:00"), Some(43200));
        assert_eq!(parse_time_s("2-12"), Some(2 * 86400 + 12 * 3600));
        assert_eq!(parse_time_s("1-00:30"), Some(86400 + 1800));
        assert_eq!(parse_time_s("1-00:00:05"), Some(86405));
        for bad in ["", "1h", "1:2:3:4", "-1", "a-1", "0", "1-2-3"] {
            assert_eq!(parse_time_s(bad), None, "{bad}");
        }
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_mem_mb("500"), Some(500));
        assert_eq!(parse_mem_mb("16G"), Some(16384));
        assert_eq!(parse_mem_mb("2048K"), Some(2));
        assert_eq!(parse_mem_mb("1t"), Some(1024 * 1024));
        for bad in ["", "G", "16X", "1.5G", "0"] {
            assert_eq!(parse_mem_mb(bad), None, "{bad}");
        }
    }

    #[test]
    fn overlay_and_validation() {
        let base = Resources { cpus: Some(2), mem: Some("4G".into()), ..Default::default() };
        let over = Resources { gpus: Some(1), mem: Some("8G".into()), ..Default::default() };
        let r = base.overlay(&over);
        assert_eq!((r.cpus, r.gpus, r.mem.as_deref()), (Some(2), Some(1), Some("8G")));
        let bad = Resources {
            mem: Some("lots".into()),
            time: Some("1h".into()),
            cpus: Some(0),
            gpu_type: Some("a100".into()),
            extra: vec!["exclusive".into()],
            ..Default::default()
        };
        let paths: Vec<String> = bad.validate().into_iter().map(|e| e.path.join(".")).collect();
        assert_eq!(paths, ["mem", "time", "cpus", "gpu_type", "extra.0"]);
    }
}
