//! Profiles: cluster defaults kept out of manifests (which describe experiments, not machines).
//!
//! `progdiff run` reads `--profile FILE`, else `progdiff.profile.yaml` next to the manifest, else
//! `$XDG_CONFIG_HOME/progdiff/profile.yaml` (`~/.config/progdiff/profile.yaml`); none is fine.
//!
//! ```yaml
//! backend: slurm                 # what `run` uses without --backend (default: local)
//! slurm:
//!   partition: gpu
//!   account: mylab
//!   qos: normal
//!   gpu_request: gres            # gres (--gres=gpu[:type]:N, default) or gpus (--gpus=[type:]N)
//!   extra: ["--exclusive"]       # for every job
//!   log_dir: /scratch/me/logs    # Slurm's own output files (default: in the cache)
//! resources:                     # per stage kind, and `default` for every stage
//!   default: { cpus: 4, mem: 16G, time: "12:00:00" }
//!   train: { gpus: 1, time: "2-00:00:00" }
//!   evaluate: { gpus: 1 }
//! ```
//!
//! A stage's resources are the profile's `default`, overlaid by its kind's, overlaid by the
//! manifest's `resources:` of the stage. Mistakes are reported as `file:line:col`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::yaml::{self, NodeKind};
use crate::manifest::{Cx, Diagnostic, ManifestError};
use crate::resources::Resources;

/// How jobs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Worker processes on this machine.
    #[default]
    Local,
    /// One Slurm job (or array task) per instance.
    Slurm,
}

/// How GPUs are asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GpuRequest {
    /// `--gres=gpu[:type]:N`.
    #[default]
    Gres,
    /// `--gpus=[type:]N`.
    Gpus,
}

/// The `slurm:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmProfile {
    /// Default partition (`--partition`); a stage's `resources.partition` wins.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `gres` or `gpus`.
    pub gpu_request: GpuRequest,
    /// Further `sbatch` arguments for every job.
    pub extra: Vec<String>,
    /// Directory of Slurm's own output files (default: `<cache>/v1/slurm/out`).
    pub log_dir: Option<PathBuf>,
    /// Shortest wait between two polls of the queue, in seconds.
    pub poll_min_s: f64,
    /// Longest wait between two polls (the wait doubles while nothing changes).
    pub poll_max_s: f64,
    /// How long a job may be absent from the queue without its exit marker before it counts as
    /// lost, in seconds.
    pub lost_grace_s: f64,
    /// How many times a lost job is submitted again.
    pub max_resubmits: u32,
    /// How many times a training job requeues itself after checkpointing on the time-limit or
    /// preemption signal (then it fails, as submitit caps timeouts).
    pub max_requeues: u32,
    /// Seconds before its time limit a training job gets `SIGUSR2` to checkpoint.
    pub signal_grace_s: u32,
}

impl Default for SlurmProfile {
    fn default() -> Self {
        SlurmProfile {
            partition: None,
            account: None,
            qos: None,
            gpu_request: GpuRequest::Gres,
            extra: Vec::new(),
            log_dir: None,
            poll_min_s: 2.0,
            poll_max_s: 60.0,
            lost_grace_s: 120.0,
            max_resubmits: 2,
            max_requeues: 3,
            signal_grace_s: 120,
        }
    }
}

/// A profile file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// The backend `run` uses when `--backend` is not given.
    pub backend: Backend,
    /// Slurm settings.
    pub slurm: SlurmProfile,
    /// Resources per stage kind (`train`, `prune`, ...) and `default` for every stage.
    pub resources: BTreeMap<String, Resources>,
    /// The remote cache (`--remote` wins): s3://bucket/prefix, gs://…, az://…, http(s)://…
    pub remote: Option<String>,
    /// Where it was read from (none: defaults).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// The profile file name looked for next to a manifest.
pub const PROFILE_FILE: &str = "progdiff.profile.yaml";

impl Profile {
    /// Finds and reads the profile for `manifest`: `explicit`, else next to the manifest, else
    /// in the user's config directory; defaults when there is none.
    pub fn find(explicit: Option<&Path>, manifest: &Path) -> Result<Profile, ManifestError> {
        if let Some(p) = explicit {
            return Profile::load(p);
        }
        let beside = manifest.parent().unwrap_or(Path::new(".")).join(PROFILE_FILE);
        if beside.is_file() {
            return Profile::load(&beside);
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        if let Some(user) = config.map(|c| c.join("progdiff/profile.yaml"))
            && user.is_file()
        {
            return Profile::load(&user);
        }
        Ok(Profile::default())
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Profile, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        let mut p =
            Profile::parse(&text, &path.display().to_string()).map_err(ManifestError::Invalid)?;
        p.file = Some(path.to_path_buf());
        Ok(p)
    }

    /// Parses profile text; every mistake with its position.
    pub fn parse(text: &str, file: &str) -> Result<Profile, Vec<Diagnostic>> {
        let mut cx = Cx::new(file);
        let root = match yaml::parse(text) {
            Ok(root) => root,
            Err(errs) => {
                for e in errs {
                    cx.push(e.pos, &e.path, e.message);
                }
                return Err(cx.finish());
            }
        };
        if matches!(root.kind, NodeKind::Null) {
            return Ok(Profile::default());
        }
        let profile: Option<Profile> = cx.deserialize(&root, "", &[]);
        let Some(profile) = profile else { return Err(cx.finish()) };
        if let Some(node) = root.get("resources") {
            for (name, r) in &profile.resources {
                let errs = r.validate();
                if !errs.is_empty()
                    && let Some(n) = node.get(name)
                {
                    cx.field_errors(n, &format!("resources.{name}"), errs);
                }
            }
        }
        if let Some(node) = root.get("slurm") {
            let s = &profile.slurm;
            let mut errs = Vec::new();
            if !(s.poll_min_s > 0.0 && s.poll_min_s <= s.poll_max_s) {
                errs.push(progdiff_kinds::context::FieldError::at(
                    "poll_min_s",
                    format!(
                        "must be positive and at most `poll_max_s` ({}), got {}",
                        s.poll_max_s, s.poll_min_s
                    ),
                ));
            }
            if !errs.is_empty() {
                cx.field_errors(node, "slurm", errs);
            }
        }
        let diags = cx.finish();
        if diags.is_empty() { Ok(profile) } else { Err(diags) }
    }

    /// The resources of a stage of `kind` whose manifest entry says `stage`.
    pub fn resources_for(&self, kind: &str, stage: &Resources) -> Resources {
        let mut r = self.resources.get("default").cloned().unwrap_or_default();
        if let Some(k) = self.resources.get(kind) {
            r = r.overlay(k);
        }
        if r.partition.is_none() {
            r.partition = self.slurm.partition.clone();
        }
        r.overlay(stage)
    }
}
