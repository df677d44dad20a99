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
        cx.push_at(
            pos,
            &format!("{prefix}.kind"),
            format!("unknown stage kind `{kind}`, expected one of {names}"),
        );
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
