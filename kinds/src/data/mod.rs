//! The manifest's `data:` section: where training images come from and how they are shaped
//! into `[B, C, H, W]` float batches in `[-1, 1]`.
//!
//! # Formats
//!
//! | `kind` | reads | held in memory |
//! |---|---|---|
//! | `cifar10` | `data_batch_{1..5}.bin` / `test_batch.bin` | yes (180 MB at most) |
//! | `idx` | MNIST-style IDX images (+ labels), raw or gzipped | yes (decompressed) |
//! | `npz` | numpy `.npz` files with a `data` uint8 array | no: positioned reads per image |
//! | `folder` | PNG/JPEG files under a directory, recursively | no: decoded per batch |
//! | `synthetic` | nothing: smooth gradients and blobs from a seed | no: generated per image |
//!
//! ImageNet64 is 15 GB of pixels, so `npz` never loads an array: it reads the zip's central
//! directory, requires the image member to be *stored* (uncompressed, as `np.savez` writes it),
//! parses the `.npy` header, and reads each image with one positioned read (`pread`) at its
//! offset. That is as fast as a memory map for 12 KB records, needs no `unsafe`, and turns a
//! file truncated under a running job into an error instead of a `SIGBUS`.
//!
//! # Transforms (every kind)
//!
//! `x / 127.5 - 1`, then `channels` (`keep`, `gray` by BT.601 luma, `rgb` by repeating a gray
//! plane), then the fit to `image_size` (`pad`: centre on a black canvas, cropping the centre of
//! a larger side; `bilinear`: antialiased resize of the shorter side, then centre crop; `none`:
//! sizes must already match), then an optional random horizontal flip drawn from the caller's
//! RNG so a seeded run is reproducible.
//!
//! # Cache keys
//!
//! The engine keys a stage on the `data:` values it reads plus the content of the files
//! [`DataConfig::content_files`] lists (hashed once per file version by the cache's memo), or,
//! for `synthetic`, on [`DataConfig::generated_fingerprint`]. Listing files reads no pixels.

mod error;
pub mod files;
mod values;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::context::FieldError;

pub use error::DataError;
pub use values::{DataValues, PATH_FIELDS};

/// What to do with the source's channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// As stored: 1 for grayscale sources, 3 for colour (a folder follows its first image).
    #[default]
    Keep,
    /// One channel; colour images become their ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B).
    Gray,
    /// Three channels; a grayscale image is repeated into R, G and B.
    Rgb,
}

/// How images reach `image_size` x `image_size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Centre the image on a black canvas (value -1 after scaling), keeping the centre of a
    /// side that is larger than the target: 28x28 Fashion-MNIST becomes 32x32 with a 2-pixel
    /// border. An odd margin leaves the extra pixel at the bottom/right.
    #[default]
    Pad,
    /// Antialiased bilinear resize (PIL's `BILINEAR`) of the shorter side to the target, then a
    /// centre crop of the longer side.
    Bilinear,
    /// No resizing: every image must already be the target size.
    #[serde(rename = "none")]
    Exact,
}

impl Resize {
    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Resize::Pad => "pad",
            Resize::Bilinear => "bilinear",
            Resize::Exact => "none",
        }
    }
}

/// Which CIFAR-10 files to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `data_batch_1.bin` ... `data_batch_5.bin`: 50,000 images.
    #[default]
    Train,
    /// `test_batch.bin`: 10,000 images.
    Test,
}

/// The transform options every `kind` accepts, gathered from its section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transform {
    /// Channel handling.
    pub channels: Channels,
    /// Target side in pixels; `None` keeps the source's size.
    pub image_size: Option<usize>,
    /// How to reach `image_size` ([`Resize::Pad`] when not given).
    pub resize: Resize,
    /// Random horizontal flips.
    pub hflip: bool,
    /// Use only the first N images.
    pub limit: Option<usize>,
}

