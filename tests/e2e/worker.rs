//! One stage instance, one worker process: a worker that dies fails only its instance, the
//! summary names how it died, a re-run resumes, a job description runs by hand, and the
//! progress bars of concurrent jobs share the terminal.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const TRAIN: &str = "
seed: 3
data: { kind: synthetic, n: 32, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.1 }
diffusion: { steps: 40, schedule: cosine }
stages:
";

fn train_stage(name: &str, steps: usize) -> String {
    format!(
        "  {name}: {{ kind: train, steps: {steps}, batch_size: 4, lr: 1.0e-3, ema: 0.9, \
         log_every: 50, checkpoint_every: 5 }}\n"
    )
}

/// The pid of the worker running the job of `key`, from `/proc`.
fn worker_pid(key: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("progdiff-worker") && cmdline.contains(key) {
            return Some(pid);
        }
    }
    None
}

fn key_of(p: &Project, manifest: &str, id: &str) -> String {
    let (_, plan) = p.json(&["plan", "--json", manifest]);
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no stage `{id}`"))["key"]
        .as_str()
        .unwrap()
        .to_string()
}

fn work_checkpoint(cache: &Path, key: &str) -> PathBuf {
    cache.join("v1/work").join(key).join("latest")
}

fn digests(v: &serde_json::Value, id: &str) -> Vec<String> {
    let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
    ["model.safetensors", "ema.safetensors"]
        .iter()
        .map(|k| {
            Path::new(s["outputs"][*k].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn a_worker_killed_mid_training_fails_only_its_instance_and_the_rerun_resumes() {
    let manifest = format!("name: kill{TRAIN}{}{}", train_stage("a", 150), train_stage("b", 30));
    // What an uninterrupted run produces.
    let whole = Project::new();
    whole.write("m.yaml", &manifest);
    let (out, expected) = whole.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let p = Project::new();
    p.write("m.yaml", &manifest);
    let key = key_of(&p, "m.yaml", "a");
    let child = p
        .cmd(&["run", "--json", "--jobs", "2", "m.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !work_checkpoint(&p.cache(), &key).exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "`a` never saved a checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = worker_pid(&key).expect("the worker of `a` is running");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(killed.unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status_of(&v, "a"), "failed");
    assert_eq!(status_of(&v, "b"), "ran", "the sibling goes on");
    let a = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "a").unwrap();
    let error = a["error"].as_str().unwrap();
    assert!(error.starts_with("the worker was killed by signal 9 (SIGKILL)"), "{error}");
    assert!(error.contains("last lines of its log:"), "{error}");
    let log = a["log"].as_str().unwrap();
    assert!(error.ends_with(&format!("log: {log}")), "{error}");
    assert!(std::fs::read_to_string(log).unwrap().contains("running"), "the log is kept");
    // Nothing was published for `a`.
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "a"), "run");
    assert_eq!(status_of(&plan, "b"), "cached");

    // The re-run resumes from the work area and ends with the uninterrupted run's weights.
    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status_of(&v, "a"), "ran");
    assert_eq!(digests(&v, "a"), digests(&expected, "a"));
    assert_eq!(digests(&v, "b"), digests(&expected, "b"));
    let log = p.run(&["log", "m.yaml", "a"]);
    assert!(log.status.success());
    assert!(stdout(&log).contains("resuming from the work area"), "{}", stdout(&log));
    assert!(p.run(&["cache", "verify"]).status.success());
}

#[test]
fn a_segfault_or_an_abort_fails_its_instance_clearly_and_the_run_goes_on() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "stages:
  own: { kind: command, run: 'kill -SEGV $$' }
  worker: { kind: command, run: 'kill -ABRT $PPID; sleep 5' }
  fine: { kind: command, run: 'echo ok > $PROGDIFF_OUT/ok' }
  after: { kind: command, needs: [own], run: 'true' }
",
    );
    let (out, v) = p.json(&["run", "--json", "--jobs", "2", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(status_of(&v, "fine"), "ran");
    assert_eq!(status_of(&v, "after"), "skipped");
    let error = |id: &str| -> String {
        let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
        assert_eq!(s["status"], "failed", "{s:#}");
        s["error"].as_str().unwrap().to_string()
    };
    // The command died of SIGSEGV: its worker says so.
    let own = error("own");
    assert!(own.contains("SIGSEGV"), "{own}");
    // The worker itself died (SIGABRT, as an abort in libtorch): the coordinator says so.
    // (A SIGSEGV sent with `kill` is absorbed once by Rust's stack-overflow handler.)
    let worker = error("worker");
    assert!(worker.starts_with("the worker was killed by signal 6 (SIGABRT)"), "{worker}");
    assert!(p.run(&["cache", "verify"]).status.success());
}

#[test]
fn a_job_description_runs_by_hand_and_an_edited_one_is_refused() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "seed: 4
stages:
  make: { kind: command, run: 'echo $PROGDIFF_SEED > $PROGDIFF_OUT/seed.txt' }
",
    );
    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = v["stages"][0]["key"].as_str().unwrap().to_string();
    let job = p.cache().join("v1/jobs").join(&key[..2]).join(format!("{key}.json"));
    assert!(job.is_file(), "the job description is kept in the cache");
    let worker = Path::new(env!("CARGO_BIN_EXE_progdiff")).with_file_name("progdiff-worker");

    // Already in the cache: a hit.
    let out = std::process::Command::new(&worker).arg("exec").arg(&job).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("found in the cache"), "{}", stderr(&out));

    // Without its record, the same description recomputes the same output.
    std::fs::remove_file(p.cache().join("v1/records").join(&key[..2]).join(format!("{key}.json")))
        .unwrap();
    let out = std::process::Command::new(&worker).arg("exec").arg(&job).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "make"), "cached");

    // An edited description hashes to another key: refused, nothing published.
    let mut edited: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&job).unwrap()).unwrap();
    edited["inputs"]["seed"] = 5.into();
    let path = p.path().join("edited.json");
    std::fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
    let out = std::process::Command::new(&worker).arg("exec").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to run `make`"), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("not to the key {key} it was planned with")));
}

