//! Checkpoints: round trip with a pruned architecture, the safetensors byte format, importing an
//! improved-diffusion state dict, and the errors.

use std::collections::BTreeMap;

use progdiff_stages::checkpoint::{Checkpoint, CheckpointError, EMA_RATE, FORMAT, STEP};
use progdiff_stages::unet::{UNet, UNetArch};
use safetensors::{Dtype, SafeTensors};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::{fill_deterministic, max_abs_diff, tiny_config};
use crate::pruned::pruned_arch;

fn state() -> BTreeMap<String, String> {
    BTreeMap::from([
        (STEP.to_string(), "1200".to_string()),
        (EMA_RATE.to_string(), "0.9999".to_string()),
    ])
}

#[test]
fn round_trip_rebuilds_a_pruned_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ema.safetensors");
    let arch = pruned_arch();
    let vs = VarStore::new(Device::Cpu);
    let net = UNet::new(&vs.root(), &arch).unwrap();
    fill_deterministic(&vs);
    Checkpoint::from_var_store(&arch, &vs, state()).unwrap().save(&path).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");

    let loaded = Checkpoint::load(&path).unwrap();
    assert_eq!(loaded.arch, arch);
    assert_eq!(loaded.state, state());
    let vs2 = VarStore::new(Device::Cpu);
    let net2 = loaded.build(&vs2).unwrap();
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[1.0f32, 700.0]);
    let (a, b) = tch::no_grad(|| (net.forward_t(&x, &t, false), net2.forward_t(&x, &t, false)));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// What PyTorch's `safetensors.torch.load_file` reads: plain F32 tensors under the reference's
/// names, string metadata with the format, the arch JSON and `state.*` entries.
#[test]
fn file_is_plain_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let arch = UNetArch::from_config(&tiny_config()).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _net = UNet::new(&vs.root(), &arch).unwrap();
    Checkpoint::from_var_store(&arch, &vs, state()).unwrap().save(&path).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], FORMAT);
    assert_eq!(meta["state.step"], "1200");
    assert_eq!(meta["state.ema_rate"], "0.9999");
    assert_eq!(serde_json::from_str::<UNetArch>(&meta["arch"]).unwrap(), arch);
    assert_eq!(meta.len(), 4);
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().cloned().collect();
    names.sort();
    assert_eq!(names, arch.param_shapes().into_keys().collect::<Vec<_>>());
    let w = file.tensor("input_blocks.1.0.in_layers.2.weight").unwrap();
    assert_eq!(w.dtype(), Dtype::F32);
    assert_eq!(w.shape(), [32, 32, 3, 3]);
}

/// A state dict converted from improved-diffusion (here: written by tch without metadata, in
/// float16 like an fp16 export) imports with the `model:` flags.
#[test]
fn imports_a_plain_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("converted.safetensors");
    let config = tiny_config();
    let arch = UNetArch::from_config(&config).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = UNet::new(&vs.root(), &arch).unwrap();
    fill_deterministic(&vs);
    let half: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.to_kind(Kind::Half))).collect();
    Tensor::write_safetensors(&half, &path).unwrap();

    let err = Checkpoint::load(&path).unwrap_err();
    assert!(matches!(err, CheckpointError::NotProgdiff { .. }));
    assert!(err.to_string().ends_with(
        "is not a `progdiff-unet/1` checkpoint (its `format` is `none`)\nhint: bring an \
         improved-diffusion state dict in with `Checkpoint::import` and the `model:` flags"
    ));

    let imported = Checkpoint::import(&path, &config).unwrap();
    assert!(imported.state.is_empty());
    let vs2 = VarStore::new(Device::Cpu);
    let net2 = imported.build(&vs2).unwrap();
    assert_eq!(vs2.variables()["out.2.weight"].kind(), Kind::Float);
    let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[42.0f32]);
    let (a, b) = tch::no_grad(|| (net.forward_t(&x, &t, false), net2.forward_t(&x, &t, false)));
    let scale = a.abs().max().double_value(&[]);
    assert!(max_abs_diff(&a, &b) < 1e-2 * scale.max(1.0), "fp16 weights stay close");
}

#[test]
fn wrong_config_is_a_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("converted.safetensors");
    let arch = UNetArch::from_config(&tiny_config()).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _net = UNet::new(&vs.root(), &arch).unwrap();
    Tensor::write_safetensors(&vs.variables().into_iter().collect::<Vec<_>>(), &path).unwrap();

    let other = progdiff_stages::config::ModelConfig { learn_sigma: false, ..tiny_config() };
    let err = Checkpoint::import(&path, &other).unwrap_err().to_string();
    assert_eq!(
        err,
        "weights do not match the architecture: 2 of wrong shape (`out.2.bias` expected [3], got \
         [6], `out.2.weight` expected [3, 32, 3, 3], got [6, 32, 3, 3])"
    );
}
