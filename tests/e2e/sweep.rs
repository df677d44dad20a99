//! Sweeps and `extends:`: variants share what they have in common, keys differ where values
//! differ, every mistake is reported where it is, and reports give one row per variant.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;

/// A toy Table 5: base -> allocate (swept group counts) -> finetune[i] -> evaluate, plus a
/// baseline evaluation of the base model every variant shares.
const GROUPS: &str = "\
name: groups
seed: 0
data: { kind: synthetic, n: 32, image_size: 8, channels: gray, seed: 1 }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.0, learn_sigma: true }
diffusion: { steps: 40, schedule: cosine, loss: hybrid, sample_steps: \"5\" }
stages:
  base: { kind: train, steps: 6, batch_size: 4, lr: 1.0e-3, ema: 0.9, log_every: 3, checkpoint_every: 0 }
  allocate: { kind: snr-allocate, groups: 2, k: 0.5 }
  finetune: { kind: train, needs: [base, allocate], for_each: group, steps: 2, batch_size: 4,
              lr: 1.0e-3, ema: 0.9, log_every: 2, checkpoint_every: 0 }
  eval_base: { kind: evaluate, needs: [base], samples: 4, batch_size: 4, label: baseline }
  eval: { kind: evaluate, needs: [finetune, allocate], samples: 4, batch_size: 4, label: ours }
sweep:
  product: { allocate.groups: [1, 2, 3, 4, 5] }
";

/// (local stage name, status) of every instance of a run summary, with its variants.
fn outcomes(v: &serde_json::Value) -> Vec<(String, String, Vec<String>)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let id = s["id"].as_str().unwrap();
            let local = id.rsplit('/').next().unwrap();
            let stage = local.split('[').next().unwrap().to_string();
            let variants = s["variants"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            (stage, s["status"].as_str().unwrap().to_string(), variants)
        })
        .collect()
}

fn count(rows: &[(String, String, Vec<String>)], stage: &str, status: &str) -> usize {
    rows.iter().filter(|r| r.0 == stage && r.1 == status).count()
}