#[test]
fn progress_bars_of_concurrent_jobs_share_the_terminal() {
    let p = Project::new();
    let manifest =
        format!("name: bars{TRAIN}{}{}", train_stage("alpha", 120), train_stage("beta", 120));
    p.write("m.yaml", &manifest);
    let progdiff = env!("CARGO_BIN_EXE_progdiff");
    // `script` gives the run a pseudo-terminal; its output is what a terminal would show.
    let out = std::process::Command::new("script")
        .args([
            "-qfec",
            &format!("stty cols 120 rows 40; {progdiff} run --jobs 2 m.yaml"),
            "/dev/null",
        ])
        .current_dir(p.path())
        .env("PROGDIFF_CACHE_DIR", p.cache())
        .env("PROGDIFF_THREADS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    // Replay the bytes through a terminal emulator and look at every state of the screen.
    let mut parser = vt100::Parser::new(40, 120, 0);
    let mut both = false;
    for chunk in out.stdout.chunks(64) {
        parser.process(chunk);
        let rows: Vec<String> = parser.screen().rows(0, 120).collect();
        let screen = rows.join("\n");
        let bars: Vec<&str> =
            rows.iter().map(|r| r.as_str()).filter(|l| l.contains("] ")).collect();
        for line in &bars {
            let ids = ["alpha", "beta"].iter().filter(|id| line.contains(*id)).count();
            assert!(ids <= 1, "two jobs on one line:\n{screen}");
            assert!(
                line.starts_with("alpha") || line.starts_with("beta"),
                "a bar line that does not start with its job:\n{screen}"
            );
        }
        both |= bars.iter().any(|l| l.starts_with("alpha"))
            && bars.iter().any(|l| l.starts_with("beta"));
    }
    assert!(both, "the two bars were never on screen together");
    let end = parser.screen().contents();
    assert!(end.contains("2 ran, 0 hit, 0 failed, 0 skipped"), "{end}");

    // Piped, the same run (cached now) prints plain lines only.
    let out = p.run(&["run", "--jobs", "2", "m.yaml"]);
    assert!(out.status.success());
    assert!(
        !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
        "escape codes in piped output"
    );
}

#[test]
fn ctrl_c_saves_the_training_resume_state_and_the_rerun_resumes_from_it() {
    // No periodic checkpoint (`checkpoint_every` beyond the steps): only the interruption saves.
    let manifest = format!(
        "name: int{TRAIN}  t: {{ kind: train, steps: 400, batch_size: 4, lr: 1.0e-3, ema: 0.9, \
         log_every: 50, checkpoint_every: 1000 }}\n"
    );
    let whole = Project::new();
    whole.write("m.yaml", &manifest);
    let (out, expected) = whole.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let p = Project::new();
    p.write("m.yaml", &manifest);
    let key = key_of(&p, "m.yaml", "t");
    let child = p
        .cmd(&["run", "--json", "m.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the worker has trained a little: its first metrics line (step 50 of 400) in
    // its work area. Not a fixed sleep: on a fast machine 400 steps take well under a second,
    // and an interrupt after the last step has nothing to save.
    let t = Instant::now();
    let metrics = p.cache().join("v1/work").join(&key).join("metrics.jsonl");
    while !std::fs::read_to_string(&metrics).is_ok_and(|s| s.contains('\n')) {
        assert!(t.elapsed() < Duration::from_secs(60), "training never logged a step");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status_of(&v, "t"), "skipped");
    assert!(work_checkpoint(&p.cache(), &key).exists(), "the interrupted worker saved no state");
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "t"), "run", "nothing was published");

    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digests(&v, "t"), digests(&expected, "t"));
    let log = stdout(&p.run(&["log", "m.yaml", "t"]));
    assert!(log.contains("resuming from the work area"), "{log}");
}
