//! [`ModelSet`]: the UNets a sampler runs and which original timesteps each one serves.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Device;
use tch::nn::VarStore;

use super::SampleError;
use crate::allocate::Allocation;
use crate::checkpoint::Checkpoint;
use crate::cost::cost;
use crate::diffusion::GaussianDiffusion;
use crate::unet::UNet;

/// One or more UNets, each serving a set of original timesteps.
///
/// A single model serves every timestep. A progressive set ([`ModelSet::progressive`]) has one
/// model per group of an allocation, and model i serves group i's timesteps; a respaced sampling
/// process asks for the model of each step's original timestep ([`ModelSet::model_of`]), so the
/// groups are those of the full T-step process whatever the respacing.
#[derive(Debug)]
pub struct ModelSet {
    models: Vec<UNet>,
    /// Model index of every original timestep; `None` when one model serves all of them.
    per_timestep: Option<Vec<usize>>,
}

impl ModelSet {
    /// One model for every timestep.
    pub fn single(model: UNet) -> ModelSet {
        ModelSet { models: vec![model], per_timestep: None }
    }

    /// One model per group of `allocation`: `models[i]` serves `allocation.groups[i].timesteps`.
    ///
    /// Errors when the counts differ, or when the models differ in image size, image channels
    /// or `learn_sigma` (their widths may differ: they are pruned to different bounds).
    pub fn progressive(
        models: Vec<UNet>,
        allocation: &Allocation,
    ) -> Result<ModelSet, SampleError> {
        if models.len() != allocation.groups.len() {
            return Err(SampleError::ModelCount {
                models: models.len(),
                groups: allocation.groups.len(),
            });
        }
        check_compatible(&models)?;
        let mut per_timestep = vec![0; allocation.steps];
        for group in &allocation.groups {
            for &t in &group.timesteps {
                per_timestep[t] = group.index;
            }
        }
        Ok(ModelSet { models, per_timestep: Some(per_timestep) })
    }

    /// The models, by index.
    pub fn models(&self) -> &[UNet] {
        &self.models
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Always false: a set has at least one model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The number of original timesteps a progressive set covers (its allocation's T); `None`
    /// for a single model, which serves any T.
    pub fn steps(&self) -> Option<usize> {
        self.per_timestep.as_ref().map(Vec::len)
    }

    /// The index of the model that serves original timestep `t`.
    ///
    /// # Panics
    /// When a progressive set does not cover `t` (see [`ModelSet::check`]).
    pub fn model_of(&self, t: usize) -> usize {
        match &self.per_timestep {
            None => 0,
            Some(map) => *map.get(t).unwrap_or_else(|| {
                panic!("timestep {t} is outside the model set's 0..{}", map.len())
            }),
        }
    }

    /// The model that serves original timestep `t` (see [`ModelSet::model_of`]).
    pub fn model_for(&self, t: usize) -> &UNet {
        &self.models[self.model_of(t)]
    }

    /// `[C, H, W]` of the images the models work on.
    pub fn image_shape(&self) -> [i64; 3] {
        let c = &self.models[0].arch().config;
        [c.in_channels as i64, c.image_size as i64, c.image_size as i64]
    }

    /// Checks that the set can sample `diffusion`: a progressive set's T is the process's
    /// original T, and the models output a variance exactly when the process learns it.
    pub fn check(&self, diffusion: &GaussianDiffusion) -> Result<(), SampleError> {
        if let Some(steps) = self.steps()
            && steps != diffusion.original_num_timesteps()
        {
            return Err(SampleError::StepsMismatch {
                allocation: steps,
                diffusion: diffusion.original_num_timesteps(),
            });
        }
        let learn_sigma = self.models[0].arch().config.learn_sigma;
        if learn_sigma != diffusion.variance().is_learned() {
            return Err(SampleError::LearnSigma { model: learn_sigma });
        }
        Ok(())
    }

    /// The model that runs at each step of `diffusion`, indexed by the process's own timestep:
    /// entry `i` is the model of original timestep `diffusion.timestep_map()[i]`. Sampling runs
    /// the steps from the last entry to the first.
    pub fn models_per_step(
        &self,
        diffusion: &GaussianDiffusion,
    ) -> Result<Vec<usize>, SampleError> {
        self.check(diffusion)?;
        Ok(diffusion.timestep_map().iter().map(|&t| self.model_of(t)).collect())
    }

    /// Params and conv + linear MACs per image averaged over the steps of `diffusion` (the
    /// sampled timesteps), each step counting its model's [`cost`]: the paper's params and
    /// FLOPs of a progressive model. A single model's average is its own cost.
    pub fn average_cost(&self, diffusion: &GaussianDiffusion) -> Result<AverageCost, SampleError> {
        let per_step = self.models_per_step(diffusion)?;
        let costs: Vec<_> = self.models.iter().map(|m| cost(m.arch())).collect();
        let mut steps_per_model = vec![0; self.models.len()];
        for &m in &per_step {
            steps_per_model[m] += 1;
        }
        let n = per_step.len() as f64;
        let mean = |f: fn(&crate::cost::Cost) -> u64| {
            steps_per_model.iter().zip(&costs).map(|(&k, c)| k as f64 * f(c) as f64).sum::<f64>()
                / n
        };
        Ok(AverageCost { params: mean(|c| c.params), macs: mean(|c| c.macs), steps_per_model })
    }
}

/// Params and MACs averaged over the sampled timesteps ([`ModelSet::average_cost`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AverageCost {
    /// Mean trainable parameters of the model that runs a step.
    pub params: f64,
    /// Mean conv + linear multiply-accumulates per image of the model that runs a step.
    pub macs: f64,
    /// How many steps each model runs, by model index.
    pub steps_per_model: Vec<usize>,
}

/// Checks that every model reads and writes the same images as model 0.
fn check_compatible(models: &[UNet]) -> Result<(), SampleError> {
    let first = &models.first().ok_or(SampleError::NoModels)?.arch().config;
    for (index, m) in models.iter().enumerate().skip(1) {
        let c = &m.arch().config;
        let fields = [
            ("image_size", first.image_size.to_string(), c.image_size.to_string()),
            ("in_channels", first.in_channels.to_string(), c.in_channels.to_string()),
            ("learn_sigma", first.learn_sigma.to_string(), c.learn_sigma.to_string()),
        ];
        if let Some((field, expected, found)) = fields.into_iter().find(|(_, a, b)| a != b) {
            return Err(SampleError::ModelsDiffer { index, field, expected, found });
        }
    }
    Ok(())
}

/// Loads a progdiff checkpoint ([`Checkpoint::load`]) and builds its model on `device`, for
/// sampling.
pub fn load_unet(path: &Path, device: Device) -> Result<UNet, SampleError> {
    let load = |source| SampleError::Load { path: path.to_path_buf(), source };
    let ckpt = Checkpoint::load(path).map_err(load)?;
    // The model keeps (reference-counted) handles on the store's variables.
    let vs = VarStore::new(device);
    ckpt.build(&vs).map_err(load)
}
