//! Each stage kind's `run`, and the dispatcher the worker calls.
//!
//! A kind's `run` receives its [`StageKind::Inputs`] — exactly what its cache key was computed
//! from — and a [`StageContext`] (upstream outputs, output and work directories, device,
//! cancellation, progress). Nothing else of the manifest reaches it.

use progdiff_kinds::allocate::SnrAllocate;
use progdiff_kinds::command::Command;
use progdiff_kinds::evaluate::Evaluate;
use progdiff_kinds::fid_extractor::FidExtractor;
use progdiff_kinds::import::Import;
use progdiff_kinds::kind::{Prepared, StageKind, canonical_inputs};
use progdiff_kinds::prune::Prune;
use progdiff_kinds::train::Train;
use serde_json::Value;

use crate::context::StageContext;

/// A stage kind's work.
pub trait Run: StageKind {
    /// Runs one instance: reads upstream outputs from `ctx.inputs`, writes outputs into
    /// `ctx.out_dir`.
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()>;
}

impl Run for Train {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::train::run(ctx, inputs)
    }
}

impl Run for SnrAllocate {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::allocate::run(ctx, inputs)
    }
}

impl Run for Import {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::import::run(ctx, inputs)
    }
}

impl Run for Command {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::command::run(ctx, inputs)
    }
}

impl Run for Evaluate {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::evaluate::run(ctx, inputs)
    }
}

impl Run for FidExtractor {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::fid::stage::run(ctx, inputs)
    }
}

impl Run for Prune {
    fn run(ctx: &StageContext, inputs: &Self::Inputs) -> anyhow::Result<()> {
        crate::prune::run(ctx, inputs)
    }
}

/// Parses `inputs` as the inputs of kind `kind`; errors for an unknown kind or inputs that are
/// not that kind's.
pub fn prepare(kind: &str, inputs: &Value) -> anyhow::Result<Prepared> {
    fn typed<K: Run>(inputs: &Value) -> anyhow::Result<Prepared> {
        let (typed, value) = canonical_inputs::<K>(inputs).map_err(anyhow::Error::msg)?;
        Ok(Prepared::new(K::VERSION, value, Box::new(move |ctx| K::run(ctx, &typed))))
    }
    macro_rules! dispatch {
        ($($k:path),* $(,)?) => {
            $(if kind == <$k as StageKind>::KIND {
                return typed::<$k>(inputs);
            })*
        };
    }
    progdiff_kinds::for_each_kind!(dispatch);
    anyhow::bail!("unknown stage kind `{kind}`")
}
