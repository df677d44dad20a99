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
        channels_last(x)
    } else {
        x.shallow_clone()
    }
}

/// `x` (`[B, C, H, W]`) with its values stored NHWC (same shape and values).
fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_keeps_shape_and_values() {
        let x =
            Tensor::arange(2 * 3 * 4 * 5, (tch::Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 5]);
        let nhwc = channels_last(&x);
        assert_eq!(nhwc.size(), x.size());
        assert!(nhwc.equal(&x));
        assert_eq!(nhwc.stride(), vec![60, 1, 15, 3]);
        // On the CPU the layout is left alone.
        assert_eq!(layout(&x).stride(), x.stride());
    }
}
