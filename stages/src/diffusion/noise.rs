//! Where the samplers' standard normal noise comes from.
//!
//! libtorch's generators are process-wide and tch cannot create private ones, so anything that
//! draws from them in between (a UNet initialising in another thread, dropout, another sampler,
//! tests running in parallel) shifts the stream. Hence two seeded sources:
//!
//! - [`SeededNoise`] (the default): a counter-based generator of its own (SplitMix64 +
//!   Box-Muller in float64 on the CPU). Its values depend only on the seed, the stream and the
//!   draw count: not on threads, other torch users, or the device the noise is moved to.
//! - [`TorchNoise`]: libtorch's global generator, seeded once; on the CPU it gives exactly
//!   PyTorch's `torch.manual_seed(seed)` + `randn` stream, so IDDPM runs can be replayed.
//!
//! [`FixedNoise`] hands out given tensors (tests, replays).

use std::collections::VecDeque;
use std::f64::consts::TAU;

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// A source of standard normal noise.
pub trait NoiseSource {
    /// A tensor of `shape` filled with independent standard normal values, of the given kind
    /// and on the given device.
    fn randn(&mut self, shape: &[i64], options: (Kind, Device)) -> Tensor;
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reproducible noise from a seed, independent of libtorch's global generators.
///
/// Draw `k` of stream `s` of seed `seed` is a fixed function of `(seed, s, k)`: two samplers
/// with the same seed and stream produce the same noise whatever else runs in the process, and
/// the same values on every device (generated in float64 on the CPU, then cast and moved).
#[derive(Clone, Debug)]
pub struct SeededNoise {
    key: u64,
    draws: u64,
}

impl SeededNoise {
    /// Stream 0 of `seed`.
    pub fn new(seed: u64) -> Self {
        Self::stream(seed, 0)
    }

    /// Stream `stream` of `seed`: independent of every other stream, so e.g. each sample batch
    /// can have its own and batches can be drawn in any order, or resumed.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let key = mix(mix(seed.wrapping_add(GOLDEN)) ^ stream.wrapping_mul(GOLDEN));
        SeededNoise { key, draws: 0 }
    }

    /// How many tensors were drawn so far.
    pub fn draws(&self) -> u64 {
        self.draws
    }

    /// The key of the next draw (and counts it).
    fn next_draw(&mut self) -> u64 {
        self.draws += 1;
        mix(self.key ^ self.draws.wrapping_mul(GOLDEN))
    }

    /// The `n` float64 normals of the next draw; element `i` depends only on `(key, draw, i)`,
    /// so large draws are split across threads without changing the values.
    fn normals(&mut self, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; n];
        self.fill(&mut out);
        out
    }

    /// Fills `out` with the next draw, converted to `T` (float32 values are the float64 normals
    /// rounded to nearest, as a cast of the float64 tensor gives).
    pub(crate) fn fill<T: Normal>(&mut self, out: &mut [T]) {
        let base = self.next_draw();
        // Chunks of an even length, so a Box-Muller pair never straddles two chunks.
        let chunk = out
            .len()
            .div_ceil(rayon::current_num_threads())
            .max(PARALLEL_CHUNK)
            .next_multiple_of(2);
        if out.len() <= chunk {
            fill_normals(base, 0, out);
        } else {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, part)| fill_normals(base, i * chunk, part));
        }
    }

    /// The next draw as a CPU tensor of `shape` and `kind` (float32 filled directly; other
    /// kinds through float64).
    pub(crate) fn host(&mut self, shape: &[i64], kind: Kind) -> Tensor {
        let n = shape.iter().product::<i64>().max(0) as usize;
        if kind == Kind::Float {
            let mut out = vec![0f32; n];
            self.fill(&mut out);
            Tensor::from_slice(&out).view(shape)
        } else {
            Tensor::from_slice(&self.normals(n)).view(shape).to_kind(kind)
        }
    }
}

/// What a draw can be written as: float64, or float32 rounded from it.
pub(crate) trait Normal: Copy + Default + Send {
    /// `x` as `Self`.
    fn from_f64(x: f64) -> Self;
}

impl Normal for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl Normal for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

/// Draws smaller than this stay on one thread.
const PARALLEL_CHUNK: usize = 1 << 16;

/// Fills `out` with the normals `start..start + out.len()` of the draw keyed `base` (`start`
/// even): normal `2j` and `2j + 1` are the Box-Muller pair of uniforms `2j` and `2j + 1`.
pub(crate) fn fill_normals<T: Normal>(base: u64, start: usize, out: &mut [T]) {
    let uniform = |i: usize| mix(base.wrapping_add((i as u64).wrapping_mul(GOLDEN))) >> 11;
    let scale = 1.0 / (1u64 << 53) as f64;
    for (k, pair) in out.chunks_mut(2).enumerate() {
        let i = start + 2 * k;
        // u1 in (0, 1] keeps the log finite; u2 in [0, 1).
        let u1 = (uniform(i) + 1) as f64 * scale;
        let u2 = uniform(i + 1) as f64 * scale;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (TAU * u2).sin_cos();
        pair[0] = T::from_f64(r * c);
        if let Some(second) = pair.get_mut(1) {
            *second = T::from_f64(r * s);
        }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        crate::transfer::upload(&self.host(shape, kind), device)
    }
}

