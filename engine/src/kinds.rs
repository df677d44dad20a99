//! The stage kinds as the engine sees them: parameters parsed from a manifest (every problem
//! at its file:line:col) behind one type, [`StageParams`]. Everything else about a kind — its
//! inputs, what its key holds, its files — comes from its [`StageKind`] implementation in
//! `progdiff-kinds`, listed once by [`for_each_kind!`](progdiff_kinds::for_each_kind).

use std::path::PathBuf;

use progdiff_kinds::config::DiffusionConfig;
use progdiff_kinds::context::FieldError;
use progdiff_kinds::kind::{self, AnyParams, StageKind, Typed};
use progdiff_kinds::prune::{Prune, PruneParams, SeedRef};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::manifest::yaml::{Node, NodeKind};
use crate::manifest::{Cx, Manifest, STAGE_KEYS};

/// A stage's kind with its parameters, defaults filled.
#[derive(Debug)]
pub struct StageParams(Box<dyn AnyParams>);

impl Clone for StageParams {
    fn clone(&self) -> Self {
        StageParams(self.0.clone_box())
    }
}

impl PartialEq for StageParams {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_dyn(other.0.as_ref())
    }
}

impl StageParams {
    /// Every kind name, for messages and the schema.
    pub fn kinds() -> &'static [&'static str] {
        kind::kind_names()
    }

    /// Parameters of kind `K`.
    pub fn of<K: StageKind>(params: K::Params) -> StageParams {
        StageParams(Box::new(Typed::<K>(params)))
    }

    /// The parameters when the stage is of kind `K`.
    pub fn get<K: StageKind>(&self) -> Option<&K::Params> {
        kind::params_of::<K>(self.0.as_ref())
    }

    /// Parses the parameters of a stage of kind `kind` from its mapping `body`.
    pub(crate) fn parse(
        cx: &mut Cx,
        kind: &str,
        body: &Node,
        prefix: &str,
        diffusion: Option<&DiffusionConfig>,
    ) -> Option<StageParams> {
        macro_rules! parse_kind {
            ($($k:path),* $(,)?) => {
                $(if kind == <$k as StageKind>::KIND {
                    return checked(cx, body, prefix, |p| <$k as StageKind>::validate(p, diffusion))
                        .filter(|p| extra_checks::<$k>(cx, body, prefix, p))
                        .map(StageParams::of::<$k>);
                })*
            };
        }
        progdiff_kinds::for_each_kind!(parse_kind);
        let pos = body.get("kind").map(|n| n.pos).unwrap_or(body.pos);
        let names = Self::kinds().iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
        let mut message = format!("unknown stage kind `{kind}`, expected one of {names}");
        if let Some(close) = crate::manifest::closest(kind, Self::kinds().iter().copied()) {
            message.push_str(&format!("\nhint: did you mean `{close}`?"));
        }
        cx.push_at(pos, &format!("{prefix}.kind"), message);
        None
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// Implementation version (part of the key; bumped when results would change).
    pub fn version(&self) -> u32 {
        self.0.version()
    }

    /// Whether the kind reads the manifest's `data:` section.
    pub fn needs_data(&self) -> bool {
        self.0.needs_data()
    }

    /// Number of timestep groups, for kinds that define them (allocation).
    pub fn groups(&self) -> Option<usize> {
        self.0.groups()
    }

    /// The stage's inputs in manifest `m` (JSON): what its key is computed from and what its
    /// job carries.
    pub fn inputs(&self, m: &Manifest) -> Value {
        self.0.inputs(&m.sections())
    }

    /// JSON schema of each kind's own parameters (without `kind`/`needs`/`for_each`).
    pub fn schemas(generator: &mut schemars::SchemaGenerator) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        macro_rules! schema_of {
            ($($k:path),* $(,)?) => {
                $(out.push((
                    <$k as StageKind>::KIND,
                    generator.root_schema_for::<<$k as StageKind>::Params>().to_value(),
                ));)*
            };
        }
        progdiff_kinds::for_each_kind!(schema_of);
        out
    }
}

