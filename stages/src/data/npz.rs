//! numpy `.npz` archives (a zip of `.npy` files), read in place.
//!
//! At open: the zip's central directory (a few hundred bytes at the end of the file), the image
//! member's local header, and its `.npy` header. The member must be *stored*: a deflated member
//! cannot be read at an offset without inflating everything before it. Each image is then one
//! positioned read at `data_offset + index * image_bytes`, from any thread.

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use zip::{CompressionMethod, ZipArchive};

use super::DataError;
use super::dataset::Source;
use super::transform::RawImage;

/// How an image's bytes are laid out in the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[C][H][W]`: rows of N x (C*H*W), or N x C x H x W.
    Planar,
    /// `[H][W][C]`: N x H x W x C.
    Interleaved,
}

/// One `.npz` file's image array.
struct Part {
    path: PathBuf,
    file: File,
    /// Absolute offset of image 0.
    data_offset: u64,
    count: usize,
    labels: Option<Vec<i64>>,
}

pub(crate) struct Npz {
    parts: Vec<Part>,
    starts: Vec<usize>,
    shape: Shape,
    layout: Layout,
}

/// What an `.npy` header says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NpyHeader {
    /// `descr`, e.g. `|u1`, `<i8`.
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Bytes from the start of the `.npy` data to the first array byte.
    pub header_len: usize,
}

impl Npz {
    pub(crate) fn open(paths: &[PathBuf], key: &str, labels_key: &str) -> Result<Npz, DataError> {
        let mut parts = Vec::new();
        let mut starts = vec![0];
        let mut geometry: Option<(Shape, Layout, PathBuf)> = None;
        for path in paths {
            let (part, shape, layout) = open_part(path, key, labels_key)?;
            match &geometry {
                None => geometry = Some((shape, layout, path.clone())),
                Some((s, l, first)) if (*s, *l) != (shape, layout) => {
                    return Err(DataError::unsupported(
                        path,
                        format!(
                            "images are {} ({layout:?}) but `{}` has {} ({l:?})",
                            fmt_shape(shape),
                            first.display(),
                            fmt_shape(*s)
                        ),
                    ));
                }
                Some(_) => {}
            }
            starts.push(starts.last().unwrap() + part.count);
            parts.push(part);
        }
        let (shape, layout, _) = geometry
            .ok_or_else(|| DataError::NoFiles { message: "no `.npz` file given".into() })?;
        // Labels only when every file has them.
        if parts.iter().any(|p| p.labels.is_none()) {
            for p in &mut parts {
                p.labels = None;
            }
        }
        Ok(Npz { parts, starts, shape, layout })
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        let f = self.starts.partition_point(|&s| s <= i) - 1;
        (f, i - self.starts[f])
    }

    fn image_bytes(&self) -> usize {
        self.shape.0 * self.shape.1 * self.shape.2
    }
}

fn fmt_shape((c, h, w): Shape) -> String {
    format!("{c}x{h}x{w}")
}

/// `(C, H, W)` of one image.
type Shape = (usize, usize, usize);