/// Declares one `kind`'s section: its own fields followed by the transform options every kind
/// shares (serde's `flatten` would lose `deny_unknown_fields`, so they are spelled into each).
macro_rules! data_kind {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            /// Channels: `keep` the source's (1 for grayscale, 3 for colour), `gray` (BT.601
            /// luma) or `rgb` (a grayscale plane repeated three times).
            #[serde(default)]
            pub channels: Channels,
            /// Side in pixels of the square images the dataset yields (e.g. 32 to pad
            /// Fashion-MNIST's 28x28 as the model expects); unset keeps the source's size.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub image_size: Option<usize>,
            /// How images reach `image_size`: `pad` (centre on black, the default), `bilinear`
            /// (antialiased resize of the shorter side, then centre crop) or `none` (sizes
            /// must already match). Needs `image_size`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub resize: Option<Resize>,
            /// Flip each training image horizontally with probability 1/2 (off by default, as
            /// in IDDPM).
            #[serde(default)]
            pub hflip: bool,
            /// Use only the first N images (in file order), e.g. for quick runs.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub limit: Option<usize>,
        }

        impl $name {
            /// The transform options of this section.
            pub fn transform(&self) -> Transform {
                Transform {
                    channels: self.channels,
                    image_size: self.image_size,
                    resize: self.resize.unwrap_or_default(),
                    hflip: self.hflip,
                    limit: self.limit,
                }
            }

            /// Range checks of the shared options; `generated` kinds take no `resize`.
            fn validate_transform(&self, errs: &mut Vec<FieldError>, generated: bool) {
                if self.image_size == Some(0) {
                    errs.push(FieldError::at("image_size", "must be at least 1, got 0"));
                }
                crate::context::at_most(errs, "image_size", self.image_size.unwrap_or(0), 1024);
                if self.limit == Some(0) {
                    errs.push(FieldError::at("limit", "must be at least 1, got 0"));
                }
                match (self.resize, self.image_size) {
                    (Some(_), _) if generated => errs.push(FieldError::at(
                        "resize",
                        "has no effect on generated images: they are made at `image_size`",
                    )),
                    (Some(r), None) => errs.push(FieldError::at(
                        "resize",
                        format!("`{}` has no effect without `image_size`", r.name()),
                    )),
                    _ => {}
                }
            }
        }
    };
}

data_kind! {
    /// `kind: cifar10`: the CIFAR-10 binary version (`cifar-10-batches-bin`).
    pub struct Cifar10Data {
        /// Directory holding `data_batch_1.bin` ... `data_batch_5.bin` and `test_batch.bin`
        /// (relative paths resolve against the manifest's directory).
        pub path: PathBuf,
        /// `train` (the five data batches, 50,000 images) or `test` (`test_batch.bin`).
        #[serde(default)]
        pub split: Split,
    }
}

data_kind! {
    /// `kind: idx`: MNIST-format IDX files (Fashion-MNIST, MNIST, EMNIST), raw or gzipped.
    pub struct IdxData {
        /// The images file (magic `0x00000803`: N x H x W uint8), e.g.
        /// `train-images-idx3-ubyte.gz`.
        pub images: PathBuf,
        /// The labels file (magic `0x00000801`), e.g. `train-labels-idx1-ubyte.gz`; optional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub labels: Option<PathBuf>,
    }
}

data_kind! {
    /// `kind: npz`: numpy `.npz` archives such as downsampled ImageNet (`data`: N x 12288
    /// uint8, channel-planar 3x64x64; `labels`). The image array must be stored uncompressed
    /// (`np.savez`, not `np.savez_compressed`): it is read in place, never loaded whole.
    pub struct NpzData {
        /// An `.npz` file, a directory (every `.npz` directly inside), or a file-name pattern
        /// with `*`/`?` such as `imagenet64/train_data_batch_*.npz`; files are read in natural
        /// order (`batch_2` before `batch_10`).
        pub path: PathBuf,
        /// Name of the uint8 image array: N x (C*H*W) channel-planar with square images and
        /// C = 3 or 1, N x C x H x W, N x H x W x C (C = 1 or 3; read as N x C x H x W when
        /// both the second and the last size are 1 or 3), or N x H x W.
        #[serde(default = "default_npz_key")]
        pub key: String,
        /// Name of the integer label array, used when every file has it.
        #[serde(default = "default_npz_labels")]
        pub labels_key: String,
    }
}

data_kind! {
    /// `kind: folder`: every PNG and JPEG file under a directory (recursively), in path order.
    pub struct FolderData {
        /// The directory.
        pub path: PathBuf,
    }
}

