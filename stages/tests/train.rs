//! The `train` stage on a tiny model and the synthetic set: the loss falls, and a resumed run
//! ends with exactly the weights of an uninterrupted one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::config::{DiffusionConfig, ModelConfig};
use progdiff_stages::context::{
    CancelToken, Event, EventSink, Reporter, StageContext, UpstreamOutputs,
};
use progdiff_stages::data::DataConfig;
use progdiff_stages::kind::{Sections, StageKind};
use progdiff_stages::optim::Update;
use progdiff_stages::schedule::NoiseSchedule;
use progdiff_stages::train::{self, Precision, Train, TrainInputs, TrainParams};
use progdiff_stages::transfer;
use tch::Tensor;

fn data() -> DataConfig {
    serde_json::from_value(serde_json::json!({
        "kind": "synthetic", "n": 64, "image_size": 8, "channels": "gray", "seed": 3
    }))
    .unwrap()
}

fn model() -> ModelConfig {
    ModelConfig {
        image_size: 8,
        in_channels: 1,
        channels: 32,
        channel_mult: vec![1],
        res_blocks: 1,
        attention_resolutions: vec![],
        heads: 1,
        dropout: 0.1,
        learn_sigma: true,
        use_scale_shift_norm: true,
    }
}

fn diffusion() -> DiffusionConfig {
    DiffusionConfig { steps: 40, schedule: NoiseSchedule::Cosine, ..DiffusionConfig::default() }
}

fn ctx(root: &Path, name: &str, work: &Path, inputs: Vec<UpstreamOutputs>) -> StageContext {
    let out = root.join(name);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(work).unwrap();
    let mut c = StageContext::new(name, out, work.to_path_buf());
    c.inputs = inputs;
    c
}

/// The inputs of a train stage with `p` in the tests' manifest (seed 11).
fn inputs(p: &TrainParams) -> TrainInputs {
    let (d, m, f) = (data(), model(), diffusion());
    let sections =
        Sections { seed: 11, data: Some(&d), model: &m, diffusion: &f, dir: Path::new(".") };
    Train::inputs(p, &sections)
}

fn run(c: &StageContext, p: &TrainParams) {
    tch::set_num_threads(1);
    train::run(c, &inputs(p)).unwrap();
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("samples_per_s");
            v
        })
        .collect()
}

fn weights(path: PathBuf) -> BTreeMap<String, Vec<f32>> {
    Checkpoint::load(&path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, t)| (k, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect()
}

#[test]
fn loss_falls_on_the_synthetic_set() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path(), "base", &dir.path().join("work"), vec![]);
    let p = TrainParams {
        steps: 200,
        batch_size: 16,
        lr: 2e-3,
        ema: 0.99,
        log_every: 20,
        checkpoint_every: 0,
        ..TrainParams::default()
    };
    run(&c, &p);
    let m = metrics(&c.out_dir);
    assert_eq!(m.len(), 10);
    let first = m[0]["mse"].as_f64().unwrap();
    let last = m[9]["mse"].as_f64().unwrap();
    assert!(last < 0.6 * first, "mse {first} -> {last}");
    assert!(m.iter().all(|l| l["loss_q0"].is_f64() && l["loss_q3"].is_f64()), "{m:?}");
    for f in [train::MODEL_FILE, train::EMA_FILE] {
        let ck = Checkpoint::load(&c.out_dir.join(f)).unwrap();
        assert_eq!(ck.state["step"], "200");
    }
}

/// The resume tests' run: 30 steps, logged every 5, checkpointed every 10.
fn resume_params() -> TrainParams {
    TrainParams {
        steps: 30,
        batch_size: 8,
        lr: 1e-3,
        ema: 0.9,
        log_every: 5,
        checkpoint_every: 10,
        ..TrainParams::default()
    }
}

