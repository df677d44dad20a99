//! MNIST-format IDX files: a big-endian magic (`0x0000` + type `0x08` for uint8 + number of
//! dimensions), one big-endian u32 per dimension, then the values. Images are `0x00000803`
//! (N x H x W), labels `0x00000801` (N). Gzipped files (recognised by their content, not their
//! name) are decompressed whole at open: Fashion-MNIST's training set is 47 MB.

use std::borrow::Cow;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::DataError;
use super::dataset::Source;
use super::transform::RawImage;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

pub(crate) struct Idx {
    images_path: PathBuf,
    labels_path: Option<PathBuf>,
    /// Pixels after the header: n * h * w bytes.
    pixels: Vec<u8>,
    n: usize,
    h: usize,
    w: usize,
    labels: Option<Vec<u8>>,
}

/// A file's content, decompressed when gzipped.
struct Content {
    bytes: Vec<u8>,
    gz: bool,
}

impl Content {
    fn read(path: &Path) -> Result<Content, DataError> {
        let raw = fs::read(path).map_err(|e| DataError::io(path, e))?;
        if !raw.starts_with(&[0x1f, 0x8b]) {
            return Ok(Content { bytes: raw, gz: false });
        }
        let mut bytes = Vec::with_capacity(raw.len() * 2);
        if let Err(e) = MultiGzDecoder::new(&raw[..]).read_to_end(&mut bytes) {
            return Err(DataError::format(
                path,
                bytes.len() as u64,
                format!("corrupt gzip stream ({e})"),
                "a complete gzip stream",
            )
            .in_decompressed());
        }
        Ok(Content { bytes, gz: true })
    }

    fn err(&self, path: &Path, offset: usize, what: String, expected: String) -> DataError {
        let e = DataError::format(path, offset as u64, what, expected);
        if self.gz { e.in_decompressed() } else { e }
    }

    /// The header: magic then `dims` big-endian u32 sizes.
    fn header(&self, path: &Path, magic: u32, dims: usize) -> Result<Vec<usize>, DataError> {
        let b = &self.bytes;
        if b.len() < 4 {
            return Err(self.err(
                path,
                b.len(),
                "truncated header".into(),
                format!("magic 0x{magic:08x}"),
            ));
        }
        let found = u32::from_be_bytes(b[..4].try_into().unwrap());
        if found != magic {
            return Err(self.err(
                path,
                0,
                format!("bad magic 0x{found:08x}"),
                format!("0x{magic:08x}"),
            ));
        }
        let end = 4 + 4 * dims;
        if b.len() < end {
            return Err(self.err(
                path,
                b.len(),
                "truncated header".into(),
                format!("{dims} dimension sizes ({end} header bytes), got {}", b.len()),
            ));
        }
        Ok(b[4..end]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()) as usize)
            .collect())
    }

    /// The `n` items of `item` bytes after a `start`-byte header, as an owned buffer.
    fn body(
        self,
        path: &Path,
        start: usize,
        n: usize,
        item: usize,
        name: &str,
    ) -> Result<Vec<u8>, DataError> {
        let have = self.bytes.len() - start;
        let need = n.checked_mul(item).ok_or_else(|| {
            self.err(
                path,
                4,
                format!("{n} {name}s of {item} bytes"),
                "a size that fits in memory".into(),
            )
        })?;
        if have < need {
            let k = have / item.max(1);
            return Err(self.err(
                path,
                start + k * item,
                format!("truncated {name} {k}"),
                format!("{item} bytes, got {}", have - k * item),
            ));
        }
        if have > need {
            return Err(self.err(
                path,
                start + need,
                format!("{} trailing bytes after {n} {name}s", have - need),
                "the end of the file".into(),
            ));
        }
        let mut bytes = self.bytes;
        bytes.drain(..start);
        Ok(bytes)
    }
}

impl Idx {
    pub(crate) fn open(images: &Path, labels_path: Option<&Path>) -> Result<Idx, DataError> {
        let content = Content::read(images)?;
        let dims = content.header(images, IMAGES_MAGIC, 3)?;
        let (n, h, w) = (dims[0], dims[1], dims[2]);
        if n > 0 && h * w == 0 {
            return Err(DataError::format(
                images,
                8,
                format!("image size {h}x{w}"),
                "a positive height and width",
            ));
        }
        let pixels = content.body(images, 16, n, h * w, "image")?;
        let labels = match labels_path {
            None => None,
            Some(lp) => {
                let content = Content::read(lp)?;
                let m = content.header(lp, LABELS_MAGIC, 1)?[0];
                let l = content.body(lp, 8, m, 1, "label")?;
                if m != n {
                    return Err(DataError::unsupported(
                        lp,
                        format!("holds {m} labels but `{}` holds {n} images", images.display()),
                    ));
                }
                Some(l)
            }
        };
        Ok(Idx {
            images_path: images.to_path_buf(),
            labels_path: labels_path.map(Path::to_path_buf),
            pixels,
            n,
            h,
            w,
            labels,
        })
    }
}

impl Source for Idx {
    fn len(&self) -> usize {
        self.n
    }

    fn shape(&self) -> (usize, usize, usize) {
        (1, self.h, self.w)
    }

    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError> {
        let p = self.h * self.w;
        let pixels = Cow::Borrowed(&self.pixels[i * p..(i + 1) * p]);
        Ok(RawImage { channels: 1, height: self.h, width: self.w, pixels })
    }

    fn label(&self, i: usize) -> Option<i64> {
        self.labels.as_ref().map(|l| l[i] as i64)
    }

    fn origin(&self, _i: usize) -> PathBuf {
        self.images_path.clone()
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.images_path.clone()];
        v.extend(self.labels_path.clone());
        v
    }
}
