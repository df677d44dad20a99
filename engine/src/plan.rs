//! Planning: the key of every stage instance, whether the cache already holds its result, and —
//! for those that must run — why, in words a researcher recognises (`` `allocate.k` 0.5 -> 0.3 ``,
//! "upstream `base` changed", "input `data/x.bin` changed", "never run").
//!
//! Planning reads only small files: records and refs. Cached checkpoints are never re-hashed;
//! external inputs are hashed once per file version (the cache memoises by size/mtime/inode).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context as _;
use progdiff_cache::{Cache, Digest, StageRecord};
use serde::Serialize;

use crate::dag::Dag;
use crate::fingerprint::{FINGERPRINT_FORMAT, Fingerprint};
use crate::manifest::{Experiment, Manifest};

/// The digest recorded for an external input that does not exist.
pub const MISSING_INPUT: &str = "missing";

/// Whether an instance must run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// The cache holds a complete result for the key.
    Cached,
    /// The remote cache holds a complete result for the key: `run` downloads it.
    Remote,
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
    /// The stage's inputs (its kind's `Inputs` as JSON): what its job carries.
    #[serde(skip)]
    pub inputs: serde_json::Value,
    /// The cached record, when cached.
    #[serde(skip)]
    pub record: Option<StageRecord>,
    /// Seconds the last run of this instance took (from history), for estimates.
    pub last_duration_s: Option<f64>,
    /// The sweep variants this instance belongs to (empty for a manifest without a sweep).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
    /// Its id within a variant's own graph (`finetune[2]`), which is what the stage sees.
    #[serde(skip)]
    pub local_id: String,
    /// Index of a variant (in [`Experiment::variants`]) it belongs to; it runs with that
    /// variant's manifest (every variant it belongs to gives it the same key, so any would do).
    #[serde(skip)]
    pub source: usize,
    /// Plan-history refs to point at its key once it has run: (namespace, local id) per variant.
    #[serde(skip)]
    pub refs: Vec<(String, String)>,
    /// Recompute even when cached (`run --force`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
}

/// The plan of a whole manifest, instances in topological order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Manifest name.
    pub manifest: String,
    /// Sweep variant names, in sweep order (empty without a sweep).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
    /// Instances.
    pub stages: Vec<PlannedStage>,
}

impl Plan {
    /// Number of instances that will run.
    pub fn to_run(&self) -> usize {
        self.stages.iter().filter(|s| s.status == PlanStatus::Run).count()
    }

