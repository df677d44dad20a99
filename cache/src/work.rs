//! Per-key work areas (`work/<key>/`, resume state that survives crashes) and staging
//! directories (`tmp/stage-*/`, removed when dropped).

use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use tracing::debug;

use crate::cache::{Cache, read_dir_sorted, remove_path};
use crate::digest::Digest;
use crate::error::{Result, io_err};
use crate::lock::ActivityGuard;

/// A fresh, empty directory under `tmp/` for a stage to write its outputs into before they are
/// moved into the store with [`Cache::put_file_move`]. Removed with its content on drop (a
/// crash leaves it for `gc`).
#[derive(Debug)]
pub struct StagingDir {
    // Field order matters: the directory is removed before its lock and the activity hold go.
    dir: TempDir,
    _lock: File,
    _active: ActivityGuard,
}

impl StagingDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Cache {
    /// The work area of `key`, created if needed: a stage keeps resume state there (partial
    /// checkpoints, logs). It survives crashes and is not part of the record; remove it with
    /// [`remove_work_dir`](Cache::remove_work_dir) after publishing. `gc` removes those of keys it
    /// is not told to keep.
    pub fn work_dir(&self, key: &Digest) -> Result<PathBuf> {
        self.writable("create a work area")?;
        let path = self.work_path(key);
        fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
        Ok(path)
    }

    /// Removes the work area of `key`; absent is fine.
    pub fn remove_work_dir(&self, key: &Digest) -> Result<()> {
        self.writable("remove a work area")?;
        let path = self.work_path(key);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    pub(crate) fn work_path(&self, key: &Digest) -> PathBuf {
        self.dir("work").join(key.to_hex())
    }

    /// The keys that have a work area, with its path (entries not named by a key are skipped).
    pub(crate) fn work_dirs(&self) -> Result<Vec<(Digest, PathBuf)>> {
        Ok(read_dir_sorted(&self.dir("work"))?
            .into_iter()
            .filter_map(|p| Some((p.file_name()?.to_str()?.parse::<Digest>().ok()?, p)))
            .collect())
    }

    /// Work areas of keys that have a [complete record](Cache::complete_record): resume state
    /// nothing will resume, left by a stage killed between publishing its record and removing
    /// its work area.
    pub fn finished_work_dirs(&self) -> Result<Vec<PathBuf>> {
        Ok(self.finished_work_areas()?.into_iter().map(|(_, p)| p).collect())
    }

    fn finished_work_areas(&self) -> Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for (key, path) in self.work_dirs()? {
            if self.complete_record(&key)?.is_some() {
                out.push((key, path));
            }
        }
        Ok(out)
    }

    /// Removes the [finished work areas](Cache::finished_work_dirs), each under its key's lock
    /// (a key some process holds is left alone). Does nothing in a read-only cache. `progdiff
    /// run` calls this before it starts; `gc` and `repair` do it too. Returns how many were
    /// removed.
    pub fn remove_finished_work_dirs(&self) -> Result<usize> {
        if self.read_only {
            return Ok(0);
        }
        let mut removed = 0;
        for (key, path) in self.finished_work_areas()? {
            let Some(_lock) = self.try_lock_key_for_removal(&key)? else { continue };
            remove_path(&path)?;
            debug!(key = %key, path = %path.display(), "removed the work area of a finished stage");
            removed += 1;
        }
        Ok(removed)
    }

    /// A fresh empty staging directory under `tmp/`, removed when the guard drops.
    pub fn staging_dir(&self) -> Result<StagingDir> {
        let active = self.activity_shared()?;
        let tmp = self.tmp_root();
        let dir = tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(&tmp)
            .map_err(io_err("create a staging directory in", &tmp))?;
        // Lock the directory itself so `gc` can tell a live staging dir from a crashed one.
        let lock = File::open(dir.path()).map_err(io_err("open", dir.path()))?;
        lock.lock().map_err(io_err("lock", dir.path()))?;
        Ok(StagingDir { dir, _lock: lock, _active: active })
    }
}

/// Whether a `tmp/` entry is held by a live [`StagingDir`].
pub(crate) fn staging_in_use(path: &Path) -> bool {
    if !path.is_dir() {
        return false;
    }
    match File::open(path) {
        Ok(file) => matches!(file.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_dir_is_removed_on_drop_even_on_panic() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path()).unwrap();
        let staging = cache.staging_dir().unwrap();
        let path = staging.path().to_path_buf();
        fs::write(path.join("out.bin"), b"x").unwrap();
        assert!(staging_in_use(&path));
        drop(staging);
        assert!(!path.exists());

        let result = std::panic::catch_unwind(|| {
            let staging = cache.staging_dir().unwrap();
            fs::write(staging.path().join("half"), b"x").unwrap();
            panic!("stage failed");
        });
        assert!(result.is_err());
        assert_eq!(fs::read_dir(cache.tmp_root()).unwrap().count(), 0);
    }

    #[test]
    fn work_dir_create_and_remove() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path()).unwrap();
        let key = crate::hash_bytes(b"k");
        let w = cache.work_dir(&key).unwrap();
        assert!(w.is_dir());
        assert!(w.ends_with(format!("v1/work/{key}")));
        fs::write(w.join("resume.ckpt"), b"x").unwrap();
        assert_eq!(cache.work_dir(&key).unwrap(), w);
        assert!(w.join("resume.ckpt").exists());
        cache.remove_work_dir(&key).unwrap();
        assert!(!w.exists());
        cache.remove_work_dir(&key).unwrap();
    }
}
