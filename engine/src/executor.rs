//! Running a plan with the local backend: one worker process per running stage instance.
//!
//! Instances start in topological order, independent ones concurrently (up to `jobs`), each on
//! a device from a pool; a failure stops its dependents while unrelated instances finish.
//! Instances the cache already holds are hits without a worker. For the others the coordinator
//! writes the [`Job`] into the cache and starts `progdiff-worker exec <job.json>` in a process
//! group of its own, with its device (`CUDA_VISIBLE_DEVICES` for a GPU) and thread count; the
//! worker's stderr (its log) goes to the job's log file in the cache, its stdout carries
//! [`Event`]s as JSON lines, which drive one progress bar per running job (plain lines when
//! stderr is not a terminal).
//!
//! A worker that dies — SIGKILL, a segfault, an abort in libtorch, CUDA running out of memory —
//! fails only its instance: nothing is published for it (the worker publishes the record last),
//! its siblings go on, and the summary names the signal or exit code, the last lines of its log
//! and the log's path. Ctrl-C forwards SIGINT to every worker's process group (training saves
//! its resume state and stops); a second Ctrl-C kills them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use progdiff_cache::Cache;
use progdiff_kinds::context::{CancelToken, Event};
use serde::Serialize;

use crate::job::{Job, complete_record, outputs_of};
use crate::plan::{Plan, PlannedStage};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Maximum instances running at once.
    pub jobs: usize,
    /// Device pool: `cpu` (shared by all jobs) and/or `cuda:N` (one instance at a time each).
    pub devices: Vec<String>,
    /// Draw progress bars (stderr is a terminal).
    pub progress: bool,
    /// Intra-op threads of each worker.
    pub threads: usize,
    /// The worker binary.
    pub worker: PathBuf,
    /// The remote cache (URL) workers look keys up in.
    pub remote: Option<String>,
    /// Whether workers upload what they compute to the remote cache.
    pub upload: bool,
    /// Opt-in GPU fast paths of every worker (`--fast`).
    pub fast: progdiff_kinds::fast::FastPaths,
}