/// `b` ended with the weights, EMA and logged metrics (throughput aside) of `a`.
fn assert_same_training(a: &StageContext, b: &StageContext) {
    for f in [train::MODEL_FILE, train::EMA_FILE] {
        assert_eq!(weights(a.out_dir.join(f)), weights(b.out_dir.join(f)), "{f}");
    }
    assert_eq!(metrics(&a.out_dir), metrics(&b.out_dir));
}

#[test]
fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = resume_params();
    let whole = ctx(dir.path(), "whole", &dir.path().join("work-whole"), vec![]);
    run(&whole, &p);

    // A run that stopped after its step-10 checkpoint (the same state a kill leaves: its work
    // area holds the checkpoint, and metrics past it), then a run of the full length on the
    // same work area.
    let work = dir.path().join("work-resumed");
    let first = ctx(dir.path(), "first", &work, vec![]);
    run(&first, &TrainParams { steps: 20, ..p.clone() });
    assert!(work.join("latest").exists());
    let resumed = ctx(dir.path(), "resumed", &work, vec![]);
    run(&resumed, &p);
    assert_same_training(&whole, &resumed);
}

/// Cancels its token at the first logged metrics, i.e. after the step that logs them decided
/// whether to save (the moment a Ctrl-C used to be lost between).
struct CancelAtFirstMetrics(CancelToken);

impl EventSink for CancelAtFirstMetrics {
    fn emit(&self, event: &Event) {
        if matches!(event, Event::Metrics { .. }) {
            self.0.cancel();
        }
    }
}

#[test]
fn an_interruption_at_any_moment_saves_the_steps_taken_and_the_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // No periodic checkpoint within the run: only the interruption saves.
    let p = TrainParams { steps: 20, checkpoint_every: 1000, ..resume_params() };
    let whole = ctx(dir.path(), "whole", &dir.path().join("work-whole"), vec![]);
    run(&whole, &p);

    let work = dir.path().join("work-interrupted");
    let mut first = ctx(dir.path(), "first", &work, vec![]);
    first.report = Reporter::to(Arc::new(CancelAtFirstMetrics(first.cancel.clone())));
    tch::set_num_threads(1);
    let err = train::run(&first, &inputs(&p)).unwrap_err();
    assert!(first.cancel.is_cancelled(), "{err:#}");
    // Cancelled after step 5 had decided not to save: step 6 is taken, saved, and the run stops.
    assert_eq!(std::fs::read_to_string(work.join("latest")).unwrap().trim(), "ckpt-6");
    assert!(!first.out_dir.join(train::MODEL_FILE).exists(), "an interrupted run wrote outputs");

    let resumed = ctx(dir.path(), "resumed", &work, vec![]);
    run(&resumed, &p);
    assert_same_training(&whole, &resumed);
}

#[test]
fn fine_tuning_starts_from_upstream_weights_and_trains_on_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let base = ctx(dir.path(), "base", &dir.path().join("wb"), vec![]);
    let p = TrainParams { steps: 5, batch_size: 4, log_every: 5, ..TrainParams::default() };
    run(&base, &p);

    // A two-group allocation of the 40 timesteps.
    let alloc = progdiff_stages::allocate::allocate(
        NoiseSchedule::Cosine,
        40,
        &progdiff_stages::allocate::AllocateParams { groups: 2, ..Default::default() },
    )
    .unwrap();
    let alloc_path = dir.path().join("allocation.json");
    alloc.write_json(&alloc_path).unwrap();
    let upstream = vec![
        UpstreamOutputs {
            id: "base".into(),
            kind: "train".into(),
            group: None,
            files: [
                (train::MODEL_FILE.to_string(), base.out_dir.join(train::MODEL_FILE)),
                (train::EMA_FILE.to_string(), base.out_dir.join(train::EMA_FILE)),
            ]
            .into(),
        },
        UpstreamOutputs {
            id: "allocate".into(),
            kind: "snr-allocate".into(),
            group: None,
            files: [("allocation.json".to_string(), alloc_path)].into(),
        },
    ];
    let mut ft = ctx(dir.path(), "finetune[1]", &dir.path().join("wf"), upstream);
    ft.group = Some(1);
    // lr 0: the weights stay the upstream EMA weights exactly.
    run(&ft, &TrainParams { lr: 1e-30, steps: 3, log_every: 1, ..p });
    let up = weights(base.out_dir.join(train::EMA_FILE));
    let got = weights(ft.out_dir.join(train::MODEL_FILE));
    for (k, v) in &up {
        let g = &got[k];
        let max = v.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max < 1e-6, "{k} moved by {max}");
    }
    // Group 1 holds the high timesteps: only the upper quartiles are logged.
    let lo = *alloc.groups[1].timesteps.first().unwrap();
    for l in metrics(&ft.out_dir) {
        for q in 0..4 {
            if l.get(format!("loss_q{q}")).is_some() {
                assert!((q + 1) * 10 > lo, "quartile {q} logged but group 1 starts at {lo}: {l}");
            }
        }
    }
}

