//! Manifests: YAML -> a typed [`Manifest`], with every mistake reported at `file:line:col`.
//!
//! Reading goes in three steps: the YAML becomes a position-aware [`yaml::Node`] tree; each
//! section and each stage is deserialised on its own (serde, unknown keys rejected with the list
//! of expected ones), so one bad section does not hide errors in another; then values are
//! range-checked and the stages are checked together (unknown `needs`, cycles, `for_each: group`
//! without an allocation). All diagnostics are returned at once, sorted by position.

mod compose;
mod sweep;
pub mod yaml;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use progdiff_kinds::config::{DiffusionConfig, ModelConfig};
use progdiff_kinds::context::FieldError;
use progdiff_kinds::data::DataConfig;
use progdiff_kinds::kind::Sections;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::kinds::StageParams;
use crate::resources::Resources;
use yaml::{Node, NodeKind, Pos};

/// One problem in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// The manifest file as given.
    pub file: String,
    /// Where in it.
    pub pos: Pos,
    /// Dotted key path (`stages.allocate.k`); empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.pos.line, self.pos.col)?;
        if !self.path.is_empty() {
            write!(f, "`{}`: ", self.path)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest `{path}`")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest has mistakes.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

/// The text of a manifest file, or a located error at its first byte that is not UTF-8.
pub(crate) fn utf8(bytes: Vec<u8>, file: &str) -> Result<String, Vec<Diagnostic>> {
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let before = &bytes[..offset];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        // Columns count characters, as the YAML positions do.
        let col = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
        vec![Diagnostic {
            file: file.to_string(),
            pos: Pos::at(line, col),
            path: String::new(),
            message: format!(
                "not UTF-8 text: byte 0x{:02x} at offset {offset}\nhint: save the manifest as UTF-8",
                bytes[offset]
            ),
        }]
    })
}

fn render(diags: &[Diagnostic]) -> String {
    let mut s = diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    s.push_str(&format!(
        "\n{} error{} in `{}`",
        diags.len(),
        if diags.len() == 1 { "" } else { "s" },
        diags.first().map(|d| d.file.as_str()).unwrap_or("")
    ));
    s
}

/// Reads a manifest file (the one given, or one it `extends:`) as UTF-8 text.
///
/// Only a regular file (or a symlink to one) is read: a named pipe would block the read until
/// some process writes to it, so it and every other kind of file (a directory, a device, a
/// socket) is an error naming what the path is. The file is opened without blocking and checked
/// again once open, so one swapped in between is refused too.
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

/// The bytes of a manifest file (a regular file only: see [`read_text`]).
pub(crate) fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    check_regular(&std::fs::metadata(path)?)?;
    let mut file =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path)?;
    check_regular(&file.metadata()?)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn check_regular(meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file"),
    ))
}

/// `for_each:` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForEach {
    /// One instance per timestep group of the upstream allocation.
    Group,
}

/// A stage as declared in the manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDecl {
    /// The key under `stages:`.
    pub name: String,
    /// Stages it needs, in the order written.
    pub needs: Vec<String>,
    /// Fan-out.
    pub for_each: Option<ForEach>,
    /// The kind and its parameters (defaults filled).
    pub params: StageParams,
    /// What a cluster backend asks for (not part of any key).
    pub resources: Resources,
    /// How many times a cluster backend resubmits a failed job of this stage.
    pub retries: u32,
    /// Where the stage's key is.
    pub pos: Pos,
}

/// A validated manifest with defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The file as given on the command line.
    pub file: String,
    /// Directory relative paths in the manifest resolve against.
    pub dir: PathBuf,
    /// `dir` made absolute (what stages' inputs carry).
    pub abs_dir: PathBuf,
    /// Experiment name (defaults to the file stem); namespaces plan history in the cache.
    pub name: String,
    /// Seed for every stage that draws random numbers.
    pub seed: u64,
    /// `data:` section (required by stages that train or evaluate).
    pub data: Option<DataConfig>,
    /// `model:` section.
    pub model: ModelConfig,
    /// `diffusion:` section.
    pub diffusion: DiffusionConfig,
    /// Stages in manifest order.
    pub stages: Vec<StageDecl>,
    /// The sweep variant this is (`groups=4,k=0.5`), for manifests with a `sweep:` or
    /// `seeds:`.
    pub variant: Option<String>,
    /// For a variant whose seed is an axis of its own (`seeds: N`, `product: { seed: [...] }`):
    /// its name without the seed part (`groups=4`; empty when the seed is the only axis).
    /// Variants with the same one are replicates of one configuration, which `progdiff
    /// report` folds into one row.
    pub seed_group: Option<String>,
}

