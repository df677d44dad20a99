//! The `prune` stage end to end (issue 4): base -> allocate -> prune[i] -> finetune[i], with every
//! pruned model within its group's budget, for each proxy (`llm` against a scripted local chat
//! server); banks seeding other groups' searches.

use crate::chat_server::{Answer, Server};
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

/// The CI manifest with its `prune` stage's lines replaced by `prune`.
fn with_prune(prune: &str) -> String {
    let start = PRUNE.find("  prune:\n").unwrap();
    let end = PRUNE.find("  finetune:\n").unwrap();
    format!("{}{prune}{}", &PRUNE[..start], &PRUNE[end..])
}

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

const LLM_KEY_ENV: &str = "PROGDIFF_E2E_LLM_KEY";
const LLM_KEY: &str = "sk-e2e-7c41d09b-never-on-disk";

#[test]
fn the_llm_proxy_runs_end_to_end_against_a_local_chat_server_and_caches_everything() {
    let server = Server::start();
    // Every answer: one plan keeping everything (fitted to the budget); the second candidate
    // of each round is filled by mutation.
    server.set_fallback(Answer::chat(r#"{"plans": [{}]}"#));
    let p = Project::new();
    p.write(
        "m.yaml",
        &with_prune(&format!(
            "  prune:\n    kind: prune\n    needs: [base, allocate]\n    for_each: group\n    \
             batch_size: 4\n    proxy: {{ kind: llm, endpoint: \"{}\", model: test-model, \
             api_key_env: {LLM_KEY_ENV}, rounds: 2, candidates: 2, timeout_s: 30, \
             backoff_ms: 10 }}\n",
            server.url
        )),
    );
    let run = |p: &Project| {
        let out = p.cmd(&["run", "--json", "m.yaml"]).env(LLM_KEY_ENV, LLM_KEY).output().unwrap();
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        for text in [stdout(&out), stderr(&out)] {
            assert!(!text.contains(LLM_KEY), "the key is in the output:\n{text}");
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v
    };
    let first = run(&p);
    let requests = server.requests();
    assert_eq!(requests.len(), 4, "2 groups x 2 rounds, one request each");
    for r in &requests {
        assert!(r.head.starts_with("POST /v1/chat/completions "), "{}", r.head);
        assert!(r.head.contains(LLM_KEY), "the key goes in the Authorization header");
        assert!(!r.body.contains(LLM_KEY));
    }
    for g in 0..2 {
        assert_eq!(status_of(&first, &format!("prune[{g}]")), "ran");
        assert_eq!(status_of(&first, &format!("finetune[{g}]")), "ran");
        let o = outputs(&first, &format!("prune[{g}]"));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o["report.json"].as_str().unwrap()).unwrap())
                .unwrap();
        assert_eq!(report["proxy"], "llm");
        assert!(report["pruned"]["macs"].as_u64() <= report["bound_macs"].as_u64(), "{report}");
        let bank: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o["bank.json"].as_str().unwrap()).unwrap())
                .unwrap();
        assert_eq!((bank["group"].as_u64(), bank["rounds"].as_u64()), (Some(g), Some(2)));
        assert_eq!(bank["entries"].as_array().unwrap().len(), 4);
    }

    // A second run executes nothing and asks nothing.
    let second = run(&p);
    assert_eq!(server.requests().len(), 4);
    assert_eq!(second["counts"].get("ran"), None, "{second:#}");
    assert!(stage_rows(&second).iter().all(|r| r.1 == "hit"), "{second:#}");

    // The key is in no file under the cache directory.
    let mut files = Vec::new();
    files_under(&p.cache(), &mut files);
    assert!(files.iter().any(|f| f.to_string_lossy().contains("responses")), "{files:?}");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(LLM_KEY.len()).any(|w| w == LLM_KEY.as_bytes()),
            "the key is in {}",
            f.display()
        );
    }
}

/// `seed` searches for group 1 alone; every group's search starts from its bank.
const SEEDED: &str = "  seed:
    kind: prune
    needs: [base, allocate]
    group: 1
    batch_size: 4
    proxy: { kind: search, rounds: 1, candidates: 2 }
  prune:
    kind: prune
    needs: [base, allocate, seed]
    for_each: group
    batch_size: 4
    seed_bank: seed
    proxy: { kind: search, rounds: 1, candidates: 2 }
";

