//! Stage kinds behind one trait, and the one registry of them.
//!
//! A kind declares its name and implementation version, its parameters (serde + JSON Schema +
//! range checks), and its [`StageKind::Inputs`]: a serialisable struct built from the parameters
//! and the manifest sections the kind reads. The inputs are the *only* thing the kind's `run`
//! receives (in the worker, `progdiff-stages`' `Run` trait), and the cache key is computed from
//! them ([`key_values`]), so a stage cannot read a value its key does not hold.
//!
//! # The shape of an inputs struct
//!
//! Its JSON is an object whose top-level entries are flattened into the key by dotted path:
//! - `stage`: the stage's own parameters, keyed under the stage's name (`allocate.k`);
//! - any section it reads, under its own name (`model.channels`, `diffusion.steps`, `seed`);
//! - `at` ([`Locations`]): where the files are — the manifest's directory, the files it reads by
//!   label, the path fields of `data:`. Locations are *not* part of the key; the content digests
//!   of the files they name are ([`external_files`]), so moving a dataset re-uses results and
//!   changing a file's bytes re-runs.
//!
//! Adding a kind: a file with a type implementing [`StageKind`] (torch-free: parameters,
//! validation, inputs), a line in [`for_each_kind!`](crate::for_each_kind), and its `run` in
//! `progdiff-stages` (the `Run` trait).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{DiffusionConfig, ModelConfig};
use crate::context::{FieldError, StageContext};
use crate::data::{DataConfig, DataValues};

/// The manifest as a kind sees it: the sections a stage may read.
#[derive(Clone, Copy, Debug)]
pub struct Sections<'a> {
    /// `seed:`.
    pub seed: u64,
    /// `data:`, when the manifest has one.
    pub data: Option<&'a DataConfig>,
    /// `model:`.
    pub model: &'a ModelConfig,
    /// `diffusion:`.
    pub diffusion: &'a DiffusionConfig,
    /// The manifest's directory, absolute.
    pub dir: &'a Path,
}

impl Sections<'_> {
    /// `rel` resolved against the manifest's directory.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }

    /// Locations with the manifest's directory and nothing else.
    pub fn locations(&self) -> Locations {
        Locations { dir: self.dir.to_path_buf(), ..Locations::default() }
    }

    /// `data:` split into what the key holds and where its files are (added to `at`).
    pub fn data_values(&self, at: &mut Locations) -> Option<DataValues> {
        self.data.map(|d| {
            let (values, locations) = DataValues::split(d);
            at.data = locations;
            values
        })
    }
}

/// Where a stage's files are. Not part of the cache key: the content digests of the files are
/// ([`external_files`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Locations {
    /// The manifest's directory (absolute): relative paths resolve against it, and `command`
    /// stages run in it.
    pub dir: PathBuf,
    /// Files the stage reads, under the labels their digests have in the key (the manifest's
    /// field name, e.g. `path`, or a `command`'s input as written), resolved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, PathBuf>,
    /// The fields of `data:` that name files ([`crate::data::PATH_FIELDS`]), as written.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
}

impl Locations {
    /// The file labelled `label`, or an error naming it.
    pub fn file(&self, label: &str) -> anyhow::Result<&Path> {
        self.files
            .get(label)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("the stage's inputs name no file `{label}`"))
    }

    /// The `data:` section rebuilt from its `values` and these locations.
    pub fn data_config(&self, values: Option<&DataValues>) -> anyhow::Result<DataConfig> {
        let values =
            values.ok_or_else(|| anyhow::anyhow!("the manifest has no `data:` section"))?;
        values.config(&self.data).map_err(|e| anyhow::anyhow!(e))
    }
}