/// A manifest file with its sweep expanded: one [`Manifest`] per variant (exactly one, with no
/// variant name, when the file declares no sweep).
#[derive(Clone, Debug, PartialEq)]
pub struct Experiment {
    /// The file as given.
    pub file: String,
    /// Experiment name.
    pub name: String,
    /// The variants, in sweep order.
    pub variants: Vec<Manifest>,
}

impl Experiment {
    /// Reads a manifest file, the files it `extends:`, and expands its sweep.
    pub fn load(path: &Path) -> Result<Experiment, ManifestError> {
        let bytes = read_bytes(path)
            .map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        let text = utf8(bytes, &path.display().to_string()).map_err(ManifestError::Invalid)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Experiment::parse(&text, &path.display().to_string(), &dir, &stem)
            .map_err(ManifestError::Invalid)
    }

    /// Validates manifest text (see [`Manifest::parse`]); `extends:` paths resolve against `dir`.
    pub fn parse(
        text: &str,
        file: &str,
        dir: &Path,
        default_name: &str,
    ) -> Result<Experiment, Vec<Diagnostic>> {
        let mut cx = Cx::new(file);
        let root = match yaml::parse(text) {
            Ok(root) => root,
            Err(errs) => {
                for e in errs {
                    cx.push(e.pos, &e.path, e.message);
                }
                return Err(cx.finish());
            }
        };
        let mut chain: Vec<PathBuf> = std::fs::canonicalize(file).into_iter().collect();
        let Some(mut root) = cx.compose(root, dir, &mut chain) else { return Err(cx.finish()) };
        let mut take = |key: &str| match &mut root.kind {
            NodeKind::Map(entries) => entries
                .iter()
                .position(|(k, _)| k.name == key)
                .map(|i| entries.remove(i).1)
                .filter(|n| n.kind != NodeKind::Null),
            _ => None,
        };
        let sweep = take(sweep::SWEEP);
        let seeds = take(sweep::SEEDS);
        let seeds = match &seeds {
            Some(node) => match cx.seeds(&root, node) {
                Some(s) => Some(s),
                None => return Err(cx.finish()),
            },
            None => None,
        };
        let mut variants = Vec::new();
        if sweep.is_none() && seeds.as_ref().is_none_or(|s| s.count() <= 1) {
            variants.extend(cx.manifest(&root, dir, default_name));
        } else if let Some(specs) = cx.variants(&root, sweep.as_ref(), seeds.as_ref()) {
            for spec in specs {
                if let Some(mut m) = cx.manifest(&spec.apply(&root), dir, default_name) {
                    m.variant = Some(spec.name);
                    m.seed_group = spec.seed_group;
                    variants.push(m);
                }
            }
        }
        let diags = cx.finish();
        if !diags.is_empty() || variants.is_empty() {
            return Err(diags);
        }
        Ok(Experiment { file: file.to_string(), name: variants[0].name.clone(), variants })
    }

    /// Whether the manifest declares a sweep.
    pub fn is_sweep(&self) -> bool {
        self.variants.iter().any(|v| v.variant.is_some())
    }

    /// The variant named `name`.
    pub fn variant(&self, name: &str) -> Option<&Manifest> {
        self.variants.iter().find(|v| v.variant.as_deref() == Some(name))
    }
}

impl Manifest {
    /// Reads and validates a manifest file without a sweep (see [`Experiment::load`] for
    /// manifests that may have one).
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        Experiment::load(path)?.single().map_err(ManifestError::Invalid)
    }

    /// Validates manifest text without a sweep. `file` labels diagnostics; `default_name` is used
    /// when the manifest has no `name:`.
    pub fn parse(
        text: &str,
        file: &str,
        dir: &Path,
        default_name: &str,
    ) -> Result<Manifest, Vec<Diagnostic>> {
        Experiment::parse(text, file, dir, default_name)?.single()
    }

    /// The declaration of stage `name`.
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Resolves a path written in the manifest against its directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.dir.join(p) }
    }

    /// The sections stage kinds read.
    pub fn sections(&self) -> Sections<'_> {
        Sections {
            seed: self.seed,
            data: self.data.as_ref(),
            model: &self.model,
            diffusion: &self.diffusion,
            dir: &self.abs_dir,
        }
    }
}

