//! UNet checkpoints: safetensors files that rebuild their own (possibly pruned) architecture.
//!
//! A checkpoint file is one plain state dict under improved-diffusion's parameter names, so
//! PyTorch reads it with `UNetModel.load_state_dict(safetensors.torch.load_file(path))` (after
//! building a model of matching widths). Its `__metadata__` holds:
//!
//! - `format`: [`FORMAT`] (bump when the layout of this file changes);
//! - `arch`: the [`UNetArch`] as JSON, so [`Checkpoint::load`] knows the widths of a pruned model;
//! - `state.<key>`: training state as strings (`state.step`, `state.ema_rate`, ...), free-form:
//!   the stage that writes a checkpoint owns its keys ([`STEP`], [`EMA_RATE`] are the common ones).
//!
//! EMA weights are a second checkpoint file with the same `arch` and a `state.ema_rate` entry,
//! not extra keys in the same file: each file stays a state dict PyTorch loads as is, like
//! improved-diffusion's own `model*.pt` / `ema_0.9999_*.pt` pair.
//!
//! [`Checkpoint::import`] reads a safetensors file converted from an improved-diffusion
//! PyTorch state dict (same keys, any float dtype, no progdiff metadata), taking the
//! architecture from the `model:` flags.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::config::ModelConfig;
use crate::unet::{ArchError, UNet, UNetArch};

/// The value of the `format` metadata entry this module writes and reads.
pub const FORMAT: &str = "progdiff-unet/1";

/// State key of the training step a checkpoint was taken at.
pub const STEP: &str = "step";

/// State key of the EMA rate, present in an EMA checkpoint.
pub const EMA_RATE: &str = "ema_rate";

const STATE_PREFIX: &str = "state.";

/// Why a checkpoint could not be read, checked or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("cannot access checkpoint `{path}`")]
    Io {
        /// The checkpoint path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("`{path}` is not a readable safetensors file: {message}")]
    Format {
        /// The checkpoint path.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The file has no progdiff metadata, or another format version.
    #[error(
        "`{path}` is not a `{FORMAT}` checkpoint (its `format` is `{found}`)\nhint: bring an \
         improved-diffusion state dict in with `Checkpoint::import` and the `model:` flags"
    )]
    NotProgdiff {
        /// The checkpoint path.
        path: PathBuf,
        /// The `format` entry found, or `none`.
        found: String,
    },
    /// The `arch` metadata does not parse.
    #[error("`{path}` has unreadable `arch` metadata")]
    ArchJson {
        /// The checkpoint path.
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },
    /// The architecture is not a valid IDDPM UNet.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// Tensor names or shapes differ from what the architecture needs.
    #[error("weights do not match the architecture: {}", describe_mismatch(.missing, .unexpected, .wrong_shape))]
    Mismatch {
        /// Parameters the architecture needs that the weights lack.
        missing: Vec<String>,
        /// Weights the architecture has no parameter for.
        unexpected: Vec<String>,
        /// `(name, expected shape, found shape)`.
        wrong_shape: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
    /// libtorch failed (e.g. a dtype safetensors cannot store).
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    wrong: &[(String, Vec<i64>, Vec<i64>)],
) -> String {
    const SHOW: usize = 5;
    let list = |items: Vec<String>| {
        let n = items.len();
        let mut s = items.into_iter().take(SHOW).collect::<Vec<_>>().join(", ");
        if n > SHOW {
            s.push_str(&format!(" and {} more", n - SHOW));
        }
        s
    };
    let names = |v: &[String]| list(v.iter().map(|n| format!("`{n}`")).collect());
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing ({})", missing.len(), names(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected ({})", unexpected.len(), names(unexpected)));
    }
    if !wrong.is_empty() {
        let shapes = wrong
            .iter()
            .map(|(n, want, got)| format!("`{n}` expected {want:?}, got {got:?}"))
            .collect();
        parts.push(format!("{} of wrong shape ({})", wrong.len(), list(shapes)));
    }
    parts.join("; ")
}

