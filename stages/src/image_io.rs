//! Writing 8-bit images as PNG: one grid for a quick look ([`write_png_grid`]) and one file per
//! image for folder-based metrics such as FID ([`write_pngs`]).
//!
//! Images are uint8 `[N, C, H, W]` tensors (what [`crate::diffusion::to_uint8_images`] gives),
//! with C = 1 (grayscale PNG) or 3 (RGB PNG). Files are written atomically: a temporary file in
//! the same directory, then a rename.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

/// Pixels of black border around and between the cells of a grid (torchvision's `make_grid`
/// default).
pub const GRID_PADDING: usize = 2;

/// Why images could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a uint8 `[N, 1 or 3, H, W]` tensor.
    #[error("expected uint8 images of shape [N, 1 or 3, H, W], got {kind:?} of shape {shape:?}")]
    Shape {
        /// The tensor's shape.
        shape: Vec<i64>,
        /// The tensor's kind.
        kind: Kind,
    },
    /// A grid with zero columns.
    #[error("a grid needs at least one column")]
    NoColumns,
    /// The file could not be created, written or renamed.
    #[error("cannot write `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("cannot encode `{}` as PNG", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: png::EncodingError,
    },
}

/// Checked `[N, C, H, W]` dimensions of uint8 images.
fn dims(images: &Tensor) -> Result<[usize; 4], ImageError> {
    let shape = images.size();
    match shape[..] {
        [n, c @ (1 | 3), h, w] if images.kind() == Kind::Uint8 => {
            Ok([n as usize, c as usize, h as usize, w as usize])
        }
        _ => Err(ImageError::Shape { shape, kind: images.kind() }),
    }
}

/// `[H, W, C]` interleaved bytes of `image` (`[C, H, W]` uint8).
fn interleaved(image: &Tensor) -> Vec<u8> {
    let hwc = image.permute([1, 2, 0]).contiguous().to_device(Device::Cpu); // [H, W, C]
    Vec::<u8>::try_from(hwc.flatten(0, -1)).expect("uint8 tensor to bytes")
}

/// Writes `images` as one PNG: a grid of `columns` cells per row (rows as needed, filled left
/// to right, top to bottom), [`GRID_PADDING`] black pixels around and between cells; cells past
/// the last image stay black. 1-channel images give a grayscale PNG, 3-channel an RGB one.
///
/// # Shapes
/// `images`: uint8 `[N, C, H, W]`, C = 1 or 3, N >= 0.
pub fn write_png_grid(images: &Tensor, path: &Path, columns: usize) -> Result<(), ImageError> {
    let [n, c, h, w] = dims(images)?;
    if columns == 0 {
        return Err(ImageError::NoColumns);
    }
    let cols = columns.min(n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let p = GRID_PADDING;
    let (width, height) = (cols * (w + p) + p, rows * (h + p) + p);
    let mut pixels = vec![0u8; width * height * c];
    for i in 0..n {
        let cell = interleaved(&images.get(i as i64)); // [h, w, c]
        let (x0, y0) = (p + (i % cols) * (w + p), p + (i / cols) * (h + p));
        for y in 0..h {
            let dst = ((y0 + y) * width + x0) * c;
            pixels[dst..dst + w * c].copy_from_slice(&cell[y * w * c..(y + 1) * w * c]);
        }
    }
    write_png(path, &pixels, width, height, c)
}

/// Writes each image of `images` to its own PNG in `dir` (created if missing), named by its
/// index with at least six digits: `000000.png`, `000001.png`, ...; returns the paths.
///
/// # Shapes
/// `images`: uint8 `[N, C, H, W]`, C = 1 or 3.
pub fn write_pngs(images: &Tensor, dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    write_pngs_from(images, dir, 0)
}

/// [`write_pngs`] for a batch whose first image has index `first` (files `first..first + N`),
/// so batches of a run can be written as they come.
pub fn write_pngs_from(
    images: &Tensor,
    dir: &Path,
    first: usize,
) -> Result<Vec<PathBuf>, ImageError> {
    let [n, c, h, w] = dims(images)?;
    std::fs::create_dir_all(dir)
        .map_err(|source| ImageError::Io { path: dir.to_path_buf(), source })?;
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{:06}.png", first + i));
            write_png(&path, &interleaved(&images.get(i as i64)), w, h, c)?;
            Ok(path)
        })
        .collect()
}

/// Encodes `pixels` (`[height, width, channels]` interleaved) as an 8-bit PNG at `path`,
/// atomically.
fn write_png(
    path: &Path,
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> Result<(), ImageError> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = encode(&tmp, pixels, width, height, channels).and_then(|()| {
        std::fs::rename(&tmp, path)
            .map_err(|source| ImageError::Io { path: path.to_path_buf(), source })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn encode(
    path: &Path,
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> Result<(), ImageError> {
    let enc = |source| ImageError::Encode { path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
    encoder.set_color(if channels == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(enc)?;
    writer.write_image_data(pixels).map_err(enc)?;
    writer.finish().map_err(enc)?;
    std::fs::write(path, bytes)
        .map_err(|source| ImageError::Io { path: path.to_path_buf(), source })
}