/// The files the inputs' key holds digests of (see [`kind::external_files`]).
pub fn external_files(inputs: &Value) -> Vec<(String, PathBuf)> {
    kind::external_files(inputs)
}

/// Checks of a kind that need the stage's YAML (positions of its other keys); true when fine.
fn extra_checks<K: StageKind>(cx: &mut Cx, body: &Node, prefix: &str, p: &K::Params) -> bool {
    match (p as &dyn std::any::Any).downcast_ref::<PruneParams>() {
        Some(p) if K::KIND == Prune::KIND => prune_refs(cx, body, prefix, p),
        _ => true,
    }
}

/// A stage's parameters deserialised (unknown keys and type errors reported) and range-checked,
/// or `None` with every problem reported at its position.
fn checked<P: DeserializeOwned + JsonSchema + 'static>(
    cx: &mut Cx,
    body: &Node,
    prefix: &str,
    validate: impl FnOnce(&P) -> Vec<FieldError>,
) -> Option<P> {
    let p: P = cx.deserialize(body, prefix, STAGE_KEYS)?;
    let errs = validate(&p);
    if errs.is_empty() {
        Some(p)
    } else {
        cx.field_errors(body, prefix, errs);
        None
    }
}

/// A `prune` stage's group and `seed_bank` against its own `for_each` and `needs` (the checks that
/// need no other stage; the seeding instance's kind and bank are checked when the stage runs).
/// False after reporting a problem.
fn prune_refs(cx: &mut Cx, body: &Node, prefix: &str, p: &PruneParams) -> bool {
    let mut ok = true;
    let fanned = body.get("for_each").is_some_and(|n| n.kind != NodeKind::Null);
    // Positions are the keys', as for every other parameter error.
    let key_pos = |k: &str| body.entry(k).map(|(k, _)| k.pos);
    match (fanned, p.group, key_pos("group")) {
        (true, Some(_), Some(pos)) => {
            cx.push_at(
                pos,
                &format!("{prefix}.group"),
                "`group` is the one group of a stage without `for_each: group`; remove one of \
                 the two",
            );
            ok = false;
        }
        (false, None, _) if p.budget.is_none() => {
            let pos = key_pos("kind").unwrap_or(body.pos);
            cx.push_at(
                pos,
                prefix,
                "a `prune` stage prunes for one group: give it `for_each: group`, or \
                 `group: <index>` for a single group, or a `budget` (a fraction of the base \
                 MACs) for one model over all timesteps",
            );
            ok = false;
        }
        _ => {}
    }
    let (Some(seed), Some(pos)) = (&p.seed_bank, key_pos("seed_bank")) else { return ok };
    let Ok(r) = SeedRef::parse(seed) else { return ok }; // reported by `validate`
    let needs: Vec<&str> = match body.get("needs").map(|n| &n.kind) {
        Some(NodeKind::Str(s)) => vec![s.as_str()],
        Some(NodeKind::Seq(items)) => items
            .iter()
            .filter_map(|i| match &i.kind {
                NodeKind::Str(s) => Some(s.as_str()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let path = format!("{prefix}.seed_bank");
    if !needs.contains(&r.stage.as_str()) {
        cx.push_at(
            pos,
            &path,
            format!(
                "stage `{}` is not among the stages this one needs\nhint: add `{}` to `needs`",
                r.stage, r.stage
            ),
        );
        ok = false;
    } else if fanned && r.group.is_some() {
        cx.push_at(
            pos,
            &path,
            format!(
                "`{seed}` names one group's instance, but a `for_each: group` stage receives only \
                 its own group's instance of a fanned-out stage\nhint: name the stage alone (the \
                 same group), or seed from a single-group `prune` stage (`group: <index>`)"
            ),
        );
        ok = false;
    }
    ok
}

#[cfg(test)]
mod tests {
    //! Key coverage, kind by kind: changing any value of the manifest changes the key of a stage
    //! of that kind, unless the kind lists the value in its `NOT_READ`. Each kind's stage is
    //! keyed from its inputs, which are all its `run` receives, so a value that changes nothing
    //! here cannot reach the stage either.

    use std::collections::BTreeMap;
    use std::path::Path;

    use progdiff_kinds::kind::{StageKind, key_values};
    use serde_json::{Value, json};

    use crate::manifest::Experiment;

    /// A manifest with every section written out in full.
    fn base(stage: Value) -> Value {
        json!({
            "name": "cover",
            "seed": 1,
            "data": { "kind": "synthetic", "n": 16, "seed": 2, "image_size": 8,
                      "channels": "gray", "hflip": false, "limit": 10 },
            "model": { "image_size": 8, "in_channels": 1, "channels": 32, "channel_mult": [1],
                       "res_blocks": 1, "attention_resolutions": [], "heads": 1, "dropout": 0.1,
                       "learn_sigma": true, "use_scale_shift_norm": true },
            "diffusion": { "steps": 40, "schedule": "cosine", "loss": "hybrid",
                           "sample_steps": "10", "rescale_timesteps": true },
            "stages": {
                "base": { "kind": "train", "steps": 2, "batch_size": 2 },
                "allocate": { "kind": "snr-allocate", "groups": 2 },
                "s": stage,
            }
        })
    }

    /// A different valid value for every section field.
    fn section_changes() -> Vec<(&'static str, Value)> {
        vec![
            ("seed", json!(7)),
            ("data.n", json!(17)),
            ("data.seed", json!(3)),
            ("data.image_size", json!(16)),
            ("data.channels", json!("rgb")),
            ("data.hflip", json!(true)),
            ("data.limit", json!(11)),
            ("model.image_size", json!(16)),
            ("model.in_channels", json!(3)),
            ("model.channels", json!(64)),
            ("model.channel_mult", json!([1, 2])),
            ("model.res_blocks", json!(2)),
            ("model.attention_resolutions", json!([8])),
            ("model.heads", json!(2)),
            ("model.dropout", json!(0.2)),
            ("model.learn_sigma", json!(false)),
            ("model.use_scale_shift_norm", json!(false)),
            ("diffusion.steps", json!(50)),
            ("diffusion.schedule", json!("linear")),
            ("diffusion.loss", json!("simple")),
            ("diffusion.sample_steps", json!("5")),
            ("diffusion.rescale_timesteps", json!(false)),
        ]
    }

    fn set(v: &mut Value, path: &str, value: Value) {
        let mut cur = v;
        let segs: Vec<&str> = path.split('.').collect();
        for s in &segs[..segs.len() - 1] {
            cur = &mut cur[*s];
        }
        cur[*segs.last().unwrap()] = value;
    }

    /// Leaf paths of a JSON value (arrays are leaves).
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&p, x, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    /// The key values and key-file labels of stage `s`.
    fn key_of(manifest: &Value, dir: &Path) -> (BTreeMap<String, Value>, Vec<String>) {
        let text = serde_json::to_string(manifest).unwrap();
        let exp = Experiment::parse(&text, "cover.yaml", dir, "cover")
            .unwrap_or_else(|e| panic!("invalid test manifest: {e:?}\n{text}"));
        let m = &exp.variants[0];
        let decl = m.stage("s").unwrap();
        let inputs = decl.params.inputs(m);
        let files = super::external_files(&inputs).into_iter().map(|(l, _)| l).collect();
        (key_values("s", &inputs), files)
    }

    fn not_read(list: &[&str], path: &str) -> bool {
        list.iter().any(|n| path == *n || path.starts_with(&format!("{n}.")))
    }

    /// What changing a parameter should do.
    #[derive(Clone, Copy, PartialEq)]
    enum Expect {
        /// Change the key (unless the kind's `NOT_READ` lists it).
        Key,
        /// Leave it: the kind reads the parameter only in another configuration (the reason).
        Unread(&'static str),
        /// Not tried with this base (covered by another one, the reason).
        Skip(&'static str),
    }
    use Expect::*;

    /// Checks kind `K` with `stage` (its `kind` and `needs`), every section change, and a
    /// change for each of its own parameters (`stage.<param>`, dotted for nested ones).
    fn check<K: StageKind>(stage: Value, own: Vec<(&str, Value, Expect)>) {
        let dir = tempfile::tempdir().unwrap();
        let base = base(stage.clone());
        let (key, files) = key_of(&base, dir.path());
        // Every parameter of the kind has a change in the table: a new field needs one.
        let params: serde_json::Map<String, Value> = stage
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !["kind", "needs", "for_each"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let params: K::Params = serde_json::from_value(params.into()).unwrap();
        let mut fields = Vec::new();
        leaves("stage", &serde_json::to_value(&params).unwrap(), &mut fields);
        for f in &fields {
            assert!(
                own.iter().any(|(p, _, _)| p == f || f.starts_with(&format!("{p}."))),
                "`{}`: no change listed for its parameter `{f}`",
                K::KIND
            );
        }
        // Section changes, unless the table says otherwise for one of them.
        let mut changes: Vec<(String, Value, Expect)> = section_changes()
            .into_iter()
            .filter(|(p, _)| !own.iter().any(|(o, _, _)| o == p))
            .map(|(p, v)| (p.to_string(), v, Key))
            .collect();
        changes.extend(own.into_iter().map(|(p, v, e)| (p.to_string(), v, e)));
        for (path, value, expect) in changes {
            if let Skip(_) = expect {
                continue;
            }
            let mut m = base.clone();
            let target = match path.strip_prefix("stage.") {
                Some(rest) => format!("stages.s.{rest}"),
                None => path.clone(),
            };
            set(&mut m, &target, value);
            let (changed, changed_files) = key_of(&m, dir.path());
            let differs = changed != key || changed_files != files;
            if not_read(K::NOT_READ, &path) || expect != Key {
                assert!(!differs, "`{}`: `{path}` is not read but changes the key", K::KIND);
            } else {
                assert!(differs, "`{}`: changing `{path}` leaves the key unchanged", K::KIND);
            }
        }
    }

    #[test]
    fn train_key_covers_what_it_reads() {
        check::<progdiff_kinds::train::Train>(
            json!({ "kind": "train", "steps": 5, "batch_size": 2 }),
            vec![
                ("stage.steps", json!(6), Key),
                ("stage.batch_size", json!(3), Key),
                ("stage.lr", json!(0.002), Key),
                ("stage.weight_decay", json!(0.1), Key),
                ("stage.ema", json!(0.5), Key),
                ("stage.grad_clip", json!(1.0), Key),
                ("stage.warmup", json!(2), Key),
                ("stage.checkpoint_every", json!(7), Key),
                ("stage.log_every", json!(3), Key),
                ("stage.init", json!("model"), Key),
                ("stage.precision", json!("bf16"), Key),
            ],
        );
    }

    #[test]
    fn allocate_key_covers_what_it_reads() {
        check::<progdiff_kinds::allocate::SnrAllocate>(
            json!({ "kind": "snr-allocate", "groups": 2, "k": 0.5 }),
            vec![
                ("stage.groups", json!(3), Key),
                ("stage.k", json!(0.3), Key),
                ("stage.schedule", json!("constant"), Key),
                ("stage.clipped", json!("include"), Key),
                ("stage.snr_schedule", json!("linear"), Key),
                ("stage.snr_steps", json!(30), Key),
            ],
        );
        // The diffusion's own schedule and steps written out are the default: same key.
        check::<progdiff_kinds::allocate::SnrAllocate>(
            json!({ "kind": "snr-allocate", "groups": 2, "k": 0.5, "snr_schedule": "cosine",
                    "snr_steps": 40 }),
            vec![
                ("stage.groups", json!(3), Key),
                ("stage.k", json!(0.3), Key),
                ("stage.schedule", json!("constant"), Key),
                ("stage.clipped", json!("include"), Key),
                ("stage.snr_schedule", json!("linear"), Key),
                ("stage.snr_steps", json!(30), Key),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = base(json!({ "kind": "snr-allocate", "groups": 2 }));
        let written = base(json!({ "kind": "snr-allocate", "groups": 2, "snr_schedule": "cosine",
                                   "snr_steps": 40 }));
        assert_eq!(key_of(&plain, dir.path()), key_of(&written, dir.path()));
    }

    #[test]
    fn prune_key_covers_what_it_reads() {
        check::<progdiff_kinds::prune::Prune>(
            json!({ "kind": "prune", "needs": ["base", "allocate"], "for_each": "group",
                    "proxy": { "kind": "search", "rounds": 1 } }),
            vec![
                ("stage.proxy", json!({ "kind": "magnitude" }), Key),
                ("stage.proxy.rounds", json!(2), Key),
                ("stage.proxy.candidates", json!(7), Key),
                ("stage.proxy.parents", json!(1), Key),
                ("stage.proxy.mutations", json!(5), Key),
                ("stage.proxy.importance", json!("diff-pruning"), Key),
                ("stage.batch_size", json!(3), Key),
                ("stage.init", json!("model"), Key),
                // A `for_each: group` stage has neither (validation); covered by the
                // single-group base below.
                ("stage.group", json!(null), Skip("single-group stages")),
                ("stage.seed_bank", json!(null), Skip("single-group stages")),
                ("stage.budget", json!(0.7), Key),
            ],
        );
    }

    #[test]
    fn evaluate_key_covers_what_it_reads() {
        check::<progdiff_kinds::evaluate::Evaluate>(
            json!({ "kind": "evaluate", "needs": ["base"], "samples": 4 }),
            vec![
                ("stage.samples", json!(5), Key),
                ("stage.samples", json!(0), Key),
                ("stage.batch_size", json!(3), Key),
                ("stage.weights", json!("model"), Key),
                ("stage.clip_denoised", json!(false), Key),
                ("stage.ddim_eta", json!(0.5), Key),
                ("stage.grid", json!(4), Key),
                ("stage.kid.subsets", json!(10), Key),
                ("stage.kid.subset_size", json!(50), Key),
                ("stage.kid.seed", json!(3), Key),
                ("stage.label", json!("a row"), Key),
            ],
        );
    }

    #[test]
    fn prune_single_group_key_covers_what_it_reads() {
        let stage = json!({ "kind": "prune", "needs": ["base", "allocate", "seed"], "group": 1,
                            "seed_bank": "seed", "proxy": { "kind": "search", "rounds": 1 } });
        let table = vec![
            ("stage.group", json!(0), Key),
            ("stage.seed_bank", json!(null), Key),
            ("stage.budget", json!(0.7), Key),
            ("stage.proxy", json!(null), Skip("the `for_each: group` base")),
            ("stage.batch_size", json!(null), Skip("the `for_each: group` base")),
            ("stage.init", json!(null), Skip("the `for_each: group` base")),
        ];
        // The seeding stage is another single-group prune stage.
        let dir = tempfile::tempdir().unwrap();
        let mut m = base(stage.clone());
        m["stages"]["seed"] = json!({ "kind": "prune", "needs": ["base", "allocate"],
                                      "group": 0, "proxy": { "kind": "search", "rounds": 1 } });
        let (key, _) = key_of(&m, dir.path());
        for (path, value, expect) in table {
            if let Skip(_) = expect {
                continue;
            }
            let mut changed = m.clone();
            set(&mut changed, &format!("stages.s.{}", &path["stage.".len()..]), value);
            assert_ne!(key_of(&changed, dir.path()).0, key, "`{path}` leaves the key unchanged");
        }
    }

    #[test]
    fn fid_extractor_key_covers_what_it_reads() {
        let trained = "a classifier is trained; a TorchScript module is not";
        check::<progdiff_kinds::fid_extractor::FidExtractor>(
            json!({ "kind": "fid-extractor", "steps": 3 }),
            vec![
                ("stage.extractor", json!(null), Skip("the torchscript base")),
                ("stage.path", json!(null), Skip("the torchscript base")),
                ("stage.size", json!(224), Unread("the input size of a TorchScript module")),
                ("stage.steps", json!(4), Key),
                ("stage.batch_size", json!(3), Key),
                ("stage.lr", json!(0.01), Key),
                ("stage.features", json!(16), Key),
                ("stage.target", json!("rotation"), Key),
                ("stage.reference_samples", json!(5), Key),
                ("stage.seed", json!(5), Key),
            ],
        );
        check::<progdiff_kinds::fid_extractor::FidExtractor>(
            json!({ "kind": "fid-extractor", "extractor": "torchscript", "path": "ext.pt" }),
            vec![
                ("seed", json!(7), Unread("a TorchScript module draws nothing")),
                ("stage.extractor", json!(null), Skip("the classifier base")),
                // The module's name is not read: its content is (a digest in the key).
                ("stage.path", json!("other.pt"), Key),
                ("stage.size", json!(224), Key),
                ("stage.steps", json!(4), Unread(trained)),
                ("stage.batch_size", json!(3), Key),
                ("stage.lr", json!(0.01), Unread(trained)),
                ("stage.features", json!(16), Unread(trained)),
                ("stage.target", json!("rotation"), Unread(trained)),
                ("stage.reference_samples", json!(5), Key),
                ("stage.seed", json!(null), Skip("validation refuses it for a TorchScript module")),
            ],
        );
    }

    /// Issue 13: a classifier with its own `seed` is one extractor for every manifest seed, so
    /// the variants of a `seeds:` study share it.
    #[test]
    fn fid_extractor_own_seed_replaces_the_manifest_seed() {
        let dir = tempfile::tempdir().unwrap();
        let m = base(json!({ "kind": "fid-extractor", "steps": 3, "seed": 5 }));
        let mut other = m.clone();
        other["seed"] = json!(8);
        assert_eq!(key_of(&m, dir.path()), key_of(&other, dir.path()));
        let mut own = m.clone();
        own["stages"]["s"]["seed"] = json!(6);
        assert_ne!(key_of(&m, dir.path()), key_of(&own, dir.path()));
        // Without its own seed, the manifest's is the classifier's.
        let mut implicit = m.clone();
        implicit["stages"]["s"].as_object_mut().unwrap().remove("seed");
        implicit["seed"] = json!(5);
        assert_eq!(key_of(&m, dir.path()), key_of(&implicit, dir.path()));
    }

    #[test]
    fn command_key_covers_what_it_reads() {
        check::<progdiff_kinds::command::Command>(
            json!({ "kind": "command", "run": "true" }),
            vec![
                ("stage.run", json!("false"), Key),
                ("stage.inputs", json!(["x.txt"]), Key),
                ("stage.outputs", json!(["y"]), Key),
                ("stage.env", json!({ "A": "1" }), Key),
            ],
        );
    }

    #[test]
    fn import_key_covers_what_it_reads() {
        check::<progdiff_kinds::import::Import>(
            json!({ "kind": "import", "path": "w.safetensors" }),
            vec![
                ("stage.path", json!("v.safetensors"), Key),
                ("stage.ema_path", json!("e.safetensors"), Key),
            ],
        );
    }
}
