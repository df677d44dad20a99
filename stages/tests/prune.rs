//! Structured pruning (issue 4): exactness of an empty plan, any plan gives a working model whose
//! counted MACs equal the analytic count, every proxy fits budgets from 0.3 to 1.0 tightly, and
//! the `prune` stage (including the `search` proxy's cached memory bank).

mod prune_fixture;

use std::collections::BTreeMap;

use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::context::{StageContext, UpstreamOutputs};
use progdiff_stages::cost::cost;
use progdiff_stages::diffusion::GaussianDiffusion;
use progdiff_stages::prune::budget::{
    ScorePriority, ShapePriority, fit, is_tight, macs_of, plan_of,
};
use progdiff_stages::prune::importance::{self, LossBatch};
use progdiff_stages::prune::search::{Bank, BankEntry, BankFile};
use progdiff_stages::prune::{self, Plan, PruneParams, Structure};
use progdiff_stages::unet::UNetArch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use prune_fixture::*;

fn forward(ckpt: &Checkpoint, x: &Tensor, t: &Tensor) -> (Tensor, u64) {
    let vs = VarStore::new(Device::Cpu);
    let net = ckpt.build(&vs).unwrap();
    tch::no_grad(|| net.forward_counting_macs(x, t))
}

fn inputs() -> (Tensor, Tensor) {
    tch::manual_seed(7);
    (Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[3i64, 31]))
}

fn random_plan(s: &Structure, rng: &mut ChaCha8Rng) -> Plan {
    s.units()
        .iter()
        .map(|u| (u.name.clone(), u.step * rng.gen_range(1..=u.full / u.step)))
        .collect()
}

#[test]
fn units_cover_hidden_heads_and_streams() {
    let s = Structure::new(&UNetArch::from_config(&model(32)).unwrap());
    let names: Vec<&str> = s.units().iter().map(|u| u.name.as_str()).collect();
    assert!(names.contains(&"input_blocks.1.0.hidden"));
    assert!(names.contains(&"input_blocks.3.1.heads"));
    assert!(names.contains(&"input_blocks.0.0.stream"));
    assert!(names.contains(&"output_blocks.0.0.stream"));
    // An identity-skip ResBlock writes no new stream.
    assert!(!names.contains(&"input_blocks.1.0.stream"));
    let err = s.check(&BTreeMap::from([("input_blocks.3.0.hidden".to_string(), 40)])).unwrap_err();
    assert_eq!(err, "`input_blocks.3.0.hidden` keeps 40, expected a multiple of 32 in [32, 64]");
}

#[test]
fn an_empty_plan_is_exact() {
    let base = random_checkpoint(&model(64), 1);
    let s = Structure::new(&base.arch);
    let scores = importance::magnitude(&s, &base);
    let same = s.apply(&base, &s.full_plan(), &scores).unwrap();
    assert_eq!(same.arch, base.arch);
    let (x, t) = inputs();
    let (a, _) = forward(&base, &x, &t);
    let (b, _) = forward(&same, &x, &t);
    assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
}

