//! The `slurm` backend against a real single-node Slurm (`scripts/slurm-up`: two fake GPUs,
//! four CPUs). `scripts/test` starts it and sets `PROGDIFF_TEST_SLURM=required`; without that
//! variable these tests run only where `sinfo` answers, and say so when they skip.
//!
//! `sbatch` and `squeue` are wrapped by scripts on `PATH` that log each call (time, arguments)
//! before running the real command, so the tests count what the coordinator asks of Slurm.
//! nextest runs these tests one at a time (`.config/nextest.toml`): they share the cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Whether the tests can use Slurm; panics when it is required but missing.
fn slurm() -> bool {
    let up = std::process::Command::new("sinfo").args(["-h", "-o", "%T"]).output().is_ok_and(|o| {
        let s = String::from_utf8_lossy(&o.stdout);
        o.status.success() && s.lines().any(|l| ["idle", "mixed", "allocated"].contains(&l.trim()))
    });
    if !up {
        if std::env::var("PROGDIFF_TEST_SLURM").as_deref() == Ok("required") {
            panic!("PROGDIFF_TEST_SLURM=required but no Slurm node answers (scripts/slurm-up)");
        }
        eprintln!("skipped: no Slurm here (scripts/slurm-up starts one; root needed)");
    }
    up
}

const PROFILE: &str = "backend: slurm
slurm:
  poll_min_s: 0.3
  poll_max_s: 1.0
  lost_grace_s: 4
  signal_grace_s: 40
  max_requeues: 10
";

/// A project whose `progdiff` sees logging wrappers of `sbatch` and `squeue` first on `PATH`.
struct Cluster {
    p: Project,
    bin: PathBuf,
}

impl Cluster {
    fn new() -> Cluster {
        let p = Project::new();
        p.write("progdiff.profile.yaml", PROFILE);
        let bin = p.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for tool in ["sbatch", "squeue"] {
            let real = which(tool);
            let script = format!(
                "#!/bin/bash\nprintf '%s %s\\n' \"$(date +%s.%N)\" \"$*\" >> {log}\n{hide}exec {real} \"$@\"\n",
                log = bin.join(format!("{tool}.log")).display(),
                real = real.display(),
                // `squeue` hides the jobs listed in `hidden` (a job the controller lost).
                hide = if tool == "squeue" {
                    format!(
                        "if [ -s {h} ]; then {real} \"$@\" | grep -v -E -f {h}; exit 0; fi\n",
                        h = bin.join("hidden").display(),
                        real = real.display()
                    )
                } else {
                    String::new()
                }
            );
            let path = bin.join(tool);
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Cluster { p, bin }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = self.p.cmd(args);
        let path = std::env::var("PATH").unwrap_or_default();
        // Jobs inherit this environment: the wrappers, and short leases (a killed worker's
        // lease lapses in seconds).
        c.env("PATH", format!("{}:{path}", self.bin.display())).env("PROGDIFF_LEASE_TTL_S", "5");
        c
    }

    fn run(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let out = self.cmd(args).output().unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", stdout(&out), stderr(&out))
        });
        (out, v)
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Logged calls of `tool`: (unix time, arguments).
    fn calls(&self, tool: &str) -> Vec<(f64, String)> {
        std::fs::read_to_string(self.bin.join(format!("{tool}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, args) = l.split_once(' ')?;
                Some((t.parse().ok()?, args.to_string()))
            })
            .collect()
    }
}

fn which(tool: &str) -> PathBuf {
    let out = std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
    PathBuf::from(String::from_utf8_lossy(&out.unwrap().stdout).trim())
}

/// The job name every job of `cache` carries (as the coordinator computes it).
fn queue_of(cache: &Path) -> Vec<(String, String)> {
    let root = std::path::absolute(cache).unwrap();
    let digest = blake3::hash(root.to_string_lossy().as_bytes()).to_hex().to_string();
    let name = format!("progdiff-{}", &digest[..12]);
    let out = std::process::Command::new("squeue")
        .args(["--noheader", "--states=all", "--array", "--name", &name, "--format=%i|%T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once('|').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stage<'a>(v: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no `{id}`"))
}

/// Output name -> object file name (its digest) of every instance.
fn digests(v: &serde_json::Value, skip: &[&str]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for s in v["stages"].as_array().unwrap() {
        for (name, path) in s["outputs"].as_object().unwrap() {
            if skip.contains(&name.as_str()) {
                continue;
            }
            let file = Path::new(path.as_str().unwrap()).file_name().unwrap();
            out.push((
                s["id"].as_str().unwrap().into(),
                name.clone(),
                file.to_string_lossy().into(),
            ));
        }
    }
    out
}

const PIPELINE: &str = "name: pipeline
seed: 2
data: { kind: synthetic, n: 32, image_size: 8, channels: gray, seed: 1 }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.1 }
diffusion: { steps: 40, schedule: cosine, sample_steps: '10' }
stages:
  base: { kind: train, steps: 20, batch_size: 4, lr: 1.0e-3, ema: 0.9, log_every: 10 }
  allocate: { kind: snr-allocate, groups: 2, k: 0.5 }
  finetune: { kind: train, needs: [base, allocate], for_each: group, steps: 10, batch_size: 4,
              lr: 1.0e-3, ema: 0.9, log_every: 5 }
  eval: { kind: evaluate, needs: [finetune, allocate], samples: 8, batch_size: 8, grid: 4 }