fn open_part(path: &Path, key: &str, labels_key: &str) -> Result<(Part, Shape, Layout), DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut zip = ZipArchive::new(&file).map_err(|e| {
        DataError::unsupported(path, format!("not a readable `.npz` (zip) archive: {e}"))
    })?;
    let member = format!("{key}.npy");
    let found = zip.by_name(&member).map(|m| (m.data_start(), m.size(), m.compression()));
    let (start, size, method) = match found {
        Ok(found) => found,
        Err(_) => {
            let names: Vec<String> =
                zip.file_names().map(|n| format!("`{}`", n.trim_end_matches(".npy"))).collect();
            return Err(DataError::unsupported(
                path,
                format!("has no array `{key}`; it holds {}", names.join(", ")),
            )
            .with_hint("set `key` to the image array's name"));
        }
    };
    if method != CompressionMethod::Stored {
        return Err(DataError::unsupported(
            path,
            format!("array `{key}` is compressed ({method}), so it cannot be read in place"),
        )
        .with_hint(
            "re-save it uncompressed with `np.savez` instead of `np.savez_compressed`, e.g. \
             `d = dict(np.load(f)); np.savez(f, **d)`",
        ));
    }
    let avail = size.min(file_len.saturating_sub(start));
    let header = read_npy_header(path, start, avail, |off, buf| read_at(&file, off, buf))?;
    if !matches!(header.descr.as_str(), "|u1" | "<u1" | ">u1" | "u1" | "=u1") {
        return Err(DataError::unsupported(
            path,
            format!("array `{key}` has dtype `{}`, expected `|u1` (uint8)", header.descr),
        ));
    }
    if header.fortran_order && header.shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(DataError::unsupported(path, format!("array `{key}` is in Fortran order"))
            .with_hint("save a C-ordered copy: `np.savez(f, data=np.ascontiguousarray(x))`"));
    }
    let (count, shape, layout) = geometry(&header.shape).ok_or_else(|| {
        DataError::unsupported(
            path,
            format!(
                "array `{key}` has shape {:?}; expected N x (C*S*S) with C = 3 or 1, \
                 N x C x H x W, N x H x W x C (C = 1 or 3) or N x H x W",
                header.shape
            ),
        )
    })?;
    let per = shape.0 * shape.1 * shape.2;
    let data_offset = start + header.header_len as u64;
    let have = avail - header.header_len as u64;
    let need = count as u64 * per as u64;
    if have < need {
        let k = have / per as u64;
        return Err(DataError::format(
            path,
            data_offset + k * per as u64,
            format!("truncated array `{key}`: image {k} of {count}"),
            format!("{per} bytes, got {}", have - k * per as u64),
        ));
    }
    let labels = read_labels(path, &mut zip, labels_key, count)?;
    drop(zip);
    Ok((Part { path: path.to_path_buf(), file, data_offset, count, labels }, shape, layout))
}

/// `(N, (C, H, W), layout)` for the supported array shapes.
fn geometry(shape: &[usize]) -> Option<(usize, Shape, Layout)> {
    let square = |d: usize| {
        let s = (d as f64).sqrt().round() as usize;
        (s > 0 && s * s == d).then_some(s)
    };
    match *shape {
        [n, d] if d % 3 == 0 && square(d / 3).is_some() => {
            let s = square(d / 3)?;
            Some((n, (3, s, s), Layout::Planar))
        }
        [n, d] => square(d).map(|s| (n, (1, s, s), Layout::Planar)),
        [n, h, w] if h > 0 && w > 0 => Some((n, (1, h, w), Layout::Planar)),
        [n, c, h, w] if matches!(c, 1 | 3) && h > 0 && w > 0 => {
            Some((n, (c, h, w), Layout::Planar))
        }
        [n, h, w, c] if matches!(c, 1 | 3) && h > 0 && w > 0 => {
            Some((n, (c, h, w), Layout::Interleaved))
        }
        _ => None,
    }
}

