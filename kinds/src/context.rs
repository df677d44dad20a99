//! What a stage instance is given when it runs, and the validation vocabulary its parameters use.
//!
//! A stage instance runs in isolation: every input is a file in the cache (found by the engine
//! from upstream keys), every output is a file it writes into `out_dir`, and anything it wants to
//! keep across a crash (resume checkpoints) goes into `work_dir`. Nothing is shared through the
//! coordinating process, so a stage can run in a fresh process or on another machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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

/// Everything a stage instance is given besides its inputs (which its kind's `run` receives
/// separately: see [`crate::kind`]). Nothing here is part of the key but what the key holds
/// anyway: the instance id is the stage's name (the prefix of its parameters in the key) and its
/// group.
#[derive(Clone, Debug)]
pub struct StageContext {
    /// Stage instance id: `base`, `prune[3]`.
    pub id: String,
    /// Group index for `for_each: group` instances.
    pub group: Option<usize>,
    /// Device to run on: `cpu` or `cuda:N`.
    pub device: String,
    /// Upstream instances this one needs, in manifest order.
    pub inputs: Vec<UpstreamOutputs>,
    /// Empty directory; every regular file written here becomes an output named by its file name.
    pub out_dir: PathBuf,
    /// Persistent per-key directory for resume state; survives a killed run, removed on success.
    pub work_dir: PathBuf,
    /// Set when the run is interrupted.
    pub cancel: CancelToken,
    /// Where progress and metrics go.
    pub report: Reporter,
}

impl StageContext {
    /// A context on the CPU with no upstream, no group and no reporting (tests, tools).
    pub fn new(id: &str, out_dir: PathBuf, work_dir: PathBuf) -> StageContext {
        StageContext {
            id: id.to_string(),
            group: None,
            device: "cpu".into(),
            inputs: Vec::new(),
            out_dir,
            work_dir,
            cancel: CancelToken::new(),
            report: Reporter::none(),
        }
    }

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

/// Pushes an error when `value` exceeds `max`: the sanity bounds that keep validation and
/// planning from sizing anything from an absurd number (`steps: 1000000000`).
pub fn at_most(errs: &mut Vec<FieldError>, field: &str, value: usize, max: usize) {
    if value > max {
        errs.push(FieldError::at(field, format!("must be at most {max}, got {value}")));
    }
}

/// What a worker tells its coordinator, one JSON object per line on its stdout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The stage's position in its work: `pos` of `len` `unit`s, with a short message.
    Progress {
        /// Done so far.
        pos: u64,
        /// Total.
        len: u64,
        /// What is counted (`steps`, `images`, `rounds`).
        unit: String,
        /// A short status, e.g. the last loss.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// Values the stage logged (a training step's losses).
    Metrics {
        /// The values.
        values: serde_json::Value,
    },
    /// A warning or error worth showing beside the progress bars.
    Message {
        /// `warn` or `error`.
        level: String,
        /// The text.
        text: String,
    },
    /// The job's end: `hit` (found in the cache), `ran`, or `failed` with an error.
    Done {
        /// `hit`, `ran` or `failed`.
        status: String,
        /// Output name -> object path, for `hit` and `ran`.
        #[serde(default)]
        outputs: BTreeMap<String, PathBuf>,
        /// Seconds the stage itself ran.
        #[serde(default)]
        seconds: f64,
        /// The error, for `failed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Where events go.
pub trait EventSink: Send + Sync {
    /// Delivers one event.
    fn emit(&self, event: &Event);
}

/// A stage's handle for reporting progress and metrics. Progress is rate-limited here (at most
/// one event per 100 ms, plus the last one), so stages may report every step.
#[derive(Clone, Default)]
pub struct Reporter {
    sink: Option<Arc<dyn EventSink>>,
    last: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.sink.is_some() { "Reporter(on)" } else { "Reporter(off)" })
    }
}

impl Reporter {
    /// Reports nothing.
    pub fn none() -> Reporter {
        Reporter::default()
    }

    /// Reports to `sink`.
    pub fn to(sink: Arc<dyn EventSink>) -> Reporter {
        Reporter { sink: Some(sink), last: Arc::default() }
    }

    /// Whether events go anywhere.
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// `pos` of `len` `unit`s done.
    pub fn progress(&self, pos: u64, len: u64, unit: &str, message: impl FnOnce() -> String) {
        let Some(sink) = &self.sink else { return };
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if !due && pos < len {
                return;
            }
            *last = Some(Instant::now());
        }
        sink.emit(&Event::Progress { pos, len, unit: unit.to_string(), message: message() });
    }

    /// Logged values.
    pub fn metrics(&self, values: &impl Serialize) {
        if let Some(sink) = &self.sink
            && let Ok(values) = serde_json::to_value(values)
        {
            sink.emit(&Event::Metrics { values });
        }
    }

    /// Any event, unthrottled.
    pub fn emit(&self, event: &Event) {
        if let Some(sink) = &self.sink {
            sink.emit(event);
        }
    }
}
