//! Atomic publication: write into a temp file under `tmp/`, fsync, rename onto the final path,
//! fsync the directory. The temp file is a [`tempfile::TempPath`] guard, so an error or a panic
//! anywhere before the rename deletes it; a crash leaves it in `tmp/` for `gc` to sweep, never a
//! partial file at a final path.

use std::fs::{self, File, Permissions};
use std::io::Write;
use std::path::Path;

use tempfile::TempPath;

use crate::cache::Cache;
use crate::error::{Result, io_err};

/// Mode of published objects: read-only for everyone.
pub(crate) const OBJECT_MODE: u32 = 0o444;
/// Mode of records, refs and the memo.
pub(crate) const FILE_MODE: u32 = 0o644;

impl Cache {
    /// A fresh, empty temp file in `tmp/`, deleted when the guard drops.
    pub(crate) fn temp_file(&self, what: &str) -> Result<(File, TempPath)> {
        let tmp = self.tmp_root();
        let file = tempfile::Builder::new()
            .prefix(&format!(".{what}-"))
            .suffix(".tmp")
            .tempfile_in(&tmp)
            .map_err(io_err("create a temp file in", &tmp))?;
        Ok(file.into_parts())
    }

    /// A fresh temp file in `tmp/` for a download (deleted when the guard drops unless moved into
    /// the store with [`put_downloaded`](Cache::put_downloaded)).
    pub fn download_file(&self) -> Result<(File, TempPath)> {
        self.temp_file("download")
    }

    /// Writes `bytes` to `dest` atomically (readers see the old file or the new one, never a
    /// mix), creating `dest`'s parent directory if needed.
    pub(crate) fn write_atomic(&self, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        let _active = self.activity_shared()?;
        let (mut file, temp) = self.temp_file("write")?;
        file.write_all(bytes).map_err(io_err("write", &temp))?;
        drop(file);
        self.persist(temp, dest, mode)
    }

    /// Sets `mode`, fsyncs the temp file, renames it onto `dest` and fsyncs `dest`'s directory.
    pub(crate) fn persist(&self, temp: TempPath, dest: &Path, mode: u32) -> Result<()> {
        fs::set_permissions(&temp, permissions(mode))
            .map_err(io_err("set permissions of", &temp))?;
        File::open(&temp).and_then(|f| f.sync_all()).map_err(io_err("sync", &temp))?;
        let dir = dest.parent().expect("cache paths have a parent");
        if !dir.is_dir() {
            // A new shard directory: make its own entry durable too.
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            sync_dir(dir.parent().expect("shard directories have a parent"))?;
        }
        temp.persist(dest).map_err(|e| io_err("rename a temp file onto", dest)(e.error))?;
        sync_dir(dir)
    }
}

#[cfg(unix)]
pub(crate) fn permissions(mode: u32) -> Permissions {
    use std::os::unix::fs::PermissionsExt;
    Permissions::from_mode(mode)
}

#[cfg(not(unix))]
pub(crate) fn permissions(mode: u32) -> Permissions {
    let mut p = fs::metadata(".").map(|m| m.permissions()).expect("cwd has metadata");
    p.set_readonly(mode & 0o200 == 0);
    p
}

/// fsyncs a directory so a rename into it survives power loss (a no-op where directories cannot
/// be opened, i.e. off unix).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|f| f.sync_all()).map_err(io_err("sync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