/// A stage kind: the torch-free half (parameters, validation, inputs). Its work is the
/// `Run` trait of `progdiff-stages`, which receives [`StageKind::Inputs`] and nothing else of
/// the manifest.
pub trait StageKind: 'static {
    /// The `kind:` name in manifests.
    const KIND: &'static str;
    /// Implementation version, part of the key: bump it whenever the outputs for the same
    /// inputs would change.
    const VERSION: u32;
    /// Manifest values the kind never reads, for the key-coverage test: `seed`, a section
    /// (`model`), a section's field (`diffusion.sample_steps`), or one of its own parameters
    /// (`stage.label`). Every other manifest value must change the kind's key.
    const NOT_READ: &'static [&'static str];
    /// Whether a stage of this kind reads the `data:` section (validation asks for one).
    const NEEDS_DATA: bool = false;

    /// The stage's own parameters (`kind`, `needs` and `for_each` excluded), with defaults.
    type Params: Serialize
        + DeserializeOwned
        + JsonSchema
        + Clone
        + Debug
        + PartialEq
        + Send
        + Sync
        + 'static;
    /// Everything the stage reads: hashed into the key by [`key_values`] (all but `at`), carried
    /// by the job, and the only thing its `run` receives. See the module documentation for
    /// its JSON shape.
    type Inputs: Serialize + DeserializeOwned + Debug;

    /// Range checks serde cannot express. `diffusion` is the manifest's section when it is
    /// valid.
    fn validate(params: &Self::Params, diffusion: Option<&DiffusionConfig>) -> Vec<FieldError>;

    /// The inputs of a stage with `params` in a manifest with `sections`.
    fn inputs(params: &Self::Params, sections: &Sections<'_>) -> Self::Inputs;

    /// Number of timestep groups the stage defines (allocation), if any.
    fn groups(_params: &Self::Params) -> Option<usize> {
        None
    }
}

/// The key's flat map of the inputs' JSON: every top-level entry flattened by dotted path under
/// its own name, `stage` under the stage's name, `at` left out.
pub fn key_values(stage: &str, inputs: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Value::Object(o) = inputs {
        for (k, v) in o {
            match k.as_str() {
                "at" => {}
                "stage" => flatten(stage, v, &mut out),
                _ => flatten(k, v, &mut out),
            }
        }
    }
    out
}

/// `value` flattened into `out` by dotted path under `prefix` (objects recurse; arrays and
/// scalars are leaves).
pub fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The files whose content digests go into the key, by label: the inputs' `at.files`, and
/// the files of `data:` (labelled `data:<path relative to their common directory>`). A
/// dataset whose files cannot be listed contributes none (the stage fails clearly when it
/// runs, so nothing is cached under that key).
pub fn external_files(inputs: &Value) -> Vec<(String, PathBuf)> {
    let Some(at) = inputs.get("at") else { return Vec::new() };
    let Ok(at) = serde_json::from_value::<Locations>(at.clone()) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> =
        at.files.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let data =
        inputs.get("data").and_then(|d| serde_json::from_value::<DataValues>(d.clone()).ok());
    if let Some(config) = data.and_then(|d| d.config(&at.data).ok()) {
        out.extend(data_files(&config, &at.dir));
    }
    out
}

/// The dataset's files, labelled by their path relative to their common directory
/// (`data:data_batch_1.bin`).
fn data_files(data: &DataConfig, dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(files) = data.content_files(dir) else { return Vec::new() };
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

/// A kind's parameters behind a trait object, so a manifest can hold stages of every kind.
pub trait AnyParams: Debug + Send + Sync {
    /// [`StageKind::KIND`].
    fn kind(&self) -> &'static str;
    /// [`StageKind::VERSION`].
    fn version(&self) -> u32;
    /// [`StageKind::NEEDS_DATA`].
    fn needs_data(&self) -> bool;
    /// [`StageKind::groups`].
    fn groups(&self) -> Option<usize>;
    /// [`StageKind::inputs`] as JSON.
    fn inputs(&self, sections: &Sections<'_>) -> Value;
    /// For downcasting to [`Typed`].
    fn as_any(&self) -> &dyn Any;
    /// A boxed clone.
    fn clone_box(&self) -> Box<dyn AnyParams>;
    /// Equality with another kind's parameters (false across kinds).
    fn eq_dyn(&self, other: &dyn AnyParams) -> bool;
}

/// The parameters of kind `K`.
pub struct Typed<K: StageKind>(pub K::Params);

impl<K: StageKind> Debug for Typed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", K::KIND, self.0)
    }
}

