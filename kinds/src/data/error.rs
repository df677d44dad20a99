//! [`DataError`]: every way opening or reading a dataset can fail, each naming the file and,
//! for malformed content, the byte offset.

use std::io;
use std::path::{Path, PathBuf};

/// A dataset could not be opened or read. Malformed files name the file and the byte offset
/// of the problem; nothing in `data` panics on bad input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be opened or read.
    #[error("`{}`: {err}{}", path.display(), hint_suffix(hint))]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        err: io::Error,
        /// How to fix it, when known (e.g. where to download CIFAR-10).
        hint: Option<String>,
    },
    /// A file's content is malformed at a known position.
    #[error(
        "`{}`: {what} at byte {offset}{}, expected {expected}",
        path.display(),
        if *decompressed { " of the decompressed data" } else { "" }
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem (in the decompressed stream for gzipped files).
        offset: u64,
        /// Whether `offset` counts bytes of the decompressed stream of a gzipped file.
        decompressed: bool,
        /// What was found, e.g. `truncated record 9999`, `bad magic 0x00000802`.
        what: String,
        /// What was expected there, e.g. `3073 bytes, got 12`, `0x00000803`.
        expected: String,
    },
    /// A file is well-formed but cannot be used as asked (wrong layout, compressed member,
    /// mismatched shapes), with a hint where there is one.
    #[error("`{}`: {message}{}", path.display(), hint_suffix(hint))]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: Option<String>,
    },
    /// An image file could not be decoded.
    #[error("`{}`: cannot decode image: {message}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// A path, directory or pattern names no usable file.
    #[error("{message}")]
    NoFiles {
        /// What was looked for where.
        message: String,
    },
    /// An index past the end of the dataset.
    #[error("index {index} out of range for a dataset of {len} images")]
    Index {
        /// The index asked for.
        index: usize,
        /// The dataset's length.
        len: usize,
    },
    /// libtorch refused to build a tensor.
    #[error("{0}")]
    Tensor(String),
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!("\nhint: {h}")).unwrap_or_default()
}

impl DataError {
    /// An I/O error on `path` without a hint.
    pub fn io(path: &Path, err: io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), err, hint: None }
    }

    /// Malformed content of `path` at `offset`.
    pub fn format(
        path: &Path,
        offset: u64,
        what: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        DataError::Format {
            path: path.to_path_buf(),
            offset,
            decompressed: false,
            what: what.into(),
            expected: expected.into(),
        }
    }

    /// A file that cannot be used as asked.
    pub fn unsupported(path: &Path, message: impl Into<String>) -> Self {
        DataError::Unsupported { path: path.to_path_buf(), message: message.into(), hint: None }
    }

    /// Adds a hint to an [`DataError::Io`] or [`DataError::Unsupported`] error.
    pub fn with_hint(mut self, h: impl Into<String>) -> Self {
        if let DataError::Io { hint, .. } | DataError::Unsupported { hint, .. } = &mut self {
            *hint = Some(h.into());
        }
        self
    }

    /// Marks a [`DataError::Format`] offset as counting decompressed bytes.
    pub fn in_decompressed(mut self) -> Self {
        if let DataError::Format { decompressed, .. } = &mut self {
            *decompressed = true;
        }
        self
    }
}
