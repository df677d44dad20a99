//! The evaluation pipeline end to end (`manifests/ci/evaluate.yaml`): a self-trained FID
//! extractor with reference statistics, baseline and progressive evaluations, `progdiff report`
//! before and after the run, and `progdiff fid` on the statistics and image folders it leaves.

use crate::common::{Project, repo, stderr, stdout};

fn rows(p: &Project, manifest: &str) -> Vec<serde_json::Value> {
    let (out, v) = p.json(&["report", "--format", "json", manifest]);
    assert!(out.status.success(), "{}", stderr(&out));
    v.as_array().unwrap().clone()
}

#[test]
fn ci_evaluate_manifest_reports_baseline_and_progressive_rows() {
    let p = Project::new();
    let text = std::fs::read_to_string(repo().join("manifests/ci/evaluate.yaml")).unwrap();
    p.write("evaluate.yaml", &text);

    // Before anything ran: both rows, marked missing, with no numbers.
    let before = rows(&p, "evaluate.yaml");
    assert_eq!(before.len(), 2);
    for r in &before {
        assert_eq!(r["evaluated"], false);
        assert!(r["fid"].is_null() && r["macs"].is_null() && r["params"].is_null(), "{r}");
    }
    let md = stdout(&p.run(&["report", "evaluate.yaml"]));
    assert!(
        md.contains("| IDDPM | eval_base | missing | missing | missing | missing | 30 |"),
        "{md}"
    );

    let (out, run) = p.json(&["run", "--json", "evaluate.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let outputs = |id: &str| {
        run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["outputs"].clone()
    };
    for id in ["eval_base", "eval_progressive"] {
        let o = outputs(id);
        for f in ["metrics.json", "samples.png", "samples.npz"] {
            assert!(o[f].is_string(), "`{id}` has no `{f}`: {o}");
        }
    }
    let features = outputs("features");
    for f in ["extractor.json", "classifier.safetensors", "reference.npz"] {
        assert!(features[f].is_string(), "`features` has no `{f}`: {features}");
    }

    let after = rows(&p, "evaluate.yaml");
    assert_eq!(after.len(), 2);
    let (base, prog) = (&after[0], &after[1]);
    assert_eq!(base["label"], "IDDPM");
    assert_eq!(prog["label"], "IDDPM + step-adaptive");
    for r in [base, prog] {
        assert_eq!(r["evaluated"], true);
        let fid = r["fid"].as_f64().unwrap();
        assert!(fid.is_finite() && fid >= -1e-9, "{r}");
        // KID beside FID, from the same features (unbiased: it may be negative).
        assert!(r["kid"].as_f64().is_some_and(f64::is_finite), "{r}");
        assert!(r["seeds"][0]["kid_std"].as_f64().is_some_and(|s| s >= 0.0), "{r}");
        assert!(r["macs"].as_f64().unwrap() > 0.0 && r["params"].as_f64().unwrap() > 0.0);
        assert_eq!(r["samples"], 8);
    }
    assert_eq!(base["models"], 1);
    assert_eq!(prog["models"], 2);
    // Base training only, vs base + 2 groups x 10 fine-tuning steps.
    assert_eq!(base["training_steps"], 30);
    assert_eq!(prog["training_steps"], 50);
    let csv = stdout(&p.run(&["report", "--format", "csv", "evaluate.yaml"]));
    assert_eq!(csv.lines().count(), 3, "{csv}");

    // `--plots DIR`: training curves, the allocation figure, FID and KID bars, the sample grids
    // and the side-by-side figure, as decodable PNGs.
    let out = p.run(&["report", "evaluate.yaml", "--plots", "plots"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = p.path().join("plots");
    for name in [
        "ci-evaluate.loss.png",
        "ci-evaluate.allocate.allocation.png",
        "fid.png",
        "kid.png",
        "samples.png",
        "samples/ci-evaluate.eval_base.seed0.png",
        "samples/ci-evaluate.eval_progressive.seed0.png",
    ] {
        let path = dir.join(name);
        assert!(stderr(&out).contains(&format!("wrote plots/{name}")), "{}", stderr(&out));
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let small = name.starts_with("samples/");
        assert!(small || (info.width > 100 && info.height > 100), "{name}: {info:?}");
    }

    // `progdiff fid` between the statistics the evaluation left: the stage's own FID and KID
    // (the stored features make KID possible without the worker).
    let stats = outputs("eval_base")["samples.npz"].as_str().unwrap().to_string();
    let reference = features["reference.npz"].as_str().unwrap().to_string();
    let out = p.run(&["fid", &stats, &reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let line = |prefix: &str| -> f64 {
        let l = printed.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| {
            panic!("no `{prefix}` line in {printed}");
        });
        l.split_whitespace().next().unwrap().parse().unwrap()
    };
    let fid = base["fid"].as_f64().unwrap();
    let (got_fid, got_kid) = (line("FID: "), line("KID: "));
    assert!((got_fid - fid).abs() <= 1e-6 * fid.abs().max(1.0), "{got_fid} vs {fid}");
    let kid = base["kid"].as_f64().unwrap();
    assert!((got_kid - kid).abs() <= 1e-9 * kid.abs().max(1.0), "{got_kid} vs {kid}");

    // An image folder through a TorchScript extractor, saved as statistics, compared to itself.
    let grid = outputs("eval_base")["samples.png"].as_str().unwrap().to_string();
    let folder = p.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    for name in ["a.png", "b.png", "c.png"] {
        std::fs::copy(&grid, folder.join(name)).unwrap();
    }
    let module = repo().join("kinds/tests/fixtures/fid/tiny_extractor.pt");
    let module = module.to_str().unwrap();
    let out = p.run(&[
        "fid",
        "images",
        "images.npz",
        "--save-stats",
        "--extractor",
        module,
        "--size",
        "16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&["fid", "images.npz", "images", "--extractor", module, "--size", "16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let d: f64 = printed.lines().next().unwrap().strip_prefix("FID: ").unwrap().parse().unwrap();
    assert!(d.abs() < 1e-9, "{d}");
    // Three copies of one image on both sides: every kernel value is the same, so KID is 0
    // (to rounding), over subsets of all 3.
    let kid = printed.lines().nth(1).unwrap().strip_prefix("KID: ").unwrap();
    assert!(kid.split_whitespace().next().unwrap().parse::<f64>().unwrap().abs() < 1e-9, "{kid}");
    assert!(kid.ends_with("over 100 subsets of 3)"), "{printed}");
    // pytorch-fid's own files hold no features: FID only, and a note saying why there is no KID.
    let stats_only = p.path().join("stats-only.npz");
    {
        let s = progdiff_kinds::fid::read_stats(&p.path().join("images.npz")).unwrap();
        progdiff_kinds::fid::write_stats(&s, &stats_only).unwrap();
    }
    let out = p.run(&["fid", "stats-only.npz", "images.npz"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no KID: `stats-only.npz` holds statistics only"),
        "{}",
        stderr(&out)
    );
    // A folder without an extractor is an error with a hint.
    let out = p.run(&["fid", "images", "images.npz"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hint: pass `--extractor"), "{}", stderr(&out));
}

/// Issue 14 through the binary: `samples: 0` evaluations (cost only) of a base model and of its
/// pruned per-group copies, grouped by a linear-schedule SNR on a cosine diffusion.
#[test]
fn cost_only_evaluations_report_params_and_macs_without_samples() {
    let p = Project::new();
    p.write(
        "cost.yaml",
        r#"
name: cost-only
data: { kind: synthetic, n: 8, image_size: 8 }
model: { image_size: 8, in_channels: 3, channels: 64, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.0, learn_sigma: true }
diffusion: { steps: 40, schedule: cosine, sample_steps: "10" }
stages:
  base: { kind: train, steps: 1, batch_size: 2, log_every: 1 }
  allocate: { kind: snr-allocate, groups: 2, k: 0.5, snr_schedule: linear, snr_steps: 25 }
  prune: { kind: prune, needs: [base, allocate], for_each: group, batch_size: 2 }
  eval_base: { kind: evaluate, needs: [base], samples: 0, label: base }
  eval_pruned: { kind: evaluate, needs: [prune, allocate], samples: 0, label: pruned }
"#,
    );
    let (out, run) = p.json(&["run", "--json", "cost.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let outputs = |id: &str| {
        run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["outputs"].clone()
    };
    // Cost only: metrics, no grid, no statistics.
    for id in ["eval_base", "eval_pruned"] {
        let names: Vec<String> = outputs(id).as_object().unwrap().keys().cloned().collect();
        assert_eq!(names, ["metrics.json"], "{id}");
    }
    let alloc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(outputs("allocate")["allocation.json"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(alloc["noise_schedule"], "cosine");
    assert_eq!(alloc["snr_source"], serde_json::json!({ "schedule": "linear", "steps": 25 }));

    let rows = rows(&p, "cost.yaml");
    let (base, pruned) = (&rows[0], &rows[1]);
    for r in [base, pruned] {
        assert_eq!(r["evaluated"], true, "{r}");
        assert!(r["fid"].is_null() && r["samples"] == 0 && r["sampling_seconds"] == 0.0, "{r}");
    }
    // The base model's own cost (counted by hand in stages/tests/evaluate.rs).
    assert_eq!(base["macs"], 30_986_240.0);
    assert_eq!(pruned["models"], 2);
    let macs = pruned["macs"].as_f64().unwrap();
    assert!(macs < 30_986_240.0 && macs > 0.5 * 30_986_240.0, "{pruned}");
    let md = stdout(&p.run(&["report", "cost.yaml"]));
    assert!(md.contains("| base | eval_base | - | - | 30.99M |"), "{md}"); // no FID, no KID
}