impl<K: StageKind> AnyParams for Typed<K> {
    fn kind(&self) -> &'static str {
        K::KIND
    }
    fn version(&self) -> u32 {
        K::VERSION
    }
    fn needs_data(&self) -> bool {
        K::NEEDS_DATA
    }
    fn groups(&self) -> Option<usize> {
        K::groups(&self.0)
    }
    fn inputs(&self, sections: &Sections<'_>) -> Value {
        serde_json::to_value(K::inputs(&self.0, sections)).expect("inputs serialise to JSON")
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn clone_box(&self) -> Box<dyn AnyParams> {
        Box::new(Typed::<K>(self.0.clone()))
    }
    fn eq_dyn(&self, other: &dyn AnyParams) -> bool {
        other.as_any().downcast_ref::<Typed<K>>().is_some_and(|o| o.0 == self.0)
    }
}

/// The parameters of `p` when it is a stage of kind `K`.
pub fn params_of<K: StageKind>(p: &dyn AnyParams) -> Option<&K::Params> {
    p.as_any().downcast_ref::<Typed<K>>().map(|t| &t.0)
}

/// A job's inputs in their canonical form: parsed as kind `K`'s inputs and serialised again,
/// so what is hashed is exactly what `run` will be given.
pub fn canonical_inputs<K: StageKind>(inputs: &Value) -> Result<(K::Inputs, Value), String> {
    let typed: K::Inputs = serde_json::from_value(inputs.clone())
        .map_err(|e| format!("the inputs do not parse as `{}` inputs: {e}", K::KIND))?;
    let value = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    Ok((typed, value))
}

/// The one registry of stage kinds: calls macro `$m` with every kind's type, in the order
/// messages list them. The engine builds its parser and schema from it, the worker its
/// dispatcher; a new kind is one line here.
#[macro_export]
macro_rules! for_each_kind {
    ($m:ident) => {
        $m! {
            $crate::train::Train,
            $crate::allocate::SnrAllocate,
            $crate::import::Import,
            $crate::command::Command,
            $crate::evaluate::Evaluate,
            $crate::fid_extractor::FidExtractor,
            $crate::prune::Prune,
        }
    };
}

/// Every kind name, in registry order.
pub fn kind_names() -> &'static [&'static str] {
    macro_rules! names {
        ($($k:path),* $(,)?) => {
            &[$(<$k as StageKind>::KIND),*]
        };
    }
    for_each_kind!(names)
}

/// The implementation version of kind `kind`.
pub fn version_of(kind: &str) -> Option<u32> {
    macro_rules! find {
        ($($k:path),* $(,)?) => {
            $(if kind == <$k as StageKind>::KIND {
                return Some(<$k as StageKind>::VERSION);
            })*
        };
    }
    for_each_kind!(find);
    None
}

/// A stage's work on its (captured) inputs.
pub type RunFn = Box<dyn FnOnce(&StageContext) -> anyhow::Result<()>>;

/// A job's inputs checked against their kind and ready to run (built by the worker's registry
/// of `run` functions).
pub struct Prepared {
    /// The kind's implementation version.
    pub version: u32,
    /// The inputs in canonical form ([`canonical_inputs`]): the key is computed from this value,
    /// and `run` receives exactly it.
    pub inputs: Value,
    run: RunFn,
}

impl Prepared {
    /// Inputs of a kind with `version`, and the closure that runs them.
    pub fn new(version: u32, inputs: Value, run: RunFn) -> Prepared {
        Prepared { version, inputs, run }
    }

    /// Runs the stage.
    pub fn run(self, ctx: &StageContext) -> anyhow::Result<()> {
        (self.run)(ctx)
    }
}

/// [`canonical_inputs`] of kind `kind` (named at run time), with its version.
pub fn canonical_of(kind: &str, inputs: &Value) -> Result<(u32, Value), String> {
    macro_rules! find {
        ($($k:path),* $(,)?) => {
            $(if kind == <$k as StageKind>::KIND {
                let (_, value) = canonical_inputs::<$k>(inputs)?;
                return Ok((<$k as StageKind>::VERSION, value));
            })*
        };
    }
    for_each_kind!(find);
    Err(format!("unknown stage kind `{kind}`"))
}
