//! Sampling with one or several UNets, PNG output, and the `import` stage, on tiny models
//! (8x8 images, one level, T = 40 sampled in 10 steps).

use std::collections::BTreeMap;
use std::path::Path;

use progdiff_stages::allocate::{AllocateParams, Allocation, FlopsSchedule, allocate};
use progdiff_stages::checkpoint::Checkpoint;
use progdiff_stages::config::{DiffusionConfig, ModelConfig};
use progdiff_stages::context::StageContext;
use progdiff_stages::cost::cost;
use progdiff_stages::diffusion::{
    GaussianDiffusion, NoiseSource, SampleOptions, Sampler, SeededNoise, to_uint8_images,
};
use progdiff_stages::image_io::{GRID_PADDING, write_png_grid, write_pngs};
use progdiff_stages::import::{self, EMA_FILE, IMPORTED_FROM, Import, ImportParams, MODEL_FILE};
use progdiff_stages::kind::{Sections, StageKind};
use progdiff_stages::sample::{
    ImageNoise, ModelSet, SampleConfig, SampleError, load_unet, sample, sample_batches,
};
use progdiff_stages::schedule::NoiseSchedule;
use progdiff_stages::unet::{LayerArch, UNet, UNetArch};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Helpers

/// One level at 8x8, no attention: about 60k parameters.
fn tiny_config() -> ModelConfig {
    ModelConfig {
        image_size: 8,
        in_channels: 3,
        channels: 32,
        channel_mult: vec![1],
        res_blocks: 1,
        attention_resolutions: vec![],
        heads: 1,
        dropout: 0.0,
        learn_sigma: true,
        use_scale_shift_norm: true,
    }
}

fn diffusion_config() -> DiffusionConfig {
    DiffusionConfig {
        steps: 40,
        schedule: NoiseSchedule::Cosine,
        sample_steps: "10".into(),
        ..DiffusionConfig::default()
    }
}

fn diffusion() -> GaussianDiffusion {
    GaussianDiffusion::for_sampling(&diffusion_config(), true).unwrap()
}

/// A checkpoint of `arch` with non-zero weights drawn from `seed` (the reference's zero-init
/// output conv would make every model predict zero).
fn checkpoint(arch: &UNetArch, seed: u64) -> Checkpoint {
    // Every test that samples builds a checkpoint first. One OpenMP thread per test thread: the
    // models are tiny, and libtorch's default (a thread per core in every test thread) makes
    // parallel tests on a small machine spin against each other (1.4 s instead of 10 s here).
    // OpenMP keeps this setting per calling thread, so each test sets it for itself.
    tch::set_num_threads(1);
    let vs = VarStore::new(Device::Cpu);
    UNet::new(&vs.root(), arch).unwrap();
    let mut noise = SeededNoise::new(seed);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let fan_in = v.size().iter().skip(1).product::<i64>().max(1) as f64;
            v.copy_(&(noise.randn(&v.size(), (Kind::Float, Device::Cpu)) / fan_in.sqrt()));
        }
    });
    Checkpoint::from_var_store(arch, &vs, BTreeMap::new()).unwrap()
}

fn build(ckpt: &Checkpoint) -> UNet {
    ckpt.build(&VarStore::new(Device::Cpu)).unwrap()
}

fn tiny_arch() -> UNetArch {
    UNetArch::from_config(&tiny_config()).unwrap()
}

/// The T = 40 cosine allocation of `groups` contiguous groups of (nearly) equal size.
fn contiguous_groups(groups: usize) -> Allocation {
    let params = AllocateParams {
        groups,
        k: 0.5,
        schedule: FlopsSchedule::Increasing,
        ..Default::default()
    };
    allocate(NoiseSchedule::Cosine, 40, &params).unwrap()
}

/// Two groups: timesteps `0..split` and `split..40`.
fn two_groups(split: usize) -> Allocation {
    let mut a = contiguous_groups(2);
    for (g, range) in a.groups.iter_mut().zip([0..split, split..40]) {
        g.timesteps = range.collect();
        g.t_min = g.timesteps[0];
        g.t_max = *g.timesteps.last().unwrap();
    }
    a.check().unwrap();
    a
}

