//! The `slurm` backend: one Slurm job (or job-array task) per stage instance, through `sbatch`,
//! `squeue`, `scancel` and `scontrol` (no libslurm).
//!
//! # Submitting
//! Instances that are ready together and share their stage and resources (the ten `prune[g]`,
//! the ten `finetune[g]`, the variants of a sweep) go into one job array; others are single
//! jobs. Every job of a cache carries one name, `progdiff-<cache id>`, so a single `squeue` per
//! polling cycle sees all of them — and a second coordinator on the same cache, or a restarted
//! one, sees them too. Each job runs a generated batch script (kept under
//! `<cache>/v1/slurm/scripts/`) that starts `progdiff-worker exec` on the instance's job
//! description, appends the worker's log to the cache's per-key log, and writes an exit marker
//! (`<key>.exit.json` next to the log: exit code, Slurm job id, restart count) when the worker
//! ends. Which job computes which key is recorded in `<cache>/v1/slurm/keys/`.
//!
//! # Waiting
//! The queue is polled with back-off (`poll_min_s` doubling up to `poll_max_s`, back to the
//! minimum when something changed). A job in a live state is waited for; one that ended is
//! judged by the cache first (a complete record: it ran), then by its exit marker, then by its
//! final state (`FAILED`, `TIMEOUT`, `OUT_OF_MEMORY`, `CANCELLED`, `NODE_FAIL`, ...): the
//! instance fails with the state, the exit code and the log's path. A job that left the queue
//! without a marker is *lost* after `lost_grace_s` and submitted again (at most `max_resubmits`
//! times). An unknown state is never taken for success. `retries:` of a stage resubmits failed
//! jobs (after `NODE_FAIL`, excluding the node).
//!
//! # Preemption and time limits
//! Training jobs are submitted with `--requeue --signal=B:USR2@<signal_grace_s>`. The batch
//! script forwards `SIGUSR2` to the worker, which saves the training's resume state and exits
//! with [`EXIT_REQUEUE`]; the script then requeues the job (`scontrol requeue`) unless it has
//! been requeued `max_requeues` times. The requeued job resumes from the work area to the same
//! bits as an uninterrupted run. A job Slurm itself requeues (preemption, `scontrol requeue`)
//! gets `SIGTERM`, which the worker treats the same way (state saved, nothing published).
//!
//! # Restarting the coordinator
//! The coordinator keeps no state a job needs. Killed or disconnected, a new `progdiff run` finds
//! each instance's live job through the key records and the queue and waits for it instead of
//! submitting again. Ctrl-C cancels the jobs it waits for (`scancel`) and exits 130.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use progdiff_cache::{Cache, Digest};
use progdiff_kinds::context::CancelToken;
use serde::{Deserialize, Serialize};

use crate::executor::{RunStatus, RunSummary, StageOutcome};
use crate::job::{Job, complete_record, outputs_of};
use crate::plan::{Plan, PlannedStage, stage_name};
use crate::profile::{GpuRequest, SlurmProfile};
use crate::resources::Resources;

/// The worker's exit code after checkpointing on `SIGUSR2`: requeue me.
pub const EXIT_REQUEUE: i32 = 75;

/// Slurm job states in which a job may still run.
const LIVE: &[&str] = &[
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
];

/// Final Slurm job states.
const ENDED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "CANCELLED",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
];

/// What the Slurm backend needs besides the plan.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// The profile's `slurm:` section.
    pub profile: SlurmProfile,
    /// Resources of each plan instance (index-aligned with the plan), resolved.
    pub resources: Vec<Resources>,
    /// `retries:` of each plan instance.
    pub retries: Vec<u32>,
    /// The worker binary, as the compute nodes see it (a shared filesystem).
    pub worker: PathBuf,
    /// Opt-in GPU fast paths of every worker (`--fast`).
    pub fast: progdiff_kinds::fast::FastPaths,
}

/// Which job computes a key (`<cache>/v1/slurm/keys/ab/<key>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyJob {
    /// The key.
    pub key: Digest,
    /// The Slurm job id as `squeue` prints it: `123`, or `123_4` for an array task.
    pub job: String,
    /// The instance id it was submitted as.
    pub id: String,
    /// When it was submitted (RFC 3339).
    pub submitted: String,
}

