//! The stage kinds the engine knows: how each parses its parameters, which manifest values it
//! reads (the cache key holds exactly these), which external files it reads, and how it runs.
//!
//! Adding a kind means adding a variant here; the stage's real work lives in `progdiff-stages`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use progdiff_stages::allocate::{self, AllocateParams};
use progdiff_stages::command::{self, CommandParams};
use progdiff_stages::config::DiffusionConfig;
use progdiff_stages::context::FieldError;
use progdiff_stages::context::StageContext;
use progdiff_stages::data::DataConfig;
use progdiff_stages::evaluate::{self, EvaluateParams};
use progdiff_stages::fid::stage::{self as fid_extractor, ExtractorKind, ExtractorParams};
use progdiff_stages::import::{self, ImportParams};
use progdiff_stages::prune::params::SeedRef;
use progdiff_stages::prune::{self, PruneInputs, PruneParams};
use progdiff_stages::train::{self, TrainInputs, TrainParams};
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::manifest::yaml::{Node, NodeKind};
use crate::manifest::{Cx, Manifest, STAGE_KEYS, flatten};

/// A stage's kind with its parameters, defaults filled.
#[derive(Clone, Debug, PartialEq)]
pub enum StageParams {
    /// `snr-allocate`: paper eq. 7-10.
    SnrAllocate(AllocateParams),
    /// `command`: a shell command.
    Command(CommandParams),
    /// `train`: IDDPM training, from scratch or fine-tuning.
    Train(TrainParams),
    /// `import`: an external checkpoint as a model.
    Import(ImportParams),
    /// `evaluate`: samples, FID, averaged params/MACs, sampling time.
    Evaluate(EvaluateParams),
    /// `fid-extractor`: the FID feature extractor and the dataset's reference statistics.
    FidExtractor(ExtractorParams),
    /// `prune`: a group's copy of a checkpoint pruned to its FLOPs bound.
    Prune(PruneParams),
}

