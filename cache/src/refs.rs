//! Refs: `refs/<namespace>/<name>`, tiny files holding one key, e.g. "the last key of stage
//! `prune[3]` of manifest `cifar10`", so `plan` can load the previous record and say what
//! changed. `gc` does not follow refs: a ref may outlive the record it names.

use std::fs;
use std::io;
use std::path::PathBuf;

use tracing::{debug, warn};

use crate::atomic::FILE_MODE;
use crate::cache::Cache;
use crate::digest::{Digest, hash_bytes};
use crate::error::{CacheError, Result, io_err};

/// Longest encoded file name kept as is; longer ones are cut and suffixed with a hash.
const MAX_NAME: usize = 160;

impl Cache {
    /// Points `namespace`/`name` at `key`, atomically.
    ///
    /// Any non-empty strings work as namespace and name (`prune[3]`, `a/b`, `..`): they are
    /// percent-encoded into safe file names.
    pub fn set_ref(&self, namespace: &str, name: &str, key: &Digest) -> Result<()> {
        let path = self.ref_path(namespace, name)?;
        self.write_atomic(&path, format!("{key}\n").as_bytes(), FILE_MODE)?;
        debug!(namespace, name, key = %key, path = %path.display(), "set ref");
        Ok(())
    }

    /// The key `namespace`/`name` points at, or `None` if unset. A ref file that does not hold
    /// a digest is treated as unset, with a warning.
    pub fn get_ref(&self, namespace: &str, name: &str) -> Result<Option<Digest>> {
        let path = self.ref_path(namespace, name)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        match text.trim().parse() {
            Ok(key) => Ok(Some(key)),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring unreadable ref");
                Ok(None)
            }
        }
    }

    /// Deletes a ref; an unset ref is fine.
    pub fn remove_ref(&self, namespace: &str, name: &str) -> Result<()> {
        self.writable("remove a ref")?;
        let path = self.ref_path(namespace, name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// The file behind a ref.
    pub fn ref_path(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        Ok(self
            .dir("refs")
            .join(encode_name("ref namespace", namespace)?)
            .join(encode_name("ref name", name)?))
    }
}

/// Percent-encodes everything but ASCII letters, digits, `-`, `_` and non-leading `.` (so no
/// name is hidden, `.` or `..`). Over-long results are cut and suffixed with `~` and a hash of
/// the whole name, keeping them unique and within file-name limits.
fn encode_name(what: &'static str, name: &str) -> Result<String> {
    if name.is_empty() {
        return Err(CacheError::InvalidName { what, name: name.to_owned(), reason: "empty" });
    }
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_NAME {
        out.truncate(MAX_NAME - 13);
        out.push('~');
        out.push_str(&hash_bytes(name.as_bytes()).short());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_odd_names() {
        let enc = |s: &str| encode_name("ref name", s).unwrap();
        assert_eq!(enc("prune[3]"), "prune%5B3%5D");
        assert_eq!(enc("base"), "base");
        assert_eq!(enc("a.b"), "a.b");
        assert_eq!(enc(".."), "%2E.");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
        assert_eq!(enc("é"), "%C3%A9");
        assert_eq!(enc("100%"), "100%25");
        let long = enc(&"x".repeat(1000));
        assert_eq!(long.len(), MAX_NAME);
        assert_ne!(long, enc(&"x".repeat(1001)));
        let err = encode_name("ref name", "").unwrap_err();
        assert_eq!(err.to_string(), "invalid ref name ``: empty");
    }
}
