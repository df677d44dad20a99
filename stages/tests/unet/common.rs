//! Shared helpers: fixture paths, tiny configs, and the deterministic weights the parity fixtures
//! were generated with.

use std::path::PathBuf;

use progdiff_stages::config::ModelConfig;
use tch::Tensor;
use tch::nn::VarStore;

/// `stages/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The paper's CIFAR-10 model (improved-diffusion's `cifar10` flags).
pub fn cifar10_config() -> ModelConfig {
    ModelConfig {
        image_size: 32,
        in_channels: 3,
        channels: 128,
        channel_mult: vec![1, 2, 2, 2],
        res_blocks: 3,
        attention_resolutions: vec![16, 8],
        heads: 4,
        dropout: 0.3,
        learn_sigma: true,
        use_scale_shift_norm: true,
    }
}

/// The paper's unconditional ImageNet 64x64 model.
pub fn imagenet64_config() -> ModelConfig {
    ModelConfig { image_size: 64, channel_mult: vec![1, 2, 3, 4], ..cifar10_config() }
}

/// Two levels at 8x8, attention at 4x4, two heads: about 0.75M parameters.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        image_size: 8,
        in_channels: 3,
        channels: 32,
        channel_mult: vec![1, 2],
        res_blocks: 1,
        attention_resolutions: vec![4],
        heads: 2,
        dropout: 0.1,
        learn_sigma: true,
        use_scale_shift_norm: true,
    }
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3))
}

/// `n` values in `[-1, 1)`: a splitmix64 stream keyed by the FNV-1a hash of `name`. The parity
/// fixtures were generated with the same function in NumPy (uint64 arithmetic), so both sides
/// fill their models with identical float32 weights without shipping them.
pub fn det_uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            2.0 * ((z >> 40) as f64 / f64::from(1u32 << 24)) - 1.0
        })
        .collect()
}

/// The deterministic value of parameter `name`: weights `U/sqrt(fan_in)`, biases `0.1 U`,
/// GroupNorm scales `1 + 0.25 U` (with `U` from [`det_uniform`]), as float32.
pub fn det_param(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let u = det_uniform(name, n as usize);
    let v: Vec<f32> = if shape.len() >= 2 {
        let s = 1.0 / (shape[1..].iter().product::<i64>() as f64).sqrt();
        u.iter().map(|x| (x * s) as f32).collect()
    } else if name.ends_with(".bias") {
        u.iter().map(|x| (x * 0.1) as f32).collect()
    } else {
        u.iter().map(|x| (1.0 + 0.25 * x) as f32).collect()
    };
    Tensor::from_slice(&v).reshape(shape)
}

/// Overwrites every variable of `vs` with [`det_param`].
pub fn fill_deterministic(vs: &VarStore) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&det_param(&name, &var.size()));
        }
    });
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
