//! `import`: an external checkpoint as a stage's model — parameters and inputs (the work is
//! `progdiff_stages::import`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{DiffusionConfig, ModelConfig};
use crate::context::FieldError;
use crate::kind::{Locations, Sections, StageKind};

/// The stage kind in manifests.
pub const KIND: &str = "import";

/// Implementation version: bump whenever the outputs for the same inputs would change (2: the
/// checkpoints' `imported_from` is the source's content digest, not its path as written).
pub const VERSION: u32 = 2;

/// The output holding the model weights (the name the `train` stage uses too).
pub const MODEL_FILE: &str = "model.safetensors";

/// The output holding the EMA weights (the name the `train` stage uses too).
pub const EMA_FILE: &str = "ema.safetensors";

/// State key holding the imported file's blake3 content digest (its path is not part of the
/// key, so it is not written into the outputs either).
pub const IMPORTED_FROM: &str = "imported_from";

/// Parameters of an `import` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// The checkpoint: a safetensors file (relative to the manifest) holding an improved-diffusion
    /// state dict under its own parameter names, for the architecture of the manifest's `model:`
    /// section. Its content digest is part of the cache key.
    pub path: String,
    /// Optional EMA weights in the same form; when absent, the `ema.safetensors` output is the
    /// weights of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_path: Option<String>,
}

impl ImportParams {
    /// Checks values serde cannot: non-empty paths, and not a PyTorch pickle.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        for (field, value) in self.fields() {
            let lower = value.to_ascii_lowercase();
            if value.trim().is_empty() {
                errs.push(FieldError::at(field, "must not be empty"));
            } else if [".pt", ".pth", ".ckpt", ".bin"].iter().any(|e| lower.ends_with(e)) {
                errs.push(FieldError::at(
                    field,
                    format!(
                        "must be a safetensors file, got the PyTorch file `{value}`\nhint: convert \
                         it with `safetensors.torch.save_file({{k: v.contiguous() for k, v in \
                         torch.load(path, map_location=\"cpu\").items()}}, out)`"
                    ),
                ));
            }
        }
        errs
    }

    /// The files the stage reads, relative to the manifest (for the cache key's digests).
    pub fn inputs(&self) -> Vec<&str> {
        self.fields().into_iter().map(|(_, v)| v).collect()
    }

    fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![("path", self.path.as_str())];
        out.extend(self.ema_path.as_deref().map(|e| ("ema_path", e)));
        out
    }
}

/// What an `import` stage reads: the architecture, and the files (by content).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportInputs {
    /// `model:` (the checkpoint's architecture).
    pub model: ModelConfig,
    /// The files: `path` and, when given, `ema_path`.
    pub at: Locations,
}

/// The `import` kind.
pub struct Import;

impl StageKind for Import {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    // The file names are not read: their contents are (digests in the key).
    const NOT_READ: &'static [&'static str] = &["seed", "data", "diffusion", "stage.path"];
    type Params = ImportParams;
    type Inputs = ImportInputs;

    fn validate(params: &ImportParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &ImportParams, m: &Sections<'_>) -> ImportInputs {
        let mut at = m.locations();
        at.files =
            params.fields().into_iter().map(|(k, v)| (k.to_string(), m.resolve(v))).collect();
        ImportInputs { model: m.model.clone(), at }
    }
}
