//! # progdiff-cache
//!
//! The content-addressed store under every progdiff run: stage outputs are stored as immutable
//! objects named by their blake3 digest, and a *stage record* maps a stage instance's key (the
//! blake3 of its canonical fingerprint, computed by the engine) to the objects it produced. A
//! record's existence is the cache hit. The crate knows nothing of libtorch, manifests or stages.
//!
//! ## Layout
//!
//! Everything lives in a versioned bucket under the root the caller picks (`.progdiff/` by
//! default); a future incompatible layout gets a new bucket and leaves this one alone.
//!
//! ```text
//! <root>/CACHEDIR.TAG, .gitignore        so backups and git skip the cache
//! <root>/v1/objects/ab/ab12…(64 hex)     objects, named by content digest, read-only
//! <root>/v1/records/ab/<key>.json        stage records (StageRecord as pretty JSON)
//! <root>/v1/refs/<namespace>/<name>      one key in hex, e.g. last key of `prune[3]` of a manifest
//! <root>/v1/locks/ab/<key>.lock          per-key lock files
//! <root>/v1/locks/activity.lock          shared by writers, exclusive for gc
//! <root>/v1/work/<key>/                  a stage's resume state; survives crashes
//! <root>/v1/tmp/                         temp files and staging dirs before publication
//! <root>/v1/index/files.json             memo of external file digests
//! <root>/v1/jobs/ab/<key>.json           job descriptions (what a worker runs)
//! <root>/v1/logs/ab/<key>.log            worker logs, every attempt appended
//! <root>/v1/leases/ab/<key>.lease        per-key leases (locks across the nodes of a shared fs)
//! <root>/v1/prune-banks/<digest>/         a side store (state beyond one key), with
//!                            owners/<key>  the keys that use this entry (see below)
//! ```
//!
//! Objects keep their full digest as file name (not git's 62-character tail) so a digest
//! printed anywhere can be found with `find`. Shard directories are never removed.
//!
//! ## Guarantees
//!
//! **Atomic publication.** Objects, records, refs and the memo are written to a temp file in
//! `tmp/` (same file system), fsynced, renamed onto their final path, and the directory fsynced.
//! A crash at any instant leaves either nothing or the complete file at the final path; the
//! temp file is deleted by its guard on error or panic, or left in `tmp/` by a crash, where
//! [`Cache::verify`] reports it and [`Cache::gc`] removes it. An object's name always matches
//! its content: [`Cache::put_file`] hashes the copy it made before renaming it into place, and
//! an object already stored under that digest is re-hashed before it is reused (a damaged one
//! is replaced, never handed to a new record).
//! A record is published only after every object it names is stored, so a record never points at
//! nothing (unless someone deletes objects by hand, which `verify` reports). A record carries a
//! checksum of its content, so one changed after publication (an output pointing at another
//! object, another size) is treated as unreadable.
//!
//! **One computation per key.** [`Cache::lock_key`] takes an exclusive OS file lock
//! (`flock` through std's [`File::lock`](std::fs::File::lock)) that is released when the
//! [`KeyLock`] drops or its process dies, even by `kill -9`. The engine's protocol is: lock the
//! key, re-check [`Cache::record`], compute and [`Cache::publish`] only if absent, then drop
//! the lock. Two threads or processes sharing a cache then never compute the same stage twice:
//! the second waits and finds the record.
//!
//! **A failed stage leaves no record.** Its outputs go to a [`StagingDir`] (removed on drop) and
//! are moved into the store with [`Cache::put_file_move`] only when it succeeds; resume state it
//! wants to survive a crash goes to its [`Cache::work_dir`]. **A completed stage leaves no work
//! area**: the stage removes it after publishing, and one left by a kill in between is removed
//! by the next `progdiff run` ([`Cache::remove_finished_work_dirs`]), `gc` and `repair`, and
//! reported by `verify`.
//!
//! **gc never pulls the rug.** [`Cache::gc`] keeps the records whose keys the caller names (the
//! keys of every manifest still in use) and every object they reference, and removes the rest:
//! other records, unreferenced objects, work areas and lock files of other keys, stale temp
//! entries, and memo entries of vanished files. It try-locks each key before removing its record
//! or work area and skips keys a running stage holds. Writers (a `KeyLock`, a `StagingDir`, one
//! `put`) hold `activity.lock` shared; gc tries to hold it exclusively. If it gets it, nothing is
//! in flight and it sweeps everything unreferenced; if not, it spares unreferenced objects and
//! temp entries younger than [`GcOptions::min_age`] (default one hour), which covers a stage
//! between `put` and `publish` (reusing an object, by `put` or `publish`, refreshes its mtime).
//! Refs are not gc roots and are never removed. Side-store entries (`prune-banks/<digest>/`) are
//! kept while a key in their `owners/` is kept or held, else removed (see [`SIDE_STORES`]).
//!
//! **Corruption is reported, never a panic.** [`Cache::verify`] re-hashes every object in
//! parallel and checks every record (readable, its checksum, every object present with the
//! recorded size); [`Cache::record`] treats an unparsable record as absent
//! (with a warning) so a re-run replaces it; [`Cache::repair`] removes corrupt objects, the
//! records that need them and, transitively, the records (and resume state) of every stage
//! computed from those, so the affected stages run again and no result computed from damaged
//! bytes survives.
//!
//! **Read-only caches work.** A cache this process cannot write (a read-only mount, a CI job
//! consuming a shared cache) opens [read-only](Cache::is_read_only), as does one opened with
//! [`Cache::open_read_only`]: records, objects and `verify` work, every write fails with
//! [`CacheError::ReadOnly`].
//!
//! ## External inputs
//!
//! [`Cache::file_digest`] and [`Cache::dir_digest`] give content digests of data files and image
//! folders for cache keys, memoised by (canonical path, size, mtime, inode) so an unchanged data
//! set is read once, not on every `plan`.

#![warn(missing_docs)]

mod atomic;
mod cache;
mod digest;
mod error;
mod file_index;
mod gc;
mod jobs;
mod lease;
mod lock;
mod object;
mod record;
mod refs;
mod side_store;
mod time;
mod verify;
mod work;

pub use cache::{
    BUCKET, Cache, ShardedScan, disk_size, read_dir_sorted, remove_path, scan_sharded,
};
pub use digest::{Digest, MMAP_THRESHOLD, ParseDigestError, hash_bytes, hash_file};
pub use error::{CacheError, Result};
pub use file_index::{FileDigest, MAX_DIR_DEPTH, RACY_WINDOW};
pub use gc::{GcOptions, GcReport};
pub use lease::{Lease, LeaseOwner, OwnerCheck};
pub use lock::KeyLock;
pub use object::ObjectRef;
pub use record::{RecordMeta, StageRecord, decode_record, encode_record, host_name};
pub use side_store::{OWNERS_DIR, SIDE_STORES};
pub use time::rfc3339_utc;
pub use verify::{
    BadRecord, CorruptObject, DEFAULT_MIN_AGE, MissingObject, RepairReport, SizeMismatch,
    VerifyReport,
};
pub use work::StagingDir;

/// An error and its causes, joined by `: `.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
