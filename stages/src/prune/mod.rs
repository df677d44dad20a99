//! `prune`: structured pruning of a base model to one timestep group's FLOPs bound (paper
//! section 4.3, eq. 12 and 14-17), with the importance proxies of the paper's Table 4.
//!
//! - [`structure`]: the prunable units of the IDDPM UNet (ResBlock hidden channels, attention
//!   heads, residual-stream widths), plans, and slicing a checkpoint to a plan;
//! - [`budget`]: fitting any plan to the MACs bound, tightly;
//! - [`importance`]: random, magnitude, Taylor and Diff-Pruning scores, and the group's fixed
//!   loss batch;
//! - [`search`]: the memory-bank loop with an evolutionary proposer, its bank cached per round;
//! - [`llm`]: the same loop with plans proposed by an OpenAI-compatible chat-completions API;
//! - [`stage`]: the `for_each: group` stage itself.
//!
//! Outputs: the pruned `model.safetensors` and `ema.safetensors` (the same pruned weights, so a
//! downstream `train` fine-tunes from them whichever it prefers), `report.json`
//! ([`stage::PruneReport`]) and `bank.json` ([`search::BankFile`]): the memory bank of `search`
//! and `llm`, a one-entry bank (the plan and its loss) for the importance proxies.

pub mod budget;
pub mod importance;
pub mod llm;
pub mod search;
pub mod stage;
pub mod structure;

pub use progdiff_kinds::prune::{
    BANK_FILE, KIND, Prune, PruneInputs, REPORT_FILE, VERSION, params,
};
pub use progdiff_kinds::prune::{ProxyParams, PruneParams, SeedRef};
pub use stage::{PruneReport, run};
pub use structure::{Plan, Structure, Unit, UnitKind};