/// What the batch script writes when the worker ends (`<key>.exit.json` beside its log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitMarker {
    /// The worker's exit code (128 + n when a signal ended it).
    pub exit_code: i32,
    /// The Slurm job id (`123` or `123_4`).
    pub job: String,
    /// `SLURM_RESTART_COUNT`.
    #[serde(default)]
    pub restarts: u32,
}

/// The job name every job of this cache carries.
pub fn job_name(cache: &Cache) -> String {
    let root = std::path::absolute(cache.root()).unwrap_or_else(|_| cache.root().to_path_buf());
    let digest = progdiff_cache::hash_bytes(root.to_string_lossy().as_bytes()).to_string();
    format!("progdiff-{}", &digest[..12])
}

fn key_job_path(cache: &Cache, key: &Digest) -> PathBuf {
    let k = key.to_string();
    cache.bucket().join("slurm/keys").join(&k[..2]).join(format!("{k}.json"))
}

/// Where the exit marker of `key` goes.
pub fn marker_path(cache: &Cache, key: &Digest) -> PathBuf {
    cache.log_path(key).with_extension("exit.json")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let dir = path.parent().expect("paths in the cache have a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), serde_json::to_vec_pretty(value)?)?;
    tmp.persist(path).map_err(|e| anyhow::anyhow!("writing `{}`: {}", path.display(), e.error))?;
    Ok(())
}

/// One row of `squeue`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    /// Job id (`123`, `123_4`).
    pub job: String,
    /// State (`PENDING`, `RUNNING`, `COMPLETED`, ...).
    pub state: String,
    /// Reason or node list.
    pub reason: String,
    /// Node list.
    pub nodes: String,
}

/// One `squeue` call: every job named `name`, in any state Slurm still keeps.
pub fn squeue(name: &str) -> anyhow::Result<BTreeMap<String, QueueEntry>> {
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--array", "--name", name])
        .args(["--format=%i|%T|%r|%N"])
        .output()
        .context("running `squeue` (is Slurm's client installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "`squeue` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(parse_squeue(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `squeue --format=%i|%T|%r|%N` output.
pub fn parse_squeue(text: &str) -> BTreeMap<String, QueueEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let job = f.next()?.trim().to_string();
            let state = f.next()?.trim().to_string();
            let reason = f.next().unwrap_or("").trim().to_string();
            let nodes = f.next().unwrap_or("").trim().to_string();
            (!job.is_empty()).then(|| (job.clone(), QueueEntry { job, state, reason, nodes }))
        })
        .collect()
}

/// Whether Slurm job `job` (`123` or `123_4`) is still in a live state: `Some(true)`, gone or
/// ended `Some(false)`, `None` when the queue cannot be asked. A lease's owner check.
pub fn job_alive(job: &str) -> Option<bool> {
    let out = Command::new("squeue")
        .args(["--noheader", "--states=all", "--format=%T", "--jobs", job])
        .output()
        .ok()?;
    if !out.status.success() {
        // `Invalid job id specified`: the controller forgot it long ago.
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then_some(false);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().any(|l| is_live(l.trim()) == Some(true)))
}

/// Whether a Slurm state is live (`Some(true)`), final (`Some(false)`) or unknown (`None`).
pub fn is_live(state: &str) -> Option<bool> {
    // `CANCELLED by 0` and the like: the first word is the state.
    let s = state.split_whitespace().next().unwrap_or("");
    if LIVE.contains(&s) {
        Some(true)
    } else if ENDED.contains(&s) {
        Some(false)
    } else {
        None
    }
}

/// What `sbatch` gets for one job or array.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The jobs, in array-task order.
    pub jobs: Vec<Job>,
    /// The resources all of them get.
    pub resources: Resources,
    /// Training: requeueable with the checkpoint signal.
    pub requeue: bool,
    /// Nodes to avoid (after `NODE_FAIL`).
    pub exclude: BTreeSet<String>,
    /// The `--comment`: the instance ids.
    pub comment: String,
}

