//! Parameter names and shapes against improved-diffusion's CIFAR-10 `UNetModel` state dict.
//!
//! `iddpm_cifar10_state_dict.txt` lists `name shape` (shape as `AxBxC`) for every entry of
//! `UNetModel(in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
//! attention_resolutions=(2, 4), dropout=0.3, channel_mult=(1, 2, 2, 2), num_heads=4,
//! use_scale_shift_norm=True).state_dict()`, in the reference's order.

use std::collections::BTreeMap;

use progdiff_stages::unet::{UNet, UNetArch};
use tch::nn::VarStore;

use crate::common::{cifar10_config, fixture};

fn reference() -> BTreeMap<String, Vec<i64>> {
    let text = std::fs::read_to_string(fixture("iddpm_cifar10_state_dict.txt")).unwrap();
    text.lines()
        .map(|line| {
            let (name, shape) = line.split_once(' ').unwrap();
            (name.to_string(), shape.split('x').map(|d| d.parse().unwrap()).collect())
        })
        .collect()
}

fn cifar10() -> UNetArch {
    UNetArch::from_config(&cifar10_config()).unwrap()
}

#[test]
fn param_shapes_match_reference() {
    let want = reference();
    assert_eq!(want.len(), 446);
    assert_eq!(cifar10().param_shapes(), want);
}

#[test]
fn built_model_matches_reference() {
    let vs = VarStore::new(tch::Device::Cpu);
    let _net = UNet::new(&vs.root(), &cifar10()).unwrap();
    let got: BTreeMap<String, Vec<i64>> =
        vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    assert_eq!(got, reference());
}
