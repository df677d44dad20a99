//! Objects: immutable, content-addressed files at `objects/<ab>/<digest>`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tempfile::TempPath;
use tracing::{debug, warn};

use crate::atomic::OBJECT_MODE;
use crate::cache::Cache;
use crate::digest::{Digest, hash_bytes, hash_file};
use crate::error::{CacheError, Result, io_err};

/// A stored object: its content digest and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    /// blake3 of the content; also the object's file name.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
}

impl Cache {
    /// Where the object with this digest lives (whether or not it exists).
    pub fn object_path(&self, digest: &Digest) -> PathBuf {
        self.sharded("objects", digest, "")
    }

    /// Whether the object is stored.
    pub fn has_object(&self, digest: &Digest) -> bool {
        self.object_path(digest).is_file()
    }

    /// Reads a whole object into memory (for small objects: metrics, configs).
    pub fn read_object(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.object_path(digest);
        fs::read(&path).map_err(io_err("read object", &path))
    }

    /// Stores `bytes`; stores nothing new if identical content is already there (checked by
    /// re-hashing it: a damaged object of that name is replaced).
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<ObjectRef> {
        let digest = hash_bytes(bytes);
        let size = bytes.len() as u64;
        let _active = self.activity_shared()?;
        if self.reuse_object(&digest, size) {
            return Ok(ObjectRef { digest, size });
        }
        let (mut file, temp) = self.temp_file("obj")?;
        file.write_all(bytes).map_err(io_err("write", &temp))?;
        drop(file);
        self.publish_object(temp, &digest)?;
        Ok(ObjectRef { digest, size })
    }

    /// Stores a copy of the file at `path`; copies nothing if identical content is already there
    /// (checked by re-hashing it: a damaged object of that name is replaced).
    ///
    /// The file is hashed, copied into `tmp/`, and the copy hashed again before it is renamed
    /// into place, so an object's name always matches its content even if the source is being
    /// rewritten meanwhile (that is reported as [`CacheError::SourceChanged`]).
    pub fn put_file(&self, path: &Path) -> Result<ObjectRef> {
        let digest = hash_file(path)?;
        let size = fs::metadata(path).map_err(io_err("read metadata of", path))?.len();
        let _active = self.activity_shared()?;
        if self.reuse_object(&digest, size) {
            return Ok(ObjectRef { digest, size });
        }
        let (file, temp) = self.temp_file("obj")?;
        drop(file);
        fs::copy(path, &temp).map_err(io_err("copy", path))?;
        self.publish_checked(temp, path, digest)
    }

    /// Moves the file at `path` into the store (a rename: no copy when `path` is on the cache's
    /// filesystem, e.g. in a [`staging_dir`](Cache::staging_dir)); `path` is gone afterwards.
    ///
    /// Falls back to [`put_file`](Cache::put_file) and removing `path` when it is on another
    /// filesystem or has other hard links (which could later change the object's content).
    pub fn put_file_move(&self, path: &Path) -> Result<ObjectRef> {
        let meta = fs::symlink_metadata(path).map_err(io_err("read metadata of", path))?;
        if !meta.is_file() {
            return Err(CacheError::NotAFile { path: path.to_path_buf() });
        }
        if hard_links(&meta) > 1 {
            return self.copy_then_remove(path);
        }
        let _active = self.activity_shared()?;
        let (file, temp) = self.temp_file("obj")?;
        drop(file);
        match fs::rename(path, &temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                drop(temp);
                return self.copy_then_remove(path);
            }
            Err(e) => return Err(io_err("move", path)(e)),
        }
        let digest = hash_file(&temp)?;
        let size = fs::metadata(&temp).map_err(io_err("read metadata of", &temp))?.len();
        if self.reuse_object(&digest, size) {
            return Ok(ObjectRef { digest, size });
        }
        self.publish_object(temp, &digest)?;
        Ok(ObjectRef { digest, size })
    }

    /// Publishes a file made by [`download_file`](Cache::download_file) whose bytes the caller
    /// hashed as it wrote them (a remote cache's download, verified against `digest`): no
    /// second read of a large object. The file is fsynced and renamed into place.
    pub fn put_downloaded(&self, temp: TempPath, digest: &Digest) -> Result<ObjectRef> {
        let size = fs::metadata(&temp).map_err(io_err("read metadata of", &temp))?.len();
        let _active = self.activity_shared()?;
        self.publish_object(temp, digest)?;
        Ok(ObjectRef { digest: *digest, size })
    }

    fn copy_then_remove(&self, path: &Path) -> Result<ObjectRef> {
        let object = self.put_file(path)?;
        fs::remove_file(path).map_err(io_err("remove", path))?;
        Ok(object)
    }

    /// Hashes the copy in `temp` and publishes it if it matches the source's digest.
    fn publish_checked(
        &self,
        temp: TempPath,
        source: &Path,
        expected: Digest,
    ) -> Result<ObjectRef> {
        let actual = hash_file(&temp)?;
        if actual != expected {
            return Err(CacheError::SourceChanged { path: source.to_path_buf(), expected, actual });
        }
        let size = fs::metadata(&temp).map_err(io_err("read metadata of", &temp))?.len();
        self.publish_object(temp, &expected)?;
        Ok(ObjectRef { digest: expected, size })
    }

    /// Whether an object with this digest and size is already stored, intact; if so its mtime
    /// is refreshed, which tells a concurrent `gc` that it was just (re)used.
    ///
    /// An existing object is re-hashed before it is reused: one of the right size may still
    /// have been damaged (a flipped bit, a hand edit), and reusing it would hand the damage to
    /// the record being published. A damaged one is replaced by the caller's fresh copy (an
    /// atomic rename over it).
    fn reuse_object(&self, digest: &Digest, size: u64) -> bool {
        let path = self.object_path(digest);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == size => match hash_file(&path) {
                Ok(actual) if actual == *digest => {
                    touch(&path);
                    debug!(digest = %digest, path = %path.display(), "object already stored");
                    true
                }
                Ok(actual) => {
                    warn!(
                        path = %path.display(),
                        actual = %actual,
                        "stored object is corrupt (its content hashes to another digest); replacing it"
                    );
                    false
                }
                Err(e) => {
                    warn!(
                        path = %path.display(),
                        error = %crate::error_chain(&e),
                        "stored object cannot be read; replacing it"
                    );
                    false
                }
            },
            Ok(meta) => {
                warn!(
                    path = %path.display(),
                    expected = size,
                    actual = meta.len(),
                    "stored object has the wrong size; replacing it"
                );
                false
            }
            Err(_) => false,
        }
    }

    fn publish_object(&self, temp: TempPath, digest: &Digest) -> Result<()> {
        let dest = self.object_path(digest);
        self.persist(temp, &dest, OBJECT_MODE)?;
        debug!(digest = %digest, path = %dest.display(), "stored object");
        Ok(())
    }
}