/// Parses the `.npy` header of a member whose data starts at `start` with `avail` bytes;
/// `read(offset, buf)` reads exactly `buf.len()` bytes at an absolute offset or fails.
pub(crate) fn read_npy_header(
    path: &Path,
    start: u64,
    avail: u64,
    read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<NpyHeader, DataError> {
    let truncated = |at: u64, need: u64| {
        DataError::format(path, start + at, "truncated `.npy` header", format!("{need} more bytes"))
    };
    if avail < 10 {
        return Err(truncated(avail, 10 - avail));
    }
    let mut pre = [0u8; 12];
    let n = avail.min(12) as usize;
    read(start, &mut pre[..n]).map_err(|e| DataError::io(path, e))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(DataError::format(
            path,
            start,
            format!("bad `.npy` magic {:02x?}", &pre[..6]),
            "`\\x93NUMPY`",
        ));
    }
    let (prefix, len) = match pre[6] {
        1 => (10u64, u16::from_le_bytes([pre[8], pre[9]]) as u64),
        2 | 3 if n == 12 => (12, u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as u64),
        2 | 3 => return Err(truncated(avail, 12 - avail)),
        v => {
            return Err(DataError::format(
                path,
                start + 6,
                format!("`.npy` version {v}"),
                "1, 2 or 3",
            ));
        }
    };
    if avail < prefix + len {
        return Err(truncated(avail, prefix + len - avail));
    }
    let mut text = vec![0u8; len as usize];
    read(start + prefix, &mut text).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8_lossy(&text);
    let bad = |what: &str| {
        DataError::format(
            path,
            start + prefix,
            format!("bad `.npy` header `{}` ({what})", text.trim()),
            "a dict with `descr`, `fortran_order` and `shape`",
        )
    };
    let descr = dict_value(&text, "descr").ok_or_else(|| bad("no `descr`"))?;
    let descr = descr
        .strip_prefix(['\'', '"'])
        .and_then(|d| d.split(['\'', '"']).next())
        .ok_or_else(|| bad("`descr` is not a string"))?
        .to_string();
    let fortran_order = match dict_value(&text, "fortran_order") {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => return Err(bad("no `fortran_order`")),
    };
    let shape_text = dict_value(&text, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad("no `shape` tuple"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("`shape` is not a tuple of integers"))?;
    Ok(NpyHeader { descr, fortran_order, shape, header_len: (prefix + len) as usize })
}

/// The text after `'key':` in a Python dict literal, leading spaces removed.
fn dict_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    for q in ['\'', '"'] {
        let pat = format!("{q}{key}{q}");
        if let Some(i) = dict.find(&pat) {
            let rest = dict[i + pat.len()..].trim_start();
            return rest.strip_prefix(':').map(str::trim_start);
        }
    }
    None
}

/// The labels array, when the archive has one (any compression: it is small).
fn read_labels(
    path: &Path,
    zip: &mut ZipArchive<&File>,
    labels_key: &str,
    count: usize,
) -> Result<Option<Vec<i64>>, DataError> {
    let member = format!("{labels_key}.npy");
    let mut bytes = Vec::new();
    match zip.by_name(&member) {
        Ok(mut m) => {
            m.read_to_end(&mut bytes).map_err(|e| {
                DataError::unsupported(path, format!("cannot read array `{labels_key}`: {e}"))
            })?;
        }
        Err(_) => return Ok(None),
    }
    let at = |off: u64, buf: &mut [u8]| {
        let off = off as usize;
        buf.copy_from_slice(&bytes[off..off + buf.len()]);
        Ok(())
    };
    let header = read_npy_header(path, 0, bytes.len() as u64, at).map_err(|e| match e {
        // Offsets inside a (possibly compressed) member do not locate anything in the file.
        DataError::Format { what, expected, .. } => DataError::unsupported(
            path,
            format!("array `{labels_key}`: {what}, expected {expected}"),
        ),
        e => e,
    })?;
    if header.shape.iter().product::<usize>() != count || header.shape.len() > 2 {
        return Err(DataError::unsupported(
            path,
            format!("array `{labels_key}` has shape {:?}, expected ({count},)", header.shape),
        ));
    }
    let body = &bytes[header.header_len..];
    let descr = header.descr.as_str();
    let (size, little) = match descr.get(1..) {
        Some("u1" | "i1" | "b1") => (1, true),
        Some("u2" | "i2") => (2, !descr.starts_with('>')),
        Some("u4" | "i4") => (4, !descr.starts_with('>')),
        Some("u8" | "i8") => (8, !descr.starts_with('>')),
        _ => {
            return Err(DataError::unsupported(
                path,
                format!("array `{labels_key}` has dtype `{descr}`, expected an integer type"),
            ));
        }
    };
    if body.len() < count * size {
        return Err(DataError::unsupported(
            path,
            format!("array `{labels_key}` is truncated: {} bytes for {count} labels", body.len()),
        ));
    }
    let signed = descr.as_bytes()[1] == b'i';
    let labels = body[..count * size]
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            if little {
                b[..size].copy_from_slice(c);
            } else {
                for (k, &v) in c.iter().rev().enumerate() {
                    b[k] = v;
                }
            }
            if signed && size < 8 && b[size - 1] & 0x80 != 0 {
                b[size..].fill(0xff);
            }
            i64::from_le_bytes(b)
        })
        .collect();
    Ok(Some(labels))
}