data_kind! {
    /// `kind: synthetic`: a deterministic toy set of smooth colour gradients with soft blobs,
    /// generated from a seed without files (for tests and smoke runs). Images are RGB at
    /// `image_size` (32 when unset).
    pub struct SyntheticData {
        /// Number of images.
        pub n: usize,
        /// Seed of the generator (independent of the manifest's `seed`).
        #[serde(default)]
        pub seed: u64,
    }
}

fn default_npz_key() -> String {
    "data".into()
}

fn default_npz_labels() -> String {
    "labels".into()
}

/// `data:` — the training images: a `kind` with its own fields plus the shared transform
/// options (`channels`, `image_size`, `resize`, `hflip`, `limit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataConfig {
    /// CIFAR-10 binary batches.
    Cifar10(Cifar10Data),
    /// MNIST-format IDX files.
    Idx(IdxData),
    /// numpy `.npz` archives (downsampled ImageNet).
    Npz(NpzData),
    /// A folder of PNG/JPEG images.
    Folder(FolderData),
    /// Generated toy images.
    Synthetic(SyntheticData),
}

impl DataConfig {
    /// Every `kind` name, for messages and the schema.
    pub const KINDS: &'static [&'static str] = &["cifar10", "idx", "npz", "folder", "synthetic"];

    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            DataConfig::Cifar10(_) => "cifar10",
            DataConfig::Idx(_) => "idx",
            DataConfig::Npz(_) => "npz",
            DataConfig::Folder(_) => "folder",
            DataConfig::Synthetic(_) => "synthetic",
        }
    }

    /// The transform options of the section.
    pub fn transform(&self) -> Transform {
        match self {
            DataConfig::Cifar10(d) => d.transform(),
            DataConfig::Idx(d) => d.transform(),
            DataConfig::Npz(d) => d.transform(),
            DataConfig::Folder(d) => d.transform(),
            DataConfig::Synthetic(d) => d.transform(),
        }
    }

    /// Range checks that serde cannot express. Paths are not checked here (validation must
    /// not depend on the machine); [`DataConfig::open`] reports missing files.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let empty = |p: &Path| p.as_os_str().is_empty();
        match self {
            DataConfig::Cifar10(d) => {
                if empty(&d.path) {
                    errs.push(FieldError::at("path", "must not be empty"));
                }
                d.validate_transform(&mut errs, false);
            }
            DataConfig::Idx(d) => {
                if empty(&d.images) {
                    errs.push(FieldError::at("images", "must not be empty"));
                }
                if d.labels.as_deref().is_some_and(empty) {
                    errs.push(FieldError::at("labels", "must not be empty"));
                }
                d.validate_transform(&mut errs, false);
            }
            DataConfig::Npz(d) => {
                if empty(&d.path) {
                    errs.push(FieldError::at("path", "must not be empty"));
                }
                if d.key.is_empty() {
                    errs.push(FieldError::at("key", "must not be empty"));
                }
                d.validate_transform(&mut errs, false);
            }
            DataConfig::Folder(d) => {
                if empty(&d.path) {
                    errs.push(FieldError::at("path", "must not be empty"));
                }
                d.validate_transform(&mut errs, false);
            }
            DataConfig::Synthetic(d) => {
                if d.n == 0 {
                    errs.push(FieldError::at("n", "must be at least 1, got 0"));
                }
                crate::context::at_most(&mut errs, "n", d.n, 100_000_000);
                d.validate_transform(&mut errs, true);
            }
        }
        errs
    }

    /// The files the dataset reads, resolved against `base_dir` (the manifest's directory),
    /// for the cache to hash. Lists directories and expands patterns but reads no file's
    /// content; empty for `synthetic` (see [`DataConfig::generated_fingerprint`]).
    pub fn content_files(&self, base_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
        match self {
            DataConfig::Cifar10(d) => {
                Ok(cifar10_files(&files::resolve(base_dir, &d.path), d.split))
            }
            DataConfig::Idx(d) => {
                let mut v = vec![files::resolve(base_dir, &d.images)];
                v.extend(d.labels.as_ref().map(|l| files::resolve(base_dir, l)));
                Ok(v)
            }
            DataConfig::Npz(d) => files::expand(&files::resolve(base_dir, &d.path), "npz"),
            DataConfig::Folder(d) => folder_files(&files::resolve(base_dir, &d.path)),
            DataConfig::Synthetic(_) => Ok(Vec::new()),
        }
    }

    /// For `synthetic`, which reads no file: a canonical description of the generator version
    /// and its parameters, to stand in for a content digest. `None` for file-backed kinds.
    pub fn generated_fingerprint(&self) -> Option<String> {
        match self {
            DataConfig::Synthetic(d) => Some(synthetic_fingerprint(d)),
            _ => None,
        }
    }
}

