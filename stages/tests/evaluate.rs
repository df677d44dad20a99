//! The `evaluate` stage's cost-only mode (`samples: 0`, issue 14): the paper's params and FLOPs
//! columns without sampling, on two tiny models whose MACs are counted here by hand.

use std::collections::BTreeMap;
use std::path::Path;

use progdiff_stages::allocate::{ALLOCATION_JSON, AllocateParams, FlopsSchedule, allocate};
use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::config::{DiffusionConfig, ModelConfig};
use progdiff_stages::context::{StageContext, UpstreamOutputs};
use progdiff_stages::evaluate::{
    self, EvaluateInputs, EvaluateMetrics, EvaluateParams, METRICS_FILE,
};
use progdiff_stages::fid::stage::SPEC_FILE;
use progdiff_stages::schedule::NoiseSchedule;
use progdiff_stages::train::{EMA_FILE, MODEL_FILE};
use progdiff_stages::unet::{LayerArch, UNet, UNetArch};
use tch::Device;
use tch::nn::VarStore;

/// One level at 8x8 (64 pixels), 64 channels, one ResBlock, no attention but the middle block's,
/// RGB with learned sigma (6 output channels).
fn wide() -> UNetArch {
    UNetArch::from_config(&ModelConfig {
        image_size: 8,
        in_channels: 3,
        channels: 64,
        channel_mult: vec![1],
        res_blocks: 1,
        attention_resolutions: vec![],
        heads: 1,
        dropout: 0.0,
        learn_sigma: true,
        use_scale_shift_norm: true,
    })
    .unwrap()
}

/// `wide` with every ResBlock's hidden width pruned from 64 to 32.
fn narrow() -> UNetArch {
    let mut arch = wide();
    for (_, layer) in arch.layers_mut() {
        if let LayerArch::Res(r) = layer {
            r.hidden = 32;
        }
    }
    arch.validate().unwrap();
    arch
}

/// Conv + linear MACs of `wide` (h = 64) and `narrow` (h = 32) counted by hand. Per image, 64
/// pixels, time embedding 4 x 64 = 256 wide:
/// - time embedding: Linear(64, 256) + Linear(256, 256) = 16,384 + 65,536 = 81,920
/// - input conv3x3 3 -> 64: 64 px * 64 * 3 * 9 = 110,592
/// - a ResBlock 64 -> 64 with hidden h: conv3x3 64 -> h (36,864 h), the scale-shift Linear
///   256 -> 2h (512 h), conv3x3 h -> 64 (36,864 h): 74,240 h
///   (h = 64: 4,751,360; h = 32: 2,375,680); one in the input path, two in the middle
/// - middle attention, 64 channels: qkv 64 -> 192 (786,432) and proj_out 64 -> 64 (262,144)
///   per-pixel convs: 1,048,576
/// - two output ResBlocks on cat([h, skip]) = 128 -> 64: conv3x3 128 -> h (73,728 h), the
///   Linear (512 h), conv3x3 h -> 64 (36,864 h), the 1x1 skip conv 128 -> 64 (524,288):
///   111,104 h + 524,288 (h = 64: 7,634,944; h = 32: 4,079,616)
/// - output conv3x3 64 -> 6: 221,184
///
/// wide: 81,920 + 110,592 + 3 * 4,751,360 + 1,048,576 + 2 * 7,634,944 + 221,184 = 30,986,240
/// narrow: 81,920 + 110,592 + 3 * 2,375,680 + 1,048,576 + 2 * 4,079,616 + 221,184 = 16,748,544
const WIDE_MACS: f64 = 30_986_240.0;
const NARROW_MACS: f64 = 16_748_544.0;

/// T = 40 cosine, sampled in 10 respaced steps: timesteps 0, 4, 9, 13, 17, 22, 26, 30, 35, 39.
fn diffusion() -> DiffusionConfig {
    DiffusionConfig {
        steps: 40,
        schedule: NoiseSchedule::Cosine,
        sample_steps: "10".into(),
        ..DiffusionConfig::default()
    }
}

fn cost_only() -> EvaluateInputs {
    EvaluateInputs {
        stage: EvaluateParams { samples: 0, ..EvaluateParams::default() },
        seed: 0,
        diffusion: diffusion(),
    }
}

/// Saves a randomly initialised `arch` as `dir/model.safetensors` (the same file as EMA
/// weights); returns its number of parameters, counted from the saved tensors.
fn save_model(arch: &UNetArch, dir: &Path) -> u64 {
    tch::set_num_threads(1);
    std::fs::create_dir_all(dir).unwrap();
    let vs = VarStore::new(Device::Cpu);
    UNet::new(&vs.root(), arch).unwrap();
    let ckpt = Checkpoint::from_var_store(arch, &vs, BTreeMap::new()).unwrap();
    ckpt.save(&dir.join(MODEL_FILE)).unwrap();
    std::fs::copy(dir.join(MODEL_FILE), dir.join(EMA_FILE)).unwrap();
    vs.variables().values().map(|t| t.numel() as u64).sum()
}

