//! The `search` proxy: the paper's memory-bank loop (eq. 16-17) with an evolutionary proposer
//! in place of the LLM, so the method runs offline and deterministically.
//!
//! Round `r` proposes `candidates` plans — in the first round the importance-greedy plan and
//! mutations of it, later mutations of the `parents` best plans in the bank — fits each to the
//! bound ([`super::budget::fit`] with [`ShapePriority`]), prunes the base model with it, measures
//! the loss on the group's fixed batch and appends `(plan, loss)` to the bank
//! (`M_{i+1} = M_i ∪ (θ'_i, Loss)`). The plan with the lowest loss wins.
//!
//! **The bank is cached state.** After every round the whole bank is written to a side store
//! beside the engine's work areas, `<cache>/v1/prune-banks/<digest>/round-<r>.json`, where the
//! digest covers everything the bank depends on *except `rounds`*: the base checkpoint's bytes,
//! the group (timesteps, bound), the loss batch's bytes (data, seed, `batch_size`), the diffusion
//! settings and the search settings other than `rounds`. The stage's own cache key does include
//! `rounds` (its outputs differ), so raising `rounds` from 5 to 8 re-runs the stage, which finds
//! `round-5.json` and runs rounds 6-8 only; lowering it reuses `round-r.json` as is. Every round
//! is deterministic from the manifest seed, the group and the round index, so a resumed search
//! equals an uninterrupted one. Each bank directory names the stage instances that used it in
//! `owners/<key>` ([`claim_bank_dir`]); `cache gc` keeps it while one of them is kept (a key of
//! a manifest given to `gc`, or a running stage's) and removes it otherwise.
//!
//! **Seeds.** With `seed_bank` ([`super::PruneParams::seed_bank`]) the loop starts from another
//! instance's bank: round 0 fits each of its plans to this group's bound and re-measures it on
//! this group's batch ([`seed_round`], saved as `round-0.json`), and round 1 mutates the best of
//! those instead of starting from the importance-greedy plan. The seed's contents are part of the
//! side store's digest.
//!
//! **Output.** `bank.json` ([`BankFile`]) is written by every proxy: the importance proxies write
//! a one-entry bank (their plan and its loss), so a seed can come from any `prune` instance.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::allocate::Group;
use crate::checkpoint::Checkpoint;
use crate::context::StageContext;
use crate::diffusion::GaussianDiffusion;

use super::budget::{ScorePriority, ShapePriority, fit, macs_of};
use super::importance::{self, LossBatch};
use super::params::{ChannelImportance, DiffPruningParams, SearchParams};
use super::stage::sub_seed;
use super::structure::{Plan, Scores, Structure};

/// Bump when a bank's contents would change for the same inputs.
const BANK_VERSION: u32 = 1;

/// One measured plan (eq. 17's `(θ'_i, Loss)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BankEntry {
    /// Round that proposed it (1-based).
    pub round: usize,
    /// Kept width per unit.
    pub plan: Plan,
    /// MACs of the pruned model.
    pub macs: u64,
    /// Mean loss on the group's fixed batch, right after pruning.
    pub loss: f64,
    /// For a round-0 entry of a seeded search: where the plan came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeded: Option<Seeded>,
}

/// The origin of a seeded entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seeded {
    /// The group whose bank held the plan.
    pub group: usize,
    /// The loss it had there: on that group's timesteps, before fitting to this group's bound
    /// (this entry's `loss` is re-measured here).
    pub loss: f64,
}

/// `bank.json`: the memory bank every `prune` instance outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BankFile {
    /// The group the bank's losses were measured on.
    pub group: usize,
    /// Rounds completed (round 0, a seed, not counted).
    pub rounds: usize,
    /// Every measured plan, in order.
    pub entries: Vec<BankEntry>,
    /// The plan with the lowest loss: the one the stage pruned with.
    pub best: Plan,
}