impl StageParams {
    /// Every kind name, for messages and the schema.
    pub const KINDS: &'static [&'static str] = &[
        train::KIND,
        allocate::KIND,
        import::KIND,
        command::KIND,
        evaluate::KIND,
        fid_extractor::KIND,
        prune::KIND,
    ];

    /// Parses the parameters of a stage of kind `kind` from its mapping `body`.
    pub(crate) fn parse(
        cx: &mut Cx,
        kind: &str,
        body: &Node,
        prefix: &str,
        diffusion: Option<&DiffusionConfig>,
    ) -> Option<StageParams> {
        match kind {
            allocate::KIND => {
                let steps = diffusion.map(|d| d.steps).unwrap_or(usize::MAX);
                checked(cx, body, prefix, |p: &AllocateParams| p.validate(steps))
                    .map(StageParams::SnrAllocate)
            }
            command::KIND => {
                checked(cx, body, prefix, CommandParams::validate).map(StageParams::Command)
            }
            train::KIND => checked(cx, body, prefix, TrainParams::validate).map(StageParams::Train),
            import::KIND => {
                checked(cx, body, prefix, ImportParams::validate).map(StageParams::Import)
            }
            prune::KIND => checked(cx, body, prefix, PruneParams::validate)
                .filter(|p| prune_refs(cx, body, prefix, p))
                .map(StageParams::Prune),
            evaluate::KIND => {
                checked(cx, body, prefix, EvaluateParams::validate).map(StageParams::Evaluate)
            }
            fid_extractor::KIND => {
                checked(cx, body, prefix, ExtractorParams::validate).map(StageParams::FidExtractor)
            }
            other => {
                let pos = body.get("kind").map(|n| n.pos).unwrap_or(body.pos);
                let names =
                    Self::KINDS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
                cx.push_at(
                    pos,
                    &format!("{prefix}.kind"),
                    format!("unknown stage kind `{other}`, expected one of {names}"),
                );
                None
            }
        }
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            StageParams::SnrAllocate(_) => allocate::KIND,
            StageParams::Command(_) => command::KIND,
            StageParams::Train(_) => train::KIND,
            StageParams::Import(_) => import::KIND,
            StageParams::Evaluate(_) => evaluate::KIND,
            StageParams::FidExtractor(_) => fid_extractor::KIND,
            StageParams::Prune(_) => prune::KIND,
        }
    }

    /// Implementation version (part of the key; bumped when results would change).
    pub fn version(&self) -> u32 {
        match self {
            StageParams::SnrAllocate(_) => allocate::VERSION,
            StageParams::Command(_) => command::VERSION,
            StageParams::Train(_) => train::VERSION,
            StageParams::Import(_) => import::VERSION,
            StageParams::Evaluate(_) => evaluate::VERSION,
            StageParams::FidExtractor(_) => fid_extractor::VERSION,
            StageParams::Prune(_) => prune::VERSION,
        }
    }

    /// Whether the kind reads the manifest's `data:` section.
    pub fn needs_data(&self) -> bool {
        matches!(self, StageParams::Train(_) | StageParams::FidExtractor(_) | StageParams::Prune(_))
    }

    /// Number of timestep groups, for kinds that define them (allocation).
    pub fn groups(&self) -> Option<usize> {
        match self {
            StageParams::SnrAllocate(p) => Some(p.groups),
            StageParams::Command(_) | StageParams::Train(_) | StageParams::Import(_) => None,
            StageParams::Evaluate(_) | StageParams::FidExtractor(_) | StageParams::Prune(_) => None,
        }
    }

    /// The manifest values this stage reads, by dotted path (`allocate.k`, `diffusion.steps`):
    /// exactly what goes into its cache key.
    pub fn reads(&self, m: &Manifest, stage: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        match self {
            StageParams::SnrAllocate(p) => {
                flatten(stage, &to_value(p), &mut out);
                out.insert("diffusion.steps".into(), to_value(m.diffusion.steps));
                out.insert("diffusion.schedule".into(), to_value(m.diffusion.schedule));
            }
            StageParams::Command(p) => {
                flatten(stage, &to_value(p), &mut out);
                out.insert("seed".into(), to_value(m.seed));
            }
            StageParams::Train(p) => {
                flatten(stage, &to_value(p), &mut out);
                flatten("model", &to_value(&m.model), &mut out);
                training_values(m, &mut out);
            }
            StageParams::Prune(p) => {
                // The architecture comes from the upstream checkpoint (its key covers it).
                flatten(stage, &to_value(p), &mut out);
                training_values(m, &mut out);
            }
            StageParams::Import(_) => {
                // The file locations are not part of the key: their content digests are.
                flatten("model", &to_value(&m.model), &mut out);
            }
            StageParams::Evaluate(p) => {
                // The models' architectures come with their checkpoints (upstream keys); the
                // sampling process is the manifest's.
                flatten(stage, &to_value(p), &mut out);
                // The row name changes no measurement: renaming a row must not re-sample.
                out.remove(&format!("{stage}.label"));
                out.insert("seed".into(), to_value(m.seed));
                flatten("diffusion", &to_value(&m.diffusion), &mut out);
            }
            StageParams::FidExtractor(p) => {
                flatten(stage, &p.key_values(), &mut out);
                if p.extractor == ExtractorKind::Classifier {
                    out.insert("seed".into(), to_value(m.seed));
                }
                if let Some(data) = &m.data {
                    data_values(data, &mut out);
                }
            }
        }
        out
    }

    /// External files the stage reads: (label as written in the manifest, resolved path).
    pub fn external_inputs(&self, m: &Manifest) -> Vec<(String, PathBuf)> {
        match self {
            StageParams::SnrAllocate(_) => Vec::new(),
            StageParams::Command(p) => p.inputs.iter().map(|i| (i.clone(), m.resolve(i))).collect(),
            StageParams::Train(_) | StageParams::Prune(_) => {
                m.data.as_ref().map(|d| data_files(d, m)).unwrap_or_default()
            }
            StageParams::Import(p) => {
                let mut v = vec![("path".to_string(), m.resolve(&p.path))];
                if let Some(e) = &p.ema_path {
                    v.push(("ema_path".to_string(), m.resolve(e)));
                }
                v
            }
            StageParams::Evaluate(_) => Vec::new(),
            StageParams::FidExtractor(p) => {
                let mut v = m.data.as_ref().map(|d| data_files(d, m)).unwrap_or_default();
                if let Some(path) = &p.path {
                    v.push(("path".to_string(), m.resolve(path)));
                }
                v
            }
        }
    }

    /// Runs the stage's real work.
    pub fn run(&self, m: &Manifest, ctx: &StageContext) -> anyhow::Result<()> {
        match self {
            StageParams::SnrAllocate(p) => allocate::run(ctx, p, &m.diffusion),
            StageParams::Command(p) => command::run(ctx, p, &m.dir),
            StageParams::Train(p) => {
                let data = m
                    .data
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("the manifest has no `data:` section"))?;
                let inputs = TrainInputs {
                    data,
                    model: &m.model,
                    diffusion: &m.diffusion,
                    manifest_dir: &m.dir,
                };
                train::run(ctx, p, &inputs)
            }
            StageParams::Import(p) => import::run(ctx, p, &m.model, &m.dir),
            StageParams::Prune(p) => {
                let data = m
                    .data
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("the manifest has no `data:` section"))?;
                let inputs = PruneInputs { data, diffusion: &m.diffusion, manifest_dir: &m.dir };
                prune::run(ctx, p, &inputs)
            }
            StageParams::Evaluate(p) => evaluate::run(ctx, p, &m.diffusion),
            StageParams::FidExtractor(p) => {
                let data = m
                    .data
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("the manifest has no `data:` section"))?;
                fid_extractor::run(ctx, p, data, &m.dir)
            }
        }
    }

    /// JSON schema of each kind's own parameters (without `kind`/`needs`/`for_each`).
    pub fn schemas(generator: &mut schemars::SchemaGenerator) -> Vec<(&'static str, Value)> {
        vec![
            (allocate::KIND, generator.root_schema_for::<AllocateParams>().to_value()),
            (command::KIND, generator.root_schema_for::<CommandParams>().to_value()),
            (train::KIND, generator.root_schema_for::<TrainParams>().to_value()),
            (import::KIND, generator.root_schema_for::<ImportParams>().to_value()),
            (prune::KIND, generator.root_schema_for::<PruneParams>().to_value()),
            (evaluate::KIND, generator.root_schema_for::<EvaluateParams>().to_value()),
            (fid_extractor::KIND, generator.root_schema_for::<ExtractorParams>().to_value()),
        ]
    }
}

