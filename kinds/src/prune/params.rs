//! Parameters of the `prune` stage and of its proxies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::context::FieldError;
use crate::train::InitFrom;

/// Parameters of a `prune` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PruneParams {
    /// How importance is judged and plans are chosen.
    pub proxy: ProxyParams,
    /// Images in the fixed, seeded batch every loss (importance gradients, candidate losses,
    /// the report's before/after) is measured on.
    pub batch_size: usize,
    /// Which upstream weights to prune: the EMA weights (default) or the raw ones.
    pub init: InitFrom,
    /// The one group a stage without `for_each: group` prunes for (an index into the upstream
    /// allocation's groups). Such a single-group stage is how one group's memory bank seeds the
    /// searches of other groups (`seed_bank`): a `for_each: group` stage receives only its own
    /// group's instance of another fanned-out stage, but every stage receives a single-group
    /// stage it needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Starts the `search` or `llm` memory-bank loop from another `prune` instance's memory bank
    /// (its `bank.json`) instead of an empty one: `<stage>` or `<stage>[<group>]`, a stage this
    /// one `needs`. `<stage>` alone is that stage's single instance (a single-group stage, or the
    /// same group's instance of a fanned-out one); `<stage>[<group>]` picks one instance of a
    /// fanned-out stage and is for a stage without `for_each: group` (which receives all of them).
    ///
    /// The seed's losses were measured on its own group's timesteps and bound, so they are not
    /// reused: as round 0 of this search, each seed plan is fitted to this group's bound
    /// (duplicates dropped), pruned and **re-measured** on this group's fixed batch. Those entries
    /// carry `round: 0` and `seeded: { group, loss }` (the seed's group and the loss the plan had
    /// there) in `bank.json`. They are round 1's parents (`search`) or the prompt's first results
    /// (`llm`); `rounds` counts the rounds after them. The seed's bank is part of both the stage's
    /// cache key (through the seeding instance's key) and the bank side store's digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_bank: Option<String>,
    /// Prune to this fraction of the base model's MACs, in (0, 1], instead of the group's
    /// `flops_bound`. A stage with a `budget` and neither `for_each: group` nor `group:` prunes
    /// one model for every timestep (its losses are measured over all timesteps) and needs no
    /// allocation: the paper's Table 4 setting (one pruned model, fine-tuned on all timesteps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
}

impl Default for PruneParams {
    fn default() -> Self {
        PruneParams {
            proxy: ProxyParams::default(),
            batch_size: 16,
            init: InitFrom::Ema,
            group: None,
            seed_bank: None,
            budget: None,
        }
    }
}

/// A parsed `seed_bank` reference: `stage` or `stage[group]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedRef {
    /// The stage name.
    pub stage: String,
    /// The instance's group, when given.
    pub group: Option<usize>,
}

impl SeedRef {
    /// Parses `stage` or `stage[group]`.
    pub fn parse(s: &str) -> Result<SeedRef, String> {
        let bad = || format!("expected `<stage>` or `<stage>[<group>]`, got `{s}`");
        let (stage, group) = match s.split_once('[') {
            None => (s, None),
            Some((stage, rest)) => {
                let g = rest.strip_suffix(']').ok_or_else(bad)?;
                (stage, Some(g.parse::<usize>().map_err(|_| bad())?))
            }
        };
        let ok_name = stage.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && stage.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok_name {
            return Err(bad());
        }
        Ok(SeedRef { stage: stage.to_string(), group })
    }

    /// The instance id it names (`prune[3]`), when it names a group.
    pub fn instance(&self) -> Option<String> {
        self.group.map(|g| format!("{}[{g}]", self.stage))
    }
}

impl std::fmt::Display for SeedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.group {
            Some(g) => write!(f, "{}[{g}]", self.stage),
            None => f.write_str(&self.stage),
        }
    }
}

/// `proxy:` — the importance proxy (paper eq. 12 and 15-16).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ProxyParams {
    /// Random importance (seeded by the manifest's seed and the group).
    Random(NoParams),
    /// L2 norm of each channel's (or head's) weights across every coupled layer.
    Magnitude(NoParams),
    /// First-order Taylor `|w * dL/dw|`, loss over all timesteps.
    Taylor(NoParams),
    /// Diff-Pruning: Taylor with the loss accumulated over the group's timesteps in ascending
    /// order, stopping once the loss falls under `threshold` times its maximum.
    DiffPruning(DiffPruningParams),
    /// The memory-bank loop without an LLM: evolutionary search over plans.
    Search(SearchParams),
    /// The paper's memory-bank loop with plans proposed by an OpenAI-compatible chat-completions
    /// endpoint (eq. 16-17).
    Llm(LlmParams),
}

impl Default for ProxyParams {
    fn default() -> Self {
        ProxyParams::Magnitude(NoParams {})
    }
}

impl ProxyParams {
    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyParams::Random(_) => "random",
            ProxyParams::Magnitude(_) => "magnitude",
            ProxyParams::Taylor(_) => "taylor",
            ProxyParams::DiffPruning(_) => "diff-pruning",
            ProxyParams::Search(_) => "search",
            ProxyParams::Llm(_) => "llm",
        }
    }
}

/// No parameters.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `diff-pruning` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DiffPruningParams {
    /// Stop accumulating once the loss is below this fraction of its maximum (Diff-Pruning: 0.05).
    pub threshold: f64,
    /// At most this many of the group's timesteps, evenly spaced (one gradient pass each).
    pub max_timesteps: usize,
}

