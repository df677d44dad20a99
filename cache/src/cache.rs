//! [`Cache`]: the handle on one cache root, and the on-disk layout under it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::debug;

use crate::digest::Digest;
use crate::error::{CacheError, Result, io_err};
use crate::file_index::MemoEntry;

/// Name of the versioned bucket under the root. Bump it when the layout or a file format changes
/// incompatibly; an old bucket is then simply ignored (and can be deleted by hand).
pub const BUCKET: &str = "v1";

/// A content-addressed store rooted at a directory. See the [crate docs](crate) for the layout
/// and the guarantees.
///
/// A `Cache` is `Send + Sync`; share one per process (e.g. in an `Arc`). Any number of processes
/// may open the same root at once.
#[derive(Debug)]
pub struct Cache {
    pub(crate) root: PathBuf,
    pub(crate) bucket: PathBuf,
    /// The external-file digest memo, loaded on first use.
    pub(crate) memo: Mutex<Option<BTreeMap<String, MemoEntry>>>,
    /// Nothing may be written: see [`Cache::is_read_only`].
    pub(crate) read_only: bool,
}

const DIRS: [&str; 10] =
    ["objects", "records", "refs", "locks", "work", "tmp", "index", "jobs", "logs", "leases"];

impl Cache {
    /// Opens (creating if needed) the cache rooted at `root`, e.g. `.progdiff`.
    ///
    /// A fresh root gets a `CACHEDIR.TAG` (so backup tools skip it) and a `.gitignore` of `*`.
    ///
    /// A cache this process cannot write to (a read-only mount, a directory owned by someone
    /// else) opens [read-only](Cache::is_read_only) instead of failing: it serves records and
    /// objects, and every write is refused with [`CacheError::ReadOnly`]. Writability is probed
    /// by creating an unnamed temp file in `tmp/` (`O_TMPFILE` where available, so nothing is
    /// left behind), because only a write tells: `root` may write where permission bits say no,
    /// and a read-only mount still lets `mkdir` of an existing directory succeed.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let bucket = root.join(BUCKET);
        let read_only = match Self::create_layout(&root, &bucket) {
            Ok(()) => false,
            Err(CacheError::Io { source, .. }) if is_read_only_error(&source) => true,
            Err(e) => return Err(e),
        };
        if read_only {
            debug!(root = %root.display(), "cache is not writable: opened read-only");
        } else {
            debug!(root = %root.display(), "opened cache");
        }
        Ok(Self { root, bucket, memo: Mutex::new(None), read_only })
    }

    /// Opens the cache rooted at `root` without ever writing to it, e.g. a shared cache a CI job
    /// consumes: records and objects are served, every write is refused with
    /// [`CacheError::ReadOnly`]. A root that does not exist reads as an empty cache.
    pub fn open_read_only(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let bucket = root.join(BUCKET);
        debug!(root = %root.display(), "opened cache read-only");
        Ok(Self { root, bucket, memo: Mutex::new(None), read_only: true })
    }

    /// Creates the layout (idempotent) and proves that this process can write to it.
    fn create_layout(root: &Path, bucket: &Path) -> Result<()> {
        for dir in DIRS {
            let p = bucket.join(dir);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        for (name, content) in [
            (
                "CACHEDIR.TAG",
                "Signature: 8a477f597d28d172789f06886806bc55\n# progdiff cache: see https://bford.info/cachedir/\n",
            ),
            (".gitignore", "*\n"),
        ] {
            let p = root.join(name);
            if !p.exists() {
                fs::write(&p, content).map_err(io_err("write", &p))?;
            }
        }
        let tmp = bucket.join("tmp");
        tempfile::tempfile_in(&tmp).map_err(io_err("create a temp file in", &tmp))?;
        Ok(())
    }

    /// Whether this cache refuses writes: opened with [`open_read_only`](Cache::open_read_only),
    /// or found not writable by [`open`](Cache::open). A read-only cache serves records, objects,
    /// refs and file digests (computed, not memoised); storing, publishing, locking keys, work
    /// areas, `gc` and `repair` fail with [`CacheError::ReadOnly`], and the maintenance sweeps
    /// ([`sweep_tmp`](Cache::sweep_tmp), [`remove_finished_work_dirs`](Cache::remove_finished_work_dirs)) do nothing.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// `Err(ReadOnly)` if the cache is read-only, for the start of every write.
    pub(crate) fn writable(&self, action: &'static str) -> Result<()> {
        if self.read_only {
            return Err(CacheError::ReadOnly { action, root: self.root.clone() });
        }
        Ok(())
    }

    /// The root directory this cache was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/v1`: where everything lives.
    pub fn bucket(&self) -> &Path {
        &self.bucket
    }

    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.bucket.join(name)
    }

    pub(crate) fn tmp_root(&self) -> PathBuf {
        self.dir("tmp")
    }

    /// `<dir>/<ab>/<hex><ext>`: the sharded path of a digest in one of the trees.
    pub(crate) fn sharded(&self, dir: &str, digest: &Digest, ext: &str) -> PathBuf {
        self.dir(dir).join(digest.prefix()).join(format!("{digest}{ext}"))
    }
}

/// Whether an I/O error says "you may not write here" (a read-only file system, or permissions),
/// as opposed to a failure of the write itself (a full disk).
pub(crate) fn is_read_only_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
    )
}

/// A sharded tree's scan: (digest, path) of well-named files, and everything else found.
pub type ShardedScan = (Vec<(Digest, PathBuf)>, Vec<PathBuf>);

/// Lists `<dir>/<ab>/<name>` files of a sharded tree whose name parses as a digest (after
/// stripping `ext`) and sits in the right shard, and separately everything else found there.
pub fn scan_sharded(dir: &Path, ext: &str) -> Result<ShardedScan> {
    let mut found = Vec::new();
    let mut stray = Vec::new();
    for shard in read_dir_sorted(dir)? {
        if !shard.is_dir() {
            stray.push(shard);
            continue;
        }
        let shard_name = shard.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        for file in read_dir_sorted(&shard)? {
            let digest = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(ext))
                .and_then(|n| n.parse::<Digest>().ok())
                .filter(|d| d.prefix() == shard_name && file.is_file());
            match digest {
                Some(d) => found.push((d, file)),
                None => stray.push(file),
            }
        }
    }
    Ok((found, stray))
}

/// The entries of a directory, sorted; a missing directory is empty.
pub fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.map_err(io_err("read directory", dir))?.path());
    }
    out.sort();
    Ok(out)
}

/// Total size of the files under `path` (a file or a directory tree), not following symlinks.
pub fn disk_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_size(&e.path())).sum())
        .unwrap_or(0)
}

/// Removes a file or a directory tree; already gone is fine.
pub fn remove_path(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}