fn config(n: usize, batch_size: usize, seed: u64) -> SampleConfig {
    SampleConfig { batch_size, ..SampleConfig::new(n, seed) }
}

/// The respaced timesteps of `"10"` over T = 40.
const MAP: [usize; 10] = [0, 4, 9, 13, 17, 22, 26, 30, 35, 39];

// ---------------------------------------------------------------------------------------------
// Sampling

#[test]
fn respacing_is_the_one_the_tests_assume() {
    assert_eq!(diffusion().timestep_map(), MAP);
}

#[test]
fn progressive_copies_equal_the_single_model_bit_for_bit() {
    let ckpt = checkpoint(&tiny_arch(), 1);
    let alloc = contiguous_groups(3);
    let single = ModelSet::single(build(&ckpt));
    let copies =
        ModelSet::progressive(vec![build(&ckpt), build(&ckpt), build(&ckpt)], &alloc).unwrap();
    let cfg = config(3, 2, 11);
    let a = sample(&single, &diffusion(), &cfg).unwrap();
    let b = sample(&copies, &diffusion(), &cfg).unwrap();
    assert_eq!(a.images.size(), [3, 3, 8, 8]);
    assert_eq!(a.images.kind(), Kind::Uint8);
    assert!(a.images.equal(&b.images));
    assert_eq!(a.models_per_step, [0; 10]);
    // The copies really took turns.
    assert_eq!(b.models_per_step, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
    // Not a degenerate sample: the pixels vary.
    let spread = a.images.to_kind(Kind::Float).std(true).double_value(&[]);
    assert!(spread > 1.0, "pixel std {spread}");
}

#[test]
fn the_model_of_each_step_follows_the_allocation() {
    let (a, b) = (checkpoint(&tiny_arch(), 1), checkpoint(&tiny_arch(), 2));
    let alloc = two_groups(10);
    let set = ModelSet::progressive(vec![build(&a), build(&b)], &alloc).unwrap();
    let d = diffusion();
    let expected: Vec<usize> = d.timestep_map().iter().map(|&t| alloc.group_of(t)).collect();
    assert_eq!(expected, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
    assert_eq!(set.models_per_step(&d).unwrap(), expected);
    // What the sampler recorded from the calls it made.
    let samples = sample(&set, &d, &config(2, 2, 0)).unwrap();
    assert_eq!(samples.models_per_step, expected);
    for t in 0..40 {
        assert_eq!(set.model_of(t), usize::from(t >= 10), "t = {t}");
    }
}

/// The progressive sampler is the diffusion's own loop with a closure that switches models at
/// the group boundary, and the per-image noise.
#[test]
fn sampling_equals_a_hand_written_switching_loop() {
    let (a, b) = (checkpoint(&tiny_arch(), 3), checkpoint(&tiny_arch(), 4));
    let set = ModelSet::progressive(vec![build(&a), build(&b)], &two_groups(20)).unwrap();
    let d = diffusion();
    let got = sample(&set, &d, &config(3, 3, 5)).unwrap().images;

    let (ma, mb) = (build(&a), build(&b));
    let mut calls = Vec::new();
    let mut model = |x: &Tensor, t: &Tensor, original_t: usize| {
        calls.push(original_t);
        if original_t < 20 { ma.forward_t(x, t, false) } else { mb.forward_t(x, t, false) }
    };
    let mut noise = ImageNoise::new(5, 0, 3);
    let x = d.sample_loop(
        &mut model,
        &[3, 3, 8, 8],
        (Kind::Float, Device::Cpu),
        &SampleOptions::default(),
        &mut noise,
        &mut |_| {},
    );
    assert!(got.equal(&to_uint8_images(&x)));
    assert_eq!(calls, MAP.iter().rev().copied().collect::<Vec<_>>());

    // Both models matter: either one alone gives other images.
    for only in [&a, &b] {
        let alone = sample(&ModelSet::single(build(only)), &d, &config(3, 3, 5)).unwrap();
        assert!(!alone.images.equal(&got));
    }
}

#[test]
fn average_cost_is_the_mean_over_sampled_steps() {
    // Group 0 (t < 10: steps 0, 4, 9) gets a narrower model than group 1 (the other 7 steps).
    let wide_config = ModelConfig { channels: 64, ..tiny_config() };
    let wide = UNetArch::from_config(&wide_config).unwrap();
    let mut narrow = wide.clone();
    for (_, layer) in narrow.layers_mut() {
        if let LayerArch::Res(r) = layer {
            r.hidden = 32;
        }
    }
    narrow.validate().unwrap();
    let (cn, cw) = (cost(&narrow), cost(&wide));
    assert!(cn.params < cw.params && cn.macs < cw.macs);

    let set = ModelSet::progressive(
        vec![build(&checkpoint(&narrow, 1)), build(&checkpoint(&wide, 2))],
        &two_groups(10),
    )
    .unwrap();
    let avg = set.average_cost(&diffusion()).unwrap();
    assert_eq!(avg.steps_per_model, [3, 7]);
    let expect = |n: u64, w: u64| (3.0 * n as f64 + 7.0 * w as f64) / 10.0;
    assert_eq!(avg.params, expect(cn.params, cw.params));
    assert_eq!(avg.macs, expect(cn.macs, cw.macs));

    // The params are the models' own: count the variables of each.
    let numel = |arch: &UNetArch| -> u64 {
        arch.param_shapes().values().map(|s| s.iter().product::<i64>() as u64).sum()
    };
    assert_eq!((numel(&narrow), numel(&wide)), (cn.params, cw.params));

    let single = ModelSet::single(build(&checkpoint(&wide, 2)));
    let avg = single.average_cost(&diffusion()).unwrap();
    assert_eq!((avg.params, avg.macs), (cw.params as f64, cw.macs as f64));
    assert_eq!(avg.steps_per_model, [10]);
}

#[test]
fn same_seed_same_images_other_seed_other_images() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let d = diffusion();
    let a = sample(&set, &d, &config(2, 2, 7)).unwrap().images;
    let b = sample(&set, &d, &config(2, 2, 7)).unwrap().images;
    let c = sample(&set, &d, &config(2, 2, 8)).unwrap().images;
    assert!(a.equal(&b));
    assert!(!a.equal(&c));
    // Two images of one run differ too (each has its own noise stream).
    assert!(!a.get(0).equal(&a.get(1)));
}

/// `a` and `b` are the same 8-bit images up to the rounding of batched float kernels: no pixel
/// more than one level apart, and at most 1% of them apart at all. (libtorch's CPU kernels do
/// not give an image of a batch of 5 the bits it gets in a batch of 2, and which way a pixel
/// near a level boundary rounds can change from one process to the next; the noise itself is
/// per image exactly, pinned in `sample::noise`.)
fn assert_same_up_to_rounding(a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size());
    let diff = (a.to_kind(Kind::Int) - b.to_kind(Kind::Int)).abs();
    let max = diff.max().int64_value(&[]);
    let apart = diff.ne(0).sum(Kind::Int64).int64_value(&[]);
    let n = diff.numel() as i64;
    assert!(max <= 1 && apart * 100 <= n, "{apart} of {n} pixels apart, by up to {max} levels");
}