";

#[test]
fn slurm_runs_a_pipeline_with_the_keys_and_outputs_of_a_local_run() {
    if !slurm() {
        return;
    }
    let local = Project::new();
    local.write("m.yaml", PIPELINE);
    let (out, lv) = local.json(&["run", "--json", "--backend", "local", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let c = Cluster::new();
    c.p.write("m.yaml", PIPELINE);
    let (out, plan) = c.run(&["plan", "--json", "m.yaml"]);
    assert!(out.status.success());
    assert_eq!(plan["backend"], "slurm", "the profile next to the manifest picks the backend");
    let (out, sv) = c.run(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sv["counts"]["ran"], 5);
    let keys = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].as_str().unwrap().into(), s["key"].as_str().unwrap().into()))
            .collect()
    };
    assert_eq!(keys(&sv), keys(&lv), "the same keys");
    // The same bytes, timings aside (`metrics.jsonl` and `metrics.json` hold wall-clock rates).
    let skip = ["metrics.jsonl", "metrics.json"];
    assert_eq!(digests(&sv, &skip), digests(&lv, &skip), "the same outputs");
    let sbatch = c.calls("sbatch").len();
    // base + allocate, the two fine-tunings in one array, eval.
    assert_eq!(sbatch, 4, "{:?}", c.calls("sbatch"));
    // Every instance's log has the worker's lines and the Slurm job's header.
    let log = std::fs::read_to_string(stage(&sv, "finetune[1]")["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("slurm job ") && log.contains("running"), "{log}");

    let (out, again) = c.run(&["run", "--json", "m.yaml"]);
    assert!(out.status.success());
    assert_eq!(again["counts"]["hit"], 5);
    assert_eq!(c.calls("sbatch").len(), sbatch, "a second run submits nothing");
}

#[test]
fn slurm_submits_siblings_as_one_array_and_polls_once_per_cycle() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "diffusion: { steps: 100, schedule: cosine }
stages:
  allocate: { kind: snr-allocate, groups: 10, k: 0.5, schedule: increasing }
  each: { kind: command, needs: allocate, for_each: group,
          run: 'sleep 1; echo $PROGDIFF_GROUP > $PROGDIFF_OUT/g' }
",
    );
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(v["counts"]["ran"], 11);
    let sbatch = c.calls("sbatch");
    assert_eq!(sbatch.len(), 2, "{sbatch:?}");
    assert!(sbatch[1].1.contains("--array=0-9"), "{}", sbatch[1].1);
    // One `squeue` per polling cycle: cycles are at least `poll_min_s` (0.3 s) apart.
    let squeue = c.calls("squeue");
    assert!(squeue.len() >= 3, "{squeue:?}");
    for w in squeue.windows(2) {
        assert!(w[1].0 - w[0].0 >= 0.25, "two squeue calls in one cycle: {w:?}");
    }
}

