//! What the pruning tests share: a tiny UNet config, a synthetic dataset, a checkpoint with every
//! weight random, stage contexts, the base + allocation upstream, and running the stage.

#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::path::Path;

use progdiff_stages::allocate::{self, AllocateParams, SnrAllocate};
use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::config::{DiffusionConfig, ModelConfig};
use progdiff_stages::context::{StageContext, UpstreamOutputs};
use progdiff_stages::data::DataConfig;
use progdiff_stages::kind::{Sections, StageKind};
use progdiff_stages::prune::search::Bank;
use progdiff_stages::prune::{self, Prune, PruneInputs, PruneParams};
use progdiff_stages::schedule::NoiseSchedule;
use progdiff_stages::unet::{UNet, UNetArch};
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub fn model(channels: usize) -> ModelConfig {
    ModelConfig {
        image_size: 8,
        in_channels: 1,
        channels,
        channel_mult: vec![1, 2],
        res_blocks: 1,
        attention_resolutions: vec![4],
        heads: 2,
        dropout: 0.0,
        learn_sigma: true,
        use_scale_shift_norm: true,
    }
}

pub fn diffusion() -> DiffusionConfig {
    DiffusionConfig { steps: 40, schedule: NoiseSchedule::Cosine, ..DiffusionConfig::default() }
}

pub fn data() -> DataConfig {
    serde_json::from_value(serde_json::json!({
        "kind": "synthetic", "n": 32, "image_size": 8, "channels": "gray", "seed": 3
    }))
    .unwrap()
}

/// A checkpoint with every weight random (the zero-initialised layers too, so every channel
/// matters).
pub fn random_checkpoint(config: &ModelConfig, seed: i64) -> Checkpoint {
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    let arch = UNetArch::from_config(config).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _net = UNet::new(&vs.root(), &arch).unwrap();
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.2));
        }
    });
    Checkpoint::from_var_store(&arch, &vs, BTreeMap::new()).unwrap()
}

pub fn ctx(
    root: &Path,
    name: &str,
    work_key: &str,
    group: usize,
    inputs: Vec<UpstreamOutputs>,
) -> StageContext {
    let out = root.join("out").join(name);
    let work = root.join("cache/v1/work").join(work_key);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let mut c = StageContext::new(name, out, work);
    c.group = Some(group);
    c.inputs = inputs;
    c
}

/// The inputs of a prune stage with `p` in the fixture's manifest (seed 5).
pub fn prune_inputs(p: &PruneParams) -> PruneInputs {
    let data = data();
    let d = diffusion();
    let model = ModelConfig::default();
    let sections =
        Sections { seed: 5, data: Some(&data), model: &model, diffusion: &d, dir: Path::new(".") };
    Prune::inputs(p, &sections)
}

/// Base checkpoint and allocation as upstream outputs.
pub fn upstream(root: &Path) -> Vec<UpstreamOutputs> {
    let dir = root.join("base");
    std::fs::create_dir_all(&dir).unwrap();
    let base = random_checkpoint(&model(64), 6);
    base.save(&dir.join("model.safetensors")).unwrap();
    let mut actx = ctx(root, "allocate", "alloc", 0, Vec::new());
    actx.group = None;
    let ap: AllocateParams =
        serde_json::from_value(serde_json::json!({ "groups": 2, "k": 0.5 })).unwrap();
    let d = diffusion();
    let model = ModelConfig::default();
    let sections = Sections { seed: 5, data: None, model: &model, diffusion: &d, dir: root };
    allocate::run(&actx, &SnrAllocate::inputs(&ap, &sections)).unwrap();
    vec![
        UpstreamOutputs {
            id: "base".into(),
            kind: "train".into(),
            group: None,
            files: BTreeMap::from([("model.safetensors".into(), dir.join("model.safetensors"))]),
        },
        UpstreamOutputs {
            id: "allocate".into(),
            kind: "snr-allocate".into(),
            group: None,
            files: BTreeMap::from([(
                "allocation.json".into(),
                actx.out_dir.join("allocation.json"),
            )]),
        },
    ]
}

/// Runs the stage; its report.
pub fn try_run(c: &StageContext, p: &PruneParams) -> anyhow::Result<Value> {
    tch::set_num_threads(1);
    prune::run(c, &prune_inputs(p))?;
    Ok(serde_json::from_slice(&std::fs::read(c.out_dir.join("report.json"))?)?)
}

/// Runs the stage, which must succeed; its report.
pub fn run_stage(c: &StageContext, p: &PruneParams) -> Value {
    try_run(c, p).unwrap()
}

/// The `bank.json` an instance wrote.
pub fn bank(dir: &Path) -> Bank {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("bank.json")).unwrap()).unwrap();
    Bank {
        rounds: v["rounds"].as_u64().unwrap() as usize,
        entries: serde_json::from_value(v["entries"].clone()).unwrap(),
    }
}
