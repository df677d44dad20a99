//! Pruned architectures: non-uniform widths build, run, and cost what the analytic count says;
//! removing an attention head is exactly zeroing its `proj_out` columns.

use progdiff_stages::config::ModelConfig;
use progdiff_stages::cost::cost;
use progdiff_stages::unet::{LayerArch, UNet, UNetArch};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, tiny_config};
use crate::cost::assert_analytic_matches_counted;

fn config64() -> ModelConfig {
    ModelConfig { channels: 64, ..tiny_config() }
}

/// The `config64` model with every kind of width changed:
///
/// ```text
/// input_blocks.0.0   conv 3 -> 32                  level-0 stream 64 -> 32
/// input_blocks.1.0   res 32 -> (hidden 64) -> 32   identity skip keeps the stream
/// input_blocks.2.0   downsample 32 -> 64
/// input_blocks.3.0   res 64 -> (hidden 96) -> 128
/// middle_block.1     attention 1 head of 64
/// output_blocks.0.1  attention 2 heads of 32
/// output_blocks.2.0  res 128 + 32 -> 64            reads the pruned skip
/// output_blocks.3.0  res 64 + 32 -> 32             level-0 up stream 64 -> 32
/// out                32 -> 6
/// time_embed_dim     256 -> 128
/// ```
pub fn pruned_arch() -> UNetArch {
    let mut arch = UNetArch::from_config(&config64()).unwrap();
    arch.time_embed_dim = 128;
    for (path, layer) in arch.layers_mut() {
        match (path.as_str(), layer) {
            ("input_blocks.0.0", LayerArch::Conv(c)) => c.out_ch = 32,
            ("input_blocks.1.0", LayerArch::Res(r)) => (r.in_ch, r.out_ch) = (32, 32),
            ("input_blocks.2.0", LayerArch::Downsample(c)) => c.in_ch = 32,
            ("input_blocks.3.0", LayerArch::Res(r)) => r.hidden = 96,
            ("middle_block.1", LayerArch::Attention(a)) => (a.heads, a.head_dim) = (1, 64),
            ("output_blocks.0.1", LayerArch::Attention(a)) => a.head_dim = 32,
            ("output_blocks.2.0", LayerArch::Res(r)) => r.in_ch = 160,
            ("output_blocks.3.0", LayerArch::Res(r)) => {
                (r.in_ch, r.hidden, r.out_ch) = (96, 32, 32)
            }
            _ => {}
        }
    }
    arch.out_in_ch = 32;
    arch
}

#[test]
fn pruned_arch_validates_and_costs_less() {
    let arch = pruned_arch();
    arch.validate().unwrap();
    let full = cost(&UNetArch::from_config(&config64()).unwrap());
    let pruned = cost(&arch);
    assert!(pruned.params < full.params && pruned.macs < full.macs, "{pruned:?} vs {full:?}");
}

#[test]
fn pruned_analytic_equals_counted() {
    assert_analytic_matches_counted(&pruned_arch());
}

#[test]
fn pruned_param_shapes_match_built_model() {
    let arch = pruned_arch();
    let vs = VarStore::new(Device::Cpu);
    let _net = UNet::new(&vs.root(), &arch).unwrap();
    let built: std::collections::BTreeMap<String, Vec<i64>> =
        vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    assert_eq!(built, arch.param_shapes());
    assert_eq!(built["middle_block.1.qkv.weight"], [192, 128, 1]);
    assert_eq!(built["output_blocks.0.1.proj_out.weight"], [128, 64, 1]);
    assert_eq!(built["input_blocks.3.0.emb_layers.1.weight"], [192, 128]);
}

#[test]
fn broken_stream_tie_is_reported() {
    let mut arch = pruned_arch();
    arch.out_in_ch = 64;
    if let LayerArch::Downsample(c) = &mut arch.input_blocks[2][0] {
        c.in_ch = 64;
    }
    let err = arch.validate().unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid UNet architecture: `input_blocks.2.0`: reads 64 channels, but the stream has 32; \
         `out`: reads 64 channels, but the stream has 32"
    );
}

/// Heads are independent and `proj_out` is linear, so dropping head 1 of a 2-head block (its qkv
/// rows and `proj_out` columns) gives exactly the model with those `proj_out` columns zeroed.
#[test]
fn removing_a_head_equals_zeroing_its_output() {
    let config = tiny_config();
    let full_arch = UNetArch::from_config(&config).unwrap();
    let path = "middle_block.1";
    let full_vs = VarStore::new(Device::Cpu);
    let full = UNet::new(&full_vs.root(), &full_arch).unwrap();
    tch::manual_seed(7);
    tch::no_grad(|| {
        for (_, mut v) in full_vs.variables() {
            v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.2));
        }
    });

    let mut small_arch = full_arch.clone();
    let (heads, d) = match small_arch.middle_block[1] {
        LayerArch::Attention(ref mut a) => {
            a.heads -= 1;
            (a.heads as i64 + 1, a.head_dim as i64)
        }
        _ => unreachable!(),
    };
    assert_eq!(heads, 2);
    let small_vs = VarStore::new(Device::Cpu);
    let small = UNet::new(&small_vs.root(), &small_arch).unwrap();
    let full_vars = full_vs.variables();
    tch::no_grad(|| {
        for (name, mut v) in small_vs.variables() {
            let src = &full_vars[&name];
            let src = if name == format!("{path}.qkv.weight") || name == format!("{path}.qkv.bias")
            {
                src.narrow(0, 0, 3 * d) // head 0's q, k, v rows
            } else if name == format!("{path}.proj_out.weight") {
                src.narrow(1, 0, d) // head 0's input columns
            } else {
                src.shallow_clone()
            };
            v.copy_(&src);
        }
        let w = full_vars[&format!("{path}.proj_out.weight")].shallow_clone();
        let _ = w.narrow(1, d, d).zero_();
    });

    let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[5.0f32, 600.0]);
    let (a, b) = tch::no_grad(|| (full.forward_t(&x, &t, false), small.forward_t(&x, &t, false)));
    assert!(a.abs().max().double_value(&[]) > 1e-3);
    assert!(max_abs_diff(&a, &b) < 1e-5, "diff {}", max_abs_diff(&a, &b));
}
