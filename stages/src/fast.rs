//! The worker's opt-in GPU fast paths ([`FastPaths`], from `progdiff run --fast`), process-wide:
//! a worker runs one stage instance.

use std::sync::atomic::{AtomicBool, Ordering};

pub use progdiff_kinds::fast::FastPaths;
use tch::Tensor;

static CHANNELS_LAST: AtomicBool = AtomicBool::new(false);
static FUSED_ATTENTION: AtomicBool = AtomicBool::new(false);

/// Turns the fast paths of `f` on (and the others off) for this process.
pub fn apply(f: FastPaths) {
    tch::Cuda::cudnn_set_benchmark(f.cudnn_benchmark);
    CHANNELS_LAST.store(f.channels_last, Ordering::Relaxed);
    FUSED_ATTENTION.store(f.fused_attention, Ordering::Relaxed);
}

thread_local! {
    /// A test's own setting (the process-wide one would leak into tests running alongside).
    static FUSED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether attention on `device` uses `scaled_dot_product_attention` (the fast path applies
/// to GPUs only: on the CPU results stay bit for bit those without it).
pub fn fused_attention(device: tch::Device) -> bool {
    (FUSED_ATTENTION.load(Ordering::Relaxed) && device.is_cuda()) || FUSED_HERE.with(|f| f.get())
}

/// Turns fused attention on or off for this thread only (tests).
#[doc(hidden)]
pub fn fused_attention_on_this_thread(on: bool) {
    FUSED_HERE.with(|f| f.set(on));
}

/// `x` (`[B, C, H, W]`) in channels-last layout when that fast path is on and `x` is on a GPU;
/// else `x` itself. Same shape and values either way.
pub fn layout(x: &Tensor) -> Tensor {
    if CHANNELS_LAST.load(Ordering::Relaxed) && x.device().is_cuda() && x.dim() == 4 {
        x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        x.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_keeps_shape_and_values() {
        let x =
            Tensor::arange(2 * 3 * 4 * 5, (tch::Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 5]);
        let nhwc = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        assert_eq!(nhwc.size(), x.size());
        assert!(nhwc.equal(&x));
        assert_eq!(nhwc.stride(), vec![60, 1, 15, 3]);
        // On the CPU the layout is left alone.
        assert_eq!(layout(&x).stride(), x.stride());
    }

    #[test]
    fn fused_attention_computes_the_written_out_attention() {
        use crate::unet::{UNet, UNetArch};
        let cfg = crate::config::ModelConfig {
            image_size: 8,
            in_channels: 1,
            channels: 32,
            channel_mult: vec![1, 2],
            res_blocks: 1,
            attention_resolutions: vec![4],
            heads: 2,
            dropout: 0.0,
            learn_sigma: false,
            use_scale_shift_norm: true,
        };
        let arch = UNetArch::from_config(&cfg).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        tch::manual_seed(1);
        let net = UNet::new(&vs.root(), &arch).unwrap();
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&(Tensor::randn(v.size(), (tch::Kind::Float, tch::Device::Cpu)) * 0.2));
            }
        });
        let x = Tensor::randn([2, 1, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
        let t = Tensor::from_slice(&[3.0f32, 700.0]);
        let plain = net.forward_t(&x, &t, false);
        fused_attention_on_this_thread(true);
        let fused = net.forward_t(&x, &t, false);
        fused_attention_on_this_thread(false);
        assert!(plain.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
        assert!(fused.allclose(&plain, 1e-4, 1e-5, false), "{}", (&fused - &plain).abs().max());
    }
}
