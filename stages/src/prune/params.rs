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
}

impl Default for PruneParams {
    fn default() -> Self {
        PruneParams { proxy: ProxyParams::default(), batch_size: 16, init: InitFrom::Ema }
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
    /// retry).
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
