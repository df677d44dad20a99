//! The `import` stage: brings an external checkpoint in (the released IDDPM CIFAR-10 model, say)
//! so base training can be skipped.
//!
//! The file is a safetensors state dict with improved-diffusion's parameter names, converted from
//! the PyTorch `.pt` file with a few lines of Python (`pip install torch safetensors`):
//!
//! ```python
//! import torch
//! from safetensors.torch import save_file
//!
//! state = torch.load("cifar10_uncond_50M_500K.pt", map_location="cpu")
//! save_file({k: v.contiguous() for k, v in state.items()}, "cifar10_uncond_50M_500K.safetensors")
//! ```
//!
//! The manifest's `model:` section must describe the checkpoint's architecture, i.e. the flags
//! it was trained with. For IDDPM's CIFAR-10 models (`--num_channels 128 --num_res_blocks 3
//! --learn_sigma True --dropout 0.3`, `--diffusion_steps 4000 --noise_schedule cosine`):
//!
//! ```yaml
//! model: { image_size: 32, in_channels: 3, channels: 128, channel_mult: [1, 2, 2, 2],
//!          res_blocks: 3, attention_resolutions: [16, 8], heads: 4, dropout: 0.3,
//!          learn_sigma: true, use_scale_shift_norm: true }
//! diffusion: { steps: 4000, schedule: cosine, sample_steps: "100" }
//! stages:
//!   base: { kind: import, path: checkpoints/cifar10_uncond_50M_500K.safetensors }
//! ```
//!
//! Every tensor name and shape is checked against that architecture before anything is
//! written; the error names the first tensor that differs, with its expected and found shapes.
//!
//! # Outputs
//!
//! The same files the `train` stage writes, so downstream stages take either:
//! [`MODEL_FILE`] (the weights of `path`) and [`EMA_FILE`] (the weights of `ema_path`; **when no
//! `ema_path` is given, the EMA output holds the same weights as the model output**, so stages
//! that prefer EMA weights use the imported ones). Both are progdiff checkpoints
//! ([`crate::checkpoint`]) in float32, whatever float type the source used, with
//! `state.imported_from` naming the source as written in the manifest.

pub use progdiff_kinds::import::*;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::Kind;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::ModelConfig;
use crate::context::{FieldError, StageContext};
use crate::unet::{ArchError, UNetArch};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The parameters failed [`ImportParams::validate`].
    #[error("invalid `import` parameters: {}", describe(.0))]
    InvalidParams(Vec<FieldError>),
    /// The `model:` section is not a valid IDDPM UNet.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// The file's safetensors header could not be read.
    #[error("`{}` is not a readable safetensors file: {message}", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file's tensors differ from the architecture of `model:`.
    #[error(
        "`{}` does not match the manifest's `model:` section: tensor `{name}` {}{}\nhint: set \
         `model:` to the flags the checkpoint was trained with (improved-diffusion's \
         `--num_channels`, `--num_res_blocks`, `--attention_resolutions`, `--learn_sigma`, ...)",
        path.display(),
        describe_shapes(.expected.as_deref(), .found.as_deref()),
        if *.others > 0 { format!(" ({others} more tensors differ)") } else { String::new() }
    )]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The first tensor that differs, in module order.
        name: String,
        /// Its shape in the architecture, `None` when the architecture has no such tensor.
        expected: Option<Vec<i64>>,
        /// Its shape in the file, `None` when the file lacks it.
        found: Option<Vec<i64>>,
        /// How many other tensors differ.
        others: usize,
    },
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

fn describe(errors: &[FieldError]) -> String {
    let parts: Vec<String> =
        errors.iter().map(|e| format!("`{}` {}", e.path.join("."), e.message)).collect();
    parts.join("; ")
}

fn describe_shapes(expected: Option<&[i64]>, found: Option<&[i64]>) -> String {
    match (expected, found) {
        (Some(e), Some(f)) => format!("expected shape {e:?}, found {f:?}"),
        (Some(e), None) => format!("expected shape {e:?}, not in the file"),
        (None, Some(f)) => format!("found shape {f:?}, not part of the architecture"),
        (None, None) => "differs".to_string(),
    }
}