impl BankFile {
    /// Reads a `bank.json`.
    pub fn read(path: &Path) -> anyhow::Result<BankFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("`{}` is not a memory bank", path.display()))
    }
}

/// The memory bank: every plan measured so far, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bank {
    /// Rounds completed.
    pub rounds: usize,
    /// Entries in the order they were measured.
    pub entries: Vec<BankEntry>,
}

impl Bank {
    /// The entries sorted by loss (ties: earlier first).
    pub fn ranked(&self) -> Vec<&BankEntry> {
        let mut v: Vec<&BankEntry> = self.entries.iter().collect();
        v.sort_by(|a, b| a.loss.total_cmp(&b.loss));
        v
    }
}

/// What the search works on.
pub struct SearchEnv<'a> {
    /// The stage instance (seed, work dir, cancellation).
    pub ctx: &'a StageContext,
    /// Units of the base model.
    pub structure: &'a Structure,
    /// The base checkpoint.
    pub base: &'a Checkpoint,
    /// Loss settings.
    pub diffusion: &'a GaussianDiffusion,
    /// The group's fixed batch.
    pub batch: &'a LossBatch,
    /// The group.
    pub group: &'a Group,
    /// MACs bound.
    pub bound: u64,
    /// The bank the search starts from (`seed_bank`), if any.
    pub seed: Option<&'a BankFile>,
    /// The manifest's `seed:` (random draws).
    pub rng_seed: u64,
}

/// The side-store directory of a memory-bank search's banks; `params_key` is the proxy's settings
/// without `rounds`, serialised.
pub(super) fn bank_dir(
    env: &SearchEnv<'_>,
    params_key: &str,
    scores_from: &str,
) -> anyhow::Result<PathBuf> {
    let mut h = blake3::Hasher::new();
    h.update(format!("prune-bank/{BANK_VERSION}\n").as_bytes());
    for (name, t) in &env.base.tensors {
        h.update(name.as_bytes());
        h.update(&tensor_bytes(t));
    }
    h.update(serde_json::to_string(&env.base.arch)?.as_bytes());
    h.update(serde_json::to_string(env.group)?.as_bytes());
    h.update(&env.bound.to_le_bytes());
    h.update(&env.rng_seed.to_le_bytes());
    for t in [&env.batch.x0, &env.batch.t, &env.batch.noise] {
        h.update(&tensor_bytes(t));
    }
    h.update(format!("{:?}", env.diffusion.loss()).as_bytes());
    h.update(&(env.diffusion.num_timesteps() as u64).to_le_bytes());
    h.update(params_key.as_bytes());
    h.update(scores_from.as_bytes());
    if let Some(seed) = env.seed {
        h.update(b"seed\n");
        h.update(&serde_json::to_vec(&(seed.group, &seed.entries))?);
    }
    let digest = h.finalize().to_hex();
    // The work area is `<cache>/v1/work/<key>`: the side store sits beside `work`.
    let v1 = env
        .ctx
        .work_dir
        .parent()
        .and_then(Path::parent)
        .context("the stage's work area has no cache root above it")?;
    Ok(v1.join("prune-banks").join(digest.as_str()))
}

/// Creates the bank directory if needed and records that this stage instance uses it: an empty
/// file `owners/<key>` named by the instance's key (its work area's name). `progdiff cache gc`
/// keeps a bank directory while one of its owners is kept and removes it otherwise (see
/// `progdiff_cache::SIDE_STORES`).
pub(super) fn claim_bank_dir(dir: &Path, ctx: &StageContext) -> anyhow::Result<()> {
    let owners = dir.join("owners");
    std::fs::create_dir_all(&owners).with_context(|| format!("creating `{}`", owners.display()))?;
    let key = ctx.work_dir.file_name().context("the stage's work area has no name")?;
    let marker = owners.join(key);
    std::fs::write(&marker, b"").with_context(|| format!("writing `{}`", marker.display()))?;
    Ok(())
}