/// The `sbatch` arguments of `sub` (without the script).
pub fn sbatch_args(
    sub: &Submission,
    profile: &SlurmProfile,
    name: &str,
    out_dir: &Path,
) -> Vec<String> {
    let r = &sub.resources;
    let mut a = vec![
        "--parsable".to_string(),
        format!("--job-name={name}"),
        format!("--comment={}", sub.comment),
        "--open-mode=append".to_string(),
    ];
    let array = sub.jobs.len() > 1;
    a.push(format!(
        "--output={}",
        out_dir.join(if array { "%A_%a.out" } else { "%j.out" }).display()
    ));
    if array {
        a.push(format!("--array=0-{}", sub.jobs.len() - 1));
    }
    if let Some(p) = &r.partition {
        a.push(format!("--partition={p}"));
    }
    if let Some(x) = &profile.account {
        a.push(format!("--account={x}"));
    }
    if let Some(x) = &profile.qos {
        a.push(format!("--qos={x}"));
    }
    if let Some(c) = r.cpus {
        a.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        a.push(format!("--mem={m}"));
    }
    if let Some(t) = &r.time {
        a.push(format!("--time={t}"));
    }
    if let Some(c) = &r.constraint {
        a.push(format!("--constraint={c}"));
    }
    if let Some(g) = r.gpus.filter(|g| *g > 0) {
        let typed = match &r.gpu_type {
            Some(t) => format!("{t}:{g}"),
            None => g.to_string(),
        };
        a.push(match profile.gpu_request {
            GpuRequest::Gres => format!("--gres=gpu:{typed}"),
            GpuRequest::Gpus => format!("--gpus={typed}"),
        });
    }
    if sub.requeue {
        a.push("--requeue".into());
        a.push(format!("--signal=B:USR2@{}", profile.signal_grace_s));
    }
    if !sub.exclude.is_empty() {
        a.push(format!("--exclude={}", sub.exclude.iter().cloned().collect::<Vec<_>>().join(",")));
    }
    a.extend(profile.extra.iter().cloned());
    a.extend(r.extra.iter().cloned());
    a
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The batch script of `sub`: picks its job by `SLURM_ARRAY_TASK_ID`, runs the worker with the
/// log and the exit marker, forwards `SIGUSR2`/`SIGTERM`, and requeues after a checkpoint.
pub fn batch_script(
    sub: &Submission,
    cache: &Cache,
    worker: &Path,
    profile: &SlurmProfile,
) -> String {
    let list = |f: &dyn Fn(&Job) -> String| -> String {
        sub.jobs.iter().map(|j| shell_quote(&f(j))).collect::<Vec<_>>().join(" ")
    };
    let jobs = list(&|j| cache.job_path(&j.key).display().to_string());
    let logs = list(&|j| cache.log_path(&j.key).display().to_string());
    let markers = list(&|j| marker_path(cache, &j.key).display().to_string());
    format!(
        r#"#!/bin/bash
# progdiff: {comment}
jobs=({jobs})
logs=({logs})
markers=({markers})
i=${{SLURM_ARRAY_TASK_ID:-0}}
job=${{jobs[$i]}}; log=${{logs[$i]}}; marker=${{markers[$i]}}
if [ -n "${{SLURM_ARRAY_JOB_ID:-}}" ]; then id=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}; else id=$SLURM_JOB_ID; fi
restarts=${{SLURM_RESTART_COUNT:-0}}
mkdir -p "$(dirname "$log")"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) slurm job $id on $(hostname), restart $restarts ===" >>"$log"
rm -f "$marker"
pid=
trap '[ -n "$pid" ] && kill -USR2 "$pid" 2>/dev/null' USR2
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM
{worker} exec "$job" --slurm-job "$id" >/dev/null 2>>"$log" &
pid=$!
while :; do
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break
done
if [ "$code" = {requeue_code} ]; then
    if [ "$restarts" -lt {max_requeues} ]; then
        echo "checkpointed: requeueing (restart $((restarts + 1)) of at most {max_requeues})" >>"$log"
        scontrol requeue "$SLURM_JOB_ID" >>"$log" 2>&1 && exit 0
    fi
    echo "checkpointed, but not requeued (restart $restarts of at most {max_requeues})" >>"$log"
fi
printf '{{"exit_code":%d,"job":"%s","restarts":%d}}\n' "$code" "$id" "$restarts" >"$marker.tmp" && mv "$marker.tmp" "$marker"
exit "$code"
"#,
        comment = sub.comment.replace('\n', " "),
        worker = shell_quote(&worker.display().to_string()),
        requeue_code = EXIT_REQUEUE,
        max_requeues = profile.max_requeues,
    )
}