#[test]
fn images_do_not_depend_on_the_batch_size_or_the_first_index() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let d = diffusion();
    let whole = sample(&set, &d, &config(5, 5, 3)).unwrap().images;
    let batched = sample(&set, &d, &config(5, 2, 3)).unwrap().images;
    assert_same_up_to_rounding(&whole, &batched);
    let tail = SampleConfig { first: 2, ..config(3, 2, 3) };
    let tail = sample(&set, &d, &tail).unwrap().images;
    assert_same_up_to_rounding(&tail, &whole.narrow(0, 2, 3));
    // Not vacuous: other seeds give other images.
    let other = sample(&set, &d, &config(5, 5, 4)).unwrap().images;
    let diff = (whole.to_kind(Kind::Int) - other.to_kind(Kind::Int)).abs();
    assert!(diff.gt(1).sum(Kind::Int64).int64_value(&[]) > 100);
}

#[test]
fn batches_arrive_in_order_with_their_first_index() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let mut seen = Vec::new();
    let per_step = sample_batches(&set, &diffusion(), &config(5, 2, 0), &mut |first, images| {
        seen.push((first, images.size()[0]));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [(0, 2), (2, 2), (4, 1)]);
    assert_eq!(per_step, [0; 10]);

    let err = sample_batches(&set, &diffusion(), &config(5, 2, 0), &mut |_, _| {
        anyhow::bail!("disk full")
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "disk full");
}

#[test]
fn ddim_is_deterministic_and_differs_from_ancestral() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let d = diffusion();
    let ddim = SampleConfig {
        options: SampleOptions { sampler: Sampler::Ddim { eta: 0.0 }, clip_denoised: true },
        ..config(2, 2, 1)
    };
    let a = sample(&set, &d, &ddim).unwrap().images;
    let b = sample(&set, &d, &ddim).unwrap().images;
    let ancestral = sample(&set, &d, &config(2, 2, 1)).unwrap().images;
    assert!(a.equal(&b));
    assert!(!a.equal(&ancestral));
}

