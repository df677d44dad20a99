//! Seeds as an axis (issue 13): `seeds: N` expands a manifest into `seed=...` variants whose
//! keys are the manifest's with that seed, and `progdiff report` folds each configuration's
//! seeds into one row (mean, std, 95% CI, n) while JSON and CSV keep each seed's values.

use std::collections::BTreeMap;

use crate::common::*;

/// id -> key of a plan.
fn keys(p: &Project, file: &str) -> BTreeMap<String, String> {
    let (out, plan) = p.json(&["plan", "--json", file]);
    assert!(out.status.success(), "{}", stderr(&out));
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn ci_seeds_manifest_runs_and_reports_one_row_per_configuration() {
    let p = Project::new();
    let text = std::fs::read_to_string(repo().join("manifests/ci/seeds.yaml")).unwrap();
    p.write("seeds.yaml", &text);

    // Two variants; the extractor (its own seed) is one instance shared by both.
    let (out, plan) = p.json(&["plan", "--json", "seeds.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(plan["variants"], serde_json::json!(["seed=0", "seed=1"]));
    let k = keys(&p, "seeds.yaml");
    assert!(k.contains_key("features") && !k.contains_key("seed=0/features"), "{k:#?}");
    assert_ne!(k["seed=0/base"], k["seed=1/base"]);
    // `seeds:` changes no key: variant `seed=0` is the manifest without it, `seed=1` the
    // manifest with `seed: 1`.
    p.write("one.yaml", &text.replace("seeds: 2\n", ""));
    let one = keys(&p, "one.yaml");
    assert_eq!(one["base"], k["seed=0/base"]);
    assert_eq!(one["eval_progressive"], k["seed=0/eval_progressive"]);
    assert_eq!(one["features"], k["features"]);
    p.write("s1.yaml", &text.replace("seeds: 2\n", "").replace("seed: 0\n", "seed: 1\n"));
    assert_eq!(keys(&p, "s1.yaml")["finetune[1]"], k["seed=1/finetune[1]"]);

    let (out, _) = p.json(&["run", "--json", "seeds.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));

    let (out, rows) = p.json(&["report", "--format", "json", "seeds.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0]["label"], "IDDPM");
    assert_eq!(rows[1]["label"], "IDDPM + step-adaptive");
    for r in rows {
        assert!(r["variant"].is_null(), "{r:#}");
        assert_eq!(r["evaluated"], true);
        let seeds = r["seeds"].as_array().unwrap();
        assert_eq!(seeds.len(), 2);
        assert_eq!((seeds[0]["seed"].as_u64(), seeds[1]["seed"].as_u64()), (Some(0), Some(1)));
        assert_eq!(seeds[0]["key"], k[&format!("seed=0/{}", r["stage"].as_str().unwrap())]);
        // The row's numbers are the seeds' mean, their sample std and the t(1 dof) interval.
        for metric in ["fid", "kid", "macs", "params", "sampling_seconds"] {
            let v: Vec<f64> = seeds.iter().map(|s| s[metric].as_f64().unwrap()).collect();
            let st = &r["stats"][metric];
            assert_eq!(st["n"], 2, "{metric}: {st}");
            let mean = (v[0] + v[1]) / 2.0;
            let sd = (v[0] - v[1]).abs() / 2f64.sqrt();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
            assert!(close(st["mean"].as_f64().unwrap(), mean), "{metric}: {st} vs {v:?}");
            assert!(close(r[metric].as_f64().unwrap(), mean), "{metric}");
            assert!(close(st["std"].as_f64().unwrap(), sd), "{metric}: {st} vs {v:?}");
            let ci = 12.706204736174694 * sd / 2f64.sqrt();
            assert!(close(st["ci95"].as_f64().unwrap(), ci), "{metric}: {st}");
        }
        // Different seeds sample different images.
        assert_ne!(seeds[0]["fid"], seeds[1]["fid"]);
    }

    let md = stdout(&p.run(&["report", "seeds.yaml"]));
    assert!(md.lines().next().unwrap().contains("| seeds | FID, mean ± 95% CI (sd) |"), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| IDDPM | eval_base | 2 | ")), "{md}");
    let csv = stdout(&p.run(&["report", "--format", "csv", "seeds.yaml"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[1].starts_with("ci-seeds,,0,eval_base,IDDPM,true,"), "{csv}");
    assert!(lines[2].starts_with("ci-seeds,,1,eval_base,IDDPM,true,"), "{csv}");

    // The figures: bars with intervals, each seed's grid, the rows side by side.
    let out = p.run(&["report", "seeds.yaml", "--plots", "plots"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for name in [
        "fid.png",
        "kid.png",
        "samples.png",
        "samples/ci-seeds.eval_base.seed0.png",
        "samples/ci-seeds.eval_base.seed1.png",
        "samples/ci-seeds.eval_progressive.seed0.png",
        "samples/ci-seeds.eval_progressive.seed1.png",
    ] {
        let bytes = std::fs::read(p.path().join("plots").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", stderr(&out)));
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        assert!(decoder.read_info().is_ok(), "{name} does not decode");
    }
}

#[test]
fn seeds_mistakes_are_reported() {
    let p = Project::new();
    let text = std::fs::read_to_string(repo().join("manifests/ci/seeds.yaml")).unwrap();
    for (bad, expect) in [
        ("seeds: 0\n", "bad.yaml:8:8: `seeds`: must be between 1 and 1000, got 0"),
        (
            "seeds: two\n",
            "`seeds`: must be the number of seeds to run (an integer), found a string",
        ),
        (
            "seeds: 2\nsweep: { product: { seed: [3, 4] } }\n",
            "`sweep.seed`: `seed` is swept here and `seeds:` (line 8) sets the seeds too",
        ),
    ] {
        p.write("bad.yaml", &text.replace("seeds: 2\n", bad));
        let out = p.run(&["validate", "bad.yaml"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains(expect), "{bad}: {}", stderr(&out));
    }
    // `seeds: 1` is the manifest itself; a seed sweep with other axes folds over the seeds.
    p.write("one.yaml", &text.replace("seeds: 2\n", "seeds: 1\n"));
    let (out, plan) = p.json(&["plan", "--json", "one.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(plan["variants"].is_null() || plan["variants"] == serde_json::json!([]), "{plan}");
    p.write(
        "grid.yaml",
        &text.replace("seeds: 2\n", "seeds: 2\nsweep: { product: { allocate.k: [0.3, 0.5] } }\n"),
    );
    let (out, plan) = p.json(&["plan", "--json", "grid.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        plan["variants"],
        serde_json::json!(["k=0.3,seed=0", "k=0.3,seed=1", "k=0.5,seed=0", "k=0.5,seed=1"])
    );
    let (out, rows) = p.json(&["report", "--format", "json", "grid.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<(String, Option<String>, usize)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["variant"].as_str().map(str::to_string),
                r["seeds"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("eval_base".to_string(), None, 2),
            ("eval_progressive".to_string(), Some("k=0.3".to_string()), 2),
            ("eval_progressive".to_string(), Some("k=0.5".to_string()), 2),
        ]
    );
}
