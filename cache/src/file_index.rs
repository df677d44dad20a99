//! Digests of external inputs (data files, image folders), memoised in `index/files.json` by
//! (canonical path, size, mtime in ns, inode) so an unchanged data set is hashed once, not on
//! every `plan`.
//!
//! The memo is only a memo: a missing or corrupt file is ignored and rebuilt, and processes that
//! update it at once merge their entries, the last writer winning per path. A file whose mtime is
//! within [`RACY_WINDOW`] of the moment it was hashed is not memoised ("racy" in git's sense: it
//! could change again without its mtime moving, on file systems with coarse timestamps). A
//! read-only cache reads the memo but does not update it.

use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::path::{Path, PathBuf};
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::atomic::FILE_MODE;
use crate::cache::Cache;
use crate::digest::{Digest, hash_file};
use crate::error::{CacheError, Result, io_err};

/// Files modified this recently before being hashed are not memoised.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Directory walks give up below this depth (a guard against symlink loops).
pub const MAX_DIR_DEPTH: usize = 64;

const MEMO_VERSION: u32 = 1;

/// The digest of an external file, and whether it came from the memo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// blake3 of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// `true` if the memo answered without reading the file.
    pub memo_hit: bool,
}

/// What the memo remembers about one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MemoEntry {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    digest: Digest,
}

#[derive(Serialize, Deserialize)]
struct MemoFile {
    version: u32,
    entries: BTreeMap<String, MemoEntry>,
}

/// The stat fields an entry must match, plus the mtime as a time.
struct Stamp {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    mtime: SystemTime,
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        let mtime_ns = match mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        Self { size: meta.len(), mtime_ns, inode: inode(meta), mtime }
    }

    fn matches(&self, entry: &MemoEntry) -> bool {
        (self.size, self.mtime_ns, self.inode) == (entry.size, entry.mtime_ns, entry.inode)
    }

    fn entry(&self, digest: Digest) -> MemoEntry {
        MemoEntry { size: self.size, mtime_ns: self.mtime_ns, inode: self.inode, digest }
    }

    /// Whether the file was last modified well before `hashed_at`.
    fn settled(&self, hashed_at: SystemTime) -> bool {
        self.mtime + RACY_WINDOW < hashed_at
    }
}

#[cfg(unix)]
fn inode(meta: &Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &Metadata) -> u64 {
    0
}

impl Cache {
    /// The content digest of an external file (a data set, an external checkpoint).
    ///
    /// Memoised in `index/files.json` by (canonical path, size, mtime in ns, inode): an
    /// unchanged file is read once, not on every `plan`. Files modified less than
    /// [`RACY_WINDOW`] before being hashed are not memoised, since on file systems with coarse
    /// timestamps they could change again without their mtime moving.
    pub fn file_digest(&self, path: &Path) -> Result<Digest> {
        Ok(self.file_digest_info(path)?.digest)
    }

    /// Like [`file_digest`](Cache::file_digest), also telling the size and whether the memo
    /// answered.
    pub fn file_digest_info(&self, path: &Path) -> Result<FileDigest> {
        let canonical = fs::canonicalize(path).map_err(io_err("resolve", path))?;
        Ok(self.digest_files(&[canonical])?.remove(0))
    }