/// A UNet's architecture, weights and training state.
#[derive(Debug)]
pub struct Checkpoint {
    /// The architecture the weights belong to.
    pub arch: UNetArch,
    /// Training state (`step`, `ema_rate`, ...), stored as `state.<key>` metadata.
    pub state: BTreeMap<String, String>,
    /// Weights by state-dict name, on the CPU.
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Checks `tensors` against `arch` (exact names and shapes) and wraps them; tensors are moved
    /// to the CPU. This is the import path for weights that come from elsewhere.
    pub fn from_tensors(
        arch: UNetArch,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        state: BTreeMap<String, String>,
    ) -> Result<Checkpoint, CheckpointError> {
        arch.validate()?;
        let tensors: BTreeMap<String, Tensor> =
            tensors.into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu))).collect();
        check_shapes(&arch, tensors.iter().map(|(n, t)| (n.as_str(), t.size())))?;
        Ok(Checkpoint { arch, state, tensors })
    }

    /// A snapshot of the variables in `vs` (a model built from `arch`), copied to the CPU.
    pub fn from_var_store(
        arch: &UNetArch,
        vs: &VarStore,
        state: BTreeMap<String, String>,
    ) -> Result<Checkpoint, CheckpointError> {
        let tensors = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy()));
        Checkpoint::from_tensors(arch.clone(), tensors, state)
    }

    /// Writes the checkpoint as safetensors with its metadata, atomically (a temporary file in the
    /// same directory, then a rename).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), FORMAT.to_string());
        let arch = serde_json::to_string(&self.arch).expect("UNetArch serialises to JSON");
        metadata.insert("arch".to_string(), arch);
        for (k, v) in &self.state {
            metadata.insert(format!("{STATE_PREFIX}{k}"), v.clone());
        }
        let views = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.as_str(), Bytes::of(t)?)))
            .collect::<Result<Vec<_>, CheckpointError>>()?;

        let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
        let written = std::fs::write(&tmp, serialize_sorted(&metadata, &views))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io);
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Reads a checkpoint written by [`Checkpoint::save`]; its `arch` metadata gives the
    /// architecture, and the weights are checked against it.
    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let raw = read_file(path)?;
        let metadata = raw.metadata;
        let found = metadata.get("format").cloned().unwrap_or_else(|| "none".to_string());
        if found != FORMAT {
            return Err(CheckpointError::NotProgdiff { path: path.to_path_buf(), found });
        }
        let arch_json = metadata.get("arch").map(String::as_str).unwrap_or("");
        let arch: UNetArch = serde_json::from_str(arch_json)
            .map_err(|source| CheckpointError::ArchJson { path: path.to_path_buf(), source })?;
        let state = metadata
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(STATE_PREFIX)?.to_string(), v.clone())))
            .collect();
        Checkpoint::from_tensors(arch, raw.tensors, state)
    }

    /// Reads a safetensors state dict converted from improved-diffusion (same keys; float32,
    /// float16, bfloat16 or float64), with the unpruned architecture of `config`. Metadata in the
    /// file is ignored; the state is empty.
    pub fn import(path: &Path, config: &ModelConfig) -> Result<Checkpoint, CheckpointError> {
        let arch = UNetArch::from_config(config)?;
        let raw = read_file(path)?;
        Checkpoint::from_tensors(arch, raw.tensors, BTreeMap::new())
    }

    /// Copies the weights into the variables of `vs`, which must hold exactly this architecture's
    /// parameters (any device and float kind; values are converted).
    pub fn copy_into(&self, vs: &VarStore) -> Result<(), CheckpointError> {
        let vars = vs.variables();
        check_shapes(&self.arch, vars.iter().map(|(n, t)| (n.as_str(), t.size())))?;
        tch::no_grad(|| {
            for (name, var) in &vars {
                let mut var = var.shallow_clone();
                var.f_copy_(&self.tensors[name])?;
            }
            Ok::<(), tch::TchError>(())
        })?;
        Ok(())
    }

    /// Builds the checkpoint's model under the root of `vs` (normally a fresh store) and loads
    /// the weights into it.
    pub fn build(&self, vs: &VarStore) -> Result<UNet, CheckpointError> {
        let net = UNet::new(&vs.root(), &self.arch)?;
        self.copy_into(vs)?;
        Ok(net)
    }
}

/// Compares `(name, shape)` pairs with `arch.param_shapes()`.
fn check_shapes<'a>(
    arch: &UNetArch,
    found: impl Iterator<Item = (&'a str, Vec<i64>)>,
) -> Result<(), CheckpointError> {
    let mut want = arch.param_shapes();
    let (mut unexpected, mut wrong_shape) = (Vec::new(), Vec::new());
    for (name, shape) in found {
        match want.remove(name) {
            None => unexpected.push(name.to_string()),
            Some(w) if w != shape => wrong_shape.push((name.to_string(), w, shape)),
            Some(_) => {}
        }
    }
    let missing: Vec<String> = want.into_keys().collect();
    if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
        return Ok(());
    }
    unexpected.sort();
    wrong_shape.sort();
    Err(CheckpointError::Mismatch { missing, unexpected, wrong_shape })
}

/// A safetensors file's tensors and metadata.
struct RawFile {
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
}

fn read_file(path: &Path) -> Result<RawFile, CheckpointError> {
    let bytes = std::fs::read(path)
        .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let format = |e: safetensors::SafeTensorError| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("{e:?}"),
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(format)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).map_err(format)?;
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view)?)))
        .collect::<Result<Vec<_>, tch::TchError>>()?;
    Ok(RawFile { tensors, metadata })
}

/// A tensor's bytes, for `safetensors::serialize_to_file`.
/// The safetensors format (8-byte little-endian header length, JSON header, data), written with
/// the metadata and tensors in sorted order so the same checkpoint always has the same bytes —
/// the cache addresses files by content, and `safetensors::serialize` writes its metadata
/// `HashMap` in a per-process random order.
fn serialize_sorted(metadata: &BTreeMap<String, String>, tensors: &[(&str, Bytes)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings"));
    let mut offset = 0usize;
    for (name, b) in tensors {
        let end = offset + b.data.len();
        header.insert(
            (*name).to_string(),
            serde_json::json!({
                "dtype": serde_json::to_value(b.dtype).expect("dtype serialises"),
                "shape": b.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).expect("JSON");
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, b) in tensors {
        out.extend_from_slice(&b.data);
    }
    out
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Bytes {
    fn of(t: &Tensor) -> Result<Bytes, CheckpointError> {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = Dtype::try_from(t.kind())?;
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        Ok(Bytes { dtype, shape, data })
    }
}

impl View for Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.data).into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