#[test]
fn a_single_group_bank_seeds_every_groups_search() {
    let p = Project::new();
    p.write("m.yaml", &with_prune(SEEDED));
    let out = p.run(&["validate", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The seed is an ordinary upstream instance: a static edge to each group's search.
    let dot = stdout(&p.run(&["graph", "m.yaml"]));
    for g in 0..2 {
        assert!(dot.contains(&format!("\"seed\" -> \"prune[{g}]\"")), "{dot}");
    }

    let (out, run) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let seed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(outputs(&run, "seed")["bank.json"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(seed["group"], 1);
    let seed_plans: Vec<&serde_json::Value> =
        seed["entries"].as_array().unwrap().iter().map(|e| &e["plan"]).collect();
    for g in 0..2 {
        let bank: serde_json::Value = serde_json::from_slice(
            &std::fs::read(outputs(&run, &format!("prune[{g}]"))["bank.json"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let round0: Vec<&serde_json::Value> =
            bank["entries"].as_array().unwrap().iter().filter(|e| e["round"] == 0).collect();
        assert!(!round0.is_empty(), "prune[{g}]: {bank:#}");
        for e in &round0 {
            assert_eq!(e["seeded"]["group"], 1, "{e}");
        }
        if g == 1 {
            // The seed's own group: its plans are already tight, so they come back as they are.
            for e in &round0 {
                assert!(seed_plans.contains(&&e["plan"]), "{e}");
            }
        }
    }

    // The seed is part of the key: a longer seed search re-runs every seeded search.
    p.write("m.yaml", &with_prune(&SEEDED.replacen("rounds: 1", "rounds: 2", 1)));
    let (out, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(status_of(&plan, "base"), "cached");
    for id in ["seed", "prune[0]", "prune[1]"] {
        assert_eq!(status_of(&plan, id), "run", "{id}");
    }
    // And so is `seed_bank` itself.
    p.write("m.yaml", &with_prune(&SEEDED.replace("    seed_bank: seed\n", "")));
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    let rows = stage_rows(&plan);
    let r0 = rows.iter().find(|r| r.0 == "prune[0]").unwrap();
    assert_eq!(r0.1, "run");
    assert!(r0.2.iter().any(|r| r.contains("prune.seed_bank")), "{:?}", r0.2);
}

#[test]
fn bad_seed_banks_and_groups_are_reported_with_positions() {
    let p = Project::new();
    p.write(
        "m.yaml",
        &with_prune(
            "  seed:
    kind: prune
    needs: [base, allocate]
    batch_size: 4
  prune:
    kind: prune
    needs: [base, allocate]
    for_each: group
    group: 0
    seed_bank: seed
    proxy: { kind: search }
  fanned:
    kind: prune
    needs: [base, allocate, prune]
    for_each: group
    seed_bank: prune[1]
    proxy: { kind: llm }
  importance:
    kind: prune
    needs: [base, allocate, prune]
    for_each: group
    seed_bank: prune
  garbled:
    kind: prune
    needs: [base, allocate, prune]
    for_each: group
    seed_bank: \"prune[x\"
    proxy: { kind: search }
",
        ),
    );
    let out = p.run(&["validate", "m.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("m.yaml:")).collect();
    let expected = [
        "m.yaml:15:5: `stages.seed`: a `prune` stage prunes for one group: give it `for_each: \
         group`, or `group: <index>` for a single group, or a `budget` (a fraction of the base \
         MACs) for one model over all timesteps",
        "m.yaml:22:5: `stages.prune.group`: `group` is the one group of a stage without \
         `for_each: group`; remove one of the two",
        "m.yaml:23:5: `stages.prune.seed_bank`: stage `seed` is not among the stages this one \
         needs",
        "m.yaml:29:5: `stages.fanned.seed_bank`: `prune[1]` names one group's instance, but a \
         `for_each: group` stage receives only its own group's instance of a fanned-out stage",
        "m.yaml:35:5: `stages.importance.seed_bank`: only the `search` and `llm` proxies start \
         from a memory bank, not `magnitude`",
        "m.yaml:40:5: `stages.garbled.seed_bank`: expected `<stage>` or `<stage>[<group>]`, got \
         `prune[x`",
    ];
    assert_eq!(lines, expected, "{err}");
    assert!(err.contains("hint: add `seed` to `needs`"), "{err}");
}

/// A canary key with a `/`, which a JSON encoder may escape as `\/`.
const CANARY: &str = "sk-canary/5d1e9f-echoed-back";

#[test]
fn issue_17_an_api_key_echoed_by_the_endpoint_is_in_no_file_under_the_cache() {
    let server = Server::start();
    let escaped = CANARY.replace('/', "\\/");
    // An error that echoes the Authorization header (retried), then answers that echo it in an
    // extra field, JSON-escaped, and inside the message.
    server.push(Answer::status(
        500,
        format!(
            r#"{{"error": {{"message": "upstream rejected `Authorization: Bearer {CANARY}`"}}}}"#
        ),
    ));
    let content = format!("{{\"plans\": [{{}}]}} (request signed with {CANARY})");
    let body = serde_json::json!({
        "id": "x",
        "echo": { "authorization": format!("Bearer {CANARY}") },
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content } }]
    })
    .to_string()
    .replace(CANARY, &escaped);
    server.set_fallback(Answer::status(
        200,
        format!("{}, \"raw\": \"{CANARY}\"}}", &body[..body.len() - 1]),
    ));
    let p = Project::new();
    p.write(
        "m.yaml",
        &with_prune(&format!(
            "  prune:\n    kind: prune\n    needs: [base, allocate]\n    for_each: group\n    \
             batch_size: 4\n    proxy: {{ kind: llm, endpoint: \"{}\", model: test-model, \
             api_key_env: {LLM_KEY_ENV}, rounds: 1, candidates: 1, timeout_s: 30, \
             backoff_ms: 10 }}\n",
            server.url
        )),
    );
    let out = p.cmd(&["run", "--json", "m.yaml"]).env(LLM_KEY_ENV, CANARY).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let requests = server.requests();
    assert_eq!(requests.len(), 3, "one retry after the 500, then one request per group");
    assert!(requests.iter().all(|r| r.head.contains(CANARY)), "the key is sent");
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains(CANARY) && !text.contains(&escaped), "{text}");
    }
    let mut files = Vec::new();
    files_under(&p.cache(), &mut files);
    let responses: Vec<_> =
        files.iter().filter(|f| f.to_string_lossy().contains("/responses/")).collect();
    assert_eq!(responses.len(), 2, "{files:?}");
    for r in responses {
        let text = std::fs::read_to_string(r).unwrap();
        assert!(text.contains("<redacted>"), "{text}");
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for needle in [CANARY, &escaped, "5d1e9f-echoed-back"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "`{needle}` is in {}",
                f.display()
            );
        }
    }
    // The stored (redacted) answers serve a second run: no request, same plans.
    let out = p.cmd(&["run", "--json", "m.yaml"]).env(LLM_KEY_ENV, CANARY).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.requests().len(), 3);
}

/// The bank directories under the cache.
fn banks(p: &Project) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(p.cache().join("v1/prune-banks"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

#[test]
fn issue_17_gc_collects_the_banks_no_kept_prune_instance_claims() {
    let p = Project::new();
    let manifest = &PRUNE[..PRUNE.find("  finetune:").unwrap()];
    p.write("m.yaml", manifest);
    let (out, first) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let old = banks(&p);
    assert_eq!(old.len(), 2);
    for (g, dir) in old.iter().enumerate() {
        let owners: Vec<String> = std::fs::read_dir(dir.join("owners"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(owners.len(), 1, "{owners:?}");
        let keys: Vec<&str> = (0..2)
            .map(|i| {
                first["stages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["id"] == format!("prune[{i}]"))
                    .unwrap()["key"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert!(keys.contains(&owners[0].as_str()), "group {g}: {owners:?} not in {keys:?}");
    }

    // More rounds: another key resumes the same banks and claims them too; gc keeping the new
    // manifest keeps them, though the old prune records go.
    p.write("m.yaml", &manifest.replace("rounds: 2", "rounds: 3"));
    let (out, _) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(banks(&p), old);
    let out = p.run(&["cache", "gc", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("removed 2 records, "), "{}", stdout(&out));
    assert!(stdout(&out).contains(", 0 prune banks,"), "{}", stdout(&out));
    assert_eq!(banks(&p), old);

    // Another base model: new banks; the old ones are claimed by no kept instance any more.
    p.write(
        "m.yaml",
        &manifest
            .replace("rounds: 2", "rounds: 3")
            .replace("base: { kind: train, steps: 10", "base: { kind: train, steps: 11"),
    );
    let (out, _) = p.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(banks(&p).len(), 4);
    let out = p.run(&["cache", "gc", "m.yaml", "--dry-run"]);
    assert!(stdout(&out).contains(", 2 prune banks,"), "{}", stdout(&out));
    assert_eq!(banks(&p).len(), 4, "a dry run removes nothing");
    let out = p.run(&["cache", "gc", "m.yaml"]);
    assert!(stdout(&out).contains(", 2 prune banks,"), "{}", stdout(&out));
    let new = banks(&p);
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|d| !old.contains(d)));
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert!(stage_rows(&plan).iter().all(|r| r.1 == "cached"), "{plan:#}");

    // Nothing kept: no bank is left.
    let out = p.run(&["cache", "gc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(banks(&p).is_empty());
}