#[test]
fn a_sweep_over_five_group_counts_trains_the_base_model_once() {
    let p = Project::new();
    p.write("groups.yaml", GROUPS);
    let out = p.run(&["plan", "groups.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // 1 base + 1 baseline eval + 5 allocations + 15 fine-tunings + 5 evals.
    assert!(
        stdout(&out).contains("5 variants -> 27 stage instances, 0 cached, 27 to run"),
        "{}",
        stdout(&out)
    );

    let (out, run) = p.json(&["run", "--json", "groups.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let rows = outcomes(&run);
    assert_eq!(count(&rows, "base", "ran"), 1, "{run:#}");
    assert_eq!(count(&rows, "eval_base", "ran"), 1, "{run:#}");
    assert_eq!(count(&rows, "allocate", "ran"), 5, "{run:#}");
    assert_eq!(count(&rows, "finetune", "ran"), 1 + 2 + 3 + 4 + 5, "{run:#}");
    assert_eq!(count(&rows, "eval", "ran"), 5, "{run:#}");
    let base = rows.iter().find(|r| r.0 == "base").unwrap();
    assert_eq!(base.2.len(), 5, "the base model belongs to every variant");

    // Nothing runs twice.
    let (out, again) = p.json(&["run", "--json", "groups.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(again["counts"].get("ran"), None, "{again:#}");

    // The report: the shared baseline and one row per variant.
    let (out, report) = p.json(&["report", "--format", "json", "groups.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = report.as_array().unwrap();
    assert_eq!(rows.len(), 6, "{report:#}");
    assert_eq!(rows[0]["label"], "baseline");
    assert!(rows[0]["variant"].is_null());
    let variants: Vec<&str> = rows[1..].iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["groups=1", "groups=2", "groups=3", "groups=4", "groups=5"]);
    for r in rows {
        assert_eq!(r["evaluated"], true, "{r:#}");
    }
    // Training steps count the base and the variant's fine-tunings.
    assert_eq!(rows[0]["training_steps"], 6);
    assert_eq!(rows[5]["training_steps"], 6 + 5 * 2);
    // Renaming a row changes no measurement: nothing re-runs, the report shows the new name.
    p.write("groups.yaml", &GROUPS.replace("label: ours", "label: step-adaptive"));
    let out = p.run(&["plan", "groups.yaml"]);
    assert!(stdout(&out).contains("27 stage instances, 27 cached, 0 to run"), "{}", stdout(&out));
    let md = stdout(&p.run(&["report", "groups.yaml"]));
    assert!(md.lines().any(|l| l.starts_with("| step-adaptive | groups=3 | eval |")), "{md}");
    p.write("groups.yaml", GROUPS);
    let md = stdout(&p.run(&["report", "groups.yaml"]));
    assert!(md.lines().any(|l| l.starts_with("| baseline | (all) | eval_base |")), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| ours | groups=3 | eval |")), "{md}");
}

/// Plans `text` and returns (id -> key, id -> variants).
fn plan_keys(p: &Project, file: &str) -> (BTreeMap<String, String>, BTreeMap<String, usize>) {
    let (out, plan) = p.json(&["plan", "--json", file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut keys = BTreeMap::new();
    let mut shared = BTreeMap::new();
    for s in plan["stages"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap().to_string();
        keys.insert(id.clone(), s["key"].as_str().unwrap().to_string());
        shared.insert(id, s["variants"].as_array().map_or(0, Vec::len));
    }
    (keys, shared)
}

#[test]
fn a_sweep_over_k_reuses_base_training_and_keeps_keys_apart_where_values_differ() {
    let p = Project::new();
    let text = GROUPS.replace(
        "product: { allocate.groups: [1, 2, 3, 4, 5] }",
        "product: { allocate.groups: [2, 3], allocate.k: [0.3, 0.5, 0.7] }",
    );
    p.write("k.yaml", &text);
    let (keys, shared) = plan_keys(&p, "k.yaml");
    // One base and one baseline evaluation, shared by all six variants.
    assert_eq!(shared["base"], 6);
    assert_eq!(shared["eval_base"], 6);
    // Six allocations with six different keys: the same group count with another k differs,
    // and the same k with another group count differs.
    let alloc: Vec<(&String, &String)> =
        keys.iter().filter(|(id, _)| id.ends_with("/allocate")).collect();
    assert_eq!(alloc.len(), 6, "{keys:#?}");
    assert_eq!(alloc.iter().map(|(_, k)| *k).collect::<BTreeSet<_>>().len(), 6);
    assert!(keys.contains_key("groups=2,k=0.3/allocate"), "{keys:#?}");
    assert_ne!(keys["groups=2,k=0.3/allocate"], keys["groups=2,k=0.5/allocate"]);
    assert_ne!(keys["groups=2,k=0.3/allocate"], keys["groups=3,k=0.3/allocate"]);
    // Downstream keys differ too: 3 x (2 + 3) fine-tunings, all distinct.
    let ft: BTreeSet<&String> =
        keys.iter().filter(|(id, _)| id.contains("/finetune[")).map(|(_, k)| k).collect();
    assert_eq!(ft.len(), 3 * (2 + 3));

    // The same manifest without a sweep, with k = 0.5 and 2 groups, has exactly the keys of
    // that variant: a variant is the manifest with its values written in.
    let plain = GROUPS.replace("sweep:\n  product: { allocate.groups: [1, 2, 3, 4, 5] }\n", "");
    p.write("plain.yaml", &plain);
    let (plain_keys, _) = plan_keys(&p, "plain.yaml");
    assert_eq!(plain_keys["base"], keys["base"]);
    assert_eq!(plain_keys["allocate"], keys["groups=2,k=0.5/allocate"]);
    assert_eq!(plain_keys["finetune[1]"], keys["groups=2,k=0.5/finetune[1]"]);

    // Running one variant runs only what it needs; the rest runs later without repeating it.
    let (out, one) = p.json(&["run", "--json", "--variant", "groups=2,k=0.3", "k.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<String> = stage_rows(&one).into_iter().map(|r| r.0).collect();
    assert_eq!(
        ids,
        [
            "base",
            "groups=2,k=0.3/allocate",
            "groups=2,k=0.3/finetune[0]",
            "groups=2,k=0.3/finetune[1]",
            "eval_base",
            "groups=2,k=0.3/eval"
        ]
    );
    assert_eq!(one["counts"]["ran"], 6);
    let out = p.run(&["plan", "k.yaml"]);
    let text = stdout(&out);
    assert!(text.contains("6 variants -> 29 stage instances, 6 cached, 23 to run"), "{text}");
    assert!(text.contains("to run one at a time"), "an estimate from the recorded runs: {text}");
    let out = p.run(&["run", "--variant", "groups=9", "k.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("has no variant `groups=9`; its variants: `groups=2,k=0.3`"));
}

#[test]
fn zip_and_named_variants_expand_in_order_with_readable_names() {
    let p = Project::new();
    let text = GROUPS.replace(
        "  product: { allocate.groups: [1, 2, 3, 4, 5] }\n",
        "  zip: { allocate.groups: [2, 4], finetune.steps: [3, 1] }\n  variants:\n    - { name: snr }\n    - { name: flat, allocate.schedule: constant, base.steps: 6 }\n",
    );
    p.write("z.yaml", &text);
    let out = p.run(&["validate", "z.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (out, plan) = p.json(&["plan", "--json", "z.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<&str> =
        plan["variants"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "groups=2,steps=3,snr",
            "groups=2,steps=3,flat",
            "groups=4,steps=1,snr",
            "groups=4,steps=1,flat"
        ]
    );
    // `base.steps: 6` is the value the manifest already has: still one base model.
    let (keys, shared) = plan_keys(&p, "z.yaml");
    assert_eq!(shared["base"], 4, "{keys:#?}");
    assert_ne!(keys["groups=2,steps=3,snr/allocate"], keys["groups=2,steps=3,flat/allocate"]);

    // Clashing last segments are named by their whole path.
    let text = GROUPS.replace(
        "product: { allocate.groups: [1, 2, 3, 4, 5] }",
        "product: { base.steps: [4], finetune.steps: [1, 2] }",
    );
    p.write("c.yaml", &text);
    let (_, plan) = p.json(&["plan", "--json", "c.yaml"]);
    assert_eq!(
        plan["variants"],
        serde_json::json!(["base.steps=4,finetune.steps=1", "base.steps=4,finetune.steps=2"])
    );
}

#[test]
fn sweep_mistakes_are_reported_where_they_are() {
    let p = Project::new();
    let text = GROUPS.replace(
        "  product: { allocate.groups: [1, 2, 3, 4, 5] }\n",
        "  product:\n    allocate.groups: [1, 0, 3]\n    finetune.stepz: [2]\n    alocate.k: [0.5]\n    finetune.needs: [[base]]\n    allocate.k: 0.5\n  zip: { base.steps: [1, 2], finetune.steps: [1] }\n  variants:\n    - { name: a }\n    - { name: a }\n    - { allocate.k: 0.3 }\n  extra: 1\n",
    );
    p.write("bad.yaml", &text);
    let out = p.run(&["validate", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let expect = [
        "bad.yaml:16:26: `stages.allocate.groups`: must be at least 1, got 0",
        "bad.yaml:17:22: `stages.finetune.stepz`: unknown field `stepz`",
        "bad.yaml:18:5: `sweep.product.alocate.k`: `alocate` is neither a stage",
        "bad.yaml:19:5: `sweep.product.finetune.needs`: `needs` cannot be swept",
        "bad.yaml:20:17: `sweep.product.allocate.k`: must be a list of values, found a float",
        "bad.yaml:21:30: `sweep.zip.finetune.steps`: zipped lists must have equal lengths",
        "bad.yaml:24:15: `sweep.variants.1.name`: variant `a` is named twice",
        "bad.yaml:25:7: `sweep.variants.2`: missing `name`",
        "bad.yaml:26:3: `sweep.extra`: unknown field `extra`",
    ];
    for e in expect {
        assert!(err.lines().any(|l| l.starts_with(e)), "missing `{e}` in:\n{err}");
    }
    assert!(err.contains("hint: did you mean `steps`?"), "{err}");
    assert!(err.contains("hint: did you mean `allocate`?"), "{err}");
}

#[test]
fn extends_merges_a_base_and_reports_its_mistakes_in_its_own_file() {
    let p = Project::new();
    std::fs::create_dir(p.path().join("exp")).unwrap();
    p.write("exp/base.yaml", &GROUPS.replace("name: groups\n", "name: base-exp\n"));
    // Table 2 style: the same experiment without the sweep, another k, no baseline evaluation.
    p.write(
        "exp/child.yaml",
        "extends: base.yaml\nsweep: null\nstages:\n  allocate: { k: 0.3 }\n  eval_base: null\n",
    );
    let (out, plan) = p.json(&["plan", "--json", "exp/child.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(plan["manifest"], "child", "`name` is not inherited");
    let ids: Vec<String> = stage_rows(&plan).into_iter().map(|r| r.0).collect();
    assert_eq!(ids, ["base", "allocate", "finetune[0]", "finetune[1]", "eval"]);
    let (base_keys, _) = plan_keys(&p, "exp/base.yaml");
    let (child_keys, _) = plan_keys(&p, "exp/child.yaml");
    assert_eq!(base_keys["base"], child_keys["base"], "the inherited base stage is the same");

    // A mistake in the base is reported at the base's line and column; one in the child at
    // the child's.
    p.write("exp/broken-base.yaml", &GROUPS.replace("k: 0.5 }", "k: 1.5 }"));
    p.write(
        "exp/broken-child.yaml",
        "extends: broken-base.yaml\nstages:\n  finetune: { stepz: 3 }\n",
    );
    let out = p.run(&["validate", "exp/broken-child.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l
                .starts_with("exp/broken-base.yaml:9:46: `stages.allocate.k`: must be in (0, 1]")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l
                .starts_with("exp/broken-child.yaml:3:15: `stages.finetune.stepz`: unknown field")),
        "{err}"
    );

    // Missing bases and cycles are clear errors.
    p.write("exp/orphan.yaml", "extends: nowhere.yaml\n");
    let err = stderr(&p.run(&["validate", "exp/orphan.yaml"]));
    assert!(
        err.starts_with("exp/orphan.yaml:1:10: `extends`: cannot read `exp/nowhere.yaml`"),
        "{err}"
    );
    p.write("exp/a.yaml", "extends: b.yaml\n");
    p.write("exp/b.yaml", "extends: a.yaml\n");
    let err = stderr(&p.run(&["validate", "exp/a.yaml"]));
    assert!(err.contains("`extends` cycle:"), "{err}");
}
