//! Which images go into each training batch.
//!
//! IDDPM's loader shuffles every epoch (`DataLoader(shuffle=True)`); [`EpochSampler`] does the
//! same with a permutation that depends only on `(seed, epoch)`, so its whole state is two
//! integers that a resumed run restores with [`EpochSampler::seek`].

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `batch` indices drawn uniformly from `0..len`, with replacement.
///
/// # Panics
/// When `len == 0`.
pub fn sample_indices<R: Rng + ?Sized>(rng: &mut R, len: usize, batch: usize) -> Vec<usize> {
    assert!(len > 0, "sampling from an empty dataset");
    (0..batch).map(|_| rng.gen_range(0..len)).collect()
}

/// Shuffled epochs: each epoch visits every index once, in an order drawn from
/// `ChaCha8(seed, epoch)`. A batch that runs past the end of an epoch continues into the next
/// one (no image is dropped, and batches larger than the dataset work).
#[derive(Clone, Debug)]
pub struct EpochSampler {
    len: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    order: Vec<usize>,
}

impl EpochSampler {
    /// A sampler over `0..len` at the start of epoch 0.
    ///
    /// # Panics
    /// When `len == 0`.
    pub fn new(len: usize, seed: u64) -> EpochSampler {
        assert!(len > 0, "sampling from an empty dataset");
        let mut s = EpochSampler { len, seed, epoch: 0, pos: 0, order: Vec::new() };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.epoch);
        self.order = (0..self.len).collect();
        self.order.shuffle(&mut rng);
    }

    /// The next `batch` indices.
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.pos == self.len {
                self.epoch += 1;
                self.pos = 0;
                self.shuffle();
            }
            let take = (batch - out.len()).min(self.len - self.pos);
            out.extend_from_slice(&self.order[self.pos..self.pos + take]);
            self.pos += take;
        }
        out
    }

    /// `(epoch, position within it)`: the state to save for a resume.
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.pos)
    }

    /// Jumps to `(epoch, pos)` as returned by [`EpochSampler::position`].
    ///
    /// # Panics
    /// When `pos > len`.
    pub fn seek(&mut self, epoch: u64, pos: usize) {
        assert!(pos <= self.len, "position {pos} past the epoch's {} images", self.len);
        self.epoch = epoch;
        self.pos = pos;
        self.shuffle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_batches_span_epochs() {
        let mut s = EpochSampler::new(5, 1);
        let a = s.next_batch(3);
        let b = s.next_batch(3);
        let mut first: Vec<usize> = a.iter().chain(&b[..2]).copied().collect();
        first.sort();
        assert_eq!(first, [0, 1, 2, 3, 4]);
        assert_eq!(s.position(), (1, 1));
        assert_eq!(s.next_batch(12).len(), 12);
    }

    #[test]
    fn seek_resumes_the_same_stream() {
        let mut s = EpochSampler::new(7, 9);
        s.next_batch(10);
        let (e, p) = s.position();
        let want = s.next_batch(20);
        let mut r = EpochSampler::new(7, 9);
        r.seek(e, p);
        assert_eq!(r.next_batch(20), want);
        assert_ne!(EpochSampler::new(7, 10).next_batch(7), EpochSampler::new(7, 9).next_batch(7));
    }

    #[test]
    fn uniform_indices_stay_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert!(sample_indices(&mut rng, 3, 100).iter().all(|&i| i < 3));
    }
}
