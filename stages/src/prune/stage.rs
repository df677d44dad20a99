//! The `prune` stage: one group's copy of the base model, pruned to the group's FLOPs bound.

use anyhow::{Context as _, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::allocate::{ALLOCATION_JSON, Allocation, Group};
use crate::checkpoint::Checkpoint;
use crate::config::DiffusionConfig;
use crate::context::StageContext;
use crate::cost::{Cost, cost};
use crate::data::{Dataset, sample_indices};
use crate::diffusion::GaussianDiffusion;
use crate::schedule::ScheduleTable;
use crate::train::{EMA_FILE, InitFrom, MODEL_FILE, parse_device};

use super::PruneInputs;
use super::budget::{ScorePriority, fit};
use super::importance::{self, LossBatch};
use super::params::{ProxyParams, PruneParams, SeedRef};
use super::search::{Bank, BankEntry, BankFile};
use super::structure::{Plan, Scores, Structure, UnitKind};
use super::{BANK_FILE, REPORT_FILE};
use super::{llm, search};

/// One unit's widths in the report.
#[derive(Clone, Debug, Serialize)]
pub struct UnitReport {
    /// Unit name.
    pub name: String,
    /// What the width counts.
    pub kind: UnitKind,
    /// Base width.
    pub full: usize,
    /// Kept width.
    pub kept: usize,
}

/// `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    /// Group index.
    pub group: usize,
    /// Proxy kind.
    pub proxy: String,
    /// The group's bound as a fraction of the base model's MACs (`flops_bound`).
    pub bound_ratio: f64,
    /// The bound in MACs: `floor(bound_ratio * base.macs)`.
    pub bound_macs: u64,
    /// The base model.
    pub base: Cost,
    /// The pruned model.
    pub pruned: Cost,
    /// `pruned.macs / bound_macs` (at most 1).
    pub ratio_to_budget: f64,
    /// `pruned.macs / base.macs`.
    pub macs_ratio: f64,
    /// `pruned.params / base.params`.
    pub params_ratio: f64,
    /// Mean loss of the base model on the fixed batch of the group's timesteps.
    pub loss_before: f64,
    /// Mean loss of the pruned model on the same batch.
    pub loss_after: f64,
    /// Diff-Pruning: timesteps whose gradients were accumulated before the stop rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timesteps_used: Option<usize>,
    /// Every unit's widths.
    pub units: Vec<UnitReport>,
}