impl Experiment {
    /// The one manifest of an experiment without a sweep.
    fn single(mut self) -> Result<Manifest, Vec<Diagnostic>> {
        if self.variants.len() == 1 && !self.is_sweep() {
            return Ok(self.variants.remove(0));
        }
        Err(vec![Diagnostic {
            file: self.file.clone(),
            pos: Pos::at(1, 1),
            path: sweep::SWEEP.into(),
            message: format!(
                "declares a sweep of {} variants: load it as an experiment",
                self.variants.len()
            ),
        }])
    }
}

const TOP_KEYS: &[&str] =
    &["name", "seed", "seeds", "data", "model", "diffusion", "stages", "sweep", "extends"];
pub(crate) const STAGE_KEYS: &[&str] = &["kind", "needs", "for_each", "resources", "retries"];

/// Collects diagnostics for a manifest and the files it extends.
pub(crate) struct Cx {
    /// Source files by [`Pos::src`]; the manifest given is 0.
    files: Vec<String>,
    diags: Vec<Diagnostic>,
}

impl Cx {
    pub(crate) fn new(file: &str) -> Cx {
        Cx { files: vec![file.to_string()], diags: Vec::new() }
    }

    /// Registers a further source file; returns its index for [`Pos::src`].
    pub(crate) fn add_file(&mut self, label: String) -> usize {
        self.files.push(label);
        self.files.len() - 1
    }

    pub(crate) fn push_at(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.push(pos, path, message)
    }