/// Submits `sub`; returns the Slurm job id of each of its jobs (`123` or `123_0` ...).
pub fn submit(
    sub: &Submission,
    cache: &Cache,
    opts: &SlurmOptions,
    name: &str,
) -> anyhow::Result<Vec<String>> {
    let out_dir = opts.profile.log_dir.clone().unwrap_or_else(|| cache.bucket().join("slurm/out"));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating `{}`", out_dir.display()))?;
    let scripts = cache.bucket().join("slurm/scripts");
    std::fs::create_dir_all(&scripts)?;
    let script = batch_script(sub, cache, &opts.worker, &opts.profile);
    let script_path = scripts.join(format!("{}.sh", progdiff_cache::hash_bytes(script.as_bytes())));
    std::fs::write(&script_path, &script)?;
    let args = sbatch_args(sub, &opts.profile, name, &out_dir);
    let out = Command::new("sbatch")
        .args(&args)
        .arg(&script_path)
        .output()
        .context("running `sbatch` (is Slurm's client installed?)")?;
    if !out.status.success() {
        anyhow::bail!(
            "sbatch refused {}: {}\nhint: the resources asked for: sbatch {}",
            sub.comment,
            String::from_utf8_lossy(&out.stderr).trim(),
            args.join(" ")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `--parsable`: `jobid` or `jobid;cluster`.
    let id = text.trim().split(';').next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
        "sbatch printed `{}`, not a job id",
        text.trim()
    );
    let ids: Vec<String> = if sub.jobs.len() > 1 {
        (0..sub.jobs.len()).map(|t| format!("{id}_{t}")).collect()
    } else {
        vec![id]
    };
    let now = progdiff_cache::rfc3339_utc(SystemTime::now());
    for (job, sid) in sub.jobs.iter().zip(&ids) {
        let rec =
            KeyJob { key: job.key, job: sid.clone(), id: job.id.clone(), submitted: now.clone() };
        write_json_atomic(&key_job_path(cache, &job.key), &rec)?;
    }
    Ok(ids)
}

#[derive(Clone, Debug)]
struct Waiting {
    job: String,
    started: Instant,
    /// Since when the job has been missing from the queue without a marker.
    missing_since: Option<Instant>,
    resubmits: u32,
    retries_left: u32,
    exclude: BTreeSet<String>,
    /// The node it last ran on.
    node: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Waiting,
    Done,
    Failed,
}

/// What one poll says of a waited-for job.
enum Verdict {
    Wait,
    Ran,
    Failed { state: String, exit: Option<i32>, node: String },
    Lost,
}

/// Runs `plan` on Slurm and returns the summary.
pub fn run(plan: &Plan, cache: &Cache, opts: &SlurmOptions, cancel: &CancelToken) -> RunSummary {
    let name = job_name(cache);
    let n = plan.stages.len();
    let index: BTreeMap<&str, usize> =
        plan.stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let deps: Vec<Vec<usize>> =
        plan.stages.iter().map(|s| s.needs.iter().map(|d| index[d.as_str()]).collect()).collect();
    let mut state = vec![State::Pending; n];
    let mut outcomes: Vec<Option<StageOutcome>> = vec![None; n];
    let mut waiting: BTreeMap<usize, Waiting> = BTreeMap::new();
    let min_delay = Duration::from_secs_f64(opts.profile.poll_min_s);
    let max_delay = Duration::from_secs_f64(opts.profile.poll_max_s);
    let mut delay = min_delay;
    let mut first = true;

    // One cycle: wait (with back-off), one `squeue`, judge the jobs waited for, then start what
    // became ready (hits, jobs to re-attach to — judged by the same `squeue` —, submissions).
    loop {
        if !first && !waiting.is_empty() {
            let until = Instant::now() + delay;
            while Instant::now() < until && !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50).min(delay));
            }
        }
        if cancel.is_cancelled() {
            let ids: Vec<String> = waiting.values().map(|w| w.job.clone()).collect();
            if !ids.is_empty() {
                tracing::warn!("cancelling {} Slurm jobs: {}", ids.len(), ids.join(" "));
                let _ = Command::new("scancel").args(&ids).status();
            }
            break;
        }
        let ready: Vec<usize> = (0..n)
            .filter(|&i| {
                state[i] == State::Pending && deps[i].iter().all(|&d| state[d] == State::Done)
            })
            .collect();
        let need_queue = !waiting.is_empty()
            || ready.iter().any(|&i| key_job_path(cache, &plan.stages[i].key).exists());
        let queue = if need_queue {
            match squeue(&name) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!("{e:#}; polling again");
                    delay = (delay * 2).min(max_delay);
                    first = false;
                    continue;
                }
            }
        } else {
            None
        };
        first = false;
        let mut progressed = false;
        if let Some(q) = &queue {
            let ids: Vec<usize> = waiting.keys().copied().collect();
            for i in ids {
                let stage = &plan.stages[i];
                let w = waiting.get_mut(&i).expect("waiting");
                match judge(stage, w, q, cache, opts) {
                    Verdict::Wait => {}
                    Verdict::Ran => {
                        progressed = true;
                        let w = waiting.remove(&i).expect("waiting");
                        match complete_record(cache, &stage.key) {
                            Ok(Some(r)) => {
                                set_refs(cache, stage);
                                let remote = downloaded(cache, &stage.key);
                                let status = if remote { RunStatus::Hit } else { RunStatus::Ran };
                                let mut o = outcome(stage, status, outputs_of(cache, &r));
                                o.remote = remote;
                                o.seconds = if remote { 0.0 } else { r.meta.duration_s };
                                o.device = Some(format!("slurm job {}", w.job));
                                o.log = Some(cache.log_path(&stage.key));
                                tracing::info!("{}: ran (Slurm job {})", stage.id, w.job);
                                outcomes[i] = Some(o);
                                state[i] = State::Done;
                            }
                            _ => fail(
                                &mut outcomes[i],
                                &mut state[i],
                                stage,
                                "the record vanished".into(),
                            ),
                        }
                    }
                    Verdict::Lost => {
                        progressed = true;
                        let w = waiting.remove(&i).expect("waiting");
                        if w.resubmits < opts.profile.max_resubmits {
                            tracing::warn!(
                                "{}: Slurm job {} left the queue without an exit marker; submitting again",
                                stage.id,
                                w.job
                            );
                            submit_group(
                                &[i],
                                plan,
                                cache,
                                opts,
                                &name,
                                &mut waiting,
                                &mut state,
                                &mut outcomes,
                                &w.exclude,
                                Some((w.resubmits + 1, w.retries_left)),
                            );
                        } else {
                            let log = cache.log_path(&stage.key);
                            fail(
                                &mut outcomes[i],
                                &mut state[i],
                                stage,
                                format!(
                                    "Slurm job {} was lost (it left the queue without an exit marker, after {} resubmissions)\nlog: {}",
                                    w.job,
                                    w.resubmits,
                                    log.display()
                                ),
                            );
                            outcomes[i].as_mut().expect("set").log = Some(log);
                        }
                    }
                    Verdict::Failed { state: st, exit, node } => {
                        progressed = true;
                        let w = waiting.remove(&i).expect("waiting");
                        if w.retries_left > 0 {
                            let mut exclude = w.exclude.clone();
                            if st.starts_with("NODE_FAIL") && !node.is_empty() {
                                exclude.insert(node.clone());
                            }
                            tracing::warn!(
                                "{}: Slurm job {} ended {st}; retrying",
                                stage.id,
                                w.job
                            );
                            submit_group(
                                &[i],
                                plan,
                                cache,
                                opts,
                                &name,
                                &mut waiting,
                                &mut state,
                                &mut outcomes,
                                &exclude,
                                Some((w.resubmits, w.retries_left - 1)),
                            );
                            continue;
                        }
                        let log = cache.log_path(&stage.key);
                        let mut text = format!("Slurm job {} ended {st}", w.job);
                        if let Some(code) = exit {
                            text.push_str(&format!(" (exit code {code})"));
                        }
                        let tail = crate::executor::log_tail(&log, 12);
                        if !tail.is_empty() {
                            text.push_str("\nlast lines of its log:\n");
                            for l in tail.lines() {
                                text.push_str(&format!("  {l}\n"));
                            }
                        } else {
                            text.push('\n');
                        }
                        text.push_str(&format!("log: {}", log.display()));
                        tracing::warn!("{}: {}", stage.id, text.lines().next().unwrap_or(""));
                        fail(&mut outcomes[i], &mut state[i], stage, text);
                        let o = outcomes[i].as_mut().expect("set");
                        o.log = Some(log);
                        o.device = Some(format!("slurm job {}", w.job));
                        o.seconds = w.started.elapsed().as_secs_f64();
                    }
                }
            }
        }
        // Start what is ready (again: judging may have completed some upstreams).
        let mut to_submit: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
        for i in 0..n {
            if state[i] != State::Pending || !deps[i].iter().all(|&d| state[d] == State::Done) {
                continue;
            }
            let stage = &plan.stages[i];
            progressed = true;
            let record = if stage.forced { Ok(None) } else { complete_record(cache, &stage.key) };
            match record {
                Ok(Some(r)) => {
                    set_refs(cache, stage);
                    outcomes[i] = Some(outcome(stage, RunStatus::Hit, outputs_of(cache, &r)));
                    state[i] = State::Done;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    fail(
                        &mut outcomes[i],
                        &mut state[i],
                        stage,
                        format!("reading the cache: {e:#}"),
                    );
                    continue;
                }
            }
            // A live job of this key (another coordinator's, or ours before a restart)?
            if let Some(rec) = read_json::<KeyJob>(&key_job_path(cache, &stage.key)) {
                let live = queue
                    .as_ref()
                    .and_then(|q| q.get(&rec.job))
                    .is_some_and(|e| is_live(&e.state) == Some(true));
                if live {
                    tracing::info!("{}: attached to its running Slurm job {}", stage.id, rec.job);
                    waiting.insert(i, new_waiting(rec.job, opts.retries[i]));
                    state[i] = State::Waiting;
                    continue;
                }
            }
            let group =
                (stage_name(&stage.local_id).to_string(), resources_key(&opts.resources[i]));
            to_submit.entry(group).or_default().push(i);
        }
        for members in to_submit.into_values() {
            submit_group(
                &members,
                plan,
                cache,
                opts,
                &name,
                &mut waiting,
                &mut state,
                &mut outcomes,
                &BTreeSet::new(),
                None,
            );
        }
        if waiting.is_empty() {
            // Nothing runs: either everything ended, or what is left waits on failures.
            let ready_left = (0..n).any(|i| {
                state[i] == State::Pending && deps[i].iter().all(|&d| state[d] == State::Done)
            });
            if !ready_left {
                break;
            }
        }
        delay = if progressed { min_delay } else { (delay * 2).min(max_delay) };
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
                    None if interrupted => "interrupted (its Slurm job was cancelled)".to_string(),
                    None => "not reached".to_string(),
                };
                let mut o = outcome(s, RunStatus::Skipped, BTreeMap::new());
                o.reasons = vec![reason];
                o
            })
        })
        .collect();
    crate::executor::summary(plan, stages, interrupted)
}

