//! Planning, running and caching behaviour of the engine.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const FANOUT: &str = include_str!("../../manifests/ci/fanout.yaml");

#[test]
fn changing_k_reruns_allocation_and_downstream_but_not_base() {
    let p = Project::new();
    p.write("m.yaml", FANOUT);
    let out = p.run(&["run", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));

    p.write("m.yaml", &FANOUT.replace("k: 0.5", "k: 0.3"));
    let (out, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status_of(&plan, "base"), "cached");
    for (id, status, reasons) in stage_rows(&plan) {
        if id == "base" {
            continue;
        }
        assert_eq!(status, "run", "{id}");
        assert!(reasons.iter().any(|r| r.contains("`allocate.k` 0.5 -> 0.3")), "{id}: {reasons:?}");
    }
    let rows = stage_rows(&plan);
    let alloc = rows.iter().find(|r| r.0 == "allocate").unwrap();
    assert_eq!(alloc.2, vec!["`allocate.k` 0.5 -> 0.3".to_string()]);
    let g0 = rows.iter().find(|r| r.0 == "per_group[0]").unwrap();
    assert_eq!(g0.2, vec!["upstream `allocate` changed (`allocate.k` 0.5 -> 0.3)".to_string()]);

    // The human-readable plan says the same.
    let text = stdout(&p.run(&["plan", "m.yaml"]));
    assert!(text.contains("`allocate.k` 0.5 -> 0.3"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("cached") && l.contains("base")), "{text}");
}

#[test]
fn a_new_manifest_plans_never_run_and_an_input_change_is_named() {
    let p = Project::new();
    p.write("input.txt", "one");
    p.write(
        "m.yaml",
        "stages:\n  a: { kind: command, run: 'cat input.txt > $PROGDIFF_OUT/o', inputs: [input.txt] }\n",
    );
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(stage_rows(&plan)[0].2, vec!["never run".to_string()]);
    assert!(p.run(&["run", "m.yaml"]).status.success());
    p.write("input.txt", "two!");
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(stage_rows(&plan)[0].2, vec!["input `input.txt` changed".to_string()]);
}

#[test]
fn run_json_lists_outputs_in_the_cache() {
    let p = Project::new();
    p.write("m.yaml", FANOUT);
    let (out, v) = p.json(&["run", "--json", "--jobs", "2", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let gather = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "gather").unwrap();
    let all = std::fs::read_to_string(gather["outputs"]["all.txt"].as_str().unwrap()).unwrap();
    assert_eq!(all, "seed 0\ngroup 0\nseed 0\ngroup 1\nseed 0\ngroup 2\nseed 0\ngroup 3\n");
    let alloc = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "allocate").unwrap();
    assert!(
        alloc["outputs"]["allocation.json"]
            .as_str()
            .unwrap()
            .starts_with(p.cache().to_str().unwrap())
    );
}

#[test]
fn a_failing_stage_stops_its_dependents_and_lets_others_finish() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "stages:
  bad: { kind: command, run: 'echo nope >&2; exit 1' }
  after_bad: { kind: command, needs: bad, run: 'true' }
  good: { kind: command, run: 'sleep 0.2; echo ok > $PROGDIFF_OUT/ok' }
",
    );
    let (out, v) = p.json(&["run", "--json", "--jobs", "2", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(status_of(&v, "bad"), "failed");
    assert_eq!(status_of(&v, "after_bad"), "skipped");
    assert_eq!(status_of(&v, "good"), "ran");
    let bad = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "bad").unwrap();
    assert!(bad["error"].as_str().unwrap().contains("nope"));
    // Nothing of the failed stage was recorded: the next run tries it again.
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "bad"), "run");
    assert_eq!(status_of(&plan, "good"), "cached");
}