#[test]
fn any_plan_runs_forward_and_backward_and_counted_macs_equal_the_analytic_count() {
    let base = random_checkpoint(&model(64), 2);
    let s = Structure::new(&base.arch);
    let scores = importance::random(&s, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (x, t) = inputs();
    for _ in 0..6 {
        let plan = random_plan(&s, &mut rng);
        let pruned = s.apply(&base, &plan, &scores).unwrap();
        assert_eq!(pruned.arch, s.arch_for(&plan));
        let (y, counted) = forward(&pruned, &x, &t);
        assert_eq!(y.size(), [2, 2, 8, 8]);
        assert_eq!(counted, cost(&pruned.arch).macs);
        assert_eq!(counted, macs_of(&s, &s.widths(&plan)));
        // Backward reaches every parameter.
        let vs = VarStore::new(Device::Cpu);
        let net = pruned.build(&vs).unwrap();
        net.forward_t(&x, &t, true).square().mean(None).backward();
        for (name, v) in vs.variables() {
            assert!(v.grad().defined(), "{name}");
        }
    }
}

/// A head whose `proj_out` columns are zero contributes nothing: removing it is exact, and the
/// head kept is the one with the larger score.
#[test]
fn pruning_a_dead_head_is_exact() {
    let mut base = random_checkpoint(&model(32), 3);
    let name = "middle_block.1.proj_out.weight";
    let w = base.tensors[name].copy();
    let _ = w.narrow(1, 0, 32).zero_(); // head 0 of 2 (head_dim 32)
    base.tensors.insert(name.to_string(), w);
    let s = Structure::new(&base.arch);
    let scores = importance::magnitude(&s, &base);
    let unit = s.unit_index("middle_block.1.heads").unwrap();
    assert!(scores[unit][0] < scores[unit][1]);
    let plan = BTreeMap::from([("middle_block.1.heads".to_string(), 1)]);
    let pruned = s.apply(&base, &plan, &scores).unwrap();
    let (x, t) = inputs();
    let (a, _) = forward(&base, &x, &t);
    let (b, _) = forward(&pruned, &x, &t);
    assert!((a - b).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn every_importance_proxy_fits_budgets_from_0_3_to_1_tightly() {
    let base = random_checkpoint(&model(64), 4);
    let s = Structure::new(&base.arch);
    let d = GaussianDiffusion::from_config(&diffusion(), true).unwrap();
    tch::manual_seed(0);
    let x0 = Tensor::rand([4, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2 - 1;
    let timesteps: Vec<usize> = (0..40).collect();
    let batch = LossBatch::new(x0, &timesteps, 1, Device::Cpu);
    let proxies = [
        ("random", importance::random(&s, 1)),
        ("magnitude", importance::magnitude(&s, &base)),
        ("taylor", importance::taylor(&s, &base, &d, &batch).unwrap()),
        (
            "diff-pruning",
            importance::diff_pruning(&s, &base, &d, &batch, &timesteps, 0.05, 8).unwrap().0,
        ),
    ];
    let full = cost(&base.arch).macs;
    for ratio in [0.3, 0.45, 0.6, 0.75, 0.9, 1.0] {
        let bound = (ratio * full as f64) as u64;
        for (name, scores) in &proxies {
            let plan = fit(&s, &s.full_plan(), bound, &ScorePriority::new(&s, scores)).unwrap();
            assert!(is_tight(&s, &plan, bound), "{name} at {ratio}");
            let pruned = s.apply(&base, &plan, scores).unwrap();
            assert!(cost(&pruned.arch).macs <= bound, "{name} at {ratio}");
        }
        // A proposal far outside the budget (or the ranges) is repaired too.
        let wild: Plan = s.units().iter().map(|u| (u.name.clone(), 1000 * u.full)).collect();
        let plan = fit(&s, &wild, bound, &ShapePriority).unwrap();
        assert!(is_tight(&s, &plan, bound), "shape at {ratio}");
    }
    // The full budget keeps the whole model.
    let plan = fit(&s, &s.full_plan(), full, &ShapePriority).unwrap();
    assert_eq!(plan, s.full_plan());
    // Below the smallest model: a clear error.
    let err = fit(&s, &s.full_plan(), full / 100, &ShapePriority).unwrap_err().to_string();
    assert!(err.contains("below the smallest model the pruning units allow"), "{err}");
}

fn params(proxy: serde_json::Value) -> PruneParams {
    serde_json::from_value(serde_json::json!({ "proxy": proxy, "batch_size": 4 })).unwrap()
}

#[test]
fn the_stage_prunes_each_group_within_budget_with_every_importance_proxy_and_writes_its_bank() {
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    for (i, proxy) in ["random", "magnitude", "taylor", "diff-pruning"].into_iter().enumerate() {
        for g in 0..2 {
            let c = ctx(root.path(), &format!("{proxy}{g}"), &format!("k{i}{g}"), g, ups.clone());
            let r = run_stage(&c, &params(serde_json::json!({ "kind": proxy })));
            let macs = r["pruned"]["macs"].as_u64().unwrap();
            assert!(macs <= r["bound_macs"].as_u64().unwrap(), "{proxy}[{g}]: {r}");
            assert!(r["ratio_to_budget"].as_f64().unwrap() > 0.8, "{proxy}[{g}]: {r}");
            assert!(r["loss_before"].as_f64().unwrap().is_finite());
            assert!(r["loss_after"].as_f64().unwrap().is_finite());
            let pruned = Checkpoint::load(&c.out_dir.join("model.safetensors")).unwrap();
            let ema = Checkpoint::load(&c.out_dir.join("ema.safetensors")).unwrap();
            assert_eq!(cost(&pruned.arch).macs, macs);
            assert_eq!(pruned.arch, ema.arch);
            assert_eq!(
                r["units"].as_array().unwrap().len(),
                Structure::new(&UNetArch::from_config(&model(64)).unwrap()).units().len()
            );
            if proxy == "diff-pruning" {
                assert!(r["timesteps_used"].as_u64().unwrap() >= 1);
            }
            // A one-entry bank in the search's format: the plan and the loss it gave.
            let b = BankFile::read(&c.out_dir.join("bank.json")).unwrap();
            assert_eq!((b.group, b.rounds, b.entries.len()), (g, 1, 1), "{proxy}[{g}]");
            let e = &b.entries[0];
            let kept: Plan = r["units"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| {
                    (u["name"].as_str().unwrap().to_string(), u["kept"].as_u64().unwrap() as usize)
                })
                .collect();
            assert_eq!((e.round, &e.plan, e.macs, e.seeded.clone()), (1, &kept, macs, None));
            assert_eq!(e.loss, r["loss_after"].as_f64().unwrap());
            assert_eq!(b.best, kept);
        }
    }
}

#[test]
fn a_budget_prunes_one_model_for_every_timestep_without_an_allocation() {
    let root = tempfile::tempdir().unwrap();
    // Only the base checkpoint upstream: no allocation, no group.
    let ups: Vec<UpstreamOutputs> =
        upstream(root.path()).into_iter().filter(|u| u.kind != "snr-allocate").collect();
    let mut c = ctx(root.path(), "table4", "t4", 0, ups.clone());
    c.group = None;
    let mut p = params(serde_json::json!({ "kind": "magnitude" }));
    p.budget = Some(0.6);
    let r = run_stage(&c, &p);
    let base_macs = cost(&UNetArch::from_config(&model(64)).unwrap()).macs;
    assert_eq!(r["bound_ratio"].as_f64().unwrap(), 0.6);
    assert_eq!(r["bound_macs"].as_u64().unwrap(), (0.6 * base_macs as f64).floor() as u64);
    let macs = r["pruned"]["macs"].as_u64().unwrap();
    assert!(
        macs <= r["bound_macs"].as_u64().unwrap() && r["ratio_to_budget"].as_f64().unwrap() > 0.8,
        "{r}"
    );
    // Without a budget the same stage has no group to prune for: a clear error.
    p.budget = None;
    let err = try_run(&c, &p).unwrap_err().to_string();
    assert!(err.contains("or a `budget` for one model over all timesteps"), "{err}");
    // With a group, the budget replaces the group's bound.
    let mut p = params(serde_json::json!({ "kind": "magnitude" }));
    p.budget = Some(0.45);
    let c = ctx(root.path(), "g1", "g1", 1, upstream(root.path()));
    let r = run_stage(&c, &p);
    assert_eq!(r["bound_ratio"].as_f64().unwrap(), 0.45);
    // Out of range budgets are rejected by validation.
    for bad in [0.0, 1.5, f64::NAN] {
        p.budget = Some(bad);
        let errs = p.validate();
        assert!(errs.iter().any(|e| e.path == ["budget"]), "{bad}: {errs:?}");
    }
}

#[test]
fn search_is_deterministic_and_raising_rounds_reuses_the_cached_bank() {
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    let search = |rounds: usize| {
        params(serde_json::json!({ "kind": "search", "rounds": rounds, "candidates": 2 }))
    };
    let c2 = ctx(root.path(), "s2", "key-rounds-2", 0, ups.clone());
    let r2 = run_stage(&c2, &search(2));
    let b2 = bank(&c2.out_dir);
    assert_eq!(b2.entries.len(), 4);
    assert!(r2["pruned"]["macs"].as_u64().unwrap() <= r2["bound_macs"].as_u64().unwrap());
    let best = b2.ranked()[0].loss;
    assert!((r2["loss_after"].as_f64().unwrap() - best).abs() < 1e-9);

    // Mark round 2's saved bank: a run with more rounds must read it instead of recomputing.
    let banks = root.path().join("cache/v1/prune-banks");
    let dirs: Vec<_> = std::fs::read_dir(&banks).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1);
    let round2 = dirs[0].join("round-2.json");
    let mut saved: Bank = serde_json::from_slice(&std::fs::read(&round2).unwrap()).unwrap();
    saved.entries[3].loss += 1000.0;
    std::fs::write(&round2, serde_json::to_vec(&saved).unwrap()).unwrap();

    let c3 = ctx(root.path(), "s3", "key-rounds-3", 0, ups.clone());
    run_stage(&c3, &search(3));
    let b3 = bank(&c3.out_dir);
    assert_eq!(b3.entries.len(), 6);
    assert_eq!(b3.entries[..4], saved.entries[..], "rounds 1-2 come from the cached bank");

    // A fresh cache computes the same first two rounds (deterministic from the seed).
    let other = tempfile::tempdir().unwrap();
    let ups2 = upstream(other.path());
    // The same base weights (the global RNG is shared by tests running in parallel).
    std::fs::copy(
        root.path().join("base/model.safetensors"),
        other.path().join("base/model.safetensors"),
    )
    .unwrap();
    let c = ctx(other.path(), "s2", "key", 0, ups2);
    run_stage(&c, &search(2));
    let fresh = bank(&c.out_dir);
    for (a, b) in fresh.entries.iter().zip(&b2.entries) {
        assert_eq!(a.plan, b.plan);
        assert!((a.loss - b.loss).abs() < 1e-9);
    }
}

/// Every plan one unit step away from `plan` (or `plan` itself), fitted to `bound`: what the
/// search's one-mutation proposals from `plan` can be.
fn one_step_fitted(s: &Structure, plan: &Plan, bound: u64) -> Vec<Plan> {
    let w = s.widths(plan);
    let mut out = vec![fit(s, plan, bound, &ShapePriority).unwrap()];
    for (i, u) in s.units().iter().enumerate() {
        for v in [(w[i] + u.step).min(u.full), w[i].saturating_sub(u.step).max(u.min())] {
            let mut m = w.clone();
            m[i] = v;
            out.push(fit(s, &plan_of(s, &m), bound, &ShapePriority).unwrap());
        }
    }
    out
}

#[test]
fn a_seed_bank_starts_the_search_from_another_groups_plans_re_measured() {
    let root = tempfile::tempdir().unwrap();
    let ups = upstream(root.path());
    let s = Structure::new(&UNetArch::from_config(&model(64)).unwrap());
    let search = |seed: Option<&str>, parents: usize| -> PruneParams {
        serde_json::from_value(serde_json::json!({
            "proxy": { "kind": "search", "rounds": 1, "candidates": 3, "parents": parents,
                       "mutations": 1 },
            "batch_size": 4,
            "seed_bank": seed,
        }))
        .unwrap()
    };
    let as_upstream = |c: &StageContext| UpstreamOutputs {
        id: c.id.clone(),
        kind: "prune".into(),
        group: None,
        // A `prune` instance outputs a model too: not the one to prune.
        files: ["bank.json", "model.safetensors", "ema.safetensors", "report.json"]
            .into_iter()
            .map(|f| (f.to_string(), c.out_dir.join(f)))
            .collect(),
    };

    // The seed: group 1's search, 2 rounds x 2 plans.
    let cs = ctx(root.path(), "seed", "k-seed", 1, ups.clone());
    run_stage(&cs, &params(serde_json::json!({ "kind": "search", "rounds": 2, "candidates": 2 })));
    let seed = BankFile::read(&cs.out_dir.join("bank.json")).unwrap();
    assert_eq!((seed.group, seed.entries.len()), (1, 4));

    // Group 0 without and with the seed.
    let cp = ctx(root.path(), "plain", "k-plain", 0, ups.clone());
    run_stage(&cp, &search(None, 1));
    let plain = BankFile::read(&cp.out_dir.join("bank.json")).unwrap();
    let mut seeded_ups = ups.clone();
    seeded_ups.push(as_upstream(&cs));
    let c = ctx(root.path(), "seeded", "k-seeded", 0, seeded_ups);
    let r = run_stage(&c, &search(Some("seed"), 1));
    let b = BankFile::read(&c.out_dir.join("bank.json")).unwrap();
    let bound = r["bound_macs"].as_u64().unwrap();
    assert!(r["pruned"]["macs"].as_u64().unwrap() <= bound);

    // Round 0: the seed's plans, best first, fitted to this group's bound, duplicates dropped,
    // each measured again here (the seed's loss kept aside).
    let mut ranked: Vec<&BankEntry> = seed.entries.iter().collect();
    ranked.sort_by(|a, b| a.loss.total_cmp(&b.loss));
    let mut expected: Vec<(Plan, f64)> = Vec::new();
    for e in ranked {
        let f = fit(&s, &e.plan, bound, &ShapePriority).unwrap();
        if !expected.iter().any(|(p, _)| *p == f) {
            expected.push((f, e.loss));
        }
    }
    let round0: Vec<&BankEntry> = b.entries.iter().filter(|e| e.round == 0).collect();
    assert_eq!(round0.len(), expected.len());
    assert_eq!(b.entries[..round0.len()].iter().collect::<Vec<_>>(), round0, "round 0 comes first");
    for (e, (plan, seed_loss)) in round0.iter().zip(&expected) {
        assert_eq!(&e.plan, plan);
        let origin = e.seeded.as_ref().expect("a seeded entry says where it came from");
        assert_eq!((origin.group, origin.loss), (1, *seed_loss));
        assert!(e.loss.is_finite() && e.loss != origin.loss, "re-measured on group 0: {e:?}");
        assert!(e.macs <= bound);
    }

    // Round 1 mutates the seed's best plan: with one parent and one unit step per mutation,
    // every candidate is one of its one-step neighbours fitted to the bound. The unseeded search
    // starts from the importance-greedy plan instead.
    assert_eq!(b.rounds, 1);
    let round1: Vec<&BankEntry> = b.entries.iter().filter(|e| e.round == 1).collect();
    assert_eq!(round1.len(), 3);
    let parent = &round0.iter().min_by(|a, b| a.loss.total_cmp(&b.loss)).unwrap().plan;
    let near = one_step_fitted(&s, parent, bound);
    for e in &round1 {
        assert!(near.contains(&e.plan), "{:?} is no one-step mutation of the seed's best", e.plan);
    }
    assert!(!near.contains(&plain.entries[0].plan), "the test needs a seed far from greedy");
    assert!(!b.entries.iter().any(|e| e.plan == plain.entries[0].plan));

    // Seeding from the same group's bank re-measures exactly: tight plans are kept as they
    // are and the batch is the same, so the losses are the unseeded search's.
    let mut same_ups = ups.clone();
    same_ups.push(as_upstream(&cp));
    let c2 = ctx(root.path(), "same", "k-same", 0, same_ups);
    run_stage(&c2, &search(Some("plain"), 1));
    let b2 = BankFile::read(&c2.out_dir.join("bank.json")).unwrap();
    let mut plain_ranked = plain.entries.clone();
    plain_ranked.sort_by(|a, b| a.loss.total_cmp(&b.loss));
    let same0: Vec<&BankEntry> = b2.entries.iter().filter(|e| e.round == 0).collect();
    assert_eq!(same0.len(), plain_ranked.len());
    for (e, p) in same0.iter().zip(&plain_ranked) {
        assert_eq!((&e.plan, e.loss), (&p.plan, p.loss));
    }

    // The seed is part of the bank side store's key: seed, plain, and one per seeded search.
    let banks = root.path().join("cache/v1/prune-banks");
    assert_eq!(std::fs::read_dir(&banks).unwrap().count(), 4);

    // References that resolve to no bank fail before any work.
    let c3 = ctx(root.path(), "bad", "k-bad", 0, ups.clone());
    let try_seed = |seed: &str| {
        let inputs = prune_inputs(&search(Some(seed), 1));
        format!("{:#}", prune::run(&c3, &inputs).unwrap_err())
    };
    let e = try_seed("nowhere");
    assert!(e.contains("stage `nowhere` is not upstream of `bad`"), "{e}");
    let e = try_seed("base");
    assert!(e.contains("upstream `base` (`train`) has no memory bank (`bank.json`)"), "{e}");
    let e = try_seed("allocate[1]");
    assert!(e.contains("not `allocate[1]`"), "{e}");
}