/// Sets a file's mtime to now, best effort (it fails on files owned by another user, which
/// only makes a concurrent `gc` less careful about them).
pub(crate) fn touch(path: &Path) {
    if let Err(e) = File::open(path).and_then(|f| f.set_modified(SystemTime::now())) {
        debug!(path = %path.display(), error = %e, "could not refresh mtime");
    }
}

#[cfg(unix)]
fn hard_links(meta: &fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(meta)
}

#[cfg(not(unix))]
fn hard_links(_meta: &fs::Metadata) -> u64 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c")).unwrap();
        (dir, cache)
    }

    #[test]
    fn put_bytes_round_trip_and_layout() {
        let (_d, cache) = cache();
        let obj = cache.put_bytes(b"hello").unwrap();
        assert_eq!(obj, ObjectRef { digest: hash_bytes(b"hello"), size: 5 });
        let path = cache.object_path(&obj.digest);
        assert!(path.ends_with(format!("v1/objects/{}/{}", obj.digest.prefix(), obj.digest)));
        assert_eq!(cache.read_object(&obj.digest).unwrap(), b"hello");
        assert!(fs::metadata(&path).unwrap().permissions().readonly());
        assert!(cache.has_object(&obj.digest));
        assert!(!cache.has_object(&hash_bytes(b"absent")));
    }

    #[test]
    fn put_file_move_renames_and_dedups() {
        let (_d, cache) = cache();
        let staging = cache.staging_dir().unwrap();
        let a = staging.path().join("a.bin");
        fs::write(&a, b"payload").unwrap();
        let obj = cache.put_file_move(&a).unwrap();
        assert!(!a.exists());
        assert_eq!(cache.read_object(&obj.digest).unwrap(), b"payload");
        fs::write(&a, b"payload").unwrap();
        assert_eq!(cache.put_file_move(&a).unwrap(), obj);
        assert!(!a.exists());
        assert_eq!(fs::read_dir(cache.tmp_root()).unwrap().count(), 1, "only the staging dir");
    }

    #[cfg(unix)]
    #[test]
    fn put_file_move_copies_hard_linked_files() {
        let (d, cache) = cache();
        let a = d.path().join("a");
        let b = d.path().join("b");
        fs::write(&a, b"shared").unwrap();
        fs::hard_link(&a, &b).unwrap();
        let obj = cache.put_file_move(&a).unwrap();
        assert!(!a.exists());
        fs::write(&b, b"changed").unwrap();
        assert_eq!(cache.read_object(&obj.digest).unwrap(), b"shared");
    }

    #[test]
    fn truncated_object_is_replaced() {
        let (_d, cache) = cache();
        let obj = cache.put_bytes(b"complete content").unwrap();
        let path = cache.object_path(&obj.digest);
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"compl").unwrap();
        cache.put_bytes(b"complete content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"complete content");
    }

    /// Issue 17: an object of the right size with a flipped byte is not reused by any put.
    #[test]
    fn same_size_corrupt_object_is_replaced_by_every_put() {
        let (d, cache) = cache();
        let content = b"complete content";
        let source = d.path().join("src");
        fs::write(&source, content).unwrap();
        let staging = cache.staging_dir().unwrap();
        let staged = staging.path().join("out");
        let puts: [&dyn Fn() -> ObjectRef; 3] =
            [&|| cache.put_bytes(content).unwrap(), &|| cache.put_file(&source).unwrap(), &|| {
                fs::write(&staged, content).unwrap();
                cache.put_file_move(&staged).unwrap()
            }];
        for put in puts {
            let obj = put();
            let path = cache.object_path(&obj.digest);
            let mut damaged = content.to_vec();
            damaged[3] ^= 1;
            fs::remove_file(&path).unwrap();
            fs::write(&path, &damaged).unwrap();
            assert_eq!(put(), obj);
            assert_eq!(fs::read(&path).unwrap(), content);
            assert!(fs::metadata(&path).unwrap().permissions().readonly());
        }
    }

    #[test]
    fn put_missing_file_fails_and_leaves_no_temp() {
        let (d, cache) = cache();
        let err = cache.put_file(&d.path().join("nope")).unwrap_err();
        assert!(err.to_string().starts_with("failed to open `"), "{err}");
        assert_eq!(fs::read_dir(cache.tmp_root()).unwrap().count(), 0);
    }
}
