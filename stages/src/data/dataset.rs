//! [`Dataset`]: an opened `data:` section that turns indices into `[B, C, H, W]` batches.

use std::path::{Path, PathBuf};

use rand::Rng;
use rayon::prelude::*;
use tch::Tensor;

use super::transform::{Pipeline, RawImage};
use super::{Channels, DataConfig, DataError, Resize, cifar10, files, folder, idx, npz, synthetic};

/// A format reader: indexed access to raw images in the source's own size and channels.
pub(crate) trait Source: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// `(C, H, W)` of image 0 (of every image, except in folders of mixed sizes).
    fn shape(&self) -> (usize, usize, usize);
    /// Image `i < len()`, channel-planar.
    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError>;
    /// Label of image `i`, when the source has labels.
    fn label(&self, i: usize) -> Option<i64>;
    /// The file image `i` comes from, for messages.
    fn origin(&self, i: usize) -> PathBuf;
    /// Every file read.
    fn files(&self) -> Vec<PathBuf>;
}

/// An opened dataset: `len()` images of [`Dataset::image_shape`], read and transformed on
/// demand. `Send + Sync`: share one between loader threads.
pub struct Dataset {
    source: Box<dyn Source>,
    len: usize,
    pipeline: Pipeline,
    hflip: bool,
    kind: &'static str,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("kind", &self.kind)
            .field("len", &self.len)
            .field("image_shape", &self.image_shape())
            .field("hflip", &self.hflip)
            .finish()
    }
}

impl Dataset {
    /// Opens `config`, resolving relative paths against `base_dir`.
    pub fn open(config: &DataConfig, base_dir: &Path) -> Result<Dataset, DataError> {
        let t = config.transform();
        let source: Box<dyn Source> = match config {
            DataConfig::Cifar10(d) => {
                Box::new(cifar10::Cifar10::open(&files::resolve(base_dir, &d.path), d.split)?)
            }
            DataConfig::Idx(d) => Box::new(idx::Idx::open(
                &files::resolve(base_dir, &d.images),
                d.labels.as_ref().map(|l| files::resolve(base_dir, l)).as_deref(),
            )?),
            DataConfig::Npz(d) => Box::new(npz::Npz::open(
                &files::expand(&files::resolve(base_dir, &d.path), "npz")?,
                &d.key,
                &d.labels_key,
            )?),
            DataConfig::Folder(d) => {
                Box::new(folder::Folder::open(&files::resolve(base_dir, &d.path))?)
            }
            DataConfig::Synthetic(d) => Box::new(synthetic::Synthetic::new(d)),
        };
        let total = source.len();
        if total == 0 {
            let what = source.files().first().cloned().unwrap_or_default();
            return Err(DataError::NoFiles {
                message: format!(
                    "`{}`: the `{}` dataset holds no image",
                    what.display(),
                    config.kind()
                ),
            });
        }
        let (c, h, w) = source.shape();
        let channels = match t.channels {
            Channels::Keep => c,
            Channels::Gray => 1,
            Channels::Rgb => 3,
        };
        let (height, width, fit) = match t.image_size {
            Some(s) => (s, s, t.resize),
            None => (h, w, Resize::Exact),
        };
        Ok(Dataset {
            len: t.limit.map_or(total, |l| l.min(total)),
            pipeline: Pipeline { channels, height, width, fit },
            hflip: t.hflip,
            kind: config.kind(),
            source,
        })
    }