impl RunOptions {
    /// One job at a time on the CPU with one thread, no progress bars, with `worker`.
    pub fn new(worker: PathBuf) -> RunOptions {
        RunOptions {
            jobs: 1,
            devices: vec!["cpu".into()],
            progress: false,
            threads: 1,
            worker,
            remote: None,
            upload: false,
            fast: Default::default(),
        }
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
    /// The error, for failures: what the worker reported, or how it died, with the last lines
    /// of its log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The worker's log, for instances that ran (kept after failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// The sweep variants the instance belongs to (empty without a sweep).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
    /// A hit found in the remote cache (and downloaded).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
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

/// Process groups of the running workers, shared with a Ctrl-C handler so that a second
/// Ctrl-C can kill them before the coordinator exits.
#[derive(Clone, Debug, Default)]
pub struct Workers(Arc<Mutex<Vec<i32>>>);

impl Workers {
    /// Sends `signal` to every running worker's process group.
    pub fn signal_all(&self, signal: Signal) {
        for &pgid in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
    fn add(&self, pgid: i32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
    }
    fn remove(&self, pgid: i32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|&p| p != pgid);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Done,
    Failed,
}

/// A message from a worker's stdout reader.
enum Msg {
    Event(Event),
    /// A line that is not an event (printed to the log as well, by the worker).
    Text(String),
    Eof,
}

/// A running worker.
struct Running {
    child: Child,
    device: String,
    started: Instant,
    log: PathBuf,
    bar: Option<ProgressBar>,
    done: Option<Event>,
    last_line: Instant,
}

/// Coordinator output beside the bars: through the bars when they are drawn.
struct Printer {
    multi: Option<MultiProgress>,
}

impl Printer {
    fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

/// Runs `plan` to completion (or interruption) and returns the summary.
pub fn run(
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    cancel: &CancelToken,
    workers: &Workers,
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
    let mut running: BTreeMap<usize, Running> = BTreeMap::new();
    let (tx, rx) = mpsc::channel::<(usize, Msg)>();
    let printer = Printer {
        multi: opts.progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
    };
    let width = plan.stages.iter().map(|s| s.id.len()).max().unwrap_or(0).min(40);
    let mut signalled = false;

    loop {
        // Launch what is ready, in plan order, while there is room.
        if !cancel.is_cancelled() {
            for i in 0..n {
                if running.len() >= jobs {
                    break;
                }
                if state[i] != State::Pending || !deps[i].iter().all(|&d| state[d] == State::Done) {
                    continue;
                }
                let stage = &plan.stages[i];
                // Hits need no worker (unless forced).
                let record =
                    if stage.forced { Ok(None) } else { complete_record(cache, &stage.key) };
                match record {
                    Ok(Some(record)) => {
                        let outputs = outputs_of(cache, &record);
                        set_refs(cache, stage);
                        outcomes[i] = Some(outcome(stage, RunStatus::Hit, outputs));
                        state[i] = State::Done;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let mut o = outcome(stage, RunStatus::Failed, BTreeMap::new());
                        o.error = Some(format!("reading the cache: {e:#}"));
                        outcomes[i] = Some(o);
                        state[i] = State::Failed;
                        continue;
                    }
                }
                if cache.is_read_only() {
                    let mut o = outcome(stage, RunStatus::Failed, BTreeMap::new());
                    o.error = Some(format!(
                        "cannot run `{}`: the cache `{}` is read-only, so it can only serve \
                         stages it holds\nhint: run with a writable `--cache-dir`",
                        stage.id,
                        cache.root().display()
                    ));
                    outcomes[i] = Some(o);
                    state[i] = State::Failed;
                    continue;
                }
                let Some(slot) = free.iter_mut().find(|(_, c)| *c > 0) else { break };
                slot.1 -= 1;
                let device = slot.0.clone();
                let mut job = Job::for_stage(plan, i, cache, &device, opts.threads);
                job.remote = opts.remote.clone();
                job.upload = opts.upload;
                job.fast = opts.fast;
                match spawn(&job, cache, opts, &device, i, tx.clone()) {
                    Ok((child, log)) => {
                        workers.add(child.id() as i32);
                        let bar = printer.multi.as_ref().map(|m| {
                            let bar = m.add(ProgressBar::new(0));
                            bar.set_style(bar_style(width));
                            bar.set_prefix(stage.id.clone());
                            bar.set_message(format!("starting on {device}"));
                            bar
                        });
                        if bar.is_none() {
                            tracing::info!("{}: running on {device}", stage.id);
                        }
                        running.insert(
                            i,
                            Running {
                                child,
                                device,
                                started: Instant::now(),
                                log,
                                bar,
                                done: None,
                                last_line: Instant::now(),
                            },
                        );
                        state[i] = State::Running;
                    }
                    Err(e) => {
                        if let Some(slot) = free.iter_mut().find(|(d, _)| *d == device) {
                            slot.1 += 1;
                        }
                        let mut o = outcome(stage, RunStatus::Failed, BTreeMap::new());
                        o.error = Some(format!("{e:#}"));
                        outcomes[i] = Some(o);
                        state[i] = State::Failed;
                    }
                }
            }
        }
        if running.is_empty() {
            break;
        }
        if cancel.is_cancelled() && !signalled {
            // Forward Ctrl-C: each worker stops at its next safe point (training saves its
            // resume state) and publishes nothing.
            workers.signal_all(Signal::SIGINT);
            signalled = true;
        }
        let (i, msg) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let stage = &plan.stages[i];
        match msg {
            Msg::Event(event) => {
                let Some(r) = running.get_mut(&i) else { continue };
                match &event {
                    Event::Progress { pos, len, unit, message } => match &r.bar {
                        Some(bar) => {
                            if bar.length() != Some(*len) {
                                bar.set_length(*len);
                                bar.set_style(counted_style(width, unit));
                            }
                            bar.set_position(*pos);
                            bar.set_message(message.clone());
                        }
                        None => {
                            if r.last_line.elapsed() >= Duration::from_secs(30) {
                                r.last_line = Instant::now();
                                tracing::info!("{}: {pos}/{len} {unit} {message}", stage.id);
                            }
                        }
                    },
                    Event::Message { level, text } => {
                        printer.line(&format!("{} {level}: {text}", stage.id));
                    }
                    Event::Metrics { .. } => {}
                    Event::Done { .. } => r.done = Some(event),
                }
            }
            Msg::Text(line) => {
                tracing::debug!("{}: {line}", stage.id);
            }
            Msg::Eof => {
                let Some(mut r) = running.remove(&i) else { continue };
                let status = r.child.wait();
                workers.remove(r.child.id() as i32);
                if let Some(bar) = &r.bar {
                    bar.finish_and_clear();
                    if let Some(m) = &printer.multi {
                        m.remove(bar);
                    }
                }
                if let Some(slot) = free.iter_mut().find(|(d, _)| *d == r.device) {
                    slot.1 += 1;
                }
                let o = finish(stage, &mut r, status, cancel, cache);
                let line = match o.status {
                    RunStatus::Ran => format!("{}: ran in {:.1}s", stage.id, o.seconds),
                    RunStatus::Hit if o.remote => {
                        format!("{}: found in the remote cache", stage.id)
                    }
                    RunStatus::Hit => format!("{}: found in the cache", stage.id),
                    RunStatus::Failed => format!(
                        "{}: FAILED: {}",
                        stage.id,
                        o.error.as_deref().and_then(|e| e.lines().next()).unwrap_or("")
                    ),
                    RunStatus::Skipped => format!("{}: interrupted", stage.id),
                };
                if printer.multi.is_some() {
                    printer.line(&line);
                } else {
                    tracing::info!("{line}");
                }
                state[i] = match o.status {
                    RunStatus::Hit | RunStatus::Ran => State::Done,
                    _ => State::Failed,
                };
                outcomes[i] = Some(o);
            }
        }
    }
    if let Some(m) = &printer.multi {
        let _ = m.clear();
    }
    // A worker that died (SIGKILL, abort) leaves its staging directory in `tmp/`: sweep it now
    // that every worker has ended (only if no other process is writing to the cache).
    match cache.sweep_tmp() {
        Ok(n) if n > 0 => tracing::debug!("removed {n} leftovers of ended workers from tmp/"),
        Ok(_) => {}
        Err(e) => tracing::warn!("sweeping the cache's tmp/: {e}"),
    }

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
                let mut o = outcome(s, RunStatus::Skipped, BTreeMap::new());
                o.reasons = vec![reason];
                o
            })
        })
        .collect();
    summary(plan, stages, interrupted)
}