#[test]
fn zero_images_give_an_empty_tensor() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let s = sample(&set, &diffusion(), &config(0, 4, 0)).unwrap();
    assert_eq!(s.images.size(), [0, 3, 8, 8]);
    assert_eq!(s.models_per_step, [0; 10]);
}

#[test]
fn a_cancelled_run_stops() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let cfg = config(2, 2, 0);
    cfg.cancel.cancel();
    let err = sample(&set, &diffusion(), &cfg).unwrap_err();
    assert!(matches!(err, SampleError::Interrupted), "{err}");
    assert_eq!(err.to_string(), "interrupted");
}

#[test]
fn inconsistent_sets_are_rejected() {
    let ckpt = checkpoint(&tiny_arch(), 1);
    let err = ModelSet::progressive(vec![build(&ckpt)], &two_groups(10)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a progressive model set needs one model per timestep group: 1 models for 2 groups"
    );

    let gray = UNetArch::from_config(&ModelConfig { in_channels: 1, ..tiny_config() }).unwrap();
    let err =
        ModelSet::progressive(vec![build(&ckpt), build(&checkpoint(&gray, 1))], &two_groups(10))
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "model 1 of the set has `in_channels` = 1, but model 0 has 3\nhint: every model of a \
         progressive set must come from the same `model:` section (only widths may differ)"
    );

    // An allocation of T = 40 cannot serve a T = 50 process.
    let set = ModelSet::progressive(vec![build(&ckpt), build(&ckpt)], &two_groups(10)).unwrap();
    let d50 =
        GaussianDiffusion::for_sampling(&DiffusionConfig { steps: 50, ..diffusion_config() }, true)
            .unwrap();
    let err = sample(&set, &d50, &config(1, 1, 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the allocation covers 40 timesteps, but the diffusion process has 50"
    );

    let fixed = GaussianDiffusion::for_sampling(&diffusion_config(), false).unwrap();
    let err = set.average_cost(&fixed).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the models have `learn_sigma` = true, but the diffusion process has a fixed variance"
    );

    let err = sample(&set, &diffusion(), &config(1, 0, 0)).unwrap_err();
    assert_eq!(err.to_string(), "`batch_size` must be at least 1, got 0");
}