    /// Number of images (after `limit`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the dataset has no image (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `kind` it was opened from.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// `(C, H, W)` of every image a batch holds, after the transforms.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.pipeline.channels, self.pipeline.height, self.pipeline.width)
    }

    /// Whether batches from [`Dataset::batch`] are randomly flipped (`hflip: true`).
    pub fn hflip(&self) -> bool {
        self.hflip
    }

    /// Whether the source has labels.
    pub fn has_labels(&self) -> bool {
        self.source.label(0).is_some()
    }

    /// Label of image `i` (CIFAR-10 0-9; IDX and npz as stored), or `None` without labels or
    /// past the end.
    pub fn label(&self, i: usize) -> Option<i64> {
        if i < self.len { self.source.label(i) } else { None }
    }

    /// Labels of `indices` as an int64 tensor `[B]`; `None` without labels.
    pub fn labels(&self, indices: &[usize]) -> Result<Option<Tensor>, DataError> {
        self.check(indices)?;
        if !self.has_labels() {
            return Ok(None);
        }
        let v: Option<Vec<i64>> = indices.iter().map(|&i| self.source.label(i)).collect();
        Ok(v.map(|v| Tensor::from_slice(&v)))
    }

    /// The files the dataset reads (empty for `synthetic`), for cache keys.
    pub fn content_files(&self) -> Vec<PathBuf> {
        self.source.files()
    }

    /// Image `i` as a float tensor `[C, H, W]` in `[-1, 1]`, never flipped.
    pub fn get(&self, i: usize) -> Result<Tensor, DataError> {
        let (c, h, w) = self.image_shape();
        self.batch_with_flips(&[i], &[false])?
            .f_view([c as i64, h as i64, w as i64])
            .map_err(tensor_error)
    }

    /// Images `indices` as a float tensor `[B, C, H, W]` in `[-1, 1]` (`x / 127.5 - 1`), each
    /// flipped horizontally with probability 1/2 when `hflip` is on. The flips are drawn from
    /// `rng` in batch order, one `bool` per image, and only when `hflip` is on, so a seeded RNG
    /// gives the same batches on every run.
    pub fn batch<R: Rng + ?Sized>(
        &self,
        indices: &[usize],
        rng: &mut R,
    ) -> Result<Tensor, DataError> {
        let flips: Vec<bool> = if self.hflip {
            indices.iter().map(|_| rng.gen_bool(0.5)).collect()
        } else {
            vec![false; indices.len()]
        };
        self.batch_with_flips(indices, &flips)
    }

    /// Images `indices` without augmentation (evaluation, statistics).
    pub fn batch_unaugmented(&self, indices: &[usize]) -> Result<Tensor, DataError> {
        self.batch_with_flips(indices, &vec![false; indices.len()])
    }

    /// Images `indices`, image `k` flipped when `flips[k]` (whatever `hflip` says).
    ///
    /// # Panics
    /// When `flips.len() != indices.len()`.
    pub fn batch_with_flips(&self, indices: &[usize], flips: &[bool]) -> Result<Tensor, DataError> {
        assert_eq!(indices.len(), flips.len(), "one flip per index");
        self.check(indices)?;
        let per = self.pipeline.image_len();
        let mut buf = vec![0f32; indices.len() * per];
        // Decode in parallel; report the error of the first failing image in batch order.
        let results: Vec<Result<(), DataError>> = buf
            .par_chunks_mut(per.max(1))
            .zip(indices.par_iter().zip(flips.par_iter()))
            .map(|(out, (&i, &flip))| self.write_image(i, flip, out))
            .collect();
        results.into_iter().collect::<Result<(), _>>()?;
        let (c, h, w) = self.image_shape();
        let shape = [indices.len() as i64, c as i64, h as i64, w as i64];
        Tensor::f_from_slice(&buf).and_then(|t| t.f_view(shape)).map_err(tensor_error)
    }

    fn write_image(&self, i: usize, flip: bool, out: &mut [f32]) -> Result<(), DataError> {
        let raw = self.source.read(i)?;
        self.pipeline.apply(&raw, flip, out).map_err(|m| {
            let (_, h, w) = self.image_shape();
            let hint = if self.pipeline.fit == Resize::Exact {
                "set `image_size` with `resize: pad` or `resize: bilinear`"
            } else {
                "use `resize: pad` or `resize: bilinear`"
            };
            DataError::unsupported(
                &self.source.origin(i),
                format!("image {i} is {}x{}, expected {h}x{w}", m.height, m.width),
            )
            .with_hint(hint)
        })
    }

    fn check(&self, indices: &[usize]) -> Result<(), DataError> {
        match indices.iter().find(|&&i| i >= self.len) {
            Some(&index) => Err(DataError::Index { index, len: self.len }),
            None => Ok(()),
        }
    }
}

fn tensor_error(e: tch::TchError) -> DataError {
    DataError::Tensor(e.to_string())
}