/// The CIFAR-10 batch files of `split` in `dir`.
pub fn cifar10_files(dir: &Path, split: Split) -> Vec<PathBuf> {
    match split {
        Split::Train => (1..=5).map(|k| dir.join(format!("data_batch_{k}.bin"))).collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    }
}

/// File extensions a `folder` dataset reads (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Every image file under `dir`, in path order; an error when there is none.
pub fn folder_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let found = files::walk(dir, IMAGE_EXTENSIONS)?;
    if found.is_empty() {
        return Err(DataError::NoFiles {
            message: format!(
                "`{}`: no `.png`, `.jpg` or `.jpeg` file under this folder",
                dir.display()
            ),
        });
    }
    Ok(found)
}

/// Version of the `synthetic` generator: bump when its images change.
pub const SYNTHETIC_VERSION: u32 = 1;

/// Image side of `synthetic` data when `image_size` is unset.
pub const SYNTHETIC_DEFAULT_SIZE: usize = 32;

/// The stand-in for a content digest of `synthetic` data: generator version and parameters.
pub fn synthetic_fingerprint(d: &SyntheticData) -> String {
    format!(
        "synthetic/v{SYNTHETIC_VERSION} n={} image_size={} seed={}",
        d.n,
        d.image_size.unwrap_or(SYNTHETIC_DEFAULT_SIZE),
        d.seed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DataConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn kinds_list_matches_the_enum() {
        let names: Vec<&str> = [
            r#"{"kind":"cifar10","path":"x"}"#,
            r#"{"kind":"idx","images":"x"}"#,
            r#"{"kind":"npz","path":"x"}"#,
            r#"{"kind":"folder","path":"x"}"#,
            r#"{"kind":"synthetic","n":1}"#,
        ]
        .iter()
        .map(|j| parse(j).unwrap().kind())
        .collect();
        assert_eq!(names, DataConfig::KINDS);
    }

    #[test]
    fn unknown_keys_are_rejected_per_kind() {
        let e = parse(r#"{"kind":"cifar10","path":"x","colour":"rgb"}"#).unwrap_err().to_string();
        assert!(
            e.starts_with("unknown field `colour`, expected one of `path`, `split`, `channels`"),
            "{e}"
        );
        // `split` belongs to cifar10 only.
        let e = parse(r#"{"kind":"folder","path":"x","split":"test"}"#).unwrap_err().to_string();
        assert!(e.starts_with("unknown field `split`, expected one of `path`, `channels`"), "{e}");
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = parse(r#"{"kind":"npz","path":"a.npz"}"#).unwrap();
        let DataConfig::Npz(n) = &c else { panic!() };
        assert_eq!((n.key.as_str(), n.labels_key.as_str()), ("data", "labels"));
        let t = c.transform();
        assert_eq!(
            t,
            Transform {
                channels: Channels::Keep,
                image_size: None,
                resize: Resize::Pad,
                hflip: false,
                limit: None
            }
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"npz","path":"a.npz","key":"data","labels_key":"labels","channels":"keep","hflip":false}"#
        );
        assert_eq!(parse(&json).unwrap(), c);
    }

    #[test]
    fn validate_reports_ranges() {
        let c = parse(r#"{"kind":"idx","images":"x","image_size":0,"limit":0}"#).unwrap();
        let paths: Vec<_> = c.validate().into_iter().map(|e| e.path.join(".")).collect();
        assert_eq!(paths, ["image_size", "limit"]);
        let c = parse(r#"{"kind":"folder","path":"x","resize":"bilinear"}"#).unwrap();
        assert_eq!(c.validate()[0].message, "`bilinear` has no effect without `image_size`");
        let c = parse(r#"{"kind":"synthetic","n":0,"resize":"pad"}"#).unwrap();
        let paths: Vec<_> = c.validate().into_iter().map(|e| e.path.join(".")).collect();
        assert_eq!(paths, ["n", "resize"]);
    }
}
