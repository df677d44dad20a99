//! The `prune` stage end to end (issue 4): base -> allocate -> prune[i] -> finetune[i], with every
//! pruned model within its group's budget, for each proxy.

use crate::common::*;

const PRUNE: &str = include_str!("../../manifests/ci/prune.yaml");

fn outputs<'a>(run: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    let s = run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
    &s["outputs"]
}

const PROXIES: &[(&str, &str)] = &[
    ("search", "{ kind: search, rounds: 2, candidates: 2 }"),
    ("random", "{ kind: random }"),
    ("magnitude", "{ kind: magnitude }"),
    ("taylor", "{ kind: taylor }"),
    ("diff_pruning", "{ kind: diff-pruning, max_timesteps: 8 }"),
];

/// The CI manifest with one `prune_<proxy>` -> `finetune_<proxy>` branch per proxy, all from
/// the same base model and allocation.
fn every_proxy_manifest() -> String {
    let head = &PRUNE[..PRUNE.find("  prune:").unwrap()];
    let mut m = head.to_string();
    for (name, proxy) in PROXIES {
        m += &format!(
            "  prune_{name}:\n    kind: prune\n    needs: [base, allocate]\n    for_each: group\n    \
             batch_size: 4\n    proxy: {proxy}\n  finetune_{name}:\n    kind: train\n    \
             needs: [prune_{name}, allocate]\n    for_each: group\n    steps: 2\n    \
             batch_size: 4\n    checkpoint_every: 0\n"
        );
    }
    m
}

#[test]
fn every_proxy_prunes_each_group_within_budget_and_finetuning_runs() {
    let p = Project::new();
    p.write("m.yaml", &every_proxy_manifest());
    let (out, run) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    for (name, _) in PROXIES {
        for g in 0..2 {
            let o = outputs(&run, &format!("prune_{name}[{g}]"));
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(o["report.json"].as_str().unwrap()).unwrap())
                    .unwrap();
            let macs = report["pruned"]["macs"].as_u64().unwrap();
            let bound = report["bound_macs"].as_u64().unwrap();
            assert!(macs <= bound, "{name}[{g}]: {report:#}");
            assert!(o["model.safetensors"].is_string() && o["ema.safetensors"].is_string());
            assert!(o["bank.json"].is_string(), "every proxy outputs a memory bank: {name}");
            assert_eq!(status_of(&run, &format!("finetune_{name}[{g}]")), "ran");
            if g == 0 {
                // The smaller group's model really is pruned.
                assert!(report["macs_ratio"].as_f64().unwrap() < 0.8, "{name}: {report:#}");
            }
        }
    }
}

#[test]
fn raising_search_rounds_reruns_prune_and_reuses_the_cached_bank() {
    let p = Project::new();
    p.write("m.yaml", PRUNE);
    let (out, _) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let banks = p.cache().join("v1/prune-banks");
    let dirs: Vec<_> = std::fs::read_dir(&banks).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 2, "one bank per group");

    p.write("m.yaml", &PRUNE.replace("rounds: 2", "rounds: 3"));
    let (out, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status_of(&plan, "base"), "cached");
    assert_eq!(status_of(&plan, "allocate"), "cached");
    assert_eq!(status_of(&plan, "prune[0]"), "run");
    let (out, run) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for g in 0..2 {
        let bank: serde_json::Value = serde_json::from_slice(
            &std::fs::read(outputs(&run, &format!("prune[{g}]"))["bank.json"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(bank["rounds"], 3);
        assert_eq!(bank["entries"].as_array().unwrap().len(), 6);
    }
    // The same two bank directories, now with a third round each.
    let dirs: Vec<_> = std::fs::read_dir(&banks).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 2);
    assert!(
        dirs.iter().all(|d| d.join("round-3.json").is_file() && d.join("round-2.json").is_file())
    );
}