    /// Serial seconds the instances to run are expected to take: each one's last recorded run,
    /// or else the mean recorded duration of the same stage's other instances (other groups,
    /// other variants). Returns the estimate and how many of the instances to run it covers;
    /// `None` when no duration is known at all.
    pub fn estimate(&self) -> Option<(f64, usize)> {
        let mut by_stage: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for s in &self.stages {
            let d = s.last_duration_s.or(s.record.as_ref().map(|r| r.meta.duration_s));
            if let Some(d) = d {
                let e = by_stage.entry(stage_name(&s.local_id)).or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
        let mut total = 0.0;
        let mut covered = 0;
        for s in self.stages.iter().filter(|s| s.status == PlanStatus::Run) {
            let guess = s
                .last_duration_s
                .or_else(|| by_stage.get(stage_name(&s.local_id)).map(|(sum, n)| sum / *n as f64));
            if let Some(g) = guess {
                total += g;
                covered += 1;
            }
        }
        (covered > 0).then_some((total, covered))
    }

    /// Indices of the instances `target` names: an instance id (`finetune[3]`,
    /// `groups=4/finetune[3]`), a stage name (`finetune`: all its instances, in every variant),
    /// or a glob of either with `*` and `?` (`finetune[*]`, `groups=4/*`).
    pub fn matching(&self, target: &str) -> Vec<usize> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let stage = stage_name(&s.local_id);
                [s.id.as_str(), s.local_id.as_str(), stage].iter().any(|name| glob(target, name))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Indices of the instances `targets` name, each one an error when it names none.
    pub fn targets(&self, targets: &[String]) -> anyhow::Result<Vec<usize>> {
        let mut out = BTreeSet::new();
        for t in targets {
            let found = self.matching(t);
            if found.is_empty() {
                let names: BTreeSet<&str> = self
                    .stages
                    .iter()
                    .flat_map(|s| [s.id.as_str(), stage_name(&s.local_id)])
                    .collect();
                let mut msg = format!("no stage instance matches `{t}`");
                if let Some(c) = crate::manifest::closest(t, names.iter().copied()) {
                    msg.push_str(&format!("\nhint: did you mean `{c}`?"));
                }
                anyhow::bail!(msg);
            }
            out.extend(found);
        }
        Ok(out.into_iter().collect())
    }

    fn restricted(&self, keep: &BTreeSet<usize>) -> Plan {
        Plan {
            manifest: self.manifest.clone(),
            variants: self.variants.clone(),
            stages: self
                .stages
                .iter()
                .enumerate()
                .filter(|(i, _)| keep.contains(i))
                .map(|(_, s)| s.clone())
                .collect(),
        }
    }

    /// The plan restricted to `indices` and everything they need, transitively.
    pub fn upstream_of(&self, indices: &[usize]) -> Plan {
        let index: HashMap<&str, usize> =
            self.stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        let mut keep = BTreeSet::new();
        let mut stack: Vec<usize> = indices.to_vec();
        while let Some(i) = stack.pop() {
            if keep.insert(i) {
                stack.extend(self.stages[i].needs.iter().filter_map(|d| index.get(d.as_str())));
            }
        }
        self.restricted(&keep)
    }

    /// The plan restricted to `indices` and everything that needs them, transitively: what a
    /// change to them touches.
    pub fn downstream_of(&self, indices: &[usize]) -> Plan {
        let mut keep: BTreeSet<usize> = indices.iter().copied().collect();
        // Topological order: one pass suffices.
        for (i, s) in self.stages.iter().enumerate() {
            let ids: BTreeSet<&str> = keep.iter().map(|&k| self.stages[k].id.as_str()).collect();
            if s.needs.iter().any(|d| ids.contains(d.as_str())) {
                keep.insert(i);
            }
        }
        self.restricted(&keep)
    }

    /// Marks the instances that must run but whose result the remote cache holds complete.
    pub fn look_up_remote(&mut self, remote: &crate::remote::Remote) -> anyhow::Result<()> {
        for s in self.stages.iter_mut().filter(|s| s.status == PlanStatus::Run && !s.forced) {
            if remote.has(&s.key)? {
                s.status = PlanStatus::Remote;
                s.reasons = vec![format!("in the remote cache `{}`", remote.url())];
            }
        }
        Ok(())
    }

    /// Marks `indices` to be recomputed even when cached.
    pub fn force(&mut self, indices: &[usize]) {
        for &i in indices {
            let s = &mut self.stages[i];
            s.forced = true;
            s.status = PlanStatus::Run;
            s.reasons = vec!["forced (`--force`)".into()];
        }
    }

    /// The plan restricted to the instances variant `name` needs.
    pub fn only_variant(&self, name: &str) -> Plan {
        Plan {
            manifest: self.manifest.clone(),
            variants: vec![name.to_string()],
            stages: self
                .stages
                .iter()
                .filter(|s| s.variants.iter().any(|v| v == name))
                .cloned()
                .collect(),
        }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters and `?` one.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with backtracking to the last `*` (linear in practice, no recursion).
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `prune[3]` -> `prune`.
pub fn stage_name(id: &str) -> &str {
    id.split_once('[').map(|(n, _)| n).unwrap_or(id)
}

/// The namespace under which a manifest's "last key of instance X" refs live: the manifest's
/// name, and `name/variant` for a sweep variant.
pub fn ref_namespace(m: &Manifest) -> String {
    match &m.variant {
        Some(v) => format!("{}/{v}", m.name),
        None => m.name.clone(),
    }
}

/// Plans every variant of an experiment and merges them: an instance with the same id and key
/// in several variants is planned (and later run) once. Instances shared by every variant keep
/// their plain id (`base`); the others are prefixed with the first variant that has them
/// (`groups=4/finetune[2]`).
pub fn plan_experiment(exp: &Experiment, cache: &Cache) -> anyhow::Result<Plan> {
    if !exp.is_sweep() {
        let m = &exp.variants[0];
        return plan(m, &Dag::build(m), cache);
    }
    let n_variants = exp.variants.len();
    let names: Vec<String> =
        exp.variants.iter().map(|v| v.variant.clone().unwrap_or_default()).collect();
    let mut merged: Vec<PlannedStage> = Vec::new();
    let mut deps: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<(String, Digest), usize> = HashMap::new();
    // Stage order (a topological order of the stage graph, the same in every variant).
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (vi, m) in exp.variants.iter().enumerate() {
        let dag = Dag::build(m);
        let p = plan(m, &dag, cache)?;
        let mut local: Vec<usize> = Vec::with_capacity(p.stages.len());
        for (i, mut s) in p.stages.into_iter().enumerate() {
            let next = rank.len();
            rank.entry(stage_name(&s.id).to_string()).or_insert(next);
            let slot = match index.get(&(s.id.clone(), s.key)) {
                Some(&j) => {
                    merged[j].variants.push(names[vi].clone());
                    merged[j].refs.extend(s.refs);
                    j
                }
                None => {
                    s.variants = vec![names[vi].clone()];
                    s.source = vi;
                    index.insert((s.id.clone(), s.key), merged.len());
                    merged.push(s);
                    deps.push(dag.instances[i].deps.iter().map(|&d| local[d]).collect());
                    merged.len() - 1
                }
            };
            local.push(slot);
        }
    }
    for s in &mut merged {
        if s.variants.len() < n_variants {
            s.id = format!("{}/{}", s.variants[0], s.local_id);
        }
    }
    let ids: Vec<String> = merged.iter().map(|s| s.id.clone()).collect();
    for (s, d) in merged.iter_mut().zip(&deps) {
        s.needs = d.iter().map(|&j| ids[j].clone()).collect();
    }
    // Stage by stage, variants in sweep order: reads like the manifest and stays topological.
    let vindex: HashMap<&str, usize> =
        names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    merged
        .sort_by_key(|s| (rank[stage_name(&s.local_id)], vindex[s.variants[0].as_str()], s.group));
    Ok(Plan { manifest: exp.name.clone(), variants: names, stages: merged })
}

/// Computes keys, statuses and reasons for every instance of `dag`.
pub fn plan(m: &Manifest, dag: &Dag, cache: &Cache) -> anyhow::Result<Plan> {
    let ns = ref_namespace(m);
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(dag.instances.len());
    // Root cause of each instance's change, to explain downstream reasons.
    let mut causes: BTreeMap<String, String> = BTreeMap::new();
    for inst in &dag.instances {
        let decl = &m.stages[inst.stage];
        let stage_inputs = decl.params.inputs(m);
        let mut inputs = BTreeMap::new();
        let mut missing = Vec::new();
        for (label, path) in crate::kinds::external_files(&stage_inputs) {
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
            params: progdiff_kinds::kind::key_values(&decl.name, &stage_inputs),
            group: inst.group,
            upstream: inst
                .deps
                .iter()
                .map(|&d| (stages[d].id.clone(), stages[d].key.to_string()))
                .collect(),
            inputs,
        };
        let key = fingerprint.key();
        let record = cache.complete_record(&key)?;
        // A variant never planned before falls back to the history of the manifest without
        // its sweep, so adding a sweep explains changes against the last plain run.
        let prev_key = match cache.get_ref(&ns, &inst.id)? {
            None if m.variant.is_some() => cache.get_ref(&m.name, &inst.id)?,
            k => k,
        };
        let previous = match prev_key {
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
            inputs: stage_inputs,
            record,
            last_duration_s,
            variants: m.variant.iter().cloned().collect(),
            local_id: inst.id.clone(),
            source: 0,
            refs: vec![(ns.clone(), inst.id.clone())],
            forced: false,
        });
    }
    Ok(Plan { manifest: m.name.clone(), variants: Vec::new(), stages })
}