#[test]
fn a_saved_checkpoint_loads_and_samples_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let ckpt = checkpoint(&tiny_arch(), 9);
    ckpt.save(&path).unwrap();
    let loaded = ModelSet::single(load_unet(&path, Device::Cpu).unwrap());
    let direct = ModelSet::single(build(&ckpt));
    let cfg = config(2, 2, 0);
    assert!(
        sample(&loaded, &diffusion(), &cfg)
            .unwrap()
            .images
            .equal(&sample(&direct, &diffusion(), &cfg).unwrap().images)
    );
    let err = load_unet(&dir.path().join("missing.safetensors"), Device::Cpu).unwrap_err();
    assert!(err.to_string().starts_with("cannot load the model `"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// PNG

/// Decodes a PNG: (width, height, channels, interleaved bytes).
fn decode(path: &Path) -> (usize, usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected colour type {other:?}"),
    };
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, channels, buf)
}

/// `n` distinct uint8 images `[n, c, h, w]` whose pixels are never 0 (so padding is visible).
fn test_images(n: i64, c: i64, h: i64, w: i64) -> Tensor {
    let count = n * c * h * w;
    let values: Vec<u8> = (0..count).map(|i| (1 + (i * 7) % 255) as u8).collect();
    Tensor::from_slice(&values).view([n, c, h, w])
}

fn check_grid(c: i64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    let (n, h, w, cols) = (5i64, 4i64, 6i64, 2usize);
    let images = test_images(n, c, h, w);
    write_png_grid(&images, &path, cols).unwrap();

    let (width, height, channels, buf) = decode(&path);
    let p = GRID_PADDING;
    let (hu, wu, cu) = (h as usize, w as usize, c as usize);
    assert_eq!(channels, cu);
    assert_eq!((width, height), (2 * (wu + p) + p, 3 * (hu + p) + p));
    // Expected: black everywhere but the cells; image i at row i / 2, column i % 2.
    let mut want = vec![0u8; width * height * cu];
    for i in 0..n as usize {
        let (x0, y0) = (p + (i % cols) * (wu + p), p + (i / cols) * (hu + p));
        for ch in 0..cu {
            for y in 0..hu {
                for x in 0..wu {
                    let v = images.int64_value(&[i as i64, ch as i64, y as i64, x as i64]);
                    want[((y0 + y) * width + x0 + x) * cu + ch] = v as u8;
                }
            }
        }
    }
    assert_eq!(buf, want);
    // The sixth cell (row 2, column 1) is empty.
    let (x0, y0) = (p + (wu + p), p + 2 * (hu + p));
    assert_eq!(buf[(y0 * width + x0) * cu], 0);
}

#[test]
fn an_rgb_grid_decodes_to_the_images() {
    check_grid(3);
}

#[test]
fn a_grayscale_grid_decodes_to_the_images() {
    check_grid(1);
}

#[test]
fn individual_pngs_decode_to_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("samples");
    let images = test_images(3, 3, 5, 4);
    let paths = write_pngs(&images, &out).unwrap();
    let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["000000.png", "000001.png", "000002.png"]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3, "no temporary files left");
    for (i, path) in paths.iter().enumerate() {
        let (width, height, channels, buf) = decode(path);
        assert_eq!((width, height, channels), (4, 5, 3));
        let want = images.get(i as i64).permute([1, 2, 0]).contiguous().view([-1]);
        assert_eq!(buf, Vec::<u8>::try_from(&want).unwrap());
    }
}

#[test]
fn png_writers_reject_other_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let floats = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu));
    let err = write_png_grid(&floats, &dir.path().join("a.png"), 4).unwrap_err();
    assert_eq!(
        err.to_string(),
        "expected uint8 images of shape [N, 1 or 3, H, W], got Float of shape [1, 3, 4, 4]"
    );
    let two_channels = Tensor::zeros([1, 2, 4, 4], (Kind::Uint8, Device::Cpu));
    assert!(write_pngs(&two_channels, dir.path()).is_err());
    let err = write_png_grid(&test_images(1, 1, 2, 2), &dir.path().join("b.png"), 0).unwrap_err();
    assert_eq!(err.to_string(), "a grid needs at least one column");
}

