//! CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (the R, G and B planes of
//! a 32x32 image), 10,000 to a file. The files (30 MB each) are read whole at open, which also
//! checks every record's label.

use std::borrow::Cow;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::dataset::Source;
use super::transform::RawImage;
use super::{DataError, Split, cifar10_files as files};

/// Bytes per record: label + 3 x 32 x 32.
pub(crate) const RECORD: usize = 1 + 3 * 32 * 32;

const DOWNLOAD_HINT: &str = "download the binary version from \
    https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and point `path` at its \
    `cifar-10-batches-bin` directory";

pub(crate) struct Cifar10 {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// `starts[k]`: global index of file k's first record; one past the end last.
    starts: Vec<usize>,
}

impl Cifar10 {
    pub(crate) fn open(dir: &Path, split: Split) -> Result<Cifar10, DataError> {
        let mut out = Cifar10 { files: Vec::new(), starts: vec![0] };
        for path in files(dir, split) {
            let bytes = fs::read(&path).map_err(|e| {
                let missing = e.kind() == io::ErrorKind::NotFound;
                let err = DataError::io(&path, e);
                if missing { err.with_hint(DOWNLOAD_HINT) } else { err }
            })?;
            let n = check(&path, &bytes)?;
            out.starts.push(out.starts.last().unwrap() + n);
            out.files.push((path, bytes));
        }
        Ok(out)
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        let f = self.starts.partition_point(|&s| s <= i) - 1;
        (f, i - self.starts[f])
    }
}

/// Number of records in `bytes`; an error for a partial record or a label past 9.
fn check(path: &Path, bytes: &[u8]) -> Result<usize, DataError> {
    let n = bytes.len() / RECORD;
    let rest = bytes.len() % RECORD;
    if rest != 0 {
        return Err(DataError::format(
            path,
            (n * RECORD) as u64,
            format!("truncated record {n}"),
            format!("{RECORD} bytes, got {rest}"),
        ));
    }
    for (r, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::format(
                path,
                (r * RECORD) as u64,
                format!("bad label {} in record {r}", rec[0]),
                "a label in 0..=9",
            ));
        }
    }
    Ok(n)
}

impl Source for Cifar10 {
    fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    fn shape(&self) -> (usize, usize, usize) {
        (3, 32, 32)
    }

    fn read(&self, i: usize) -> Result<RawImage<'_>, DataError> {
        let (f, r) = self.locate(i);
        let rec = &self.files[f].1[r * RECORD..(r + 1) * RECORD];
        Ok(RawImage { channels: 3, height: 32, width: 32, pixels: Cow::Borrowed(&rec[1..]) })
    }

    fn label(&self, i: usize) -> Option<i64> {
        let (f, r) = self.locate(i);
        Some(self.files[f].1[r * RECORD] as i64)
    }

    fn origin(&self, i: usize) -> PathBuf {
        self.files[self.locate(i).0].0.clone()
    }

    fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }
}