/// Runs an `import` stage instance: reads the files `path` (and `ema_path`) of the inputs,
/// checks them against `model`, and writes [`MODEL_FILE`] and [`EMA_FILE`] into `ctx.out_dir`.
pub fn run(ctx: &StageContext, inputs: &ImportInputs) -> anyhow::Result<()> {
    ctx.cancel.check()?;
    let path = inputs.at.file("path")?;
    let weights = import_file(path, &content_label(path)?, &inputs.model)?;
    tracing::info!(stage = %ctx.id, path = %path.display(), tensors = weights.tensors.len(), "imported");
    weights.save(&ctx.out_dir.join(MODEL_FILE))?;
    match inputs.at.files.get("ema_path") {
        Some(ema) => {
            ctx.cancel.check()?;
            let ema_weights = import_file(ema, &content_label(ema)?, &inputs.model)?;
            tracing::info!(stage = %ctx.id, path = %ema.display(), "imported EMA weights");
            ema_weights.save(&ctx.out_dir.join(EMA_FILE))?;
        }
        None => weights.save(&ctx.out_dir.join(EMA_FILE))?,
    }
    Ok(())
}

/// `blake3:<hex>` of a file's content: what the checkpoints record as their source (the key
/// holds the content, not the name).
pub fn content_label(path: &Path) -> anyhow::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).map_err(|e| anyhow::anyhow!("reading `{}`: {e}", path.display()))?;
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

/// Reads an improved-diffusion state dict in safetensors form for the architecture of `model`,
/// as a float32 checkpoint whose state names `label` as its source. Errors name the first
/// tensor that does not match.
pub fn import_file(
    path: &Path,
    label: &str,
    model: &ModelConfig,
) -> Result<Checkpoint, ImportError> {
    let arch = UNetArch::from_config(model)?;
    check_against(path, &arch)?;
    let mut ckpt = Checkpoint::import(path, model)?;
    ckpt.tensors = std::mem::take(&mut ckpt.tensors)
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(Kind::Float)))
        .collect();
    ckpt.state.insert(IMPORTED_FROM.to_string(), label.to_string());
    Ok(ckpt)
}

/// Compares the names and shapes in `path`'s header with `arch`, reading only the header.
fn check_against(path: &Path, arch: &UNetArch) -> Result<(), ImportError> {
    let found = header_shapes(path)?;
    let expected = arch.param_shapes();
    let mut names: Vec<&String> = expected.keys().chain(found.keys()).collect();
    names.sort_by_cached_key(|n| natural_key(n));
    names.dedup();
    let mut differing = names.into_iter().filter_map(|name| {
        let (e, f) = (expected.get(name), found.get(name));
        (e != f).then(|| (name.clone(), e.cloned(), f.cloned()))
    });
    match differing.next() {
        None => Ok(()),
        Some((name, expected, found)) => Err(ImportError::Mismatch {
            path: path.to_path_buf(),
            name,
            expected,
            found,
            others: differing.count(),
        }),
    }
}

/// `input_blocks.10.0.weight` -> text and numbers, so that `input_blocks.2` sorts before
/// `input_blocks.10` (module order within each part of the model).
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, part.to_string()),
        })
        .collect()
}

/// The tensor names and shapes of a safetensors file, from its header alone.
fn header_shapes(path: &Path) -> Result<BTreeMap<String, Vec<i64>>, ImportError> {
    let bad = |message: String| ImportError::Header { path: path.to_path_buf(), message };
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("no header length ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > file_len.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(format!("header length {len} does not fit the file of {file_len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("truncated header ({e})")))?;

    #[derive(Deserialize)]
    struct Entry {
        shape: Vec<i64>,
    }
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON ({e})")))?;
    entries.remove("__metadata__");
    entries
        .into_iter()
        .map(|(name, v)| {
            let entry: Entry = serde_json::from_value(v)
                .map_err(|e| bad(format!("entry `{name}` has no shape ({e})")))?;
            Ok((name, entry.shape))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_module_order() {
        let mut names =
            vec!["input_blocks.10.0.weight", "input_blocks.2.0.weight", "input_blocks.2.0.bias"];
        names.sort_by_cached_key(|n| natural_key(n));
        assert_eq!(
            names,
            ["input_blocks.2.0.bias", "input_blocks.2.0.weight", "input_blocks.10.0.weight"]
        );
    }

    #[test]
    fn params_reject_pickles_and_empty_paths() {
        let p = ImportParams { path: "model.pt".into(), ema_path: Some(" ".into()) };
        let errs = p.validate();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].path, ["path"]);
        assert!(errs[0].message.starts_with("must be a safetensors file, got the PyTorch file"));
        assert_eq!(errs[1], FieldError::at("ema_path", "must not be empty"));
        let ok = ImportParams { path: "m.safetensors".into(), ema_path: None };
        assert!(ok.validate().is_empty());
        assert_eq!(ok.inputs(), ["m.safetensors"]);
    }

    #[test]
    fn params_deny_unknown_fields() {
        let err = serde_json::from_str::<ImportParams>(r#"{"path": "a", "emapath": "b"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown field `emapath`, expected `path` or `ema_path`"), "{err}");
    }
}