#[test]
fn two_concurrent_runs_compute_every_stage_once() {
    let p = Project::new();
    let log = p.path().join("calls.log");
    let text = format!(
        "diffusion: {{ steps: 40 }}
stages:
  base: {{ kind: command, run: 'echo base >> {log}; sleep 0.3; echo b > $PROGDIFF_OUT/b' }}
  allocate: {{ kind: snr-allocate, groups: 3 }}
  g: {{ kind: command, needs: [base, allocate], for_each: group, run: 'echo g$PROGDIFF_GROUP >> {log}; sleep 0.2; echo x > $PROGDIFF_OUT/x' }}
",
        log = log.display()
    );
    p.write("m.yaml", &text);
    let spawn = || {
        p.cmd(&["run", "--json", "--jobs", "2", "m.yaml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", stderr(&a), stderr(&b));
    let mut calls: Vec<String> =
        std::fs::read_to_string(&log).unwrap().lines().map(String::from).collect();
    calls.sort();
    assert_eq!(calls, vec!["base", "g0", "g1", "g2"]);
    // Between them, each instance ran once and was a hit once.
    let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    for id in ["base", "allocate", "g[0]", "g[1]", "g[2]"] {
        let mut s = [status_of(&va, id), status_of(&vb, id)];
        s.sort();
        assert_eq!(s, ["hit".to_string(), "ran".to_string()], "{id}");
    }
}

#[test]
fn kill_9_mid_stage_leaves_a_consistent_cache_and_the_rerun_completes() {
    let p = Project::new();
    let gate = p.path().join("gate");
    let started = p.path().join("started");
    std::fs::write(&gate, "").unwrap();
    let text = format!(
        "stages:
  slow:
    kind: command
    run: |
      echo partial > $PROGDIFF_OUT/model.bin
      touch {started}
      while [ -e {gate} ]; do sleep 0.05; done
      echo complete >> $PROGDIFF_OUT/model.bin
",
        started = started.display(),
        gate = gate.display()
    );
    p.write("m.yaml", &text);
    let mut child =
        p.cmd(&["run", "m.yaml"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while !started.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::fs::remove_file(&gate).unwrap();

    // No record and no object of the killed stage; only its staging leftovers, which are
    // reported as such, and swept by the next run.
    let out = p.run(&["cache", "verify"]);
    let report = stdout(&out);
    assert!(report.contains("checked 0 objects") && report.contains("0 records"), "{report}");
    assert!(!report.contains("corrupt object") && !report.contains("bad record"), "{report}");
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "slow"), "run");
    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = v["stages"][0]["outputs"]["model.bin"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(path).unwrap(), "partial\ncomplete\n");
    let out = p.run(&["cache", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn a_flipped_byte_in_an_object_is_reported_by_verify() {
    let p = Project::new();
    p.write("m.yaml", "stages:\n  a: { kind: command, run: 'echo hello > $PROGDIFF_OUT/o.txt' }\n");
    let (_, v) = p.json(&["run", "--json", "m.yaml"]);
    let obj = std::path::PathBuf::from(v["stages"][0]["outputs"]["o.txt"].as_str().unwrap());
    assert!(p.run(&["cache", "verify"]).status.success());
    let mut perms = std::fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&obj, perms).unwrap();
    let mut bytes = std::fs::read(&obj).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(&obj, bytes).unwrap();
    let out = p.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let name = obj.file_name().unwrap().to_str().unwrap();
    assert!(stdout(&out).contains(name), "{}", stdout(&out));
}

#[test]
fn gc_keeps_what_the_manifest_reaches() {
    let p = Project::new();
    p.write("m.yaml", FANOUT);
    assert!(p.run(&["run", "m.yaml"]).status.success());
    p.write("m.yaml", &FANOUT.replace("k: 0.5", "k: 0.3"));
    assert!(p.run(&["run", "m.yaml"]).status.success());
    let records = |p: &Project| {
        stdout(&p.run(&["cache", "ls"])).lines().filter(|l| !l.ends_with("records")).count()
    };
    // base once, everything downstream of `allocate` twice
    assert_eq!(records(&p), 1 + 2 * (1 + 4 + 1));
    let out = p.run(&["cache", "gc", "--dry-run", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(records(&p), 13);
    assert!(p.run(&["cache", "gc", "m.yaml"]).status.success());
    assert_eq!(records(&p), 7);
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(stage_rows(&plan).iter().all(|r| r.1 == "cached"));
    assert!(p.run(&["cache", "verify"]).status.success());
}

#[test]
fn graph_draws_fanned_out_instances() {
    let p = Project::new();
    p.write("m.yaml", FANOUT);
    let dot = stdout(&p.run(&["graph", "m.yaml"]));
    assert!(dot.starts_with("digraph \"ci-fanout\""), "{dot}");
    assert!(dot.contains("\"allocate\" -> \"per_group[2]\";"), "{dot}");
    assert!(dot.contains("\"per_group[3]\" -> \"gather\";"), "{dot}");
    assert!(!dot.contains("\"per_group[1]\" -> \"per_group"), "{dot}");
    let mermaid = stdout(&p.run(&["graph", "--format", "mermaid", "m.yaml"]));
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert_eq!(mermaid.matches("-->").count(), 4 * 2 + 4);
}

#[test]
fn a_manifest_plans_without_its_data_and_says_what_is_missing() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "data: { kind: cifar10, path: nowhere }
model: { image_size: 8, in_channels: 3, channels: 32, channel_mult: [1], res_blocks: 1, attention_resolutions: [] }
stages:
  base: { kind: train, steps: 1 }
",
    );
    let (out, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reasons = &stage_rows(&plan)[0].2;
    assert!(reasons[0].starts_with("input `data:data_batch_1.bin` not found at"), "{reasons:?}");
    assert!(reasons[0].ends_with("(and 4 more inputs)"), "{reasons:?}");
    let (out, v) = p.json(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(v["stages"][0]["error"].as_str().unwrap().contains("data_batch_1.bin"), "{v:#}");
}

#[test]
fn ctrl_c_stops_running_stages_and_leaves_the_cache_consistent() {
    let p = Project::new();
    let started = p.path().join("started");
    p.write(
        "m.yaml",
        &format!(
            "stages:
  quick: {{ kind: command, run: 'echo done > $PROGDIFF_OUT/q' }}
  slow: {{ kind: command, needs: quick, run: 'echo partial > $PROGDIFF_OUT/s; touch {}; sleep 60' }}
  after: {{ kind: command, needs: slow, run: 'true' }}
",
            started.display()
        ),
    );
    let child = p
        .cmd(&["run", "--json", "m.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !started.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "the interrupted run did not stop promptly");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status_of(&v, "quick"), "ran");
    assert_eq!(status_of(&v, "slow"), "skipped");
    assert_eq!(status_of(&v, "after"), "skipped");
    assert_eq!(v["interrupted"], true);
    // Only what completed was recorded, and the cache is consistent.
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "quick"), "cached");
    assert_eq!(status_of(&plan, "slow"), "run");
    let out = p.run(&["cache", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}
