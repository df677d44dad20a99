//! A folder of PNG/JPEG images, searched recursively and read in path order (natural order,
//! so `img_2.png` comes before `img_10.png`). Images are decoded when a batch asks for them.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use image::DynamicImage;

use super::DataError;
use super::dataset::Source;
use super::folder_files as files;
use super::transform::RawImage;

/// Each image is decoded to 1 channel when it is grayscale, else to 3 (alpha dropped); the
/// transform pipeline converts to the dataset's channels, so `channels: keep` follows the
/// first image and a folder may mix gray and colour files.
pub(crate) struct Folder {
    files: Vec<PathBuf>,
    /// `(C, H, W)` of the first image.
    first: (usize, usize, usize),
}

impl Folder {
    /// Lists the folder and decodes the first image, which decides the native shape.
    pub(crate) fn open(dir: &Path) -> Result<Folder, DataError> {
        let files = files(dir)?;
        let first = decode(&files[0])?;
        let c = if first.color().has_color() { 3 } else { 1 };
        Ok(Folder { first: (c, first.height() as usize, first.width() as usize), files })
    }
}

fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let image_err = |e: image::ImageError| DataError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    image::io::Reader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(image_err)
}

impl Source for Folder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn shape(&self) -> (usize, usize, usize) {
        self.first
    }

    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError> {
        let img = decode(&self.files[i])?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let channels = if img.color().has_color() { 3 } else { 1 };
        let pixels = if channels == 1 {
            img.into_luma8().into_raw()
        } else {
            // Interleaved RGB -> planar.
            let rgb = img.into_rgb8().into_raw();
            let plane = width * height;
            let mut planar = vec![0u8; 3 * plane];
            for (k, px) in rgb.chunks_exact(3).enumerate() {
                planar[k] = px[0];
                planar[plane + k] = px[1];
                planar[2 * plane + k] = px[2];
            }
            planar
        };
        Ok(RawImage { channels, height, width, pixels: Cow::Owned(pixels) })
    }

    fn label(&self, _i: usize) -> Option<i64> {
        None
    }

    fn origin(&self, i: usize) -> PathBuf {
        self.files[i].clone()
    }

    fn files(&self) -> Vec<PathBuf> {
        self.files.clone()
    }
}