#[test]
fn sampled_images_write_as_a_grid() {
    let set = ModelSet::single(build(&checkpoint(&tiny_arch(), 1)));
    let images = sample(&set, &diffusion(), &config(4, 4, 0)).unwrap().images;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    write_png_grid(&images, &path, 2).unwrap();
    let (width, height, channels, _) = decode(&path);
    assert_eq!((width, height, channels), (2 * 10 + 2, 2 * 10 + 2, 3));
}

// ---------------------------------------------------------------------------------------------
// Import

fn stage_context(dir: &Path) -> StageContext {
    let ctx = StageContext::new("base", dir.join("out"), dir.join("work"));
    std::fs::create_dir_all(&ctx.out_dir).unwrap();
    ctx
}

/// Runs an `import` stage of `params` in a manifest in `dir` with `model:`.
fn import_run(
    ctx: &StageContext,
    params: &ImportParams,
    model: &ModelConfig,
    dir: &Path,
) -> anyhow::Result<()> {
    let diffusion = DiffusionConfig::default();
    let sections = Sections { seed: 0, data: None, model, diffusion: &diffusion, dir };
    import::run(ctx, &Import::inputs(params, &sections))
}

/// Writes `ckpt`'s tensors as a plain state dict (what the Python conversion produces: no
/// metadata), in `kind`.
fn write_state_dict(ckpt: &Checkpoint, path: &Path, kind: Kind) {
    let tensors: Vec<(String, Tensor)> =
        ckpt.tensors.iter().map(|(n, t)| (n.clone(), t.to_kind(kind))).collect();
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn output_names(ctx: &StageContext) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&ctx.out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn assert_same_weights(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &a.tensors {
        assert!(t.equal(&b.tensors[name]), "{name}");
    }
}

#[test]
fn import_writes_model_and_ema_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = stage_context(dir.path());
    let source = checkpoint(&tiny_arch(), 1);
    std::fs::create_dir(dir.path().join("ckpt")).unwrap();
    // Float64 on disk: the outputs are float32.
    write_state_dict(&source, &dir.path().join("ckpt/model.safetensors"), Kind::Double);
    let params = ImportParams { path: "ckpt/model.safetensors".into(), ema_path: None };
    import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap();

    assert_eq!(output_names(&ctx), [EMA_FILE, MODEL_FILE]);
    let model = Checkpoint::load(&ctx.out_dir.join(MODEL_FILE)).unwrap();
    let ema = Checkpoint::load(&ctx.out_dir.join(EMA_FILE)).unwrap();
    assert_eq!(model.arch, tiny_arch());
    // The source is recorded by content (its path is not part of the key).
    let source_file = dir.path().join("ckpt/model.safetensors");
    assert_eq!(model.state[IMPORTED_FROM], import::content_label(&source_file).unwrap());
    assert!(model.state[IMPORTED_FROM].starts_with("blake3:"));
    assert!(model.tensors.values().all(|t| t.kind() == Kind::Float));
    // Without `ema_path`, the EMA output is the same weights.
    assert_same_weights(&model, &source);
    assert_same_weights(&ema, &source);
}

#[test]
fn import_takes_separate_ema_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = stage_context(dir.path());
    let (weights, ema) = (checkpoint(&tiny_arch(), 1), checkpoint(&tiny_arch(), 2));
    write_state_dict(&weights, &dir.path().join("m.safetensors"), Kind::Float);
    write_state_dict(&ema, &dir.path().join("e.safetensors"), Kind::Half);
    let params =
        ImportParams { path: "m.safetensors".into(), ema_path: Some("e.safetensors".into()) };
    import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap();

    assert_same_weights(&Checkpoint::load(&ctx.out_dir.join(MODEL_FILE)).unwrap(), &weights);
    let got = Checkpoint::load(&ctx.out_dir.join(EMA_FILE)).unwrap();
    let ema_file = dir.path().join("e.safetensors");
    assert_eq!(got.state[IMPORTED_FROM], import::content_label(&ema_file).unwrap());
    for (name, t) in &ema.tensors {
        // Rounded through float16 on disk.
        let want = t.to_kind(Kind::Half).to_kind(Kind::Float);
        assert!(got.tensors[name].equal(&want), "{name}");
    }
}

