//! The `llm` pruning proxy (issue 4) against a local OpenAI-compatible test server on 127.0.0.1:
//! the request's fields and memory bank, malformed / over-budget / 429 / timeout answers, the
//! response cache (a re-run makes no request), the API key in no file, and raising `rounds`.

#[path = "../../tests/support/chat_server.rs"]
mod chat_server;
mod prune_fixture;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use progdiff_stages::context::UpstreamOutputs;
use progdiff_stages::prune::search::BankFile;
use progdiff_stages::prune::{Plan, PruneParams, Structure};
use progdiff_stages::unet::UNetArch;
use serde_json::{Value, json};

use chat_server::{Answer, Request, Server, chat};
use prune_fixture::*;

const KEY_ENV: &str = "PROGDIFF_TEST_PRUNE_LLM_KEY";
const KEY: &str = "sk-test-3f9a71c2e8b4-do-not-store";

#[allow(unsafe_code)]
fn set_key() {
    // SAFETY: every test of this binary sets the same value before reading it; nothing else
    // in the process reads or writes this variable.
    unsafe {
        std::env::set_var(KEY_ENV, KEY);
    }
}

fn plans_answer(plans: &[Plan]) -> String {
    json!({ "plans": plans }).to_string()
}

fn llm_params(server: &Server, rounds: usize, max_retries: usize) -> PruneParams {
    serde_json::from_value(json!({
        "proxy": {
            "kind": "llm", "endpoint": server.url, "model": "test-model", "temperature": 0.0,
            "api_key_env": KEY_ENV, "rounds": rounds, "candidates": 2, "timeout_s": 1,
            "max_retries": max_retries, "backoff_ms": 10
        },
        "batch_size": 4
    }))
    .unwrap()
}

fn body(r: &Request) -> Value {
    serde_json::from_str(&r.body).unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

#[test]
fn the_llm_proxy_asks_a_chat_endpoint_handles_bad_answers_and_caches_everything() {
    set_key();
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    let s = Structure::new(&UNetArch::from_config(&model(64)).unwrap());
    let server = Server::start();

    // Round 1: two malformed answers, a 429, a timeout, then a fenced answer with one plan over
    // budget (the full model) and one out of range.
    let full = s.full_plan();
    let odd: Plan = s
        .units()
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.clone(), if i == 0 { 7 } else { u.full * 10 + 3 }))
        .collect();
    server.push(Answer::status(200, "this is not json"));
    server.push(Answer::status(200, chat("Here you go: {\"plans\": [")));
    server.push(Answer::status(429, r#"{"error":"rate limited"}"#));
    server.push(Answer::Stall(Duration::from_millis(1400)));
    server.push(Answer::status(
        200,
        chat(&format!("```json\n{}\n```", plans_answer(&[full.clone(), odd]))),
    ));
    let c1 = ctx(root.path(), "llm1", "key-rounds-1", 0, ups.clone());
    let r1 = try_run(&c1, &llm_params(&server, 1, 4)).unwrap();
    let bound = r1["bound_macs"].as_u64().unwrap();
    assert!(r1["pruned"]["macs"].as_u64().unwrap() <= bound, "{r1}");
    let b1 = bank(&c1.out_dir);
    assert_eq!(b1.rounds, 1);
    assert_eq!(b1.entries.len(), 2);
    for e in &b1.entries {
        assert!(e.macs <= bound, "a repaired plan is within budget: {e:?}");
        s.check(&e.plan).unwrap();
    }
    let reqs = server.requests();
    assert_eq!(reqs.len(), 5, "malformed x2, 429, timeout, success");
    for r in &reqs {
        assert!(r.head.starts_with("POST /v1/chat/completions "), "{}", r.head);
        let auth = format!("authorization: bearer {KEY}");
        assert!(r.head.to_ascii_lowercase().contains(&auth.to_ascii_lowercase()), "{}", r.head);
        assert!(!r.body.contains(KEY));
        assert_eq!(r.body, reqs[0].body, "a retry re-sends the same request");
    }
    let b = body(&reqs[0]);
    assert_eq!(b["model"], "test-model");
    assert_eq!(b["temperature"].as_f64(), Some(0.0));
    assert_eq!(b["messages"][0]["role"], "system");
    assert_eq!(b["messages"][1]["role"], "user");
    let user = b["messages"][1]["content"].as_str().unwrap();
    for u in s.units() {
        assert!(user.contains(&u.name), "the prompt lists unit `{}`", u.name);
    }
    assert!(user.contains(&bound.to_string()), "the prompt gives the MACs budget");
    assert!(user.contains("exactly 2 plans"));

    // Raising rounds to 2 asks only for round 2, whose prompt carries round 1's results. The
    // answer gives one plan: the other is filled by mutation.
    let half: Plan = s.units().iter().map(|u| (u.name.clone(), u.clamp(u.full / 2))).collect();
    server.push(Answer::status(200, chat(&plans_answer(&[half]))));
    let c2 = ctx(root.path(), "llm2", "key-rounds-2", 0, ups.clone());
    let r2 = try_run(&c2, &llm_params(&server, 2, 4)).unwrap();
    assert!(r2["pruned"]["macs"].as_u64().unwrap() <= bound);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 6, "one request for round 2 only");
    let user2 = body(&reqs[5])["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(user2.contains("Here are some experimental results you can use as a reference:"));
    for e in &b1.entries {
        let line = format!("{} gives loss {:.6}", serde_json::to_string(&e.plan).unwrap(), e.loss);
        assert!(user2.contains(&line), "round 2's prompt has `{line}`:\n{user2}");
    }
    let b2 = bank(&c2.out_dir);
    assert_eq!(b2.entries.len(), 4);
    assert_eq!(b2.entries[..2], b1.entries[..], "round 1 comes from the cached bank");
    assert!(b2.entries.iter().all(|e| e.macs <= bound));

    // A second run makes no request: from the bank, and with the banks deleted, from the
    // response cache (the same requests, so the same plans and losses).
    try_run(&c2, &llm_params(&server, 2, 4)).unwrap();
    assert_eq!(server.requests().len(), 6);
    let banks = root.path().join("cache/v1/prune-banks");
    let dirs: Vec<_> = std::fs::read_dir(&banks).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1);
    for r in 1..=2 {
        std::fs::remove_file(dirs[0].join(format!("round-{r}.json"))).unwrap();
    }
    let c3 = ctx(root.path(), "llm3", "key-rounds-2b", 0, ups.clone());
    try_run(&c3, &llm_params(&server, 2, 4)).unwrap();
    assert_eq!(server.requests().len(), 6, "every response comes from the cache");
    let b3 = bank(&c3.out_dir);
    assert_eq!(b3.entries.len(), 4);
    for (a, b) in b3.entries.iter().zip(&b2.entries) {
        assert_eq!(a.plan, b.plan);
        assert!((a.loss - b.loss).abs() < 1e-9);
    }
    assert_eq!(std::fs::read_dir(dirs[0].join("responses")).unwrap().count(), 2);

    // The key is in no file under the cache, work or output directories.
    let mut files = Vec::new();
    files_under(root.path(), &mut files);
    assert!(files.len() > 5);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "{}", f.display());
    }
}

