//! Forward parity with improved-diffusion's `UNetModel`.
//!
//! The fixtures `unet_parity/{scale_shift,plain}.safetensors` were written by a script run
//! against openai/improved-diffusion (`improved_diffusion/unet.py` at 1bc7bbb, PyTorch 2.11,
//! float32, CPU, `model.eval()`): it builds `UNetModel` for the `config` in the file's metadata,
//! overwrites every parameter — the zero-initialised `out_layers.3`, `proj_out` and `out.2`
//! included, so they matter — with [`det_param`], and stores the input `x` ([`det_uniform`]`("x")`
//! as `[2, C, 8, 8]`), the timesteps `t = [3.0, 777.5]` and the reference output `out`, plus every
//! parameter's sum (`param_sums`) to prove both sides hold the same weights.

use std::collections::BTreeMap;

use progdiff_stages::config::ModelConfig;
use progdiff_stages::unet::{UNet, UNetArch};
use safetensors::SafeTensors;
use tch::Tensor;
use tch::nn::VarStore;

use crate::common::{det_param, fill_deterministic, fixture, max_abs_diff};

fn check_case(case: &str) {
    let bytes = std::fs::read(fixture(&format!("unet_parity/{case}.safetensors"))).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| Tensor::try_from(file.tensor(n).unwrap()).unwrap();

    let config: ModelConfig = serde_json::from_str(&meta["config"]).unwrap();
    let sums: BTreeMap<String, f64> = serde_json::from_str(&meta["param_sums"]).unwrap();
    let arch = UNetArch::from_config(&config).unwrap();
    let vs = VarStore::new(tch::Device::Cpu);
    let net = UNet::new(&vs.root(), &arch).unwrap();
    fill_deterministic(&vs);

    let vars = vs.variables();
    let names: Vec<&String> = sums.keys().collect();
    let mut ours: Vec<&String> = vars.keys().collect();
    ours.sort();
    assert_eq!(ours, names, "parameter names differ from the reference's");
    for (name, want) in &sums {
        let got = vars[name].to_kind(tch::Kind::Double).sum(tch::Kind::Double).double_value(&[]);
        assert!((got - want).abs() <= 1e-9 * (1.0 + want.abs()), "{name}: sum {got} vs {want}");
        // Same generator on both sides.
        assert_eq!(max_abs_diff(&vars[name], &det_param(name, &vars[name].size())), 0.0);
    }
    assert_eq!(
        meta["params"].parse::<i64>().unwrap(),
        vars.values().map(|t| t.numel() as i64).sum::<i64>()
    );

    let (x, t, want) = (get("x"), get("t"), get("out"));
    let got = tch::no_grad(|| net.forward_t(&x, &t, false));
    assert_eq!(got.size(), want.size());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{case}: max |ours - reference| = {diff:e}");
    eprintln!(
        "{case}: max abs diff {diff:e}, output scale {}",
        want.abs().mean(None).double_value(&[])
    );
}

/// `use_scale_shift_norm`, `learn_sigma`, RGB, 2 heads, attention at 4x4 and in the middle.
#[test]
fn matches_reference_scale_shift() {
    check_case("scale_shift");
}

/// Additive timestep embedding, no learned sigma, grayscale, 1 head, 2 ResBlocks per level,
/// attention at 8x8 and 4x4.
#[test]
fn matches_reference_plain() {
    check_case("plain");
}