/// A checkpoint trained with other flags names the first tensor that differs, with both shapes.
#[test]
fn import_names_the_first_mismatching_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = stage_context(dir.path());
    let fixed_sigma =
        UNetArch::from_config(&ModelConfig { learn_sigma: false, ..tiny_config() }).unwrap();
    write_state_dict(&checkpoint(&fixed_sigma, 1), &dir.path().join("m.safetensors"), Kind::Float);
    let params = ImportParams { path: "m.safetensors".into(), ema_path: None };
    let err = import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap_err();
    let path = dir.path().join("m.safetensors");
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` does not match the manifest's `model:` section: tensor `out.2.bias` expected \
             shape [6], found [3] (1 more tensors differ)\nhint: set `model:` to the flags the \
             checkpoint was trained with (improved-diffusion's `--num_channels`, \
             `--num_res_blocks`, `--attention_resolutions`, `--learn_sigma`, ...)",
            path.display()
        )
    );
    assert!(output_names(&ctx).is_empty(), "nothing written on failure");

    // A missing tensor.
    let mut partial = checkpoint(&tiny_arch(), 1);
    partial.tensors.remove("middle_block.0.in_layers.0.weight");
    write_state_dict(&partial, &path, Kind::Float);
    let err = import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(
            "tensor `middle_block.0.in_layers.0.weight` expected shape [32], not in the file\n"
        ),
        "{err}"
    );

    // An extra tensor.
    let mut extra = checkpoint(&tiny_arch(), 1);
    extra
        .tensors
        .insert("label_emb.weight".into(), Tensor::zeros([10, 128], (Kind::Float, Device::Cpu)));
    write_state_dict(&extra, &path, Kind::Float);
    let err = import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(
            "tensor `label_emb.weight` found shape [10, 128], not part of the architecture\n"
        ),
        "{err}"
    );
}

#[test]
fn import_rejects_files_that_are_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = stage_context(dir.path());
    std::fs::write(dir.path().join("m.safetensors"), b"not a checkpoint").unwrap();
    let params = ImportParams { path: "m.safetensors".into(), ema_path: None };
    let err = import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("is not a readable safetensors file"), "{err}");

    // A PyTorch pickle is refused when the manifest is validated.
    let pickle = ImportParams { path: "model.pt".into(), ema_path: None };
    let errs = pickle.validate();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].message.starts_with(
            "must be a safetensors file, got the PyTorch file `model.pt`\nhint: convert it with \
             `safetensors.torch.save_file("
        ),
        "{}",
        errs[0].message
    );
}

/// The imported weights sample like the source model.
#[test]
fn imported_weights_sample_like_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = stage_context(dir.path());
    let source = checkpoint(&tiny_arch(), 5);
    write_state_dict(&source, &dir.path().join("m.safetensors"), Kind::Float);
    let params = ImportParams { path: "m.safetensors".into(), ema_path: None };
    import_run(&ctx, &params, &tiny_config(), dir.path()).unwrap();
    let imported = ModelSet::single(load_unet(&ctx.out_dir.join(EMA_FILE), Device::Cpu).unwrap());
    let cfg = config(2, 2, 4);
    let a = sample(&imported, &diffusion(), &cfg).unwrap().images;
    let b = sample(&ModelSet::single(build(&source)), &diffusion(), &cfg).unwrap().images;
    assert!(a.equal(&b));
}

#[test]
fn image_noise_ignores_the_torch_seed() {
    // The per-image noise ignores libtorch's global generator.
    tch::manual_seed(1);
    let a = ImageNoise::new(0, 0, 2).randn(&[2, 3], (Kind::Float, Device::Cpu));
    tch::manual_seed(2);
    let b = ImageNoise::new(0, 0, 2).randn(&[2, 3], (Kind::Float, Device::Cpu));
    assert!(a.equal(&b));
}