/// A stage's parameters deserialised (unknown keys and type errors reported) and range-checked,
/// or `None` with every problem reported at its position.
fn checked<P: DeserializeOwned + JsonSchema>(
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

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).expect("parameters serialise to JSON")
}

/// What every stage that computes the training loss reads: the seed, the diffusion process
/// (not its sampling respacing) and the data.
fn training_values(m: &Manifest, out: &mut BTreeMap<String, Value>) {
    out.insert("seed".into(), to_value(m.seed));
    out.insert("diffusion.steps".into(), to_value(m.diffusion.steps));
    out.insert("diffusion.schedule".into(), to_value(m.diffusion.schedule));
    out.insert("diffusion.loss".into(), to_value(m.diffusion.loss));
    out.insert("diffusion.rescale_timesteps".into(), to_value(m.diffusion.rescale_timesteps));
    if let Some(data) = &m.data {
        data_values(data, out);
    }
}

/// Fields of `data:` that name files: their content is hashed instead, so moving a dataset does
/// not invalidate what was trained on it.
const DATA_PATH_FIELDS: &[&str] = &["path", "images", "labels"];

/// The `data:` values a stage reads, without file locations (see [`data_files`]); a generated
/// dataset contributes its generator fingerprint.
fn data_values(data: &DataConfig, out: &mut BTreeMap<String, Value>) {
    let mut v = to_value(data);
    if let Some(o) = v.as_object_mut() {
        for f in DATA_PATH_FIELDS {
            o.remove(*f);
        }
    }
    flatten("data", &v, out);
    if let Some(fp) = data.generated_fingerprint() {
        out.insert("data.generated".into(), Value::String(fp));
    }
}

/// The dataset's files, labelled by their path relative to the dataset's common directory
/// (`data:data_batch_1.bin`), for content digests in the key.
fn data_files(data: &DataConfig, m: &Manifest) -> Vec<(String, PathBuf)> {
    let files = match data.content_files(&m.dir) {
        Ok(f) => f,
        // A missing dataset is reported when the stage runs; the key then has no digest and
        // the stage cannot be cached by mistake because it fails.
        Err(_) => return Vec::new(),
    };
    let common = files.first().and_then(|f| f.parent()).map(|p| {
        let mut c = p.to_path_buf();
        while !files.iter().all(|f| f.starts_with(&c)) {
            if !c.pop() {
                break;
            }
        }
        c
    });
    files
        .iter()
        .map(|f| {
            let rel = common.as_ref().and_then(|c| f.strip_prefix(c).ok()).unwrap_or(f);
            (format!("data:{}", rel.display()), f.clone())
        })
        .collect()
}