/// The run's summary from every instance's outcome.
pub(crate) fn summary(plan: &Plan, stages: Vec<StageOutcome>, interrupted: bool) -> RunSummary {
    let mut counts = BTreeMap::new();
    for s in &stages {
        let name =
            serde_json::to_value(s.status).expect("status").as_str().unwrap_or("").to_string();
        *counts.entry(name).or_insert(0) += 1;
    }
    RunSummary { manifest: plan.manifest.clone(), stages, counts, interrupted }
}

/// The outcome of `stage` with `status` (reasons from the plan, none for a hit).
pub(crate) fn outcome(
    stage: &PlannedStage,
    status: RunStatus,
    outputs: BTreeMap<String, PathBuf>,
) -> StageOutcome {
    StageOutcome {
        id: stage.id.clone(),
        kind: stage.kind.clone(),
        key: stage.key.to_string(),
        status,
        reasons: if status == RunStatus::Hit { Vec::new() } else { stage.reasons.clone() },
        seconds: 0.0,
        device: None,
        outputs,
        error: None,
        log: None,
        variants: stage.variants.clone(),
        remote: false,
    }
}

/// Points the plan-history refs of every variant at the instance's key (not in a read-only
/// cache: the history is only a convenience for `plan`'s reasons).
pub(crate) fn set_refs(cache: &Cache, stage: &PlannedStage) {
    if cache.is_read_only() {
        return;
    }
    for (namespace, id) in &stage.refs {
        if let Err(e) = cache.set_ref(namespace, id, &stage.key) {
            tracing::warn!("recording the plan history of `{}`: {e}", stage.id);
        }
    }
}

