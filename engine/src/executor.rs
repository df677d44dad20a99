//! Running a plan: instances in topological order, independent ones concurrently (up to
//! `jobs`), each on a device from a pool; a failure stops its dependents while unrelated stages
//! finish; Ctrl-C stops launching, asks running stages to stop, and leaves the cache consistent
//! (results are published atomically, or not at all).
//!
//! Each instance is self-contained — inputs are read from the cache by key, outputs published to
//! it — so the per-instance function [`execute`] is what a cluster backend would run remotely.
//! Two `progdiff run` processes sharing a cache never compute the same key twice: an instance
//! takes the key's lock, re-checks the record, and only then runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use progdiff_cache::{Cache, RecordMeta, StageRecord};
use progdiff_stages::context::{CancelToken, StageContext, UpstreamOutputs};
use serde::Serialize;

use crate::manifest::Manifest;
use crate::plan::{Plan, PlannedStage};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Maximum instances running at once.
    pub jobs: usize,
    /// Device pool: `cpu` (shared by all jobs) and/or `cuda:N` (one instance at a time each).
    pub devices: Vec<String>,
    /// Draw progress bars.
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { jobs: 1, devices: vec!["cpu".into()], progress: false }
    }
}

/// What happened to one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Found in the cache.
    Hit,
    /// Ran and published.
    Ran,
    /// Ran and failed (nothing published).
    Failed,
    /// Not run: an upstream failed, or the run was interrupted.
    Skipped,
}

/// The summary line of one instance.
#[derive(Clone, Debug, Serialize)]
pub struct StageOutcome {
    /// Instance id.
    pub id: String,
    /// Stage kind.
    pub kind: String,
    /// Cache key.
    pub key: String,
    /// What happened.
    pub status: RunStatus,
    /// Why it ran (from the plan), or why it was skipped / how it failed.
    pub reasons: Vec<String>,
    /// Wall-clock seconds spent (0 for hits and skips).
    pub seconds: f64,
    /// Device it ran on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Output name -> path of the cached file.
    pub outputs: BTreeMap<String, PathBuf>,
    /// The error, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The sweep variants the instance belongs to (empty without a sweep).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
}

/// The result of `run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// Manifest name.
    pub manifest: String,
    /// Per instance, in plan order.
    pub stages: Vec<StageOutcome>,
    /// Counts by status.
    pub counts: BTreeMap<String, usize>,
    /// Whether Ctrl-C stopped the run.
    pub interrupted: bool,
}