#[test]
fn slurm_gpu_jobs_share_the_two_gpus_and_an_impossible_request_fails_at_submit() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "diffusion: { steps: 100, schedule: cosine }
stages:
  allocate: { kind: snr-allocate, groups: 3, k: 0.5, schedule: increasing }
  gpu:
    kind: command
    needs: allocate
    for_each: group
    resources: { gpus: 1, cpus: 1 }
    run: 'date +%s.%N > $PROGDIFF_OUT/start; echo \"$CUDA_VISIBLE_DEVICES\" > $PROGDIFF_OUT/dev; sleep 3; date +%s.%N > $PROGDIFF_OUT/end'
",
    );
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |id: &str, f: &str| -> String {
        std::fs::read_to_string(stage(&v, id)["outputs"][f].as_str().unwrap())
            .unwrap()
            .trim()
            .to_string()
    };
    let mut spans = Vec::new();
    for g in 0..3 {
        let id = format!("gpu[{g}]");
        let dev = read(&id, "dev");
        assert!(dev == "0" || dev == "1", "`{id}` sees CUDA_VISIBLE_DEVICES={dev:?}");
        spans.push((
            read(&id, "start").parse::<f64>().unwrap(),
            read(&id, "end").parse::<f64>().unwrap(),
        ));
    }
    // Four CPUs, two GPUs: the GPUs are the limit. Two jobs ran at once, never three.
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap();
    assert_eq!(most, 2, "GPU jobs at once: {spans:?}");

    let c = Cluster::new();
    c.p.write("m.yaml", "stages:\n  big: { kind: command, resources: { gpus: 3 }, run: 'true' }\n");
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let error = stage(&v, "big")["error"].as_str().unwrap();
    assert!(error.starts_with("sbatch refused big:"), "{error}");
    assert!(error.contains("--gres=gpu:3"), "{error}");
}

#[test]
fn slurm_failures_name_the_state_and_the_log_and_publish_nothing() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "stages:
  three: { kind: command, run: 'echo about to fail; exit 3' }
  cancelled: { kind: command, run: 'sleep 120' }
  slow: { kind: command, resources: { time: '1' }, run: 'sleep 300' }
  fine: { kind: command, run: 'echo ok > $PROGDIFF_OUT/ok' }
",
    );
    let child = c.spawn(&["run", "--json", "--jobs", "4", "m.yaml"]);
    // Cancel `cancelled` once it runs.
    let cache = c.p.cache();
    let mut cancelled = None;
    wait_for("the `cancelled` job to run", Duration::from_secs(60), || {
        let jobs =
            std::fs::read_dir(cache.join("v1/slurm/keys")).ok().into_iter().flatten().count();
        if jobs < 4 {
            return false;
        }
        for (job, state) in queue_of(&cache) {
            let comment = std::process::Command::new("squeue")
                .args(["--noheader", "--format=%k", "--jobs", &job])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&comment.stdout).trim() == "cancelled" && state == "RUNNING"
            {
                cancelled = Some(job);
                return true;
            }
        }
        false
    });
    let status = std::process::Command::new("scancel").arg(cancelled.unwrap()).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stage(&v, "fine")["status"], "ran");
    for (id, state) in [("three", "FAILED"), ("cancelled", "CANCELLED"), ("slow", "TIMEOUT")] {
        let s = stage(&v, id);
        assert_eq!(s["status"], "failed", "{s:#}");
        let error = s["error"].as_str().unwrap();
        assert!(error.contains(&format!(" ended {state}")), "`{id}`: {error}");
        let log = s["log"].as_str().unwrap();
        assert!(error.ends_with(&format!("log: {log}")), "`{id}`: {error}");
    }
    let three = stage(&v, "three")["error"].as_str().unwrap();
    assert!(three.contains("exit status: 3") && three.contains("about to fail"), "{three}");
    let (_, plan) = c.p.json(&["plan", "--json", "m.yaml"]);
    for id in ["three", "cancelled", "slow"] {
        assert_eq!(status_of(&plan, id), "run", "`{id}` published nothing");
    }
}

