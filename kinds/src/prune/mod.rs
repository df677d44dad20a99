//! `prune`: a group's copy of a checkpoint pruned to its FLOPs bound — parameters and inputs
//! (the work is `progdiff_stages::prune`).

pub mod params;

use serde::{Deserialize, Serialize};

pub use params::{ProxyParams, PruneParams, SeedRef};

use crate::config::DiffusionConfig;
use crate::context::FieldError;
use crate::data::DataValues;
use crate::kind::{Locations, Sections, StageKind};
use crate::train::TrainingProcess;

/// Stage kind name.
pub const KIND: &str = "prune";
/// Implementation version: bump when pruning results would change (2: every proxy outputs
/// `bank.json`, with the group).
pub const VERSION: u32 = 2;
/// Output: the report.
pub const REPORT_FILE: &str = "report.json";
/// Output: the final memory bank (one entry for the importance proxies).
pub const BANK_FILE: &str = "bank.json";

/// What a `prune` stage reads. The architecture comes from the upstream checkpoint (its key
/// covers it); the loss batch from the data, the seed and the training process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneInputs {
    /// Its parameters.
    pub stage: PruneParams,
    /// `seed:`.
    pub seed: u64,
    /// The training process (the loss the proxies measure).
    pub diffusion: TrainingProcess,
    /// `data:` without its file locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataValues>,
    /// Where the data is.
    pub at: Locations,
}

/// The `prune` kind.
pub struct Prune;

impl StageKind for Prune {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &["model", "diffusion.sample_steps"];
    const NEEDS_DATA: bool = true;
    type Params = PruneParams;
    type Inputs = PruneInputs;

    fn validate(params: &PruneParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &PruneParams, m: &Sections<'_>) -> PruneInputs {
        let mut at = m.locations();
        PruneInputs {
            stage: params.clone(),
            seed: m.seed,
            diffusion: TrainingProcess::of(m.diffusion),
            data: m.data_values(&mut at),
            at,
        }
    }
}
