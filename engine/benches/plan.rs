//! Benchmark: `plan` on a fully cached manifest of 200+ stage instances (`groups: 100`, two
//! fanned-out stages), one of whose outputs is a 256 MiB "checkpoint". Planning must not re-hash
//! cached outputs, so its time is independent of checkpoint sizes. Target: under 200 ms here.
//!
//! The same manifest as a sweep over five group counts (20..100: 600+ instances sharing the base
//! stage) is planned too, to show what expanding and merging variants costs.
//!
//! `cargo build --release --bin progdiff-worker && cargo bench -p progdiff --bench plan` (the
//! cache is populated by worker processes).

use std::time::Instant;

use progdiff::dag::Dag;
use progdiff::executor::{self, RunOptions, Workers};
use progdiff::manifest::{Experiment, Manifest};
use progdiff::plan::{self, PlanStatus};
use progdiff_cache::Cache;
use progdiff_kinds::context::CancelToken;

const MANIFEST: &str = "
name: bench-plan
diffusion: { steps: 1000, schedule: cosine }
stages:
  base:
    kind: command
    run: head -c 268435456 /dev/zero > $PROGDIFF_OUT/checkpoint.bin
  allocate: { kind: snr-allocate, groups: 100, k: 0.5, schedule: increasing }
  prune:
    kind: command
    needs: [base, allocate]
    for_each: group
    run: echo $PROGDIFF_GROUP > $PROGDIFF_OUT/pruned.txt
  finetune:
    kind: command
    needs: prune
    for_each: group
    run: echo $PROGDIFF_GROUP > $PROGDIFF_OUT/finetuned.txt
  eval:
    kind: command
    needs: finetune
    run: echo done > $PROGDIFF_OUT/metrics.txt
";

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.yaml");
    std::fs::write(&path, MANIFEST).expect("write manifest");
    let cache = Cache::open(dir.path().join("cache")).expect("cache");

    let m = Manifest::load(&path).expect("valid manifest");
    let dag = Dag::build(&m);
    let p = plan::plan(&m, &dag, &cache).expect("plan");
    let t = Instant::now();
    let worker = progdiff::worker::binary().expect("the worker binary");
    let opts = RunOptions { jobs: 2, ..RunOptions::new(worker) };
    let summary = executor::run(&p, &cache, &opts, &CancelToken::new(), &Workers::default());
    assert!(summary.success(), "{summary:#?}");
    println!(
        "populated the cache: {} stage instances in {:.1}s",
        dag.instances.len(),
        t.elapsed().as_secs_f64()
    );

    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let m = Manifest::load(&path).expect("valid manifest");
        let dag = Dag::build(&m);
        let p = plan::plan(&m, &dag, &cache).expect("plan");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(p.stages.iter().all(|s| s.status == PlanStatus::Cached));
        assert!(p.stages.len() >= 200);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "plan (load + validate + expand + keys + cache lookups), {} instances, fully cached: median {:.1} ms, min {:.1} ms, max {:.1} ms (target < 200 ms)",
        dag.instances.len(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );

    let swept = dir.path().join("sweep.yaml");
    let text =
        format!("{MANIFEST}sweep:\n  product: {{ allocate.groups: [20, 40, 60, 80, 100] }}\n");
    std::fs::write(&swept, text).expect("write manifest");
    let exp = Experiment::load(&swept).expect("valid manifest");
    let p = plan::plan_experiment(&exp, &cache).expect("plan");
    let t = Instant::now();
    let summary = executor::run(&p, &cache, &opts, &CancelToken::new(), &Workers::default());
    assert!(summary.success(), "{summary:#?}");
    println!(
        "populated the cache: {} variants, {} stage instances ({} ran) in {:.1}s",
        exp.variants.len(),
        p.stages.len(),
        summary.count(executor::RunStatus::Ran),
        t.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let exp = Experiment::load(&swept).expect("valid manifest");
        let p = plan::plan_experiment(&exp, &cache).expect("plan");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(p.stages.iter().all(|s| s.status == PlanStatus::Cached));
    }
    times.sort_by(f64::total_cmp);
    println!(
        "plan of the 5-variant sweep, fully cached: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}