#[test]
fn saving_a_checkpoint_twice_gives_identical_bytes() {
    // The cache addresses outputs by content: the same weights must always be the same file.
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path(), "base", &dir.path().join("w"), vec![]);
    run(&c, &TrainParams { steps: 1, batch_size: 2, log_every: 1, ..TrainParams::default() });
    let ck = Checkpoint::load(&c.out_dir.join(train::MODEL_FILE)).unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    ck.save(&a).unwrap();
    ck.save(&b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(c.out_dir.join(train::MODEL_FILE)).unwrap()
    );
}

/// The venv python that `scripts/setup` installed (the one `.libtorch` lives in), if any.
fn venv_python() -> Option<PathBuf> {
    let torch =
        std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.libtorch")).ok()?;
    // <venv>/lib/python3.X/site-packages/torch
    let python = torch.parent()?.parent()?.parent()?.parent()?.join("bin/python");
    python.exists().then_some(python)
}

#[test]
fn pytorch_loads_the_checkpoints_with_their_metadata() {
    let Some(python) = venv_python() else {
        eprintln!(
            "note: no venv python next to .libtorch; run scripts/setup to check against PyTorch"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path(), "base", &dir.path().join("w"), vec![]);
    run(&c, &TrainParams { steps: 2, batch_size: 2, log_every: 1, ..TrainParams::default() });
    let path = c.out_dir.join(train::EMA_FILE);
    let script = "
import sys, json
from safetensors import safe_open
with safe_open(sys.argv[1], 'pt') as f:
    meta = f.metadata()
    out = {k: [list(f.get_tensor(k).shape), float(f.get_tensor(k).double().sum())] for k in f.keys()}
print(json.dumps({'meta': meta, 'tensors': out}))
";
    let out = std::process::Command::new(python).args(["-c", script]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["meta"]["format"], "progdiff-unet/1");
    assert_eq!(v["meta"]["state.step"], "2");
    assert_eq!(v["meta"]["state.ema_rate"], "0.9999");
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(v["tensors"].as_object().unwrap().len(), ck.tensors.len());
    for (name, t) in &ck.tensors {
        let entry = &v["tensors"][name];
        assert_eq!(entry[0], serde_json::json!(t.size()), "{name}");
        let sum = t.to_kind(tch::Kind::Double).sum(tch::Kind::Double).double_value(&[]);
        assert!((entry[1].as_f64().unwrap() - sum).abs() <= 1e-9 * (1.0 + sum.abs()), "{name}");
    }
}

#[test]
fn bf16_mixed_precision_trains_float32_master_weights() {
    let dir = tempfile::tempdir().unwrap();
    let p = TrainParams {
        steps: 30,
        batch_size: 8,
        lr: 2e-3,
        ema: 0.9,
        log_every: 10,
        checkpoint_every: 0,
        ..TrainParams::default()
    };
    let fp32 = ctx(dir.path(), "fp32", &dir.path().join("w32"), vec![]);
    run(&fp32, &p);
    let bf16 = ctx(dir.path(), "bf16", &dir.path().join("w16"), vec![]);
    run(&bf16, &TrainParams { precision: train::Precision::Bf16, ..p });
    // The saved weights are the float32 masters.
    let ck = Checkpoint::load(&bf16.out_dir.join(train::MODEL_FILE)).unwrap();
    assert!(ck.tensors.values().all(|t| t.kind() == tch::Kind::Float));
    // Same data, timesteps and noise: bfloat16 rounding moves the losses only a little, and
    // training still makes progress.
    let (a, b) = (metrics(&fp32.out_dir), metrics(&bf16.out_dir));
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (x["mse"].as_f64().unwrap(), y["mse"].as_f64().unwrap());
        assert!((x - y).abs() < 0.1 * x.max(y), "fp32 mse {x} vs bf16 {y}");
    }
    assert!(b[2]["mse"].as_f64().unwrap() < b[0]["mse"].as_f64().unwrap(), "{b:?}");
}