fn new_waiting(job: String, retries: u32) -> Waiting {
    Waiting {
        job,
        started: Instant::now(),
        missing_since: None,
        resubmits: 0,
        retries_left: retries,
        exclude: BTreeSet::new(),
        node: String::new(),
    }
}

fn resources_key(r: &Resources) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// Whether `stage` is a training stage (requeueable with the checkpoint signal).
fn is_training(stage: &PlannedStage) -> bool {
    stage.kind == progdiff_kinds::train::KIND
}

#[allow(clippy::too_many_arguments)]
fn submit_group(
    members: &[usize],
    plan: &Plan,
    cache: &Cache,
    opts: &SlurmOptions,
    name: &str,
    waiting: &mut BTreeMap<usize, Waiting>,
    state: &mut [State],
    outcomes: &mut [Option<StageOutcome>],
    exclude: &BTreeSet<String>,
    again: Option<(u32, u32)>,
) {
    let mut jobs = Vec::new();
    for &i in members {
        let r = &opts.resources[i];
        let device = if r.gpus.unwrap_or(0) > 0 { "cuda:0" } else { "cpu" };
        let threads = r.cpus.unwrap_or(1) as usize;
        let mut job = Job::for_stage(plan, i, cache, device, threads);
        job.fast = opts.fast;
        if let Err(e) = serde_json::to_vec_pretty(&job)
            .map_err(anyhow::Error::from)
            .and_then(|b| cache.write_job(&job.key, &b).map_err(anyhow::Error::from))
        {
            fail(
                &mut outcomes[i],
                &mut state[i],
                &plan.stages[i],
                format!("writing the job: {e:#}"),
            );
            return;
        }
        jobs.push(job);
    }
    let first = &plan.stages[members[0]];
    let comment = if members.len() == 1 {
        first.id.clone()
    } else {
        format!("{} ({} instances)", stage_name(&first.id), members.len())
    };
    let sub = Submission {
        jobs,
        resources: opts.resources[members[0]].clone(),
        requeue: is_training(first),
        exclude: exclude.clone(),
        comment,
    };
    match submit(&sub, cache, opts, name) {
        Ok(ids) => {
            tracing::info!(
                "submitted {} as Slurm job {}",
                sub.comment,
                ids.first().map(|s| s.split('_').next().unwrap_or(s)).unwrap_or("?")
            );
            for (&i, id) in members.iter().zip(ids) {
                let mut w = new_waiting(id, opts.retries[i]);
                if let Some((resubmits, retries_left)) = again {
                    w.resubmits = resubmits;
                    w.retries_left = retries_left;
                }
                w.exclude = exclude.clone();
                waiting.insert(i, w);
                state[i] = State::Waiting;
            }
        }
        Err(e) => {
            for &i in members {
                fail(&mut outcomes[i], &mut state[i], &plan.stages[i], format!("{e:#}"));
            }
        }
    }
}