impl RunSummary {
    /// Whether every instance is `hit` or `ran`.
    pub fn success(&self) -> bool {
        !self.interrupted
            && self.stages.iter().all(|s| matches!(s.status, RunStatus::Hit | RunStatus::Ran))
    }
    /// Number of instances with this status.
    pub fn count(&self, status: RunStatus) -> usize {
        self.stages.iter().filter(|s| s.status == status).count()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Done,
    Failed,
}

/// Runs `plan` to completion (or interruption) and returns the summary.
pub fn run(
    variants: &[Manifest],
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    cancel: &CancelToken,
) -> RunSummary {
    let n = plan.stages.len();
    let index: BTreeMap<&str, usize> =
        plan.stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let deps: Vec<Vec<usize>> =
        plan.stages.iter().map(|s| s.needs.iter().map(|d| index[d.as_str()]).collect()).collect();
    let mut state = vec![State::Pending; n];
    let mut outcomes: Vec<Option<StageOutcome>> = vec![None; n];
    let jobs = opts.jobs.max(1);
    // Device slots: cpu is shared by every job, each GPU takes one instance at a time.
    let mut free: Vec<(String, usize)> =
        opts.devices.iter().map(|d| (d.clone(), if d == "cpu" { jobs } else { 1 })).collect();
    let mut running = 0usize;
    let (tx, rx) = mpsc::channel::<(usize, String, StageOutcome)>();

    std::thread::scope(|scope| {
        loop {
            // Launch what is ready, in plan order, while there is room.
            if !cancel.is_cancelled() {
                for i in 0..n {
                    if running >= jobs {
                        break;
                    }
                    if state[i] != State::Pending
                        || !deps[i].iter().all(|&d| state[d] == State::Done)
                    {
                        continue;
                    }
                    let Some(slot) = free.iter_mut().find(|(_, c)| *c > 0) else { break };
                    slot.1 -= 1;
                    let device = slot.0.clone();
                    state[i] = State::Running;
                    running += 1;
                    let inputs: Vec<&PlannedStage> =
                        deps[i].iter().map(|&d| &plan.stages[d]).collect();
                    let input_outputs: Vec<BTreeMap<String, PathBuf>> = deps[i]
                        .iter()
                        .map(|&d| {
                            outcomes[d].as_ref().map(|o| o.outputs.clone()).unwrap_or_default()
                        })
                        .collect();
                    let tx = tx.clone();
                    let stage = &plan.stages[i];
                    scope.spawn(move || {
                        let outcome = execute(
                            &variants[stage.source],
                            stage,
                            &inputs,
                            &input_outputs,
                            cache,
                            &device,
                            opts,
                            cancel,
                        );
                        let _ = tx.send((i, device, outcome));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let Ok((i, device, outcome)) = rx.recv() else { break };
            running -= 1;
            if let Some(slot) = free.iter_mut().find(|(d, _)| *d == device) {
                slot.1 += 1;
            }
            state[i] = match outcome.status {
                RunStatus::Hit | RunStatus::Ran => State::Done,
                _ => State::Failed,
            };
            outcomes[i] = Some(outcome);
        }
    });

    let interrupted = cancel.is_cancelled();
    let stages: Vec<StageOutcome> = (0..n)
        .map(|i| {
            outcomes[i].take().unwrap_or_else(|| {
                let s = &plan.stages[i];
                let failed_dep = deps[i]
                    .iter()
                    .find(|&&d| state[d] == State::Failed)
                    .map(|&d| plan.stages[d].id.clone());
                let reason = match failed_dep {
                    Some(d) => format!("upstream `{d}` did not complete"),
                    None if interrupted => "interrupted".to_string(),
                    None => "not reached".to_string(),
                };
                StageOutcome {
                    id: s.id.clone(),
                    kind: s.kind.clone(),
                    key: s.key.to_string(),
                    status: RunStatus::Skipped,
                    reasons: vec![reason],
                    seconds: 0.0,
                    device: None,
                    outputs: BTreeMap::new(),
                    error: None,
                    variants: s.variants.clone(),
                }
            })
        })
        .collect();
    let mut counts = BTreeMap::new();
    for s in &stages {
        let name =
            serde_json::to_value(s.status).expect("status").as_str().unwrap_or("").to_string();
        *counts.entry(name).or_insert(0) += 1;
    }
    RunSummary { manifest: plan.manifest.clone(), stages, counts, interrupted }
}

fn outputs_of(cache: &Cache, record: &StageRecord) -> BTreeMap<String, PathBuf> {
    record.outputs.iter().map(|(k, o)| (k.clone(), cache.object_path(&o.digest))).collect()
}

/// Runs one instance: hit if the cache has it; otherwise lock the key, re-check, run into a
/// staging directory, publish outputs and the record atomically.
#[allow(clippy::too_many_arguments)]
pub fn execute(
    m: &Manifest,
    stage: &PlannedStage,
    inputs: &[&PlannedStage],
    input_outputs: &[BTreeMap<String, PathBuf>],
    cache: &Cache,
    device: &str,
    opts: &RunOptions,
    cancel: &CancelToken,
) -> StageOutcome {
    let mut outcome = StageOutcome {
        id: stage.id.clone(),
        kind: stage.kind.clone(),
        key: stage.key.to_string(),
        status: RunStatus::Failed,
        reasons: stage.reasons.clone(),
        seconds: 0.0,
        device: None,
        outputs: BTreeMap::new(),
        error: None,
        variants: stage.variants.clone(),
    };
    let start = Instant::now();
    match execute_inner(m, stage, inputs, input_outputs, cache, device, opts, cancel) {
        Ok((status, outputs)) => {
            outcome.status = status;
            outcome.outputs = outputs;
            if status == RunStatus::Ran {
                outcome.device = Some(device.to_string());
                outcome.seconds = start.elapsed().as_secs_f64();
            } else {
                outcome.reasons.clear();
            }
        }
        Err(e) => {
            outcome.seconds = start.elapsed().as_secs_f64();
            outcome.device = Some(device.to_string());
            if cancel.is_cancelled() {
                outcome.status = RunStatus::Skipped;
                outcome.reasons = vec!["interrupted".into()];
            } else {
                tracing::error!(stage = %stage.id, "failed: {e:#}");
                outcome.error = Some(format!("{e:#}"));
            }
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn execute_inner(
    m: &Manifest,
    stage: &PlannedStage,
    inputs: &[&PlannedStage],
    input_outputs: &[BTreeMap<String, PathBuf>],
    cache: &Cache,
    device: &str,
    opts: &RunOptions,
    cancel: &CancelToken,
) -> anyhow::Result<(RunStatus, BTreeMap<String, PathBuf>)> {
    let complete = |r: &StageRecord| r.outputs.values().all(|o| cache.has_object(&o.digest));
    if let Some(r) = cache.record(&stage.key)?.filter(complete) {
        return Ok((RunStatus::Hit, outputs_of(cache, &r)));
    }
    // Wait for the key's lock, staying responsive to Ctrl-C.
    let _lock = loop {
        if let Some(lock) = cache.try_lock_key(&stage.key)? {
            break lock;
        }
        cancel.check()?;
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(r) = cache.record(&stage.key)?.filter(complete) {
        tracing::debug!(stage = %stage.id, "computed by another process meanwhile");
        return Ok((RunStatus::Hit, outputs_of(cache, &r)));
    }
    let decl = m.stage(stage_name(&stage.local_id)).expect("plan ids come from the manifest");
    let staging = cache.staging_dir()?;
    let work_dir = cache.work_dir(&stage.key)?;
    // The stage sees ids of its own variant's graph (`finetune[2]`, not `k=0.3/finetune[2]`).
    let ctx = StageContext {
        id: stage.local_id.clone(),
        group: stage.group,
        device: device.to_string(),
        seed: m.seed,
        inputs: inputs
            .iter()
            .zip(input_outputs)
            .map(|(up, files)| UpstreamOutputs {
                id: up.local_id.clone(),
                kind: up.kind.clone(),
                group: up.group,
                files: files.clone(),
            })
            .collect(),
        out_dir: staging.path().to_path_buf(),
        work_dir,
        cancel: cancel.clone(),
        progress: opts.progress,
    };
    tracing::info!(stage = %stage.id, key = %stage.key.short(), device, "running");
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decl.params.run(m, &ctx)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            anyhow::bail!("stage panicked: {msg}");
        }
    }
    cancel.check()?;
    let duration_s = t0.elapsed().as_secs_f64();
    let mut outputs = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(staging.path())?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_type()?.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            outputs.insert(name, cache.put_file(&e.path())?);
        }
    }
    let record = StageRecord {
        key: stage.key,
        id: stage.id.clone(),
        kind: stage.kind.clone(),
        outputs,
        fingerprint: serde_json::to_value(&stage.fingerprint)?,
        meta: RecordMeta {
            duration_s,
            device: device.to_string(),
            versions: [(stage.kind.clone(), decl.params.version().to_string())].into(),
            ..RecordMeta::timed(started_at, SystemTime::now())
        },
    };
    cache.publish(&record)?;
    for (namespace, id) in &stage.refs {
        cache.set_ref(namespace, id, &stage.key)?;
    }
    cache.remove_work_dir(&stage.key)?;
    Ok((RunStatus::Ran, outputs_of(cache, &record)))
}

pub use crate::plan::stage_name;