/// Reads exactly `buf.len()` bytes at `offset` without moving a shared cursor.
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

impl Source for Npz {
    fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError> {
        let (f, r) = self.locate(i);
        let part = &self.parts[f];
        let per = self.image_bytes();
        let offset = part.data_offset + (r * per) as u64;
        let mut buf = vec![0u8; per];
        read_at(&part.file, offset, &mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                DataError::format(
                    &part.path,
                    offset,
                    format!("truncated image {r}"),
                    format!("{per} bytes (file shrank after open)"),
                )
            } else {
                DataError::io(&part.path, e)
            }
        })?;
        let (c, h, w) = self.shape;
        if self.layout == Layout::Interleaved && c > 1 {
            let mut planar = vec![0u8; per];
            for (k, px) in buf.chunks_exact(c).enumerate() {
                for (ch, &v) in px.iter().enumerate() {
                    planar[ch * h * w + k] = v;
                }
            }
            buf = planar;
        }
        Ok(RawImage { channels: c, height: h, width: w, pixels: Cow::Owned(buf) })
    }

    fn label(&self, i: usize) -> Option<i64> {
        let (f, r) = self.locate(i);
        self.parts[f].labels.as_ref().map(|l| l[r])
    }

    fn origin(&self, i: usize) -> PathBuf {
        self.parts[self.locate(i).0].path.clone()
    }

    fn files(&self) -> Vec<PathBuf> {
        self.parts.iter().map(|p| p.path.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> Result<NpyHeader, DataError> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(text.len() as u16).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        let at = |o: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&b[o as usize..o as usize + buf.len()]);
            Ok(())
        };
        read_npy_header(Path::new("x.npy"), 0, b.len() as u64, at)
    }

    #[test]
    fn parses_numpy_headers() {
        let h =
            header("{'descr': '|u1', 'fortran_order': False, 'shape': (3, 12288), }   \n").unwrap();
        assert_eq!(h.descr, "|u1");
        assert!(!h.fortran_order);
        assert_eq!(h.shape, [3, 12288]);
        let h = header("{'descr': '<i8', 'fortran_order': True, 'shape': (5,), }\n").unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape.as_slice()),
            ("<i8", true, &[5][..])
        );
        assert_eq!(
            header("{'descr': '<f4', 'fortran_order': False, 'shape': (), }").unwrap().shape,
            Vec::<usize>::new()
        );
        let e = header("{'descr': '|u1', 'shape': (3,)}").unwrap_err().to_string();
        assert!(e.contains("no `fortran_order`"), "{e}");
    }

    #[test]
    fn geometry_of_supported_shapes() {
        assert_eq!(geometry(&[7, 12288]), Some((7, (3, 64, 64), Layout::Planar)));
        assert_eq!(geometry(&[7, 784]), Some((7, (1, 28, 28), Layout::Planar)));
        assert_eq!(geometry(&[7, 3, 8, 9]), Some((7, (3, 8, 9), Layout::Planar)));
        assert_eq!(geometry(&[7, 8, 9, 3]), Some((7, (3, 8, 9), Layout::Interleaved)));
        assert_eq!(geometry(&[7, 8, 9]), Some((7, (1, 8, 9), Layout::Planar)));
        assert_eq!(geometry(&[7, 785]), None);
        assert_eq!(geometry(&[7, 8, 9, 4]), None);
    }
}
