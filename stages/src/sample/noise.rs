//! [`ImageNoise`]: one seeded noise stream per image of a batch.

use std::thread::JoinHandle;

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::diffusion::{NoiseSource, SeededNoise};

/// Below this many numbers per draw the streams are drawn on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Noise for a batch whose row `j` is image `first + j` of a run: every draw gives row `j` the
/// next draw of stream `(seed, first + j)` of [`SeededNoise`], so an image's noise depends only
/// on the seed, its index and how many draws were made, never on the batch it is in.
///
/// On a GPU the next draw is made ahead, on a background thread into pinned memory, while the
/// device runs the step that will ask for it, and copied without blocking: a sampling step then
/// waits neither for the CPU's normals nor for the copy. (A draw of another shape or kind than
/// the one before it is made on the spot; the values are the same either way.)
#[derive(Debug)]
pub struct ImageNoise {
    streams: Vec<SeededNoise>,
    ahead: Option<Ahead>,
    /// Draw ahead also on the CPU (tests of the GPU path).
    always_ahead: bool,
}

/// A draw being made ahead: the streams after it, and the host tensor.
#[derive(Debug)]
struct Ahead {
    shape: Vec<i64>,
    kind: Kind,
    job: JoinHandle<(Vec<SeededNoise>, Tensor)>,
}

impl Clone for ImageNoise {
    fn clone(&self) -> Self {
        ImageNoise { streams: self.streams.clone(), ahead: None, always_ahead: self.always_ahead }
    }
}

impl ImageNoise {
    /// Streams for images `first..first + count` of seed `seed`.
    pub fn new(seed: u64, first: usize, count: usize) -> Self {
        let streams = (first..first + count).map(|i| SeededNoise::stream(seed, i as u64)).collect();
        ImageNoise { streams, ahead: None, always_ahead: false }
    }

    /// Makes every next draw ahead on a background thread, as on a GPU, even on the CPU (to
    /// test that path; the values are the same).
    #[doc(hidden)]
    pub fn drawing_ahead(mut self) -> Self {
        self.always_ahead = true;
        self
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

/// The next draw of every stream as one CPU tensor `shape` (`shape[0]` streams), pinned for
/// `device` when it is a GPU.
fn draw(streams: &mut [SeededNoise], shape: &[i64], kind: Kind, device: Device) -> Tensor {
    let per_image = shape[1..].iter().product::<i64>().max(0) as usize;
    let host = if kind == Kind::Float {
        let mut out = vec![0f32; per_image * streams.len()];
        fill_rows(streams, per_image, &mut out);
        Tensor::from_slice(&out)
    } else {
        let mut out = vec![0f64; per_image * streams.len()];
        fill_rows(streams, per_image, &mut out);
        Tensor::from_slice(&out).to_kind(kind)
    };
    let host = host.view(shape);
    crate::transfer::pin(host, device)
}

fn fill_rows<T: crate::diffusion::noise::Normal>(
    streams: &mut [SeededNoise],
    per_image: usize,
    out: &mut [T],
) {
    if per_image == 0 {
        return;
    }
    if per_image * streams.len() < PARALLEL_MIN {
        streams.iter_mut().zip(out.chunks_mut(per_image)).for_each(|(s, row)| s.fill(row));
    } else {
        streams.par_iter_mut().zip(out.par_chunks_mut(per_image)).for_each(|(s, row)| s.fill(row));
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
        let ready = match self.ahead.take() {
            Some(a) => {
                let (streams, host) = a.job.join().expect("the noise thread panicked");
                (a.shape == shape && a.kind == kind).then(|| {
                    self.streams = streams;
                    host
                })
            }
            None => None,
        };
        let host = match ready {
            Some(host) => host,
            None => draw(&mut self.streams, shape, kind, device),
        };
        if device != Device::Cpu || self.always_ahead {
            let mut next = self.streams.clone();
            let shape = shape.to_vec();
            let job = {
                let shape = shape.clone();
                std::thread::spawn(move || {
                    let host = draw(&mut next, &shape, kind, device);
                    (next, host)
                })
            };
            self.ahead = Some(Ahead { shape, kind, job });
        }
        crate::transfer::upload(&host, device) // [B, ...]
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
    fn drawing_ahead_gives_the_same_draws() {
        let mut now = ImageNoise::new(5, 2, 3);
        let mut ahead = ImageNoise::new(5, 2, 3).drawing_ahead();
        // Same shape twice (the second made ahead), then another shape and kind (the draw made
        // ahead is dropped, the streams do not advance for it), then the first again.
        for (shape, kind) in [
            (vec![3, 2, 4], Kind::Float),
            (vec![3, 2, 4], Kind::Float),
            (vec![3, 5], Kind::Double),
            (vec![3, 2, 4], Kind::Float),
            (vec![3, 2, 4], Kind::Float),
        ] {
            let a = now.randn(&shape, (kind, Device::Cpu));
            let b = ahead.randn(&shape, (kind, Device::Cpu));
            assert_eq!(a.kind(), kind);
            assert!(a.equal(&b), "{shape:?} {kind:?}");
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
