//! Every bundled manifest validates and plans; the CI manifests run end to end, twice.

use std::path::{Path, PathBuf};

use crate::common::*;

fn bundled() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("manifests"), &mut out);
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