/// Noise from libtorch's global generators, seeded once at construction.
///
/// The generators are process-wide: whatever else draws from them in between (dropout in
/// train mode, weight initialisation, another sampler or test in another thread) changes the
/// stream, and seeding here changes theirs. Prefer [`SeededNoise`] unless PyTorch's exact
/// stream is wanted.
#[derive(Debug)]
pub struct TorchNoise {
    on_cpu: bool,
}

impl TorchNoise {
    /// Seeds the generators with `seed` and draws on the CPU, moving noise to the target
    /// device: the same noise as PyTorch's `torch.manual_seed(seed)` + `randn` on CPU, on any
    /// device.
    pub fn seeded(seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        TorchNoise { on_cpu: true }
    }

    /// Seeds the generators with `seed` and draws on the target device: faster on a GPU, but
    /// the stream differs between devices.
    pub fn seeded_on_device(seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        TorchNoise { on_cpu: false }
    }
}

impl NoiseSource for TorchNoise {
    fn randn(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        if self.on_cpu {
            Tensor::randn(shape, (kind, Device::Cpu)).to_device(device)
        } else {
            Tensor::randn(shape, (kind, device))
        }
    }
}

/// Pre-drawn noise, handed out in order.
#[derive(Debug, Default)]
pub struct FixedNoise {
    queue: VecDeque<Tensor>,
}

impl FixedNoise {
    /// Noise that returns `tensors` in order.
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        FixedNoise { queue: tensors.into_iter().collect() }
    }

    /// How many tensors are left.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for FixedNoise {
    /// # Panics
    /// When no tensor is left or the next one has another shape.
    fn randn(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        let next = self.queue.pop_front().expect("FixedNoise ran out of tensors");
        assert_eq!(next.size(), shape, "FixedNoise: the next tensor has another shape");
        next.to_kind(kind).to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn seeded_noise_depends_only_on_seed_stream_and_draw() {
        let mut a = SeededNoise::new(5);
        let mut b = SeededNoise::new(5);
        let a1 = a.randn(&[3, 4], CPU64);
        assert!(a1.equal(&b.randn(&[3, 4], CPU64)));
        let a2 = a.randn(&[3, 4], CPU64);
        assert!(!a1.equal(&a2), "successive draws differ");
        assert!(!a1.equal(&SeededNoise::new(6).randn(&[3, 4], CPU64)), "seeds differ");
        assert!(!a1.equal(&SeededNoise::stream(5, 1).randn(&[3, 4], CPU64)), "streams differ");
        assert_eq!(a.draws(), 2);
        // The kind only casts: float32 noise is the float64 noise rounded.
        let f = SeededNoise::new(5).randn(&[3, 4], (Kind::Float, Device::Cpu));
        assert!(f.equal(&a1.to_kind(Kind::Float)));
    }

    #[test]
    fn threads_do_not_change_the_values() {
        let mut noise = SeededNoise::new(3);
        let n = 4 * PARALLEL_CHUNK + 3;
        let parallel = noise.normals(n);
        let base = mix(noise.key ^ noise.draws().wrapping_mul(GOLDEN));
        let mut serial = vec![0.0; n];
        fill_normals(base, 0, &mut serial);
        assert_eq!(parallel, serial);
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let x = SeededNoise::new(0).randn(&[200_001], CPU64);
        let mean = x.mean(Kind::Double).double_value(&[]);
        let var = x.var(true).double_value(&[]);
        let kurt = x.pow_tensor_scalar(4).mean(Kind::Double).double_value(&[]);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "fourth moment {kurt}");
        let frac_beyond_2 = x.abs().gt(2.0).to_kind(Kind::Double).mean(Kind::Double);
        assert!((frac_beyond_2.double_value(&[]) - 0.0455).abs() < 0.003);
    }

    #[test]
    fn fixed_noise_hands_out_tensors_in_order() {
        let mut n = FixedNoise::new([Tensor::from_slice(&[1.0f64]), Tensor::from_slice(&[2.0f64])]);
        let a = n.randn(&[1], (Kind::Float, Device::Cpu));
        assert_eq!(a.kind(), Kind::Float);
        assert_eq!(a.double_value(&[0]), 1.0);
        assert_eq!(n.remaining(), 1);
    }
}
