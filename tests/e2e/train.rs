//! The `train` stage through the binary: a run killed with SIGKILL mid-training resumes from its
//! last checkpoint and ends with exactly the weights of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const MANIFEST: &str = "
name: resume
seed: 3
data: { kind: synthetic, n: 32, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.1 }
diffusion: { steps: 40, schedule: cosine }
stages:
  base: { kind: train, steps: 150, batch_size: 4, lr: 1.0e-3, ema: 0.9, log_every: 50, checkpoint_every: 5 }
";

fn find_latest(dir: &Path) -> Option<PathBuf> {
    let work = dir.join("v1").join("work");
    std::fs::read_dir(work).ok()?.flatten().map(|e| e.path().join("latest")).find(|p| p.exists())
}

fn outputs(v: &serde_json::Value) -> Vec<String> {
    let o = v["stages"][0]["outputs"].as_object().unwrap();
    // Content-addressed: the object's file name is the blake3 digest of its bytes.
    ["model.safetensors", "ema.safetensors", "metrics.jsonl"]
        .iter()
        .map(|k| {
            Path::new(o[*k].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect()
}

#[test]
fn a_killed_training_run_resumes_to_identical_weights() {
    let whole = Project::new();
    whole.write("m.yaml", MANIFEST);
    let (out, v) = whole.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = outputs(&v);

    let p = Project::new();
    p.write("m.yaml", MANIFEST);
    let mut child =
        p.cmd(&["run", "m.yaml"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while find_latest(&p.cache()).is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoint was written");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "base"), "run", "the run finished before it was killed");

    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(outputs(&v)[..2], expected[..2], "weights differ after resuming");
    // The metrics log is rebuilt too (timings aside): same steps, same losses.
    let metrics = |v: &serde_json::Value| -> Vec<(u64, String)> {
        std::fs::read_to_string(v["stages"][0]["outputs"]["metrics.jsonl"].as_str().unwrap())
            .unwrap()
            .lines()
            .map(|l| {
                let j: serde_json::Value = serde_json::from_str(l).unwrap();
                (j["step"].as_u64().unwrap(), j["loss"].to_string())
            })
            .collect()
    };
    let (_, again) = whole.json(&["run", "--json", "m.yaml"]);
    assert_eq!(metrics(&v), metrics(&again));
    assert!(p.run(&["cache", "verify"]).status.success());
}

/// Issue 17: `metrics.jsonl` records throughput (`samples_per_s`, wall-clock), so two identical
/// runs store different metrics objects; everything else in it, and the weights, are identical.
#[test]
fn identical_runs_differ_only_in_the_measured_throughput() {
    let tiny = MANIFEST.replace("steps: 150", "steps: 6").replace("log_every: 50", "log_every: 3");
    let runs: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let p = Project::new();
            p.write("m.yaml", &tiny);
            let (out, v) = p.json(&["run", "--json", "m.yaml"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let metrics: Vec<serde_json::Value> = std::fs::read_to_string(
                v["stages"][0]["outputs"]["metrics.jsonl"].as_str().unwrap(),
            )
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
            serde_json::json!({ "outputs": outputs(&v), "metrics": metrics })
        })
        .collect();
    assert_eq!(runs[0]["outputs"][0], runs[1]["outputs"][0], "model.safetensors");
    assert_eq!(runs[0]["outputs"][1], runs[1]["outputs"][1], "ema.safetensors");
    let without_timing = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|line| {
                let mut line = line.clone();
                let rate = line.as_object_mut().unwrap().remove("samples_per_s");
                assert!(rate.and_then(|r| r.as_f64()).is_some_and(|r| r > 0.0), "{line}");
                line
            })
            .collect()
    };
    assert_eq!(without_timing(&runs[0]), without_timing(&runs[1]));
    assert_eq!(without_timing(&runs[0]).len(), 2);
}

/// Issue 16: `--fast` reaches the worker (its log says so), is not part of the key (the result
/// is a cache hit for a run without it), and does nothing on the CPU (same weights); an unknown
/// name is refused before anything runs.
#[test]
fn fast_paths_reach_the_worker_and_leave_the_key_alone() {
    let manifest = MANIFEST
        .replace("steps: 150", "steps: 6")
        .replace("checkpoint_every: 5", "checkpoint_every: 0");
    let plain = Project::new();
    plain.write("m.yaml", &manifest);
    let (out, v) = plain.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let fast = Project::new();
    fast.write("m.yaml", &manifest);
    let bad = fast.run(&["run", "--fast", "cudnn,all", "m.yaml"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("unknown fast path `cudnn`, expected `all` or one of"),
        "{}",
        stderr(&bad)
    );
    let (out, f) = fast.json(&["run", "--json", "--fast", "all", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(outputs(&f)[..2], outputs(&v)[..2], "--fast changed a CPU result");
    assert_eq!(f["stages"][0]["key"], v["stages"][0]["key"]);
    let log = fast.run(&["log", "m.yaml", "base"]);
    assert!(stdout(&log).contains("GPU fast paths on"), "{}", stdout(&log));
}