#[test]
fn slurm_resubmits_a_job_that_left_the_queue_without_a_marker() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    let flag = c.p.path().join("first-attempt-done");
    // The first attempt kills its batch script and worker (no exit marker, nothing published);
    // the job is then hidden from `squeue`, as if the controller had lost it.
    c.p.write(
        "m.yaml",
        &format!(
            "stages:
  flaky:
    kind: command
    run: |
      if [ ! -e {flag} ]; then
        touch {flag}
        sleep 1
        kill -KILL $(ps -o ppid= -p $PPID) $PPID
      fi
      echo ok > $PROGDIFF_OUT/ok
",
            flag = flag.display()
        ),
    );
    let child = c.spawn(&["run", "--json", "m.yaml"]);
    let key_dir = c.p.cache().join("v1/slurm/keys");
    let mut first = None;
    wait_for("the first attempt", Duration::from_secs(60), || {
        if !flag.exists() {
            return false;
        }
        let rec = walk_one(&key_dir);
        first = rec.map(|r| r["job"].as_str().unwrap().to_string());
        first.is_some()
    });
    std::fs::write(c.bin.join("hidden"), format!("^ *{}([|]|$)\n", first.clone().unwrap()))
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stage(&v, "flaky")["status"], "ran");
    assert_eq!(c.calls("sbatch").len(), 2, "submitted again after the grace period");
    assert!(stderr(&out).contains("left the queue without an exit marker; submitting again"));
}

/// The first JSON file in the shards of `dir`.
fn walk_one(dir: &Path) -> Option<serde_json::Value> {
    let shard = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let file = std::fs::read_dir(shard.path()).ok()?.flatten().next()?;
    serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()
}

const LONG_TRAIN: &str = "name: long
seed: 4
data: { kind: synthetic, n: 32, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.1 }
diffusion: { steps: 40, schedule: cosine }
stages:
";