#[test]
fn the_llm_proxy_fails_clearly_on_client_errors_and_endless_bad_answers() {
    set_key();
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    let server = Server::start();
    server.push(Answer::status(401, format!(r#"{{"error":"bad key {KEY}"}}"#)));
    let c = ctx(root.path(), "e1", "k1", 0, ups.clone());
    let err = format!("{:#}", try_run(&c, &llm_params(&server, 1, 4)).unwrap_err());
    assert!(err.contains("401") && err.contains("bad key"), "{err}");
    assert!(!err.contains(KEY), "{err}");
    assert_eq!(server.requests().len(), 1, "a client error is not retried");

    server.push(Answer::status(200, chat("no json here")));
    server.push(Answer::status(503, "busy"));
    let c = ctx(root.path(), "e2", "k2", 0, ups.clone());
    let err = format!("{:#}", try_run(&c, &llm_params(&server, 1, 1)).unwrap_err());
    assert!(err.contains("no usable answer in 2 attempts") && err.contains("503"), "{err}");
    assert_eq!(server.requests().len(), 3);

    // Unknown fields (a key in the manifest, say) are refused.
    let bad = serde_json::from_value::<PruneParams>(json!({
        "proxy": { "kind": "llm", "api_key": "sk-..." }
    }));
    assert!(bad.is_err());
}

#[test]
fn retry_after_on_a_429_is_honoured() {
    set_key();
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    let server = Server::start();
    server.push(Answer::status(429, r#"{"error":"slow down"}"#).header("Retry-After", "1"));
    server.push(Answer::chat(r#"{"plans": [{}, {}]}"#));
    let c = ctx(root.path(), "ra", "k-ra", 0, ups);
    // backoff_ms is 10: only the header explains a wait of a second.
    try_run(&c, &llm_params(&server, 1, 2)).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let waited = reqs[1].at - reqs[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
}

#[test]
fn a_seed_bank_fills_the_first_prompt_with_the_seeds_plans_re_measured() {
    set_key();
    let root = tempfile::tempdir().unwrap();
    let mut ups = upstream(root.path());
    // The seed: group 1's search bank (2 plans).
    let cs = ctx(root.path(), "seed", "k-seed", 1, ups.clone());
    let search: PruneParams = serde_json::from_value(json!({
        "proxy": { "kind": "search", "rounds": 1, "candidates": 2 }, "batch_size": 4
    }))
    .unwrap();
    try_run(&cs, &search).unwrap();
    let seed: BankFile =
        serde_json::from_slice(&std::fs::read(cs.out_dir.join("bank.json")).unwrap()).unwrap();
    ups.push(UpstreamOutputs {
        id: "seed".into(),
        kind: "prune".into(),
        group: None,
        files: BTreeMap::from([("bank.json".into(), cs.out_dir.join("bank.json"))]),
    });

    let server = Server::start();
    server.push(Answer::chat(r#"{"plans": [{}, {}]}"#));
    let c = ctx(root.path(), "seeded", "k-seeded", 0, ups);
    let mut p = llm_params(&server, 1, 0);
    p.seed_bank = Some("seed".into());
    try_run(&c, &p).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let user = body(&reqs[0])["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(!user.contains("No plan has been measured yet"), "{user}");
    assert!(user.contains("Here are some experimental results you can use as a reference:"));
    let b: BankFile =
        serde_json::from_slice(&std::fs::read(c.out_dir.join("bank.json")).unwrap()).unwrap();
    let round0: Vec<_> = b.entries.iter().filter(|e| e.round == 0).collect();
    assert!(!round0.is_empty() && round0.len() <= seed.entries.len());
    for e in round0 {
        // This group's loss, not the seed's.
        assert_eq!(e.seeded.as_ref().unwrap().group, 1);
        let line = format!("{} gives loss {:.6}", serde_json::to_string(&e.plan).unwrap(), e.loss);
        assert!(user.contains(&line), "the first prompt has `{line}`:\n{user}");
    }
    assert_eq!(b.entries.iter().filter(|e| e.round == 1).count(), 2);
}
