//! Every bundled manifest (`manifests/`, `studies/`) validates and plans; the CI manifests run
//! end to end, twice.

use std::path::{Path, PathBuf};

use crate::common::*;

fn bundled() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                // Not into a study's cache (`.progdiff/`).
                if !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("manifests"), &mut out);
    walk(&repo().join("studies"), &mut out);
    out.sort();
    assert!(!out.is_empty());
    out
}

#[test]
fn every_bundled_manifest_validates_and_plans() {
    let p = Project::new();
    for m in bundled() {
        let m = m.to_str().unwrap();
        let out = p.run(&["validate", m]);
        assert!(out.status.success(), "{m}:\n{}", stderr(&out));
        let (out, plan) = p.json(&["plan", "--json", m]);
        assert!(out.status.success(), "{m}:\n{}", stderr(&out));
        assert!(!plan["stages"].as_array().unwrap().is_empty());
    }
}

#[test]
fn ci_manifests_run_end_to_end_and_a_second_run_executes_nothing() {
    for m in bundled().into_iter().filter(|m| m.parent().unwrap().ends_with("ci")) {
        let p = Project::new();
        let m = m.to_str().unwrap();
        let (out, first) = p.json(&["run", "--json", m]);
        assert!(out.status.success(), "{m}:\n{}\n{}", stdout(&out), stderr(&out));
        assert!(first["counts"]["ran"].as_u64().unwrap() > 0);
        let (out, second) = p.json(&["run", "--json", m]);
        assert!(out.status.success(), "{m}:\n{}", stderr(&out));
        assert_eq!(second["counts"].get("ran"), None, "{m}: {second:#}");
        assert!(stage_rows(&second).iter().all(|r| r.1 == "hit"), "{m}: {second:#}");
    }
}

/// A CPU twin of a paper table, extended with step counts small enough for the test suite (the
/// twins themselves take minutes): same stages, sweeps and data.
fn shrunk_twin(p: &Project, twin: &str) -> String {
    let data = std::path::Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz");
    assert!(data.exists(), "Fashion-MNIST is installed by scripts/setup");
    let base = repo().join("manifests/cpu").join(twin);
    let text = format!(
        "extends: {}\ndiffusion: {{ sample_steps: \"4\" }}\nstages:\n  iddpm: {{ steps: 4, log_every: 2 }}\n  \
         features: {{ steps: 4 }}\n  eval_iddpm: {{ samples: 8, batch_size: 8, grid: 0 }}\n  \
         eval_ours: {{ samples: 8, batch_size: 8, grid: 0 }}\n{}",
        base.display(),
        match twin {
            "table5.yaml" =>
                "  base: { steps: 4, log_every: 2 }\n  finetune: { steps: 1, log_every: 1 }\n",
            _ => "  prune: { batch_size: 4 }\n  finetune: { steps: 2, log_every: 1 }\n",
        }
    );
    p.write(twin, &text).to_str().unwrap().to_string()
}

/// The CPU twin of the paper's Table 5 (Fashion-MNIST, groups 4/8/10/15/20) runs end to end: the
/// shared stages run once, and the report has the baseline and one row per group count.
#[test]
fn the_table5_cpu_twin_reports_five_rows_and_the_baseline() {
    let p = Project::new();
    let m = shrunk_twin(&p, "table5.yaml");
    let m = m.as_str();
    let (out, run) = p.json(&["run", "--json", m]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let ran = |stage: &str| {
        stage_rows(&run)
            .iter()
            .filter(|r| r.0.rsplit('/').next() == Some(stage) && r.1 == "ran")
            .count()
    };
    assert_eq!(ran("base"), 1, "the base model is trained once for the five variants");
    assert_eq!(ran("allocate"), 5);
    assert_eq!(ran("finetune[4]"), 4, "every group count but 4 has a group 4");
    let (out, report) = p.json(&["report", "--format", "json", m]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = report.as_array().unwrap();
    assert_eq!(rows.len(), 6, "{report:#}");
    assert!(rows[0]["variant"].is_null(), "the baseline first: {report:#}");
    let variants: Vec<&str> = rows[1..].iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["groups=4", "groups=8", "groups=10", "groups=15", "groups=20"]);
    for r in rows {
        assert_eq!(r["evaluated"], true, "{r:#}");
        assert!(r["fid"].as_f64().is_some_and(f64::is_finite), "{r:#}");
    }
    let md = stdout(&p.run(&["report", m]));
    assert_eq!(md.lines().filter(|l| l.starts_with("| ")).count(), 2 + 6, "{md}");
}

/// The Table 4 twin prunes one model for every timestep to a MACs budget with each proxy.
#[test]
fn the_table4_cpu_twin_prunes_one_model_per_proxy_to_its_budget() {
    let p = Project::new();
    let m = shrunk_twin(&p, "table4.yaml");
    let m = m.as_str();
    let (out, run) = p.json(&["run", "--json", m]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    for proxy in ["random", "magnitude", "taylor", "diff-pruning", "proxy"] {
        let prune = run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == format!("{proxy}/prune"))
            .unwrap_or_else(|| panic!("no `{proxy}/prune` in {run:#}"));
        let report = prune["outputs"]["report.json"].as_str().unwrap();
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
        assert_eq!(r["bound_ratio"], 0.7224, "{r:#}");
        assert!(r["pruned"]["macs"].as_u64() <= r["bound_macs"].as_u64(), "{r:#}");
        assert!(r["ratio_to_budget"].as_f64().unwrap() > 0.9, "{proxy}: {r:#}");
    }
    let (out, report) = p.json(&["report", "--format", "json", m]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(report.as_array().unwrap().len(), 6, "{report:#}");
}