impl Default for DiffPruningParams {
    fn default() -> Self {
        DiffPruningParams { threshold: 0.05, max_timesteps: 100 }
    }
}

/// Which channels a plan-proposing proxy keeps inside each unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelImportance {
    /// L2 magnitude.
    #[default]
    Magnitude,
    /// Diff-Pruning's per-group Taylor importance (default threshold and timesteps).
    DiffPruning,
}

/// `search` settings: `rounds` x `candidates` evaluated plans.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SearchParams {
    /// Rounds of the memory-bank loop; raising it re-uses the rounds already run.
    pub rounds: usize,
    /// Plans proposed and measured per round.
    pub candidates: usize,
    /// How many of the best plans in the bank new candidates are mutated from.
    pub parents: usize,
    /// Units changed per mutation (each by one granularity step, up or down).
    pub mutations: usize,
    /// Which channels go inside each unit.
    pub importance: ChannelImportance,
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            rounds: 5,
            candidates: 3,
            parents: 2,
            mutations: 4,
            importance: ChannelImportance::Magnitude,
        }
    }
}

/// `llm` settings: `rounds` x `candidates` plans proposed by a chat-completions endpoint.
///
/// The API key is read from the environment variable `api_key_env` names; it never appears in the
/// manifest, logs, records, the memory bank or the response cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LlmParams {
    /// Base URL of an OpenAI-compatible API; requests go to `{endpoint}/chat/completions`.
    pub endpoint: String,
    /// Model name sent with each request.
    pub model: String,
    /// Sampling temperature (the paper's pattern: 0).
    pub temperature: f64,
    /// Name of the environment variable holding the API key (sent as `Authorization: Bearer`).
    pub api_key_env: String,
    /// Rounds of the memory-bank loop; raising it re-uses the rounds already run.
    pub rounds: usize,
    /// Plans asked for and measured per round.
    pub candidates: usize,
    /// Per-request timeout in seconds.
    pub timeout_s: u64,
    /// Retries of one round's request after a timeout, 429, 5xx or an answer that is not the
    /// requested JSON; then the stage fails.
    pub max_retries: usize,
    /// Base delay of the exponential backoff between retries, in milliseconds (doubles each
    /// retry). A 429 or 5xx with `Retry-After` waits the longer of the two; no wait exceeds 60 s.
    pub backoff_ms: u64,
    /// Which channels go inside each unit.
    pub importance: ChannelImportance,
}

impl Default for LlmParams {
    fn default() -> Self {
        LlmParams {
            endpoint: "https://api.openai.com/v1".into(),
            model: "gpt-4".into(),
            temperature: 0.0,
            api_key_env: "OPENAI_API_KEY".into(),
            rounds: 5,
            candidates: 3,
            timeout_s: 60,
            max_retries: 4,
            backoff_ms: 1000,
            importance: ChannelImportance::Magnitude,
        }
    }
}

impl PruneParams {
    /// Range checks serde cannot express.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Vec::new();
        if self.batch_size == 0 {
            e.push(FieldError::at("batch_size", "must be at least 1, got 0"));
        }
        crate::context::at_most(&mut e, "batch_size", self.batch_size, 65_536);
        if let Some(b) = self.budget
            && !(b > 0.0 && b <= 1.0)
        {
            e.push(FieldError::at("budget", format!("must be in (0, 1], got {b}")));
        }
        if let Some(seed) = &self.seed_bank {
            if let Err(m) = SeedRef::parse(seed) {
                e.push(FieldError::at("seed_bank", m));
            } else if !matches!(self.proxy, ProxyParams::Search(_) | ProxyParams::Llm(_)) {
                e.push(FieldError::at(
                    "seed_bank",
                    format!(
                        "only the `search` and `llm` proxies start from a memory bank, not `{}`",
                        self.proxy.kind()
                    ),
                ));
            }
        }
        let at =
            |f: &str, m: String| FieldError { path: vec!["proxy".into(), f.into()], message: m };
        match &self.proxy {
            ProxyParams::DiffPruning(p) => {
                if !(0.0..1.0).contains(&p.threshold) {
                    e.push(at("threshold", format!("must be in [0, 1), got {}", p.threshold)));
                }
                if p.max_timesteps == 0 {
                    e.push(at("max_timesteps", "must be at least 1, got 0".into()));
                }
            }
            ProxyParams::Search(p) => {
                for (f, v) in [
                    ("rounds", p.rounds),
                    ("candidates", p.candidates),
                    ("parents", p.parents),
                    ("mutations", p.mutations),
                ] {
                    if v == 0 {
                        e.push(at(f, "must be at least 1, got 0".into()));
                    } else if v > 10_000 {
                        e.push(at(f, format!("must be at most 10000, got {v}")));
                    }
                }
            }
            ProxyParams::Llm(p) => {
                for (f, v) in [
                    ("rounds", p.rounds),
                    ("candidates", p.candidates),
                    ("timeout_s", p.timeout_s as usize),
                ] {
                    if v == 0 {
                        e.push(at(f, "must be at least 1, got 0".into()));
                    } else if v > 100_000 {
                        e.push(at(f, format!("must be at most 100000, got {v}")));
                    }
                }
                if p.endpoint.trim().is_empty() {
                    e.push(at("endpoint", "must not be empty".into()));
                }
                if p.api_key_env.trim().is_empty() {
                    e.push(at("api_key_env", "must name an environment variable".into()));
                }
                if !(0.0..=2.0).contains(&p.temperature) {
                    e.push(at("temperature", format!("must be in [0, 2], got {}", p.temperature)));
                }
            }
            _ => {}
        }
        e
    }
}