/// Model, EMA and (from the step-5 checkpoint in the work area) AdamW's moments of a run of `p`
/// as `how` says.
fn trained_state(
    root: &Path,
    name: &str,
    p: &TrainParams,
    how: &train::How,
) -> Vec<BTreeMap<String, Vec<f32>>> {
    let work = root.join(format!("work-{name}"));
    let c = ctx(root, name, &work, vec![]);
    tch::set_num_threads(1);
    // A first run stops after its step-5 checkpoint, so the work area keeps the moments.
    let first = ctx(root, &format!("{name}-first"), &work, vec![]);
    train::run_with(&first, &inputs(&TrainParams { steps: 6, ..p.clone() }), how).unwrap();
    let moments: BTreeMap<String, Vec<f32>> =
        Tensor::read_safetensors(work.join("ckpt-5").join("adam.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k != "t")
            .map(|(k, t)| (k, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
            .collect();
    assert!(!moments.is_empty());
    std::fs::remove_dir_all(&work).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    train::run_with(&c, &inputs(p), how).unwrap();
    vec![
        weights(c.out_dir.join(train::MODEL_FILE)),
        weights(c.out_dir.join(train::EMA_FILE)),
        moments,
    ]
}

/// Issue 16: the flat-buffer AdamW and EMA give exactly the weights, EMA weights and moments
/// of the per-tensor loops they replaced, in float32 and bf16 mixed precision, with weight
/// decay and a learning-rate warm-up.
#[test]
fn flat_buffers_update_exactly_as_the_per_tensor_loops() {
    let dir = tempfile::tempdir().unwrap();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let p = TrainParams {
            steps: 8,
            batch_size: 8,
            lr: 2e-3,
            ema: 0.9,
            weight_decay: 0.01,
            warmup: 3,
            log_every: 4,
            checkpoint_every: 5,
            precision,
            ..TrainParams::default()
        };
        let tag = format!("{precision:?}");
        let how = |update| train::How { update, host_thread: None };
        let reference =
            trained_state(dir.path(), &format!("pt-{tag}"), &p, &how(Update::PerTensor));
        let flat = trained_state(dir.path(), &format!("flat-{tag}"), &p, &how(Update::Flat));
        for (what, (a, b)) in ["model", "ema", "moments"].iter().zip(reference.iter().zip(&flat)) {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (name, values) in a {
                assert!(
                    values.iter().zip(&b[name]).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{tag}: {what} `{name}` differs"
                );
            }
        }
        // And training moved the weights.
        let init =
            ctx(dir.path(), &format!("init-{tag}"), &dir.path().join(format!("w-{tag}")), vec![]);
        train::run(&init, &inputs(&TrainParams { steps: 1, lr: 1e-12, ..p.clone() })).unwrap();
        let before = weights(init.out_dir.join(train::MODEL_FILE));
        assert_ne!(before, flat[0], "{tag}");
    }
}

/// Issue 16: a training step that neither logs nor checkpoints reads nothing back from the
/// device; logging and checkpoint steps read the interval's sums once.
#[test]
fn only_logging_and_checkpoint_steps_read_from_the_device() {
    let dir = tempfile::tempdir().unwrap();
    tch::set_num_threads(1);
    let mut n = 0;
    for (log_every, checkpoint_every, want) in [(12, 0, 1), (3, 0, 4), (12, 5, 3), (4, 4, 3)] {
        n += 1;
        let c = ctx(dir.path(), &format!("r{n}"), &dir.path().join(format!("w{n}")), vec![]);
        let p = TrainParams {
            steps: 12,
            batch_size: 4,
            log_every,
            checkpoint_every,
            grad_clip: Some(0.5),
            ..TrainParams::default()
        };
        let before = transfer::reads();
        train::run(&c, &inputs(&p)).unwrap();
        let reads = transfer::reads() - before;
        assert_eq!(reads, want, "log_every {log_every}, checkpoint_every {checkpoint_every}");
        assert_eq!(metrics(&c.out_dir).len(), 12 / log_every);
    }
}

/// Gradient clipping without host reads still bounds the update: with a tiny `grad_clip` the
/// first AdamW step is unchanged (Adam normalises the gradient) but clipping must not produce
/// non-finite weights, and a huge one leaves training as without clipping.
#[test]
fn clipping_on_the_device_matches_no_clipping_when_the_bound_is_loose() {
    let dir = tempfile::tempdir().unwrap();
    let p = TrainParams {
        steps: 4,
        batch_size: 4,
        log_every: 2,
        checkpoint_every: 0,
        ..TrainParams::default()
    };
    let plain = ctx(dir.path(), "plain", &dir.path().join("w1"), vec![]);
    run(&plain, &p);
    let loose = ctx(dir.path(), "loose", &dir.path().join("w2"), vec![]);
    run(&loose, &TrainParams { grad_clip: Some(1e30), ..p.clone() });
    assert_eq!(
        weights(plain.out_dir.join(train::MODEL_FILE)),
        weights(loose.out_dir.join(train::MODEL_FILE))
    );
    let tight = ctx(dir.path(), "tight", &dir.path().join("w3"), vec![]);
    run(&tight, &TrainParams { grad_clip: Some(1e-4), ..p.clone() });
    let w = weights(tight.out_dir.join(train::MODEL_FILE));
    assert!(w.values().flatten().all(|x| x.is_finite()));
    assert_ne!(w, weights(plain.out_dir.join(train::MODEL_FILE)));
}

/// The host's share of each step made a step ahead on a thread (what GPUs do) gives the run
/// made in line (what the CPU does): the same weights, moments and metrics, and the same
/// resume state (sampler position) at a checkpoint.
#[test]
fn the_host_thread_gives_the_inline_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = TrainParams {
        steps: 9,
        batch_size: 8,
        lr: 1e-3,
        ema: 0.9,
        log_every: 3,
        checkpoint_every: 5,
        ..TrainParams::default()
    };
    let inline = train::How { update: Update::Flat, host_thread: Some(false) };
    let threaded = train::How { update: Update::Flat, host_thread: Some(true) };
    let a = trained_state(dir.path(), "inline", &p, &inline);
    let b = trained_state(dir.path(), "threaded", &p, &threaded);
    assert_eq!(a, b);
    let state = |name: &str| {
        std::fs::read_to_string(
            dir.path().join(format!("work-{name}")).join("ckpt-5").join("state.json"),
        )
    };
    // The full runs' own step-5 resume states (sampler position, interval in progress).
    assert_eq!(state("inline").unwrap(), state("threaded").unwrap());
    assert_eq!(metrics(&dir.path().join("inline")), metrics(&dir.path().join("threaded")));
}
