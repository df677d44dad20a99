//! Inter-process locks on files (`flock` on unix through std's [`File::lock`]): the OS releases
//! them when the holder's file is closed or its process dies, even by `kill -9`.
//!
//! Two kinds:
//! - **key locks** `locks/<ab>/<key>.lock`: held exclusively by whoever computes a stage, so two
//!   processes never compute the same key;
//! - the **activity lock** `locks/activity.lock`: held *shared* by every writer for as long as it
//!   may leave unreferenced objects or temp files behind (a [`KeyLock`], a
//!   [`StagingDir`](crate::StagingDir), one `put`), and *exclusively* (try-only) by `gc`/`verify`
//!   to learn that nothing is in flight.
//!
//! A [read-only](Cache::is_read_only) cache takes no key lock and no shared hold (it writes
//! nothing); `verify` still asks for the exclusive hold, on the existing lock file opened for
//! reading (`flock` needs no write access), to learn whether writers elsewhere are active.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use tracing::debug;

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Result, io_err};

/// An exclusive lock on one key, held until dropped.
///
/// The engine's protocol: `lock_key`, re-check [`Cache::record`], compute and
/// [`Cache::publish`] only if absent, drop the lock. Two processes (or threads) sharing a cache
/// then never compute the same stage twice: the second waits, then finds the record.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct KeyLock {
    key: Digest,
    path: PathBuf,
    _file: File,
    _active: ActivityGuard,
}

impl KeyLock {
    /// The locked key.
    pub fn key(&self) -> &Digest {
        &self.key
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        debug!(key = %self.key, "unlocked key");
    }
}

/// A hold on the activity lock (shared or exclusive), released on drop.
#[derive(Debug)]
pub(crate) struct ActivityGuard {
    _file: File,
}

impl Cache {
    /// Blocks until this process holds the exclusive lock on `key`.
    ///
    /// May also wait briefly while a `gc` sweep holds the whole cache.
    pub fn lock_key(&self, key: &Digest) -> Result<KeyLock> {
        let active = self.activity_shared()?;
        let path = self.lock_path(key);
        debug!(key = %key, path = %path.display(), "waiting for key lock");
        let file = lock_file(&path, true)?.expect("a blocking lock always returns a file");
        debug!(key = %key, "locked key");
        Ok(KeyLock { key: *key, path, _file: file, _active: active })
    }

    /// The exclusive lock on `key` if no one else holds it, else `None` without waiting.
    pub fn try_lock_key(&self, key: &Digest) -> Result<Option<KeyLock>> {
        let active = self.activity_shared()?;
        let path = self.lock_path(key);
        Ok(lock_file(&path, false)?.map(|file| {
            debug!(key = %key, "locked key");
            KeyLock { key: *key, path, _file: file, _active: active }
        }))
    }

    pub(crate) fn lock_path(&self, key: &Digest) -> PathBuf {
        self.sharded("locks", key, ".lock")
    }

    fn activity_path(&self) -> PathBuf {
        self.dir("locks").join("activity.lock")
    }

    /// Blocks until a shared hold on the activity lock is granted: the start of every write, so
    /// a read-only cache refuses here.
    pub(crate) fn activity_shared(&self) -> Result<ActivityGuard> {
        self.writable("write to it")?;
        let path = self.activity_path();
        let file = open_lock_file(&path)?;
        file.lock_shared().map_err(io_err("lock", &path))?;
        Ok(ActivityGuard { _file: file })
    }

    /// The exclusive hold on the activity lock if no writer is active, without waiting.
    ///
    /// In a read-only cache the existing lock file is opened for reading; without one, writers
    /// are presumed active (`None`), the careful answer.
    pub(crate) fn try_activity_exclusive(&self) -> Result<Option<ActivityGuard>> {
        let path = self.activity_path();
        let file = if self.read_only {
            match File::open(&path) {
                Ok(file) => file,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "read-only cache: no activity lock");
                    return Ok(None);
                }
            }
        } else {
            open_lock_file(&path)?
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(ActivityGuard { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
        }
    }

    /// Locks `key` for deletion by `gc`/`repair`: try-only, and without the activity lock (which
    /// `gc` may hold exclusively itself).
    pub(crate) fn try_lock_key_for_removal(&self, key: &Digest) -> Result<Option<File>> {
        self.writable("remove from it")?;
        lock_file(&self.lock_path(key), false)
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    let dir = path.parent().expect("lock paths have a parent");
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open lock file", path))
}

/// Locks `path` exclusively, creating it. `gc` deletes lock files (while holding them), so after
/// locking we check that the file we hold is still the one at `path`; if not, a deleter got
/// there first and we retry on the new file.
fn lock_file(path: &Path, blocking: bool) -> Result<Option<File>> {
    loop {
        let file = open_lock_file(path)?;
        if blocking {
            file.lock().map_err(io_err("lock", path))?;
        } else {
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(io_err("lock", path)(e)),
            }
        }
        if still_linked(path, &file)? {
            return Ok(Some(file));
        }
        debug!(path = %path.display(), "lock file was replaced while waiting; retrying");
    }
}

#[cfg(unix)]
fn still_linked(path: &Path, file: &File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata().map_err(io_err("read metadata of", path))?;
    match fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("read metadata of", path)(e)),
    }
}

#[cfg(not(unix))]
fn still_linked(_path: &Path, _file: &File) -> Result<bool> {
    Ok(true)
}

/// Whether lock files may be deleted safely (only where [`still_linked`] can tell).
pub(crate) const CAN_REMOVE_LOCK_FILES: bool = cfg!(unix);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_lock_fails_while_held_and_succeeds_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = crate::hash_bytes(b"k");
        let held = cache.lock_key(&key).unwrap();
        assert_eq!(held.key(), &key);
        assert!(cache.try_lock_key(&key).unwrap().is_none());
        // another key is independent
        assert!(cache.try_lock_key(&crate::hash_bytes(b"other")).unwrap().is_some());
        drop(held);
        assert!(cache.try_lock_key(&key).unwrap().is_some());
    }

    #[test]
    fn activity_exclusive_only_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.try_activity_exclusive().unwrap().is_some());
        let lock = cache.lock_key(&crate::hash_bytes(b"k")).unwrap();
        assert!(cache.try_activity_exclusive().unwrap().is_none());
        drop(lock);
        assert!(cache.try_activity_exclusive().unwrap().is_some());
    }

    #[cfg(unix)]
    #[test]
    fn waiter_survives_lock_file_removal() {
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(Cache::open(dir.path()).unwrap());
        let key = crate::hash_bytes(b"k");
        // "gc" holds the key and deletes its lock file while a waiter blocks on the old inode
        let gc_hold = cache.try_lock_key_for_removal(&key).unwrap().unwrap();
        let c = cache.clone();
        let waiter = std::thread::spawn(move || c.lock_key(&key).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(100));
        fs::remove_file(cache.lock_path(&key)).unwrap();
        drop(gc_hold);
        let lock = waiter.join().unwrap();
        // the waiter holds the lock file now at the path, so nobody else can take the key
        assert!(cache.lock_path(&key).exists());
        assert!(cache.try_lock_key(&key).unwrap().is_none());
        drop(lock);
    }
}
