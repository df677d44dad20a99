//! Planning: the key of every stage instance, whether the cache already holds its result, and —
//! for those that must run — why, in words a researcher recognises (`` `allocate.k` 0.5 -> 0.3 ``,
//! "upstream `base` changed", "input `data/x.bin` changed", "never run").
//!
//! Planning reads only small files: records and refs. Cached checkpoints are never re-hashed;
//! external inputs are hashed once per file version (the cache memoises by size/mtime/inode).

use std::collections::BTreeMap;

use anyhow::Context as _;
use progdiff_cache::{Cache, Digest, StageRecord};
use serde::Serialize;

use crate::dag::Dag;
use crate::fingerprint::{FINGERPRINT_FORMAT, Fingerprint};
use crate::manifest::Manifest;

/// The digest recorded for an external input that does not exist.
pub const MISSING_INPUT: &str = "missing";

/// Whether an instance must run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// The cache holds a complete result for the key.
    Cached,
    /// It has to run.
    Run,
}

/// The plan for one stage instance.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedStage {
    /// Instance id.
    pub id: String,
    /// Stage kind.
    pub kind: String,
    /// Cache key (hex).
    pub key: Digest,
    /// Cached or run.
    pub status: PlanStatus,
    /// Why it runs (empty when cached).
    pub reasons: Vec<String>,
    /// Group index, for fanned-out instances.
    pub group: Option<usize>,
    /// Ids of the instances it needs.
    pub needs: Vec<String>,
    /// What the key was computed from.
    #[serde(skip)]
    pub fingerprint: Fingerprint,
    /// The cached record, when cached.
    #[serde(skip)]
    pub record: Option<StageRecord>,
    /// Seconds the last run of this instance took (from history), for estimates.
    pub last_duration_s: Option<f64>,
}

/// The plan of a whole manifest, instances in topological order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Manifest name.
    pub manifest: String,
    /// Instances.
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    /// Number of instances that will run.
    pub fn to_run(&self) -> usize {
        self.stages.iter().filter(|s| s.status == PlanStatus::Run).count()
    }
}

/// The namespace under which a manifest's "last key of instance X" refs live.
pub fn ref_namespace(m: &Manifest) -> String {
    m.name.clone()
}

/// Computes keys, statuses and reasons for every instance of `dag`.
pub fn plan(m: &Manifest, dag: &Dag, cache: &Cache) -> anyhow::Result<Plan> {
    let ns = ref_namespace(m);
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(dag.instances.len());
    // Root cause of each instance's change, to explain downstream reasons.
    let mut causes: BTreeMap<String, String> = BTreeMap::new();
    for inst in &dag.instances {
        let decl = &m.stages[inst.stage];
        let mut inputs = BTreeMap::new();
        let mut missing = Vec::new();
        for (label, path) in decl.params.external_inputs(m) {
            if !path.exists() {
                // Planning works without the data (e.g. a paper-scale manifest on a laptop);
                // the stage cannot be cached under this key and fails clearly if run.
                missing.push(format!("input `{label}` not found at `{}`", path.display()));
                inputs.insert(label, MISSING_INPUT.to_string());
                continue;
            }
            let d = cache
                .file_digest(&path)
                .with_context(|| format!("stage `{}` reads input `{label}`", inst.id))?;
            inputs.insert(label, d.to_string());
        }
        let fingerprint = Fingerprint {
            format: FINGERPRINT_FORMAT,
            kind: decl.params.kind().to_string(),
            version: decl.params.version(),
            params: decl.params.reads(m, &decl.name),
            group: inst.group,
            upstream: inst
                .deps
                .iter()
                .map(|&d| (stages[d].id.clone(), stages[d].key.to_string()))
                .collect(),
            inputs,
        };
        let key = fingerprint.key();
        let record =
            cache.record(&key)?.filter(|r| r.outputs.values().all(|o| cache.has_object(&o.digest)));
        let previous = match cache.get_ref(&ns, &inst.id)? {
            Some(prev) => cache.record(&prev)?,
            None => None,
        };
        let last_duration_s = record.as_ref().or(previous.as_ref()).map(|r| r.meta.duration_s);
        let (status, mut reasons) = if record.is_some() {
            (PlanStatus::Cached, Vec::new())
        } else {
            let reasons = match &previous {
                None => vec!["never run".to_string()],
                Some(prev) => {
                    match serde_json::from_value::<Fingerprint>(prev.fingerprint.clone()) {
                        Ok(old) => {
                            let r = fingerprint.diff(&old, &|id| causes.get(id).cloned());
                            if r.is_empty() {
                                vec!["no cached result (removed from the cache)".to_string()]
                            } else {
                                r
                            }
                        }
                        Err(_) => vec!["cached history has an older format".to_string()],
                    }
                }
            };
            (PlanStatus::Run, reasons)
        };
        if status == PlanStatus::Run && !missing.is_empty() {
            reasons.retain(|r| r != "never run");
            let first = missing.swap_remove(0);
            let note = match missing.len() {
                0 => first,
                n => format!("{first} (and {n} more inputs)"),
            };
            reasons.insert(0, note);
        }
        if status == PlanStatus::Run {
            // The first reason that is not itself "upstream changed" is the root cause.
            let own = reasons.iter().find(|r| !r.starts_with("upstream ")).cloned();
            let inherited = inst.deps.iter().find_map(|&d| causes.get(&stages[d].id).cloned());
            if let Some(c) = own.or(inherited) {
                causes.insert(inst.id.clone(), c);
            }
        }
        stages.push(PlannedStage {
            id: inst.id.clone(),
            kind: decl.params.kind().to_string(),
            key,
            status,
            reasons,
            group: inst.group,
            needs: inst.deps.iter().map(|&d| dag.instances[d].id.clone()).collect(),
            fingerprint,
            record,
            last_duration_s,
        });
    }
    Ok(Plan { manifest: m.name.clone(), stages })
}