    pub(crate) fn push(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.files.get(pos.src).unwrap_or(&self.files[0]).clone(),
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub(crate) fn finish(mut self) -> Vec<Diagnostic> {
        self.diags.sort();
        self.diags.dedup();
        self.diags
    }

    /// Reports field errors of a section/stage whose node is `node` at `prefix`.
    pub(crate) fn field_errors(&mut self, node: &Node, prefix: &str, errs: Vec<FieldError>) {
        for e in errs {
            let pos = node.locate(&e.path);
            self.push(pos, &join(prefix, &e.path.join(".")), e.message);
        }
    }

    fn manifest(&mut self, root: &Node, dir: &Path, default_name: &str) -> Option<Manifest> {
        let NodeKind::Map(entries) = &root.kind else {
            self.push(root.pos, "", format!("a manifest is a mapping, found {}", root.type_name()));
            return None;
        };
        for (k, _) in entries {
            if !TOP_KEYS.contains(&k.name.as_str()) {
                self.push(k.pos, &k.name, unknown_key(&k.name, TOP_KEYS));
            }
        }
        let name = match root.get("name") {
            None => Some(default_name.to_string()),
            Some(n) => match &n.kind {
                NodeKind::Str(s) if !s.trim().is_empty() => Some(s.clone()),
                _ => {
                    self.push(
                        n.pos,
                        "name",
                        format!("must be a non-empty string, found {}", n.type_name()),
                    );
                    None
                }
            },
        };
        let seed = match root.get("seed") {
            None => Some(0),
            Some(n) => match n.kind {
                NodeKind::Int(i) if i >= 0 => Some(i as u64),
                _ => {
                    self.push(n.pos, "seed", "must be a non-negative integer");
                    None
                }
            },
        };
        let data = match root.get("data") {
            None | Some(Node { kind: NodeKind::Null, .. }) => Some(None),
            Some(node) => self.data_section(node).map(Some),
        };
        let model = self.section::<ModelConfig>(root, "model", ModelConfig::validate);
        let diffusion =
            self.section::<DiffusionConfig>(root, "diffusion", DiffusionConfig::validate);
        let stages = self.stages(root, diffusion.as_ref());
        if let (Some(stages), Some(None)) = (&stages, &data) {
            for d in stages.iter().filter(|d| d.params.needs_data()) {
                self.push(
                    root.pos,
                    "data",
                    format!("stage `{}` (`{}`) needs a `data:` section", d.name, d.params.kind()),
                );
            }
        }
        Some(Manifest {
            file: self.files[0].clone(),
            dir: dir.to_path_buf(),
            // Absolute, so that a job's file locations hold wherever its worker starts.
            abs_dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            name: name?,
            seed: seed?,
            data: data?,
            model: model?,
            diffusion: diffusion?,
            stages: stages?,
            variant: None,
            seed_group: None,
        })
    }

    fn data_section(&mut self, node: &Node) -> Option<DataConfig> {
        match node.get("kind") {
            Some(Node { kind: NodeKind::Str(k), .. })
                if DataConfig::KINDS.contains(&k.as_str()) => {}
            Some(k) => {
                self.push(
                    k.pos,
                    "data.kind",
                    format!(
                        "unknown data kind {}, expected one of {}",
                        show_node(k),
                        quoted(DataConfig::KINDS)
                    ),
                );
                return None;
            }
            None => {
                self.push(
                    node.pos,
                    "data",
                    format!("missing `kind`, expected one of {}", quoted(DataConfig::KINDS)),
                );
                return None;
            }
        }
        let kind = &["kind"];
        let data = match node.get("kind").map(|k| &k.kind) {
            Some(NodeKind::Str(k)) => match k.as_str() {
                "cifar10" => DataConfig::Cifar10(self.deserialize(node, "data", kind)?),
                "idx" => DataConfig::Idx(self.deserialize(node, "data", kind)?),
                "npz" => DataConfig::Npz(self.deserialize(node, "data", kind)?),
                "folder" => DataConfig::Folder(self.deserialize(node, "data", kind)?),
                _ => DataConfig::Synthetic(self.deserialize(node, "data", kind)?),
            },
            _ => unreachable!("checked above"),
        };
        let errs = data.validate();
        if errs.is_empty() {
            Some(data)
        } else {
            self.field_errors(node, "data", errs);
            None
        }
    }

    fn section<T: DeserializeOwned + JsonSchema + Default>(
        &mut self,
        root: &Node,
        key: &str,
        validate: fn(&T) -> Vec<FieldError>,
    ) -> Option<T> {
        let Some(node) = root.get(key) else { return Some(T::default()) };
        if node.kind == NodeKind::Null {
            return Some(T::default());
        }
        let value = self.deserialize::<T>(node, key, &[])?;
        let errs = validate(&value);
        if errs.is_empty() {
            Some(value)
        } else {
            self.field_errors(node, key, errs);
            None
        }
    }

    /// Deserialises `node` as `T`, reporting every unknown key and every type error (the
    /// offending entry is dropped and deserialisation retried, so several are found at once).
    /// `skip` names keys of the mapping handled by the caller.
    pub(crate) fn deserialize<T: DeserializeOwned + JsonSchema>(
        &mut self,
        node: &Node,
        prefix: &str,
        skip: &[&str],
    ) -> Option<T> {
        let NodeKind::Map(entries) = &node.kind else {
            self.push(node.pos, prefix, format!("must be a mapping, found {}", node.type_name()));
            return None;
        };
        let known = schema_properties::<T>();
        let mut value = node.to_json();
        let mut ok = true;
        let obj = value.as_object_mut().expect("a mapping node converts to an object");
        for (k, _) in entries {
            if skip.contains(&k.name.as_str()) {
                obj.remove(&k.name);
            } else if !known.iter().any(|n| n == &k.name) {
                let mut expected: Vec<&str> = known.iter().map(String::as_str).collect();
                expected.extend_from_slice(skip);
                self.push(k.pos, &join(prefix, &k.name), unknown_key(&k.name, &expected));
                obj.remove(&k.name);
                ok = false;
            }
        }
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, T>(&value) {
                Ok(t) => return ok.then_some(t),
                Err(e) => {
                    ok = false;
                    let segs = segments(e.path());
                    let message = clean_serde_message(&e.inner().to_string());
                    self.push(node.locate(&segs), &join(prefix, &segs.join(".")), message);
                    if segs.is_empty() || !remove_path(&mut value, &segs) {
                        return None;
                    }
                }
            }
        }
        None
    }