/// Whether the job's worker found the result in the remote cache rather than computing it: its
/// log's last attempt (after the script's last `=== ... slurm job` line) says it downloaded.
fn downloaded(cache: &Cache, key: &Digest) -> bool {
    use std::io::{Read as _, Seek as _};
    let Ok(mut f) = std::fs::File::open(cache.log_path(key)) else { return false };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut tail = Vec::new();
    if f.take(64 * 1024).read_to_end(&mut tail).is_err() {
        return false;
    }
    let tail = String::from_utf8_lossy(&tail);
    let last = tail.rfind("\n=== ").map_or(&tail[..], |i| &tail[i..]);
    last.contains(crate::job::DOWNLOADED)
}

fn judge(
    stage: &PlannedStage,
    w: &mut Waiting,
    q: &BTreeMap<String, QueueEntry>,
    cache: &Cache,
    opts: &SlurmOptions,
) -> Verdict {
    let entry = q.get(&w.job);
    if let Some(e) = entry {
        if !e.nodes.is_empty() {
            w.node = e.nodes.clone();
        }
        match is_live(&e.state) {
            Some(true) => {
                w.missing_since = None;
                return Verdict::Wait;
            }
            Some(false) => {}
            // An unknown state is not success: keep waiting (it will end one way or another).
            None => return Verdict::Wait,
        }
    }
    if matches!(complete_record(cache, &stage.key), Ok(Some(_))) {
        return Verdict::Ran;
    }
    let marker: Option<ExitMarker> =
        read_json(&marker_path(cache, &stage.key)).filter(|m: &ExitMarker| m.job == w.job);
    match (entry, marker) {
        (Some(e), m) => Verdict::Failed {
            state: e.state.clone(),
            exit: m.map(|m| m.exit_code),
            node: w.node.clone(),
        },
        (None, Some(m)) => Verdict::Failed {
            state: if m.exit_code == 0 {
                "COMPLETED without a result".into()
            } else {
                "FAILED".into()
            },
            exit: Some(m.exit_code),
            node: w.node.clone(),
        },
        (None, None) => {
            let since = *w.missing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs_f64(opts.profile.lost_grace_s) {
                Verdict::Lost
            } else {
                Verdict::Wait
            }
        }
    }
}

fn fail(o: &mut Option<StageOutcome>, s: &mut State, stage: &PlannedStage, error: String) {
    let mut out = outcome(stage, RunStatus::Failed, BTreeMap::new());
    out.error = Some(error);
    *o = Some(out);
    *s = State::Failed;
}

fn outcome(
    stage: &PlannedStage,
    status: RunStatus,
    outputs: BTreeMap<String, PathBuf>,
) -> StageOutcome {
    crate::executor::outcome(stage, status, outputs)
}

fn set_refs(cache: &Cache, stage: &PlannedStage) {
    crate::executor::set_refs(cache, stage)
}