fn model_digests(v: &serde_json::Value, id: &str) -> Vec<String> {
    ["model.safetensors", "ema.safetensors"]
        .iter()
        .map(|k| {
            let p = stage(v, id)["outputs"][*k].as_str().unwrap();
            Path::new(p).file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect()
}

/// Makes the requeued jobs of `cache` eligible early (Slurm holds a requeued job about two
/// minutes). Only once a job has waited a few seconds: a job started again within a second of
/// its requeue is refused by slurmd ("Job credential revoked"). True when one was released.
fn release_requeued(cache: &Path, seen: &mut std::collections::HashMap<String, Instant>) -> bool {
    let mut released = false;
    for (job, state) in queue_of(cache) {
        let out = std::process::Command::new("squeue")
            .args(["--noheader", "--format=%r", "--jobs", &job])
            .output()
            .unwrap();
        let reason = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state != "PENDING" || reason != "BeginTime" {
            seen.remove(&job);
            continue;
        }
        let since = *seen.entry(job.clone()).or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_secs(3) {
            let _ = std::process::Command::new("scontrol")
                .args(["update", &format!("jobid={job}"), "StartTime=now"])
                .output();
            seen.remove(&job);
            released = true;
        }
    }
    released
}

#[test]
fn slurm_requeued_training_resumes_to_the_bits_of_an_uninterrupted_run() {
    if !slurm() {
        return;
    }
    let manifest = format!(
        "{LONG_TRAIN}  t: {{ kind: train, steps: 300, batch_size: 4, lr: 1.0e-3, ema: 0.9, \
         log_every: 50, checkpoint_every: 20 }}\n"
    );
    let local = Project::new();
    local.write("m.yaml", &manifest);
    let (out, expected) = local.json(&["run", "--json", "--backend", "local", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let c = Cluster::new();
    c.p.write("m.yaml", &manifest);
    let key =
        stage(&c.p.json(&["plan", "--json", "m.yaml"]).1, "t")["key"].as_str().unwrap().to_string();
    let child = c.spawn(&["run", "--json", "m.yaml"]);
    let latest = c.p.cache().join("v1/work").join(&key).join("latest");
    wait_for("a checkpoint", Duration::from_secs(120), || latest.exists());
    let (job, _) =
        queue_of(&c.p.cache()).into_iter().find(|(_, s)| s == "RUNNING").expect("running");
    assert!(
        std::process::Command::new("scontrol").args(["requeue", &job]).status().unwrap().success()
    );
    let mut seen = std::collections::HashMap::new();
    wait_for("the requeued job to be released", Duration::from_secs(60), || {
        release_requeued(&c.p.cache(), &mut seen)
    });
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model_digests(&v, "t"), model_digests(&expected, "t"));
    let log = std::fs::read_to_string(stage(&v, "t")["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("restart 1") && log.contains("resuming from the work area"), "{log}");
}

#[test]
fn slurm_training_checkpoints_on_the_time_limit_signal_requeues_and_finishes() {
    if !slurm() {
        return;
    }
    // More than a minute of training on one thread even on a quiet machine (about 90 steps/s
    // here then; up to four times slower under load): more than one 1-minute job, whose
    // `SIGUSR2` (40 s before the limit, Slurm checks every 30 s) checkpoints and requeues it.
    // Resume state is saved only when interrupted (`checkpoint_every` beyond the steps).
    let manifest = format!(
        "{LONG_TRAIN}  t: {{ kind: train, steps: 7000, batch_size: 4, lr: 1.0e-3, ema: 0.9, \
         log_every: 1000, checkpoint_every: 100000, resources: {{ time: '1' }} }}\n"
    );
    let c = Cluster::new();
    c.p.write("m.yaml", &manifest);
    let child = c.spawn(&["run", "--json", "m.yaml"]);
    let cache = c.p.cache();
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut seen = std::collections::HashMap::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                release_requeued(&cache, &mut seen);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let out = child.wait_with_output().unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let log = std::fs::read_to_string(stage(&v, "t")["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("SIGUSR2: saving state to be requeued"), "{log}");
    assert!(log.contains("checkpointed: requeueing"), "{log}");
    assert!(log.contains("resuming from the work area"), "{log}");
    // It finished every step (bit-identity after a requeue is the previous test's).
    let metrics =
        std::fs::read_to_string(stage(&v, "t")["outputs"]["metrics.jsonl"].as_str().unwrap())
            .unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 7000);
}

#[test]
fn slurm_coordinators_share_a_cache_and_a_restarted_one_reattaches() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "diffusion: { steps: 100, schedule: cosine }
stages:
  allocate: { kind: snr-allocate, groups: 2, k: 0.5, schedule: increasing }
  each: { kind: command, needs: allocate, for_each: group,
          run: 'sleep 4; echo $PROGDIFF_GROUP > $PROGDIFF_OUT/g' }
  last: { kind: command, needs: each, run: 'echo done > $PROGDIFF_OUT/d' }
",
    );
    // Two coordinators at once on one cache: every key is computed once.
    let a = c.spawn(&["run", "--json", "m.yaml"]);
    let b = c.spawn(&["run", "--json", "m.yaml"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", stderr(&a), stderr(&b));
    let logs = c.p.cache().join("v1/logs");
    let mut computed = 0;
    for shard in std::fs::read_dir(&logs).unwrap().flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(f.path()).unwrap();
                assert!(text.matches(" running").count() <= 1, "computed twice:\n{text}");
                computed += text.matches(" running").count();
            }
        }
    }
    assert_eq!(computed, 4);

    // A coordinator killed mid-run; a new one re-attaches to the running jobs.
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "diffusion: { steps: 100, schedule: cosine }
stages:
  allocate: { kind: snr-allocate, groups: 2, k: 0.5, schedule: increasing }
  each: { kind: command, needs: allocate, for_each: group,
          run: 'sleep 6; echo $PROGDIFF_GROUP > $PROGDIFF_OUT/g' }
",
    );
    let mut first = c.spawn(&["run", "--json", "m.yaml"]);
    wait_for("the array to run", Duration::from_secs(60), || {
        queue_of(&c.p.cache()).iter().filter(|(j, s)| j.contains('_') && s == "RUNNING").count()
            == 2
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let before = c.calls("sbatch").len();
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c.calls("sbatch").len(), before, "re-attached without submitting again");
    assert!(stderr(&out).contains("attached to its running Slurm job"), "{}", stderr(&out));
    assert_eq!(stage(&v, "each[0]")["status"], "ran");
    assert_eq!(stage(&v, "each[1]")["status"], "ran");
}

#[test]
fn slurm_ctrl_c_cancels_the_runs_jobs() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write("m.yaml", "stages:\n  long: { kind: command, run: 'sleep 120' }\n");
    let child = c.spawn(&["run", "--json", "m.yaml"]);
    wait_for("the job to run", Duration::from_secs(60), || {
        queue_of(&c.p.cache()).iter().any(|(_, s)| s == "RUNNING")
    });
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    wait_for("the job to be cancelled", Duration::from_secs(30), || {
        queue_of(&c.p.cache()).iter().all(|(_, s)| s.starts_with("CANCELLED"))
    });
}

/// The files under `dir` (recursively), by name, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

#[test]
fn slurm_gc_removes_the_job_files_of_finished_stages_and_spares_live_jobs() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    c.p.write(
        "m.yaml",
        "stages:
  ok: { kind: command, run: 'echo ok > $PROGDIFF_OUT/ok' }
  bad: { kind: command, run: 'echo broken; exit 3' }
",
    );
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let job_of = |id: &str| {
        let log = std::fs::read_to_string(stage(&v, id)["log"].as_str().unwrap()).unwrap();
        let line = log.lines().find(|l| l.contains("slurm job ")).unwrap().to_string();
        line.split("slurm job ").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let (ok, bad) = (job_of("ok"), job_of("bad"));
    let slurm = c.p.cache().join("v1/slurm");
    let markers = || {
        files_under(&c.p.cache().join("v1/logs"))
            .into_iter()
            .filter(|n| n.ends_with(".exit.json"))
            .count()
    };
    let (keys, outs) = (|| files_under(&slurm.join("keys")), || files_under(&slurm.join("out")));
    assert_eq!((keys().len(), markers()), (2, 2));
    assert_eq!(outs(), [format!("{bad}.out"), format!("{ok}.out")]);
    assert_eq!(files_under(&slurm.join("scripts")).len(), 2);

    // Live jobs of other manifests: one running, one pending (held: submitted with `--hold`).
    c.p.write("long.yaml", "stages:\n  long: { kind: command, run: 'sleep 120' }\n");
    let child = c.spawn(&["run", "--json", "long.yaml"]);
    c.p.write("held.profile.yaml", &format!("{PROFILE}  extra: ['--hold']\n"));
    c.p.write("held.yaml", "stages:\n  held: { kind: command, run: 'echo $PROGDIFF_OUT' }\n");
    let held_key = {
        let (_, plan) = c.p.json(&["plan", "--json", "held.yaml"]);
        stage(&plan, "held")["key"].as_str().unwrap().to_string()
    };
    let held = c.spawn(&["run", "--json", "--profile", "held.profile.yaml", "held.yaml"]);
    let description =
        c.p.cache().join("v1/jobs").join(&held_key[..2]).join(format!("{held_key}.json"));
    wait_for("the long job to run and the held one to wait", Duration::from_secs(60), || {
        let q = queue_of(&c.p.cache());
        q.iter().any(|(_, s)| s == "RUNNING")
            && q.iter().any(|(_, s)| s == "PENDING")
            && keys().len() == 4
    });
    assert!(description.exists());
    let out = c.cmd(&["cache", "gc", "--dry-run", "m.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("would remove 1 Slurm job records, 1 exit markers, 1 Slurm output files, 0 batch scripts"), "{}", stdout(&out));
    assert_eq!((keys().len(), markers(), outs().len()), (4, 2, 3), "a dry run removes nothing");
    // Keeping m.yaml: `ok` is complete, its job files go; the failed `bad` keeps them (its output
    // says why); the live jobs keep theirs, and the pending one its job description, which it
    // reads when it starts (no manifest keeps it, and no lock of a running stage protects it);
    // the scripts are too young.
    let out = c.cmd(&["cache", "gc", "m.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "removed 1 Slurm job records, 1 exit markers, 1 Slurm output files, 0 batch scripts"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "left 2 stages' Slurm files (and, if unfinished, their job descriptions and work \
             areas) alone: their jobs are still queued or running"
        ),
        "{text}"
    );
    assert_eq!((keys().len(), markers()), (3, 1));
    assert!(!outs().contains(&format!("{ok}.out")) && outs().contains(&format!("{bad}.out")));
    assert!(description.exists(), "gc removed the pending job's description:\n{text}");
    // Released, the held job runs its stage.
    let held_job = queue_of(&c.p.cache()).into_iter().find(|(_, s)| s == "PENDING").unwrap().0;
    let released = std::process::Command::new("scontrol").args(["release", &held_job]).status();
    assert!(released.unwrap().success());
    let out = held.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stage(&v, "held")["status"], "ran");

    // The long run stopped (its job cancelled), the scripts aged: keeping nothing, all go.
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.unwrap().success());
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    wait_for("the job to be cancelled", Duration::from_secs(30), || {
        queue_of(&c.p.cache()).iter().all(|(_, s)| !["RUNNING", "COMPLETING"].contains(&s.as_str()))
    });
    // The batch script writes the exit marker once the worker it signalled has ended.
    let t = Instant::now();
    while markers() < 2 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for e in std::fs::read_dir(slurm.join("scripts")).unwrap() {
        let f = std::fs::File::options().write(true).open(e.unwrap().path()).unwrap();
        f.set_modified(two_hours_ago).unwrap();
    }
    let out = c.cmd(&["cache", "gc"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Slurm output files, 4 batch scripts"), "{}", stdout(&out));
    assert_eq!((keys(), markers(), outs()), (vec![], 0, vec![]), "{}", stdout(&out));
    assert_eq!(files_under(&slurm.join("scripts")), Vec::<String>::new());
}

// Without a cluster: what `plan --backend slurm` shows, and mistakes in resources and profiles.

#[test]
fn plan_for_slurm_shows_the_arrays_and_resources_it_would_submit() {
    let p = Project::new();
    p.write(
        "progdiff.profile.yaml",
        "slurm: { account: lab, gpu_request: gpus }
resources:
  default: { cpus: 2, mem: 8G, time: '1:00:00' }
  train: { gpus: 1, gpu_type: a100 }
",
    );
    p.write(
        "m.yaml",
        "data: { kind: synthetic, n: 8, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1 }
diffusion: { steps: 40, schedule: cosine }
stages:
  base: { kind: train, steps: 2, batch_size: 2, resources: { time: '2-00:00:00' } }
  allocate: { kind: snr-allocate, groups: 3 }
  finetune: { kind: train, needs: [base, allocate], for_each: group, steps: 2, batch_size: 2 }
",
    );
    let (out, v) = p.json(&["plan", "--json", "--backend", "slurm", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(v["backend"], "slurm");
    let subs = v["submissions"].as_array().unwrap();
    assert_eq!(subs.len(), 3, "{subs:#?}");
    assert_eq!(subs[0]["instances"], serde_json::json!(["base"]));
    assert_eq!(subs[0]["resources"]["time"], "2-00:00:00", "the stage's resources win");
    assert_eq!(subs[0]["resources"]["gpus"], 1, "the kind's resources from the profile");
    assert_eq!(subs[0]["requeue"], true, "training requeues on the time-limit signal");
    assert_eq!(subs[1]["resources"]["gpus"], serde_json::Value::Null);
    assert_eq!(subs[1]["resources"]["mem"], "8G", "the profile's default");
    assert_eq!(subs[2]["array"], true);
    assert_eq!(subs[2]["instances"].as_array().unwrap().len(), 3);
    let text = stdout(&p.run(&["plan", "--backend", "slurm", "m.yaml"]));
    assert!(
        text.contains(
            "array of 3 (finetune[0] .. finetune[2])  gpus=a100:1 cpus=2 mem=8G time=1:00:00"
        ),
        "{text}"
    );
    // The local backend shows no submissions.
    let (_, v) = p.json(&["plan", "--json", "--backend", "local", "m.yaml"]);
    assert!(v.get("submissions").is_none());
}

#[test]
fn resources_and_profile_mistakes_are_reported_where_they_are() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "stages:
  a: { kind: command, run: 'true', resources: { time: '1h', mem: lots, gpuz: 1 }, retries: -1 }
",
    );
    let out = p.run(&["validate", "m.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("m.yaml:2:")
            && err.contains("`stages.a.resources.gpuz`: unknown field `gpuz`"),
        "{err}"
    );
    assert!(err.contains("`stages.a.retries`: must be a whole number from 0 to 100"), "{err}");
    p.write(
        "m.yaml",
        "stages:\n  a: { kind: command, run: 'true', resources: { time: '1h', mem: lots } }\n",
    );
    let err = stderr(&p.run(&["validate", "m.yaml"]));
    assert!(
        err.contains("m.yaml:2:49: `stages.a.resources.time`: `1h` is not a Slurm time"),
        "{err}"
    );
    assert!(err.contains("`stages.a.resources.mem`: `lots` is not a memory size"), "{err}");

    p.write("m.yaml", "stages:\n  a: { kind: command, run: 'true' }\n");
    p.write("progdiff.profile.yaml", "backend: pbs\nslurm: { partitionz: x }\n");
    let out = p.run(&["plan", "m.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("progdiff.profile.yaml:1:1: `backend`: unknown variant `pbs`"), "{err}");
    assert!(err.contains("progdiff.profile.yaml:2:10: `slurm.partitionz`: unknown field"), "{err}");
    p.write("progdiff.profile.yaml", "resources: { train: { time: soon } }\n");
    let err = stderr(&p.run(&["run", "m.yaml"]));
    assert!(
        err.contains(
            "progdiff.profile.yaml:1:23: `resources.train.time`: `soon` is not a Slurm time"
        ),
        "{err}"
    );
}

#[test]
fn slurm_retries_resubmit_a_failed_job() {
    if !slurm() {
        return;
    }
    let c = Cluster::new();
    let flag = c.p.path().join("failed-once");
    c.p.write(
        "m.yaml",
        &format!(
            "stages:
  second-time: {{ kind: command, retries: 1,
                 run: 'if [ ! -e {f} ]; then touch {f}; exit 3; fi; echo ok > $PROGDIFF_OUT/ok' }}
  never: {{ kind: command, retries: 1, run: 'exit 4' }}
",
            f = flag.display()
        ),
    );
    let (out, v) = c.run(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stage(&v, "second-time")["status"], "ran");
    assert_eq!(stage(&v, "never")["status"], "failed");
    assert_eq!(c.calls("sbatch").len(), 4, "each submitted twice");
    assert!(stderr(&out).contains("ended FAILED; retrying"), "{}", stderr(&out));
}