    /// The digest of a directory tree: blake3 over its files' relative paths (`/`-separated,
    /// sorted bytewise) and content digests. Symlinks are followed; empty directories do not
    /// count. File digests go through the memo.
    pub fn dir_digest(&self, dir: &Path) -> Result<Digest> {
        let root = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
        let mut files = Vec::new();
        walk(&root, Vec::new(), 0, &mut files)?;
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
        let digests = self.digest_files(&paths)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"progdiff-dir-v1\0");
        for ((rel, _), fd) in files.iter().zip(&digests) {
            hasher.update(&(rel.len() as u64).to_le_bytes());
            hasher.update(rel);
            hasher.update(fd.digest.as_bytes());
        }
        let digest = hasher.finalize().into();
        debug!(dir = %root.display(), files = files.len(), digest = %digest, "hashed directory");
        Ok(digest)
    }

    /// Digests canonical file paths: memo look-ups, the misses hashed in parallel, then one
    /// memo write.
    fn digest_files(&self, paths: &[PathBuf]) -> Result<Vec<FileDigest>> {
        let stamps = paths
            .iter()
            .map(|p| {
                let meta = fs::metadata(p).map_err(io_err("read metadata of", p))?;
                if !meta.is_file() {
                    return Err(CacheError::NotAFile { path: p.clone() });
                }
                Ok(Stamp::of(&meta))
            })
            .collect::<Result<Vec<_>>>()?;
        let known: Vec<Option<Digest>> = {
            let mut memo = self.memo();
            let entries = memo.get_or_insert_with(|| self.load_memo());
            paths
                .iter()
                .zip(&stamps)
                .map(|(p, stamp)| {
                    let entry = entries.get(p.to_str()?)?;
                    stamp.matches(entry).then_some(entry.digest)
                })
                .collect()
        };
        let results = paths
            .par_iter()
            .zip(&stamps)
            .zip(known)
            .map(|((path, stamp), known)| {
                if let Some(digest) = known {
                    debug!(path = %path.display(), digest = %digest, "file digest memo hit");
                    return Ok((FileDigest { digest, size: stamp.size, memo_hit: true }, None));
                }
                let hashed_at = SystemTime::now();
                let digest = hash_file(path)?;
                debug!(path = %path.display(), digest = %digest, "hashed file");
                let after = fs::metadata(path).map(|m| Stamp::of(&m)).ok();
                let unchanged =
                    after.is_some_and(|a| (a.size, a.mtime_ns) == (stamp.size, stamp.mtime_ns));
                let memo = (unchanged && stamp.settled(hashed_at))
                    .then(|| path.to_str().map(|k| (k.to_owned(), stamp.entry(digest))))
                    .flatten();
                Ok((FileDigest { digest, size: stamp.size, memo_hit: false }, memo))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fresh = BTreeMap::new();
        let digests = results
            .into_iter()
            .map(|(fd, entry)| {
                fresh.extend(entry);
                fd
            })
            .collect();
        if !fresh.is_empty() && !self.read_only {
            self.save_memo(fresh)?;
        }
        Ok(digests)
    }

    fn memo(&self) -> MutexGuard<'_, Option<BTreeMap<String, MemoEntry>>> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn memo_path(&self) -> PathBuf {
        self.dir("index").join("files.json")
    }

    /// The memo on disk; missing or unreadable is empty.
    fn load_memo(&self) -> BTreeMap<String, MemoEntry> {
        let path = self.memo_path();
        let Ok(bytes) = fs::read(&path) else { return BTreeMap::new() };
        match serde_json::from_slice::<MemoFile>(&bytes) {
            Ok(memo) if memo.version == MEMO_VERSION => memo.entries,
            Ok(memo) => {
                debug!(path = %path.display(), version = memo.version, "ignoring memo of another version");
                BTreeMap::new()
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring corrupt file digest memo");
                BTreeMap::new()
            }
        }
    }

    /// Merges `fresh` entries into the memo on disk (re-read, so entries other processes wrote
    /// meanwhile survive) and into memory.
    fn save_memo(&self, fresh: BTreeMap<String, MemoEntry>) -> Result<()> {
        let mut memo = self.memo();
        let mut entries = self.load_memo();
        entries.extend(fresh);
        self.write_memo(&entries)?;
        *memo = Some(entries);
        Ok(())
    }

    fn write_memo(&self, entries: &BTreeMap<String, MemoEntry>) -> Result<()> {
        let path = self.memo_path();
        let file = MemoFile { version: MEMO_VERSION, entries: entries.clone() };
        let json = serde_json::to_vec(&file)
            .map_err(|source| CacheError::Serialize { path: path.clone(), source })?;
        self.write_atomic(&path, &json, FILE_MODE)
    }

    /// Drops memo entries whose files are gone; returns how many (for `gc`).
    pub(crate) fn prune_memo(&self, dry_run: bool) -> Result<usize> {
        let mut memo = self.memo();
        let mut entries = self.load_memo();
        let before = entries.len();
        entries.retain(|path, _| Path::new(path).is_file());
        let removed = before - entries.len();
        if removed > 0 && !dry_run {
            self.write_memo(&entries)?;
            *memo = Some(entries);
        }
        Ok(removed)
    }
}

/// Collects (relative path bytes, absolute path) of the files under `dir`.
fn walk(dir: &Path, rel: Vec<u8>, depth: usize, out: &mut Vec<(Vec<u8>, PathBuf)>) -> Result<()> {
    if depth > MAX_DIR_DEPTH {
        return Err(CacheError::TooDeep { path: dir.to_path_buf() });
    }
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let path = entry.path();
        let mut child = rel.clone();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(entry.file_name().as_encoded_bytes());
        let meta = fs::metadata(&path).map_err(io_err("read metadata of", &path))?;
        if meta.is_dir() {
            walk(&path, child, depth + 1, out)?;
        } else if meta.is_file() {
            out.push((child, path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_settled() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"x").unwrap();
        let stamp = Stamp::of(&fs::metadata(&p).unwrap());
        assert!(!stamp.settled(SystemTime::now()));
        assert!(stamp.settled(SystemTime::now() + Duration::from_secs(3)));
    }
}