    fn stages(
        &mut self,
        root: &Node,
        diffusion: Option<&DiffusionConfig>,
    ) -> Option<Vec<StageDecl>> {
        let Some(node) = root.get("stages") else {
            self.push(
                root.pos,
                "stages",
                "missing `stages`: a manifest declares at least one stage",
            );
            return None;
        };
        let NodeKind::Map(entries) = &node.kind else {
            self.push(
                node.pos,
                "stages",
                format!("must be a mapping of stage names, found {}", node.type_name()),
            );
            return None;
        };
        if entries.is_empty() {
            self.push(node.pos, "stages", "declares no stage");
            return None;
        }
        let mut decls = Vec::new();
        let mut ok = self.check_needs(entries);
        for (key, body) in entries {
            match self.stage(&key.name, key.pos, body, diffusion) {
                Some(d) => decls.push(d),
                None => ok = false,
            }
            if !is_stage_name(&key.name) {
                self.push(
                    key.pos,
                    &format!("stages.{}", key.name),
                    "stage names use letters, digits, `-` and `_`, and start with a letter",
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let graph_ok = self.check_graph(node, &decls);
        graph_ok.then_some(decls)
    }

    fn stage(
        &mut self,
        name: &str,
        pos: Pos,
        body: &Node,
        diffusion: Option<&DiffusionConfig>,
    ) -> Option<StageDecl> {
        let prefix = format!("stages.{name}");
        if !matches!(body.kind, NodeKind::Map(_)) {
            self.push(
                body.pos,
                &prefix,
                format!("a stage is a mapping, found {}", body.type_name()),
            );
            return None;
        }
        let kind = match body.get("kind") {
            Some(Node { kind: NodeKind::Str(s), .. }) => s.clone(),
            Some(n) => {
                self.push(
                    n.pos,
                    &format!("{prefix}.kind"),
                    format!("must be a string, found {}", n.type_name()),
                );
                return None;
            }
            None => {
                self.push(
                    pos,
                    &prefix,
                    format!("missing `kind`, expected one of {}", quoted(StageParams::kinds())),
                );
                return None;
            }
        };
        let needs = match body.get("needs") {
            None => Some(Vec::new()),
            Some(n) => match &n.kind {
                NodeKind::Str(s) => Some(vec![s.clone()]),
                NodeKind::Seq(items) => {
                    let mut v = Vec::new();
                    for (i, it) in items.iter().enumerate() {
                        match &it.kind {
                            NodeKind::Str(s) => v.push(s.clone()),
                            _ => self.push(
                                it.pos,
                                &format!("{prefix}.needs.{i}"),
                                format!("must be a stage name, found {}", it.type_name()),
                            ),
                        }
                    }
                    (v.len() == items.len()).then_some(v)
                }
                _ => {
                    self.push(
                        n.pos,
                        &format!("{prefix}.needs"),
                        "must be a stage name or a list of them",
                    );
                    None
                }
            },
        };
        let for_each = match body.get("for_each") {
            None | Some(Node { kind: NodeKind::Null, .. }) => Some(None),
            Some(Node { kind: NodeKind::Str(s), .. }) if s == "group" => Some(Some(ForEach::Group)),
            Some(n) => {
                self.push(n.pos, &format!("{prefix}.for_each"), "must be `group`");
                None
            }
        };
        let resources = match body.get("resources") {
            None | Some(Node { kind: NodeKind::Null, .. }) => Some(Resources::default()),
            Some(n) => {
                let at = format!("{prefix}.resources");
                self.deserialize::<Resources>(n, &at, &[]).and_then(|r| {
                    let errs = r.validate();
                    if errs.is_empty() {
                        Some(r)
                    } else {
                        self.field_errors(n, &at, errs);
                        None
                    }
                })
            }
        };
        let retries = match body.get("retries") {
            None | Some(Node { kind: NodeKind::Null, .. }) => Some(0),
            Some(Node { kind: NodeKind::Int(i), .. }) if (0..=100).contains(i) => Some(*i as u32),
            Some(n) => {
                self.push(
                    n.pos,
                    &format!("{prefix}.retries"),
                    format!("must be a whole number from 0 to 100, found {}", show_node(n)),
                );
                None
            }
        };
        let params = StageParams::parse(self, &kind, body, &prefix, diffusion);
        Some(StageDecl {
            name: name.to_string(),
            needs: needs?,
            for_each: for_each?,
            params: params?,
            resources: resources?,
            retries: retries?,
            pos,
        })
    }

    /// Every name in `needs` is a declared stage other than the one needing it. Works on the raw
    /// nodes, so it reports even when some stage's parameters are invalid.
    fn check_needs(&mut self, entries: &[(yaml::Key, Node)]) -> bool {
        let names: BTreeSet<&str> = entries.iter().map(|(k, _)| k.name.as_str()).collect();
        let mut ok = true;
        for (key, body) in entries {
            let Some(needs) = body.get("needs") else { continue };
            let items: Vec<&Node> = match &needs.kind {
                NodeKind::Seq(items) => items.iter().collect(),
                _ => vec![needs],
            };
            let path = format!("stages.{}.needs", key.name);
            for item in items {
                let NodeKind::Str(n) = &item.kind else { continue };
                if n == &key.name {
                    self.push(item.pos, &path, format!("stage `{n}` cannot need itself"));
                    ok = false;
                } else if !names.contains(n.as_str()) {
                    let mut msg = format!("unknown stage `{n}`");
                    if let Some(s) = closest(n, names.iter().copied()) {
                        msg.push_str(&format!("\nhint: did you mean `{s}`?"));
                    }
                    self.push(item.pos, &path, msg);
                    ok = false;
                }
            }
        }
        ok
    }

    /// No cycles, and every `for_each: group` stage reaches exactly one allocation.
    fn check_graph(&mut self, stages_node: &Node, decls: &[StageDecl]) -> bool {
        let mut ok = true;
        if let Some(cycle) = crate::dag::find_cycle(decls) {
            let first = decls.iter().find(|d| d.name == cycle[0]).expect("cycle names a stage");
            let mut shown = cycle.clone();
            shown.push(cycle[0].clone());
            self.push(
                first.pos,
                &format!("stages.{}.needs", first.name),
                format!(
                    "dependency cycle: {}",
                    shown.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" -> ")
                ),
            );
            return false;
        }
        for d in decls {
            if d.for_each == Some(ForEach::Group) {
                match crate::dag::allocation_of(decls, &d.name) {
                    Ok(_) => {}
                    Err(msg) => {
                        let pos = stages_node
                            .get(&d.name)
                            .and_then(|b| b.entry("for_each"))
                            .map(|(k, _)| k.pos)
                            .unwrap_or(d.pos);
                        self.push(pos, &format!("stages.{}.for_each", d.name), msg);
                        ok = false;
                    }
                }
            }
        }
        ok
    }
}

fn show_node(n: &Node) -> String {
    match &n.kind {
        NodeKind::Str(s) => format!("`{s}`"),
        _ => n.type_name().to_string(),
    }
}

fn is_stage_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn join(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{rest}"),
    }
}

pub(crate) fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

pub(crate) fn unknown_key(key: &str, expected: &[&str]) -> String {
    let mut msg = format!("unknown field `{key}`, expected one of {}", quoted(expected));
    if let Some(s) = closest(key, expected.iter().copied()) {
        msg.push_str(&format!("\nhint: did you mean `{s}`?"));
    }
    msg
}

/// The candidate within edit distance 2 of `word`, if any.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates.map(|c| (levenshtein(word, c), c)).filter(|(d, _)| *d <= 2).min().map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Top-level property names of `T`'s JSON schema.
pub(crate) fn schema_properties<T: JsonSchema>() -> Vec<String> {
    let schema = schemars::schema_for!(T);
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn segments(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

fn clean_serde_message(m: &str) -> String {
    m.replace("invalid type: ", "found ").replace("integer `", "`")
}

/// Removes the entry at `segs` from a JSON value; false if there is nothing to remove.
fn remove_path(value: &mut Value, segs: &[String]) -> bool {
    let (last, parents) = segs.split_last().expect("non-empty");
    let mut v = value;
    for s in parents {
        v = match v {
            Value::Object(o) => match o.get_mut(s) {
                Some(x) => x,
                None => return false,
            },
            Value::Array(a) => match s.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(x) => x,
                None => return false,
            },
            _ => return false,
        };
    }
    match v {
        Value::Object(o) => o.remove(last).is_some(),
        Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}
