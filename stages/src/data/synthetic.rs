//! `synthetic`: smooth toy images generated from a seed, for tests and smoke runs.
//!
//! Image `i` is a linear colour gradient in a random direction with one or two soft round blobs
//! on top: low-frequency content a tiny UNet learns in a few hundred steps. Each image depends
//! only on `(seed, i, image_size)` through a SplitMix64 stream and plain IEEE arithmetic (no
//! `exp`/`sin`, whose last bit varies between C libraries), so the pixels are identical on
//! every machine; `n` only decides how many there are.

use std::borrow::Cow;
use std::path::PathBuf;

use super::dataset::Source;
use super::transform::RawImage;
use super::{DataError, SYNTHETIC_DEFAULT_SIZE, SyntheticData};

/// Version of the generator: bump whenever the pixels for the same parameters change (it is
/// part of [`super::DataConfig::generated_fingerprint`], hence of cache keys).
pub(crate) struct Synthetic {
    n: usize,
    size: usize,
    seed: u64,
}

impl Synthetic {
    pub(crate) fn new(d: &SyntheticData) -> Synthetic {
        Synthetic { n: d.n, size: d.image_size.unwrap_or(SYNTHETIC_DEFAULT_SIZE), seed: d.seed }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fully specified.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn colour(&mut self, lo: f64, hi: f64) -> [f64; 3] {
        [self.range(lo, hi), self.range(lo, hi), self.range(lo, hi)]
    }
}

/// Image `i` as channel-planar RGB bytes.
pub(crate) fn generate(seed: u64, i: usize, size: usize) -> Vec<u8> {
    let mut key = SplitMix64(seed);
    let mut rng = SplitMix64(key.next_u64() ^ (i as u64).wrapping_mul(0xd605_bbb5_8c8a_bbe1));
    rng.next_u64();
    let c0 = rng.colour(0.1, 0.9);
    let c1 = rng.colour(0.1, 0.9);
    let (mut dx, mut dy) = (rng.range(-1.0, 1.0), rng.range(-1.0, 1.0));
    let norm = (dx * dx + dy * dy).sqrt();
    if norm < 1e-3 {
        (dx, dy) = (1.0, 0.0);
    } else {
        (dx, dy) = (dx / norm, dy / norm);
    }
    let blobs: Vec<([f64; 2], f64, [f64; 3])> = (0..1 + rng.next_u64() % 2)
        .map(|_| {
            let centre = [rng.range(0.2, 0.8), rng.range(0.2, 0.8)];
            let radius = rng.range(0.1, 0.25);
            (centre, radius, rng.colour(0.0, 1.0))
        })
        .collect();
    let plane = size * size;
    let mut out = vec![0u8; 3 * plane];
    for y in 0..size {
        let fy = (y as f64 + 0.5) / size as f64;
        for x in 0..size {
            let fx = (x as f64 + 0.5) / size as f64;
            // Position along the gradient direction, in [0, 1].
            let t = (((fx - 0.5) * dx + (fy - 0.5) * dy) * std::f64::consts::FRAC_1_SQRT_2 + 0.5)
                .clamp(0.0, 1.0);
            let mut px = [0.0; 3];
            for c in 0..3 {
                px[c] = c0[c] + (c1[c] - c0[c]) * t;
            }
            for (centre, radius, colour) in &blobs {
                let d2 = ((fx - centre[0]).powi(2) + (fy - centre[1]).powi(2)) / (radius * radius);
                let alpha = 1.0 / ((1.0 + d2) * (1.0 + d2));
                for c in 0..3 {
                    px[c] += (colour[c] - px[c]) * alpha;
                }
            }
            for c in 0..3 {
                out[c * plane + y * size + x] = (px[c] * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

impl Source for Synthetic {
    fn len(&self) -> usize {
        self.n
    }

    fn shape(&self) -> (usize, usize, usize) {
        (3, self.size, self.size)
    }

    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError> {
        let pixels = Cow::Owned(generate(self.seed, i, self.size));
        Ok(RawImage { channels: 3, height: self.size, width: self.size, pixels })
    }

    fn label(&self, _i: usize) -> Option<i64> {
        None
    }

    fn origin(&self, _i: usize) -> PathBuf {
        PathBuf::from("<synthetic>")
    }

    fn files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_depend_on_seed_and_index_only() {
        assert_eq!(generate(3, 5, 16), generate(3, 5, 16));
        assert_ne!(generate(3, 5, 16), generate(3, 6, 16));
        assert_ne!(generate(3, 5, 16), generate(4, 5, 16));
    }

    #[test]
    fn images_are_smooth() {
        // Neighbouring pixels differ little: the content is low-frequency.
        let size = 32;
        let img = generate(0, 0, size);
        let max_step = img[..size * size]
            .windows(2)
            .enumerate()
            .filter(|(k, _)| (k + 1) % size != 0)
            .map(|(_, w)| (w[0] as i32 - w[1] as i32).abs())
            .max()
            .unwrap();
        assert!(max_step < 40, "max step {max_step}");
    }
}
