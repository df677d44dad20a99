//! [`Dataset`]: an opened `data:` section that turns indices into `[B, C, H, W]` batches.

use std::path::{Path, PathBuf};

use rand::Rng;
use rayon::prelude::*;
use tch::{Device, Tensor};

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

    /// The whole dataset as one tensor on `device`, when it takes at most `max_bytes` there:
    /// the raw uint8 pixels when the transforms only scale them (same channels and size), else
    /// the transformed float32 images. Its [`Resident::batch`] gives exactly the tensors of
    /// [`Dataset::batch_with_flips`], without decoding or copying anything per batch.
    pub fn resident(
        &self,
        device: Device,
        max_bytes: usize,
    ) -> Result<Option<Resident>, DataError> {
        let (c, h, w) = self.image_shape();
        let per = self.pipeline.image_len();
        let raw_fits = self.len * per <= max_bytes;
        let first = self.source.read(0)?;
        let plain = (first.channels, first.height, first.width) == (c, h, w);
        if plain && raw_fits {
            let mut buf = vec![0u8; self.len * per];
            let results: Vec<Result<bool, DataError>> = buf
                .par_chunks_mut(per)
                .enumerate()
                .map(|(i, out)| {
                    let raw = self.source.read(i)?;
                    let same = (raw.channels, raw.height, raw.width) == (c, h, w);
                    if same {
                        out.copy_from_slice(&raw.pixels);
                    }
                    Ok(same)
                })
                .collect();
            if results.into_iter().collect::<Result<Vec<bool>, _>>()?.into_iter().all(|b| b) {
                let shape = [self.len as i64, c as i64, h as i64, w as i64];
                let t = Tensor::f_from_slice(&buf)
                    .and_then(|t| t.f_view(shape))
                    .map_err(tensor_error)?;
                return Ok(Some(Resident { images: t.to_device(device), scaled: false }));
            }
        }
        if self.len * per * 4 > max_bytes {
            return Ok(None);
        }
        let all: Vec<usize> = (0..self.len).collect();
        let parts = all
            .chunks(4096)
            .map(|chunk| self.batch_unaugmented(chunk).map(|t| t.to_device(device)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Resident { images: Tensor::cat(&parts, 0), scaled: true }))
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

/// A whole dataset on a device ([`Dataset::resident`]).
#[derive(Debug)]
pub struct Resident {
    /// `[N, C, H, W]`: uint8 pixels, or float32 in `[-1, 1]` when `scaled`.
    images: Tensor,
    scaled: bool,
}

impl Resident {
    /// Images `indices` (int64 `[B]` on the resident device), image `k` flipped horizontally
    /// where `flips[k]` (bool `[B]`): float32 `[B, C, H, W]` in `[-1, 1]`, the values of
    /// [`Dataset::batch_with_flips`] (`x / 127.5 - 1` in float32, then the flip).
    pub fn batch(&self, indices: &Tensor, flips: &Tensor) -> Tensor {
        let x = self.images.index_select(0, indices);
        let x = if self.scaled { x } else { x.to_kind(tch::Kind::Float) / 127.5 - 1.0 };
        let b = indices.size()[0];
        x.flip([3]).where_self(&flips.view([b, 1, 1, 1]), &x)
    }

    /// Bytes it takes on its device.
    pub fn bytes(&self) -> usize {
        self.images.numel() * self.images.kind().elt_size_in_bytes()
    }
}

fn tensor_error(e: tch::TchError) -> DataError {
    DataError::Tensor(e.to_string())
}