/// A stream independent of every other use of the manifest seed.
pub(crate) fn sub_seed(seed: u64, group: usize, purpose: u64) -> u64 {
    let mut z = seed ^ (group as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The group this instance prunes for (its `for_each: group` index, or `group:`), from the
/// upstream allocation.
fn group_of(
    ctx: &StageContext,
    params: &PruneParams,
    diffusion: &DiffusionConfig,
) -> anyhow::Result<Group> {
    let steps = diffusion.steps;
    let g = match (ctx.group, params.group, params.budget) {
        (None, None, Some(budget)) => return Ok(all_timesteps(diffusion, budget)),
        (Some(g), None, _) | (None, Some(g), _) => g,
        (Some(_), Some(_), _) => bail!(
            "stage `{}` has both `for_each: group` and `group:`; `group:` is for a single-group \
             stage",
            ctx.id
        ),
        (None, None, None) => bail!(
            "stage `{}` prunes for one group; give it `for_each: group`, or `group: <index>`, \
             or a `budget` for one model over all timesteps",
            ctx.id
        ),
    };
    let path = ctx
        .inputs
        .iter()
        .find_map(|u| u.files.get(ALLOCATION_JSON))
        .with_context(|| format!("stage `{}` has no upstream allocation", ctx.id))?;
    let alloc = Allocation::read_json(path)?;
    anyhow::ensure!(
        alloc.steps == steps,
        "the allocation covers {} timesteps but `diffusion.steps` is {steps}",
        alloc.steps
    );
    let mut group =
        alloc.groups.get(g).cloned().with_context(|| format!("the allocation has no group {g}"))?;
    if let Some(budget) = params.budget {
        group.flops_bound = budget;
    }
    Ok(group)
}

/// One "group" of every timestep with bound `budget`, for a stage pruning a single model.
fn all_timesteps(diffusion: &DiffusionConfig, budget: f64) -> Group {
    let snr = ScheduleTable::new(diffusion.schedule, diffusion.steps).snr_db();
    let finite = || snr.iter().copied().filter(|v| v.is_finite());
    Group {
        index: 0,
        lower_bound: budget,
        flops_bound: budget,
        t_min: 0,
        t_max: diffusion.steps - 1,
        snr_db_min: finite().fold(f64::INFINITY, f64::min),
        snr_db_max: finite().fold(f64::NEG_INFINITY, f64::max),
        timesteps: (0..diffusion.steps).collect(),
    }
}

/// Whether upstream instance `id` is (an instance of) stage `stage`: `stage` or `stage[g]`.
fn is_instance_of(id: &str, stage: &str) -> bool {
    id == stage || id.strip_prefix(stage).is_some_and(|rest| rest.starts_with('['))
}

/// The upstream checkpoint to prune: the one upstream with a model that is not the `seed_bank`
/// stage's (a `prune` instance outputs a model too).
fn base_checkpoint(
    ctx: &StageContext,
    init: InitFrom,
    seed_stage: Option<&str>,
) -> anyhow::Result<Checkpoint> {
    let ups: Vec<_> = ctx
        .inputs
        .iter()
        .filter(|u| u.files.contains_key(MODEL_FILE))
        .filter(|u| seed_stage.is_none_or(|s| !is_instance_of(&u.id, s)))
        .collect();
    let [u] = ups.as_slice() else {
        bail!("stage `{}` needs exactly one upstream checkpoint, found {}", ctx.id, ups.len());
    };
    let file = match init {
        InitFrom::Ema if u.files.contains_key(EMA_FILE) => EMA_FILE,
        _ => MODEL_FILE,
    };
    Checkpoint::load(u.file(file)?)
        .with_context(|| format!("loading `{file}` of upstream `{}`", u.id))
}

/// The memory bank `seed_bank` names, from the upstream instances (see
/// [`PruneParams::seed_bank`]).
fn seed_bank(ctx: &StageContext, r: &SeedRef) -> anyhow::Result<BankFile> {
    let of_stage: Vec<_> = ctx.inputs.iter().filter(|u| is_instance_of(&u.id, &r.stage)).collect();
    let ids = || of_stage.iter().map(|u| format!("`{}`", u.id)).collect::<Vec<_>>().join(", ");
    let u = match (&r.instance(), of_stage.as_slice()) {
        (_, []) => bail!(
            "`seed_bank: {r}`: stage `{}` is not upstream of `{}`\nhint: add it to `needs`",
            r.stage,
            ctx.id
        ),
        (None, [u]) => *u,
        (None, _) => bail!(
            "`seed_bank: {r}`: `{}` receives several instances of `{}` ({}); name one, e.g. \
             `{}`",
            ctx.id,
            r.stage,
            ids(),
            of_stage[0].id
        ),
        (Some(id), _) => *of_stage.iter().find(|u| &u.id == id).with_context(|| {
            format!(
                "`seed_bank: {r}`: `{}` receives {} of `{}`, not `{id}` (a `for_each: group` \
                 stage receives only its own group's instance of a fanned-out stage)\nhint: seed \
                 from a single-group `prune` stage (`group: <index>`)",
                ctx.id,
                ids(),
                r.stage
            )
        })?,
    };
    let path = u.files.get(BANK_FILE).with_context(|| {
        format!(
            "`seed_bank: {r}`: upstream `{}` (`{}`) has no memory bank (`{BANK_FILE}`); seed \
             from a `prune` stage",
            u.id, u.kind
        )
    })?;
    BankFile::read(path)
}

/// Runs the stage.
pub fn run(ctx: &StageContext, inputs: &PruneInputs) -> anyhow::Result<()> {
    let params = &inputs.stage;
    let rng_seed = inputs.seed;
    let process = inputs.diffusion.config();
    let device = parse_device(&ctx.device)?;
    let group = group_of(ctx, params, &process)?;
    let seed_ref =
        params.seed_bank.as_deref().map(SeedRef::parse).transpose().map_err(anyhow::Error::msg)?;
    let seed = seed_ref.as_ref().map(|r| seed_bank(ctx, r)).transpose()?;
    let base = base_checkpoint(ctx, params.init, seed_ref.as_ref().map(|r| r.stage.as_str()))?;
    let structure = Structure::new(&base.arch);
    let base_cost = cost(&base.arch);
    let bound = (group.flops_bound * base_cost.macs as f64).floor() as u64;

    let data = inputs.at.data_config(inputs.data.as_ref())?;
    let dataset = Dataset::open(&data, &inputs.at.dir).context("opening the dataset")?;
    let (c, h, w) = dataset.image_shape();
    let m = &base.arch.config;
    if c != m.in_channels || h != m.image_size || w != m.image_size {
        bail!(
            "the dataset gives {c}x{h}x{w} images but the checkpoint takes {}x{}x{}",
            m.in_channels,
            m.image_size,
            m.image_size
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(sub_seed(rng_seed, group.index, 0));
    let x0 =
        dataset.batch_unaugmented(&sample_indices(&mut rng, dataset.len(), params.batch_size))?;
    let diffusion = GaussianDiffusion::from_config(&process, m.learn_sigma)?;
    let batch = LossBatch::new(x0, &group.timesteps, sub_seed(rng_seed, group.index, 1), device);

    let mut timesteps_used = None;
    let importance_plan = |scores: &Scores| -> anyhow::Result<Plan> {
        Ok(fit(&structure, &structure.full_plan(), bound, &ScorePriority::new(&structure, scores))?)
    };
    let search_env = || search::SearchEnv {
        ctx,
        structure: &structure,
        base: &base,
        diffusion: &diffusion,
        batch: &batch,
        group: &group,
        bound,
        seed: seed.as_ref(),
        rng_seed,
    };
    let (plan, scores) = match &params.proxy {
        ProxyParams::Random(_) => {
            let s = importance::random(&structure, sub_seed(rng_seed, group.index, 2));
            (importance_plan(&s)?, s)
        }
        ProxyParams::Magnitude(_) => {
            let s = importance::magnitude(&structure, &base);
            (importance_plan(&s)?, s)
        }
        ProxyParams::Taylor(_) => {
            let s = importance::taylor(&structure, &base, &diffusion, &batch)?;
            (importance_plan(&s)?, s)
        }
        ProxyParams::DiffPruning(p) => {
            let (s, used) = importance::diff_pruning(
                &structure,
                &base,
                &diffusion,
                &batch,
                &group.timesteps,
                p.threshold,
                p.max_timesteps,
            )?;
            timesteps_used = Some(used);
            (importance_plan(&s)?, s)
        }
        ProxyParams::Search(p) => search::run(&search_env(), p, &ctx.out_dir.join(BANK_FILE))?,
        ProxyParams::Llm(p) => llm::run(&search_env(), p, &ctx.out_dir.join(BANK_FILE))?,
    };
    ctx.cancel.check()?;

    let mut pruned = structure.apply(&base, &plan, &scores)?;
    pruned.state.insert("pruned_group".into(), group.index.to_string());
    pruned.state.insert("pruned_proxy".into(), params.proxy.kind().into());
    let pruned_cost = cost(&pruned.arch);
    anyhow::ensure!(pruned_cost.macs <= bound, "internal error: the pruned model is over budget");
    let loss_after = importance::loss(&pruned, &diffusion, &batch)?;
    if !matches!(params.proxy, ProxyParams::Search(_) | ProxyParams::Llm(_)) {
        // The importance proxies' bank, in the loops' format: one round, one candidate, the
        // proxy's plan and its loss.
        let entry = BankEntry {
            round: 1,
            plan: plan.clone(),
            macs: pruned_cost.macs,
            loss: loss_after,
            seeded: None,
        };
        let bank = Bank { rounds: 1, entries: vec![entry] };
        search::finish(&bank, group.index, &ctx.out_dir.join(BANK_FILE))?;
    }
    let report = PruneReport {
        group: group.index,
        proxy: params.proxy.kind().into(),
        bound_ratio: group.flops_bound,
        bound_macs: bound,
        base: base_cost,
        pruned: pruned_cost,
        ratio_to_budget: pruned_cost.macs as f64 / bound.max(1) as f64,
        macs_ratio: pruned_cost.macs as f64 / base_cost.macs as f64,
        params_ratio: pruned_cost.params as f64 / base_cost.params as f64,
        loss_before: importance::loss(&base, &diffusion, &batch)?,
        loss_after,
        timesteps_used,
        units: structure
            .units()
            .iter()
            .zip(structure.widths(&plan))
            .map(|(u, kept)| UnitReport { name: u.name.clone(), kind: u.kind, full: u.full, kept })
            .collect(),
    };
    tracing::info!(
        stage = %ctx.id,
        macs_ratio = report.macs_ratio,
        loss_before = report.loss_before,
        loss_after = report.loss_after,
        "pruned"
    );
    pruned.save(&ctx.out_dir.join(MODEL_FILE))?;
    pruned.save(&ctx.out_dir.join(EMA_FILE))?;
    std::fs::write(ctx.out_dir.join(REPORT_FILE), serde_json::to_vec_pretty(&report)?)?;
    Ok(())
}