fn tensor_bytes(t: &tch::Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut buf = vec![0u8; n];
    t.copy_data_u8(&mut buf, t.numel());
    buf
}

pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The latest saved bank with at most `rounds` rounds (`round-0.json`: a seeded search's round
/// 0).
pub(super) fn load_bank(dir: &Path, rounds: usize) -> Bank {
    (0..=rounds)
        .rev()
        .find_map(|r| {
            let bytes = std::fs::read(dir.join(format!("round-{r}.json"))).ok()?;
            serde_json::from_slice::<Bank>(&bytes).ok().filter(|b| b.rounds == r)
        })
        .unwrap_or_default()
}

/// One granularity step up or down on `mutations` random units.
pub(super) fn mutate(s: &Structure, plan: &Plan, mutations: usize, rng: &mut ChaCha8Rng) -> Plan {
    let mut w = s.widths(plan);
    let units = s.units();
    for _ in 0..mutations {
        let i = rng.gen_range(0..units.len());
        let u = &units[i];
        if rng.gen_bool(0.5) {
            w[i] = (w[i] + u.step).min(u.full);
        } else {
            w[i] = w[i].saturating_sub(u.step).max(u.min());
        }
    }
    super::budget::plan_of(s, &w)
}

/// Runs (or resumes) the search; writes the final bank to `bank_out` and returns the best plan
/// with the channel scores used to apply it.
pub fn run(
    env: &SearchEnv<'_>,
    p: &SearchParams,
    bank_out: &Path,
) -> anyhow::Result<(Plan, Scores)> {
    let s = env.structure;
    let (scores, scores_from) = channel_scores(env, p.importance)?;
    let key = SearchParams { rounds: 0, ..p.clone() };
    let dir = bank_dir(env, &serde_json::to_string(&key)?, scores_from)?;
    claim_bank_dir(&dir, env.ctx)?;
    let mut bank = start_bank(env, &scores, &dir, p.rounds)?;
    let greedy = fit(s, &s.full_plan(), env.bound, &ScorePriority::new(s, &scores))?;
    while bank.rounds < p.rounds {
        env.ctx.cancel.check()?;
        let round = bank.rounds + 1;
        let mut rng =
            ChaCha8Rng::seed_from_u64(sub_seed(env.rng_seed, env.group.index, 100 + round as u64));
        let parents: Vec<Plan> = if bank.entries.is_empty() {
            vec![greedy.clone()]
        } else {
            bank.ranked().iter().take(p.parents).map(|e| e.plan.clone()).collect()
        };
        let mut proposed: Vec<Plan> = Vec::new();
        for j in 0..p.candidates {
            let parent = &parents[j % parents.len()];
            let mut cand = if bank.entries.is_empty() && j == 0 {
                greedy.clone()
            } else {
                fit(s, &mutate(s, parent, p.mutations, &mut rng), env.bound, &ShapePriority)?
            };
            // Avoid re-measuring a plan: a few more tries, then accept the repeat.
            for _ in 0..8 {
                let seen = bank.entries.iter().any(|e| e.plan == cand) || proposed.contains(&cand);
                if !seen {
                    break;
                }
                cand =
                    fit(s, &mutate(s, parent, p.mutations, &mut rng), env.bound, &ShapePriority)?;
            }
            proposed.push(cand);
        }
        measure_round(env, &scores, &mut bank, round, proposed)?;
        write_atomic(&dir.join(format!("round-{round}.json")), &serde_json::to_vec(&bank)?)?;
    }
    Ok((finish(&bank, env.group.index, bank_out)?, scores))
}

/// The bank a search resumes from: the latest saved round, else the seed's round 0 (measured
/// and saved now), else empty.
pub(super) fn start_bank(
    env: &SearchEnv<'_>,
    scores: &Scores,
    dir: &Path,
    rounds: usize,
) -> anyhow::Result<Bank> {
    let bank = load_bank(dir, rounds);
    if bank.rounds > 0 || !bank.entries.is_empty() {
        tracing::info!(stage = %env.ctx.id, rounds = bank.rounds, dir = %dir.display(), "memory bank reused");
        return Ok(bank);
    }
    let Some(seed) = env.seed else { return Ok(bank) };
    let bank = seed_round(env, scores, seed)?;
    write_atomic(&dir.join("round-0.json"), &serde_json::to_vec(&bank)?)?;
    tracing::info!(
        stage = %env.ctx.id,
        seed_group = seed.group,
        plans = bank.entries.len(),
        "memory bank seeded"
    );
    Ok(bank)
}

/// Round 0 of a seeded search: each of the seed's plans (best first) fitted to this group's
/// bound, duplicates dropped, pruned and measured on this group's batch.
pub fn seed_round(env: &SearchEnv<'_>, scores: &Scores, seed: &BankFile) -> anyhow::Result<Bank> {
    let s = env.structure;
    let mut seen: Vec<Plan> = Vec::new();
    let mut origin = Vec::new();
    let mut ranked: Vec<&BankEntry> = seed.entries.iter().collect();
    ranked.sort_by(|a, b| a.loss.total_cmp(&b.loss));
    for e in ranked {
        s.check(&e.plan).map_err(|m| {
            anyhow::anyhow!("the seed bank (group {}) does not fit this model: {m}", seed.group)
        })?;
        let plan = fit(s, &e.plan, env.bound, &ShapePriority)?;
        if !seen.contains(&plan) {
            seen.push(plan);
            origin.push(Seeded { group: seed.group, loss: e.loss });
        }
    }
    anyhow::ensure!(!seen.is_empty(), "the seed bank (group {}) is empty", seed.group);
    let mut bank = Bank::default();
    measure_round(env, scores, &mut bank, 0, seen)?;
    for (e, o) in bank.entries.iter_mut().zip(origin) {
        e.seeded = Some(o);
    }
    Ok(bank)
}

/// Per-element channel scores for applying plans, and their name (part of the bank's key).
pub(super) fn channel_scores(
    env: &SearchEnv<'_>,
    importance: ChannelImportance,
) -> anyhow::Result<(Scores, &'static str)> {
    let s = env.structure;
    Ok(match importance {
        ChannelImportance::Magnitude => (importance::magnitude(s, env.base), "magnitude"),
        ChannelImportance::DiffPruning => {
            let d = DiffPruningParams::default();
            let (sc, _) = importance::diff_pruning(
                s,
                env.base,
                env.diffusion,
                env.batch,
                &env.group.timesteps,
                d.threshold,
                d.max_timesteps,
            )?;
            (sc, "diff-pruning")
        }
    })
}

/// Prunes with each proposed plan, measures its loss and appends it to the bank as `round`.
pub(super) fn measure_round(
    env: &SearchEnv<'_>,
    scores: &Scores,
    bank: &mut Bank,
    round: usize,
    proposed: Vec<Plan>,
) -> anyhow::Result<()> {
    let s = env.structure;
    for plan in proposed {
        let pruned = s.apply(env.base, &plan, scores)?;
        let loss = importance::loss(&pruned, env.diffusion, env.batch)?;
        let macs = macs_of(s, &s.widths(&plan));
        bank.entries.push(BankEntry { round, plan, macs, loss, seeded: None });
    }
    bank.rounds = round;
    Ok(())
}

/// Writes the final bank of `group` to `bank_out` as a [`BankFile`] and returns its best plan.
pub(super) fn finish(bank: &Bank, group: usize, bank_out: &Path) -> anyhow::Result<Plan> {
    // A bank loaded for fewer rounds than it holds cannot happen (files hold exactly `r`).
    let best = bank.ranked().first().map(|e| e.plan.clone()).context("the memory bank is empty")?;
    let out =
        BankFile { group, rounds: bank.rounds, entries: bank.entries.clone(), best: best.clone() };
    std::fs::write(bank_out, serde_json::to_vec_pretty(&out)?)?;
    Ok(best)
}