fn model_upstream(id: &str, group: Option<usize>, dir: &Path) -> UpstreamOutputs {
    UpstreamOutputs {
        id: id.into(),
        kind: "prune".into(),
        group,
        files: [
            (MODEL_FILE.to_string(), dir.join(MODEL_FILE)),
            (EMA_FILE.to_string(), dir.join(EMA_FILE)),
        ]
        .into(),
    }
}

/// Runs the stage with `inputs` upstream; its output directory.
fn run(root: &Path, inputs: Vec<UpstreamOutputs>) -> anyhow::Result<std::path::PathBuf> {
    let out = root.join("eval-out");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::new("eval", out.clone(), root.join("eval-work"));
    ctx.inputs = inputs;
    evaluate::run(&ctx, &cost_only())?;
    Ok(out)
}

fn metrics(out: &Path) -> EvaluateMetrics {
    serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap()
}

/// Group 0 (timesteps 0..10: sampled steps 0, 4, 9) gets the narrow model, group 1 the wide
/// one (the other 7 sampled steps): MACs (3 * 16,748,544 + 7 * 30,986,240) / 10.
#[test]
fn cost_only_evaluation_averages_known_macs_over_the_sampled_steps() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let narrow_params = save_model(&narrow(), &root.join("g0"));
    let wide_params = save_model(&wide(), &root.join("g1"));
    assert!(narrow_params < wide_params);

    let params =
        AllocateParams { groups: 2, schedule: FlopsSchedule::Increasing, ..Default::default() };
    let mut alloc = allocate(NoiseSchedule::Cosine, 40, &params).unwrap();
    for (g, range) in alloc.groups.iter_mut().zip([0..10, 10..40]) {
        g.timesteps = range.collect();
        g.t_min = g.timesteps[0];
        g.t_max = *g.timesteps.last().unwrap();
    }
    let alloc_path = root.join(ALLOCATION_JSON);
    alloc.write_json(&alloc_path).unwrap();
    let allocation = UpstreamOutputs {
        id: "allocate".into(),
        kind: "snr-allocate".into(),
        group: None,
        files: [(ALLOCATION_JSON.to_string(), alloc_path)].into(),
    };
    // Upstream order does not matter: models are matched to groups by their group index.
    let out = run(
        root,
        vec![
            model_upstream("prune[1]", Some(1), &root.join("g1")),
            allocation,
            model_upstream("prune[0]", Some(0), &root.join("g0")),
        ],
    )
    .unwrap();
    let m = metrics(&out);
    assert_eq!(m.macs, (3.0 * NARROW_MACS + 7.0 * WIDE_MACS) / 10.0);
    assert_eq!(m.macs, 26_714_931.2);
    assert_eq!(m.params, (3 * narrow_params + 7 * wide_params) as f64 / 10.0);
    assert_eq!(m.steps_per_model, [3, 7]);
    assert_eq!((m.models, m.samples, m.sample_steps), (2, 0, 10));
    assert_eq!(m.sampler, "progressive");
    assert_eq!((m.fid, m.extractor.as_deref()), (None, None));
    assert_eq!((m.sampling_seconds, m.fid_seconds), (0.0, 0.0));
    // Nothing sampled: no grid, no statistics.
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, [METRICS_FILE]);

    // One model serves every step: its own cost.
    let single = root.join("single");
    std::fs::create_dir_all(&single).unwrap();
    let out = run(&single, vec![model_upstream("base", None, &root.join("g1"))]).unwrap();
    let m = metrics(&out);
    assert_eq!((m.macs, m.params), (WIDE_MACS, wide_params as f64));
    assert_eq!((m.models, m.steps_per_model.clone()), (1, vec![10]));
}

#[test]
fn cost_only_evaluation_refuses_an_fid_extractor() {
    let dir = tempfile::tempdir().unwrap();
    save_model(&narrow(), &dir.path().join("m"));
    let features = UpstreamOutputs {
        id: "features".into(),
        kind: "fid-extractor".into(),
        group: None,
        files: [(SPEC_FILE.to_string(), dir.path().join("missing.json"))].into(),
    };
    let err = run(dir.path(), vec![model_upstream("base", None, &dir.path().join("m")), features])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage `eval` has `samples: 0` (cost only) but needs the FID extractor `features`\nhint: \
         remove `features` from its `needs`, or sample at least 2 images for an FID"
    );
}
