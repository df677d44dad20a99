//! The crate's one error type.

use std::io;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, ParseDigestError};

/// Result with [`CacheError`] as the default error.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Everything that can go wrong in the cache. Messages name the path or value involved in
/// backticks and carry the underlying cause as their [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// An I/O operation on a path failed.
    #[error("failed to {action} `{}`", path.display())]
    Io {
        /// What was being done, as a verb phrase (`read`, `create directory`, ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A value could not be serialised to JSON for writing to a path.
    #[error("failed to serialize `{}`", path.display())]
    Serialize {
        /// The file that was to be written.
        path: PathBuf,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A path that should be a regular file is something else (a directory, a socket, ...).
    #[error("`{}` is not a regular file", path.display())]
    NotAFile {
        /// The offending path.
        path: PathBuf,
    },
    /// A file changed while it was being copied into the store.
    #[error(
        "`{}` changed while it was being stored (hashed as `{expected}`, copied as `{actual}`)",
        path.display()
    )]
    SourceChanged {
        /// The file that was being stored.
        path: PathBuf,
        /// Digest computed before copying.
        expected: Digest,
        /// Digest of the bytes actually copied.
        actual: Digest,
    },
    /// A record to be published names an output whose object is not in the store.
    #[error(
        "record `{id}` (`{key}`) names output `{output}` with object `{digest}`, which is not in the cache"
    )]
    MissingObject {
        /// The record's key.
        key: Digest,
        /// The record's stage instance id.
        id: String,
        /// The output name.
        output: String,
        /// The missing object's digest.
        digest: Digest,
    },
    /// A record to be published names an output whose stored object has another size.
    #[error(
        "record `{id}` names output `{output}` with object `{digest}` of {expected} bytes, but the stored object has {actual} bytes"
    )]
    ObjectSizeMismatch {
        /// The record's stage instance id.
        id: String,
        /// The output name.
        output: String,
        /// The object's digest.
        digest: Digest,
        /// Size the record claims.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A write to a cache that is read-only (a read-only mount, a directory this user cannot
    /// write, or opened with [`Cache::open_read_only`](crate::Cache::open_read_only)).
    #[error("cannot {action}: the cache `{}` is read-only", root.display())]
    ReadOnly {
        /// What was attempted, as a verb phrase (`store an object`, `collect garbage`, ...).
        action: &'static str,
        /// The cache root.
        root: PathBuf,
    },
    /// A ref namespace or name cannot be turned into a file name.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// `ref namespace` or `ref name`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A directory tree is nested deeper than [`crate::MAX_DIR_DEPTH`] (most likely a symlink loop).
    #[error("`{}` is nested more than {} directories deep (a symlink loop?)", path.display(), crate::MAX_DIR_DEPTH)]
    TooDeep {
        /// The directory where the walk gave up.
        path: PathBuf,
    },
    /// A string is not a 64-character hex digest.
    #[error(transparent)]
    ParseDigest(#[from] ParseDigestError),
}

/// `map_err` adapter: `fs::read(p).map_err(io_err("read", p))`.
pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io { action, path: path.to_path_buf(), source }
}