/// Writes the job, opens its log and starts its worker; a thread forwards the worker's stdout.
fn spawn(
    job: &Job,
    cache: &Cache,
    opts: &RunOptions,
    device: &str,
    index: usize,
    tx: mpsc::Sender<(usize, Msg)>,
) -> anyhow::Result<(Child, PathBuf)> {
    use anyhow::Context as _;
    let path = cache.write_job(&job.key, &serde_json::to_vec_pretty(job)?)?;
    let mut log = cache.open_log(&job.key)?;
    writeln!(
        log,
        "=== {} `{}` on {device}, {} ===",
        progdiff_cache::rfc3339_utc(std::time::SystemTime::now()),
        job.id,
        progdiff_cache::host_name()
    )?;
    let mut cmd = Command::new(&opts.worker);
    cmd.arg("exec")
        .arg(&path)
        .arg("--events")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: Ctrl-C at the terminal reaches only the coordinator, which
        // forwards it; a command stage's children are signalled with it.
        .process_group(0)
        // The worker stops (gracefully) if the coordinator dies.
        .env("PROGDIFF_DIE_WITH_PARENT", "1")
        .env("OMP_NUM_THREADS", job.threads.to_string())
        .env("RAYON_NUM_THREADS", job.threads.to_string());
    if let Some(gpu) = device.strip_prefix("cuda:") {
        cmd.env("CUDA_VISIBLE_DEVICES", gpu);
    }
    let mut child =
        cmd.spawn().with_context(|| format!("starting the worker `{}`", opts.worker.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let msg = match serde_json::from_str::<Event>(&line) {
                Ok(e) => Msg::Event(e),
                Err(_) => Msg::Text(line),
            };
            if tx.send((index, msg)).is_err() {
                return;
            }
        }
        let _ = tx.send((index, Msg::Eof));
    });
    Ok((child, cache.log_path(&job.key)))
}

/// The outcome of a worker that exited.
fn finish(
    stage: &PlannedStage,
    r: &mut Running,
    status: std::io::Result<std::process::ExitStatus>,
    cancel: &CancelToken,
    cache: &Cache,
) -> StageOutcome {
    let mut o = outcome(stage, RunStatus::Failed, BTreeMap::new());
    o.device = Some(r.device.clone());
    o.seconds = r.started.elapsed().as_secs_f64();
    o.log = Some(r.log.clone());
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            o.error = Some(format!("waiting for the worker: {e}"));
            return o;
        }
    };
    match (&r.done, status.success()) {
        (Some(Event::Done { status: s, outputs, seconds, .. }), true)
            if s == "ran" || s == "hit" || s == "remote" =>
        {
            o.status = if s == "ran" { RunStatus::Ran } else { RunStatus::Hit };
            o.remote = s == "remote";
            o.outputs = outputs.clone();
            if o.status == RunStatus::Ran {
                o.seconds = *seconds;
            } else {
                o.reasons.clear();
                o.seconds = 0.0;
            }
            set_refs(cache, stage);
            return o;
        }
        _ => {}
    }
    // The record is what counts: a worker that died after publishing it (killed, or failing
    // to clean up) has completed its stage.
    if let Ok(Some(record)) = complete_record(cache, &stage.key) {
        tracing::warn!(
            "{}: the worker ended abnormally ({status}) after publishing the stage's record; \
             its result is complete",
            stage.id
        );
        o.status = RunStatus::Ran;
        o.outputs = outputs_of(cache, &record);
        set_refs(cache, stage);
        return o;
    }
    if cancel.is_cancelled() && (status.code() == Some(130) || status.signal().is_some()) {
        o.status = RunStatus::Skipped;
        o.reasons = vec!["interrupted".into()];
        return o;
    }
    let how = match (status.code(), status.signal()) {
        (_, Some(sig)) => format!(
            "the worker was killed by signal {sig} ({}){}",
            Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown"),
            if status.core_dumped() { ", core dumped" } else { "" }
        ),
        (Some(code), None) => format!("the worker exited with code {code}"),
        (None, None) => "the worker ended without a status".into(),
    };
    let reported = match &r.done {
        Some(Event::Done { error: Some(e), .. }) => Some(e.clone()),
        _ => None,
    };
    let mut text = match reported {
        Some(e) => e,
        None => how,
    };
    let tail = log_tail(&r.log, 12);
    if !tail.is_empty() {
        text.push_str("\nlast lines of its log:\n");
        for l in tail.lines() {
            text.push_str("  ");
            text.push_str(l);
            text.push('\n');
        }
    }
    text.push_str(&format!("log: {}", r.log.display()));
    o.error = Some(text);
    o
}

/// The last `n` lines of a log file (at most 16 kB read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn counted_style(width: usize, unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:<{width}}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{eta}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

fn bar_style(width: usize) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{prefix:<{width}}} {{spinner}} {{msg}}"))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}
