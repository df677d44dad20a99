//! Host <-> device transfers of the hot loops (training steps, sampling steps), in one place so
//! they can be counted and kept off the critical path.
//!
//! On a GPU, reading a value back to the host (`double_value`, `Vec::try_from`, `to(Cpu)`)
//! waits for every kernel queued so far: the CPU can no longer run ahead and the GPU idles while
//! the next step is prepared. So does a plain host-to-device copy from pageable memory (libtorch
//! synchronises the stream after it). The loops therefore
//! - read values only through [`read_f64`] / [`read_f64s`], which count every read on this
//!   thread ([`reads`]): tests pin that a training step that does not log or checkpoint reads
//!   nothing;
//! - move host tensors to the device only through [`upload`], which copies from pinned memory
//!   without blocking (libtorch keeps the pinned block alive until the copy is done).

use std::cell::Cell;

use tch::{Device, Kind, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Device-to-host reads made on this thread so far through this module.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
}

/// The value of a one-element tensor, as f64 (a host read: counted).
pub fn read_f64(t: &Tensor) -> f64 {
    count();
    t.double_value(&[])
}

/// The values of a tensor, flattened, as f64 (one host read: counted).
pub fn read_f64s(t: &Tensor) -> Vec<f64> {
    count();
    let host = t.to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1);
    Vec::<f64>::try_from(&host).expect("a float64 CPU tensor converts to Vec<f64>")
}

/// `host` (a CPU tensor) in pinned (page-locked) memory when `device` is a GPU, so that
/// [`upload`] copies it by DMA without blocking; itself on the CPU. (libtorch's `pin_memory`
/// with a device argument warns on every call in 2.x; `_pin_memory` does the same work.)
pub fn pin(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => host,
        _ => host.internal_pin_memory(device),
    }
}

/// `host` (a CPU tensor) on `device`: itself on the CPU; on a GPU, copied without waiting for
/// the device (ordered before any later kernel on its stream). Pinned memory ([`pin`]) is copied
/// asynchronously; pageable memory is staged by the driver first, still without a device sync.
pub fn upload(host: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => host.shallow_clone(),
        _ => host.to_device_(device, host.kind(), true, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_counted_per_thread() {
        let before = reads();
        let t = Tensor::from_slice(&[1.5f32, 2.5]);
        assert_eq!(read_f64(&t.sum(Kind::Float)), 4.0);
        assert_eq!(read_f64s(&t), vec![1.5, 2.5]);
        assert_eq!(reads(), before + 2);
        std::thread::spawn(|| assert_eq!(reads(), 0)).join().unwrap();
        let up = upload(&t, Device::Cpu);
        assert!(up.equal(&t));
        assert_eq!(reads(), before + 2, "uploads are not reads");
    }
}
