//! Per-element importance scores (random, magnitude, Taylor, Diff-Pruning) and the fixed,
//! seeded loss batch every measurement of a group uses.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::diffusion::{GaussianDiffusion, NoiseSource, SeededNoise};

use super::structure::{Scores, Structure};

/// A fixed batch: clean images, timesteps and noise, all drawn from a seed.
pub struct LossBatch {
    /// `[B, C, H, W]` in `[-1, 1]`.
    pub x0: Tensor,
    /// `[B]` int64 timesteps.
    pub t: Tensor,
    /// `[B, C, H, W]`.
    pub noise: Tensor,
}

impl LossBatch {
    /// `x0` with timesteps drawn uniformly (seeded) from `timesteps` and seeded noise.
    pub fn new(x0: Tensor, timesteps: &[usize], seed: u64, device: Device) -> LossBatch {
        let b = x0.size()[0] as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t: Vec<i64> =
            (0..b).map(|_| timesteps[rng.gen_range(0..timesteps.len())] as i64).collect();
        let noise = SeededNoise::stream(seed, 1).randn(&x0.size(), (Kind::Float, device));
        LossBatch { x0: x0.to_device(device), t: Tensor::from_slice(&t).to_device(device), noise }
    }

    /// The same images and noise at timesteps `t` (one per image).
    pub fn at(&self, t: &[i64]) -> LossBatch {
        LossBatch {
            x0: self.x0.shallow_clone(),
            t: Tensor::from_slice(t).to_device(self.x0.device()),
            noise: self.noise.shallow_clone(),
        }
    }
}

/// The mean training loss (the manifest's `diffusion.loss`) of `ckpt` on `batch`, eval mode.
pub fn loss(
    ckpt: &Checkpoint,
    diffusion: &GaussianDiffusion,
    batch: &LossBatch,
) -> anyhow::Result<f64> {
    let vs = VarStore::new(batch.x0.device());
    let net = ckpt.build(&vs)?;
    let l = tch::no_grad(|| {
        diffusion
            .training_losses(|x, t| net.forward_t(x, t, false), &batch.x0, &batch.t, &batch.noise)
            .loss
            .mean(Kind::Double)
            .double_value(&[])
    });
    Ok(l)
}

/// Random scores, uniform in `[0, 1)`, from `seed`.
pub fn random(s: &Structure, seed: u64) -> Scores {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    s.units().iter().map(|u| (0..u.full).map(|_| rng.r#gen::<f64>()).collect()).collect()
}

/// Squared L2 norm of each element's weights across every coupled layer (ranks as the L2 norm).
pub fn magnitude(s: &Structure, ckpt: &Checkpoint) -> Scores {
    let sq: BTreeMap<String, Tensor> =
        ckpt.tensors.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Double).square())).collect();
    s.scores(&sq)
}

/// `|w * g|` summed per element, where `g` is the gradient of the loss summed over `batches`;
/// `keep_going(i, loss_i)` after each batch's backward says whether to continue.
fn taylor_over(
    s: &Structure,
    ckpt: &Checkpoint,
    diffusion: &GaussianDiffusion,
    device: Device,
    batches: impl Iterator<Item = LossBatch>,
    mut keep_going: impl FnMut(usize, f64) -> bool,
) -> anyhow::Result<Scores> {
    let vs = VarStore::new(device);
    let net = ckpt.build(&vs)?;
    for (i, b) in batches.enumerate() {
        let b = LossBatch {
            x0: b.x0.to_device(device),
            t: b.t.to_device(device),
            noise: b.noise.to_device(device),
        };
        let l = diffusion
            .training_losses(|x, t| net.forward_t(x, t, false), &b.x0, &b.t, &b.noise)
            .loss
            .mean(Kind::Float);
        let v = l.double_value(&[]);
        anyhow::ensure!(v.is_finite(), "the loss is {v} while computing importance");
        l.backward();
        if !keep_going(i, v) {
            break;
        }
    }
    let imp: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(n, w)| {
            let g = w.grad();
            let g = if g.defined() { g } else { w.zeros_like() };
            (n, (w.detach() * g).abs().to_kind(Kind::Double))
        })
        .collect();
    Ok(s.scores(&imp))
}

/// Taylor importance with the loss over all timesteps: the batch's images at timesteps spread
/// evenly over `[0, T)` (image `i` at `i * T / B`), one gradient pass.
pub fn taylor(
    s: &Structure,
    ckpt: &Checkpoint,
    diffusion: &GaussianDiffusion,
    batch: &LossBatch,
) -> anyhow::Result<Scores> {
    let b = batch.x0.size()[0];
    let steps = diffusion.num_timesteps() as i64;
    let t: Vec<i64> = (0..b).map(|i| i * steps / b).collect();
    taylor_over(s, ckpt, diffusion, batch.x0.device(), std::iter::once(batch.at(&t)), |_, _| true)
}

/// Diff-Pruning's importance for one group: Taylor with gradients accumulated over the group's
/// timesteps in ascending order (at most `max_timesteps`, evenly spaced), every image of the
/// batch at the same timestep, stopping after the first timestep whose loss is below
/// `threshold` times the largest loss so far. Returns the scores and how many timesteps ran.
pub fn diff_pruning(
    s: &Structure,
    ckpt: &Checkpoint,
    diffusion: &GaussianDiffusion,
    batch: &LossBatch,
    timesteps: &[usize],
    threshold: f64,
    max_timesteps: usize,
) -> anyhow::Result<(Scores, usize)> {
    let n = timesteps.len();
    let take = max_timesteps.min(n).max(1);
    let picked: Vec<usize> = (0..take).map(|i| timesteps[i * n / take]).collect();
    let b = batch.x0.size()[0] as usize;
    let mut max = 0f64;
    let mut used = 0;
    let scores = taylor_over(
        s,
        ckpt,
        diffusion,
        batch.x0.device(),
        picked.iter().map(|&t| batch.at(&vec![t as i64; b])),
        |i, l| {
            used = i + 1;
            max = max.max(l);
            l >= threshold * max
        },
    )?;
    Ok((scores, used))
}
