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

mod cifar10;
mod dataset;
mod folder;
mod idx;
mod npz;
mod sampler;
mod synthetic;
mod transform;

pub use progdiff_kinds::data::*;

pub use dataset::{Dataset, Resident};
pub use sampler::{EpochSampler, sample_indices};
