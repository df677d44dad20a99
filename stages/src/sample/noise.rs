//! [`ImageNoise`]: one seeded noise stream per image of a batch.

use tch::{Device, Kind, Tensor};

use crate::diffusion::{NoiseSource, SeededNoise};

/// Below this many numbers per draw the streams are drawn on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Noise for a batch whose row `j` is image `first + j` of a run: every draw gives row `j` the
/// next draw of stream `(seed, first + j)` of [`SeededNoise`], so an image's noise depends only
/// on the seed, its index and how many draws were made, never on the batch it is in.
#[derive(Clone, Debug)]
pub struct ImageNoise {
    streams: Vec<SeededNoise>,
}

impl ImageNoise {
    /// Streams for images `first..first + count` of seed `seed`.
    pub fn new(seed: u64, first: usize, count: usize) -> Self {
        let streams = (first..first + count).map(|i| SeededNoise::stream(seed, i as u64)).collect();
        ImageNoise { streams }
    }

    /// Number of images (the batch size every draw must have).
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

impl NoiseSource for ImageNoise {
    /// # Panics
    /// When `shape[0]` is not the number of images.
    fn randn(&mut self, shape: &[i64], (kind, device): (Kind, Device)) -> Tensor {
        assert_eq!(
            shape.first().copied(),
            Some(self.streams.len() as i64),
            "ImageNoise: the batch dimension must be the number of images"
        );
        let mut row = shape.to_vec();
        row[0] = 1;
        let per_image = row.iter().product::<i64>().max(0) as usize;
        let draw = |s: &mut SeededNoise| s.randn(&row, (Kind::Double, Device::Cpu));
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let rows: Vec<Tensor> = if threads == 1 || per_image * self.streams.len() < PARALLEL_MIN {
            self.streams.iter_mut().map(draw).collect()
        } else {
            let chunk = self.streams.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .streams
                    .chunks_mut(chunk)
                    .map(|part| scope.spawn(move || part.iter_mut().map(draw).collect::<Vec<_>>()))
                    .collect();
                handles.into_iter().flat_map(|h| h.join().expect("noise thread panicked")).collect()
            })
        };
        Tensor::cat(&rows, 0).to_kind(kind).to_device(device) // [B, ...]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn rows_are_per_image_streams() {
        let mut batch = ImageNoise::new(7, 3, 4);
        let first = batch.randn(&[4, 2, 3], CPU64);
        let second = batch.randn(&[4, 2, 3], CPU64);
        for j in 0..4 {
            let mut own = SeededNoise::stream(7, 3 + j as u64);
            assert!(first.get(j).equal(&own.randn(&[1, 2, 3], CPU64).squeeze_dim(0)));
            assert!(second.get(j).equal(&own.randn(&[1, 2, 3], CPU64).squeeze_dim(0)));
        }
    }

    #[test]
    fn threads_do_not_change_the_values() {
        // Large enough to be drawn on several threads.
        let shape = [64, 3, 16, 16];
        let parallel = ImageNoise::new(1, 0, 64).randn(&shape, CPU64);
        for j in [0, 31, 63] {
            let own = SeededNoise::stream(1, j as u64).randn(&[1, 3, 16, 16], CPU64);
            assert!(parallel.get(j).equal(&own.squeeze_dim(0)));
        }
    }
}
