//! What a stage instance is given when it runs, and the validation vocabulary its parameters use.
//!
//! A stage instance runs in isolation: every input is a file in the cache (found by the engine
//! from upstream keys), every output is a file it writes into `out_dir`, and anything it wants to
//! keep across a crash (resume checkpoints) goes into `work_dir`. Nothing is shared through the
//! coordinating process, so a stage can run in a fresh process or on another machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared flag that asks running stages to stop at their next safe point (Ctrl-C).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every holder of this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err` when cancelled, for `?` at a stage's safe points.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }
}

/// The outputs of one upstream stage instance: output name -> file in the cache.
#[derive(Clone, Debug, Default)]
pub struct UpstreamOutputs {
    /// Upstream stage instance id, e.g. `prune[3]`.
    pub id: String,
    /// Upstream stage kind, e.g. `prune`.
    pub kind: String,
    /// The group index of the upstream instance when it was fanned out.
    pub group: Option<usize>,
    /// Output name -> path of the (read-only) cached file.
    pub files: BTreeMap<String, PathBuf>,
}

impl UpstreamOutputs {
    /// The path of output `name`, or an error naming the upstream stage.
    pub fn file(&self, name: &str) -> anyhow::Result<&Path> {
        self.files
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("upstream stage `{}` has no output `{name}`", self.id))
    }
}

/// Everything a stage instance needs to run.
#[derive(Clone, Debug)]
pub struct StageContext {
    /// Stage instance id: `base`, `prune[3]`.
    pub id: String,
    /// Group index for `for_each: group` instances.
    pub group: Option<usize>,
    /// Device the engine assigned: `cpu` or `cuda:N`.
    pub device: String,
    /// The manifest's seed.
    pub seed: u64,
    /// Upstream instances this one needs, in manifest order.
    pub inputs: Vec<UpstreamOutputs>,
    /// Empty directory; every regular file written here becomes an output named by its file name.
    pub out_dir: PathBuf,
    /// Persistent per-key directory for resume state; survives a killed run, removed on success.
    pub work_dir: PathBuf,
    /// Set when the run is interrupted.
    pub cancel: CancelToken,
    /// Whether to draw progress bars.
    pub progress: bool,
}

impl StageContext {
    /// The upstream instances of kind `kind`.
    pub fn inputs_of_kind<'a>(
        &'a self,
        kind: &'a str,
    ) -> impl Iterator<Item = &'a UpstreamOutputs> {
        self.inputs.iter().filter(move |u| u.kind == kind)
    }

    /// The single upstream instance of kind `kind`, or an error.
    pub fn input_of_kind(&self, kind: &str) -> anyhow::Result<&UpstreamOutputs> {
        let mut it = self.inputs.iter().filter(|u| u.kind == kind);
        match (it.next(), it.next()) {
            (Some(u), None) => Ok(u),
            (None, _) => anyhow::bail!("stage `{}` needs an upstream `{kind}` stage", self.id),
            (Some(_), Some(_)) => {
                anyhow::bail!("stage `{}` has more than one upstream `{kind}` stage", self.id)
            }
        }
    }
}

/// A problem with one parameter value, found after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending value relative to the struct that reported it, e.g. `["k"]`.
    pub path: Vec<String>,
    /// What is wrong, in the style `must be in (0, 1], got 1.5`.
    pub message: String,
}

impl FieldError {
    /// An error at the single field `field`.
    pub fn at(field: &str, message: impl Into<String>) -> Self {
        FieldError { path: vec![field.to_string()], message: message.into() }
    }
}
