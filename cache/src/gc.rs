//! `gc`: remove everything not reachable from the records the caller keeps.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::debug;

use crate::cache::{Cache, disk_size, read_dir_sorted, remove_path, scan_sharded};
use crate::digest::Digest;
use crate::error::Result;
use crate::lease::age;
use crate::lock::CAN_REMOVE_LOCK_FILES;
use crate::record::load_record;
use crate::verify::DEFAULT_MIN_AGE;

/// How [`Cache::gc_with`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcOptions {
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// While some writer is active, unreferenced objects and temp entries younger than this
    /// are spared: they may belong to a stage between `put` and `publish`. Ignored when no
    /// writer is active.
    pub min_age: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self { dry_run: false, min_age: DEFAULT_MIN_AGE }
    }
}

/// What [`Cache::gc`] removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// No writer was active, so every unreferenced object and temp entry was fair game.
    pub quiescent: bool,
    /// Records kept.
    pub records_kept: usize,
    /// Records removed.
    pub records_removed: usize,
    /// Objects kept (referenced by a kept record, or too young to judge).
    pub objects_kept: usize,
    /// Objects removed.
    pub objects_removed: usize,
    /// Work areas removed.
    pub work_dirs_removed: usize,
    /// Temp entries removed.
    pub tmp_removed: usize,
    /// Lock files removed.
    pub locks_removed: usize,
    /// File-digest memo entries of vanished files removed.
    pub index_entries_removed: usize,
    /// Side-store entries kept (claimed by a kept key, or too young to judge): see
    /// [`SIDE_STORES`](crate::SIDE_STORES).
    pub side_dirs_kept: usize,
    /// Side-store entries removed (no kept key claims them), e.g. memory banks of prune stages.
    pub side_dirs_removed: usize,
    /// Bytes freed (records, objects, work areas, temp entries, side-store entries).
    pub bytes_freed: u64,
    /// Keys left alone because a running stage holds their lock.
    pub skipped_locked: Vec<Digest>,
    /// Unreferenced objects spared for being younger than [`GcOptions::min_age`].
    pub skipped_young: usize,
    /// Job descriptions of keys not kept spared for being younger than [`GcOptions::min_age`]
    /// while their stage has no complete record: a worker or Slurm job about to start may
    /// still read one (it holds no lock before it starts).
    pub young_jobs_spared: usize,
}

impl Cache {
    /// Removes records whose key is not in `keep`, objects no remaining record references,
    /// work areas, job descriptions (but not those of unfinished stages written less than
    /// [`GcOptions::min_age`] ago), logs and lock files of keys not kept, work areas of kept
    /// keys whose stage is complete, side-store entries no kept key claims, and stale temp
    /// entries. Nothing held by a running stage is removed. Refs are not touched.
    pub fn gc(&self, keep: &BTreeSet<Digest>, dry_run: bool) -> Result<GcReport> {
        self.gc_with(keep, &GcOptions { dry_run, ..GcOptions::default() })
    }

    /// [`gc`](Cache::gc) with all options.
    pub fn gc_with(&self, keep: &BTreeSet<Digest>, options: &GcOptions) -> Result<GcReport> {
        self.writable("collect garbage")?;
        // Held for the whole sweep when granted: no stage can start, publish or put meanwhile.
        let exclusive = self.try_activity_exclusive()?;
        let quiescent = exclusive.is_some();
        let dry_run = options.dry_run;
        let mut report = GcReport { dry_run, quiescent, ..GcReport::default() };
        let mut live: BTreeSet<Digest> = BTreeSet::new();

        let (records, _) = scan_sharded(&self.dir("records"), ".json")?;
        let (locks, _) = scan_sharded(&self.dir("locks"), ".lock")?;
        let locked_before: BTreeSet<Digest> = locks.iter().map(|(k, _)| *k).collect();
        let mut keys: BTreeSet<Digest> = records.iter().map(|(k, _)| *k).collect();
        keys.extend(locked_before.iter().copied());
        keys.extend(scan_sharded(&self.dir("jobs"), ".json")?.0.into_iter().map(|(k, _)| k));
        keys.extend(scan_sharded(&self.dir("logs"), ".log")?.0.into_iter().map(|(k, _)| k));
        keys.extend(
            read_dir_sorted(&self.dir("work"))?
                .iter()
                .filter_map(|p| p.file_name()?.to_str()?.parse::<Digest>().ok()),
        );

        // Keys whose side-store entries stay: the kept ones and those running stages hold.
        let mut claimed: BTreeSet<Digest> = keep.clone();
        for key in keys {
            let record_path = self.record_path(&key);
            let mut keep_outputs = || {
                if let Ok(record) = load_record(&record_path, Some(&key)) {
                    live.extend(record.outputs.values().map(|o| o.digest));
                }
            };
            if keep.contains(&key) {
                if record_path.exists() {
                    report.records_kept += 1;
                }
                keep_outputs();
                // A kept stage that completed needs no resume state (a stage killed right after
                // publishing its record leaves it).
                let work = self.work_path(&key);
                if work.exists()
                    && self.complete_record(&key)?.is_some()
                    && let Some(_lock) = self.try_lock_key_for_removal(&key)?
                {
                    report.work_dirs_removed += 1;
                    report.bytes_freed += disk_size(&work);
                    if !dry_run {
                        remove_path(&work)?;
                    } else if CAN_REMOVE_LOCK_FILES && !locked_before.contains(&key) {
                        // Taking the lock created its file: a dry run leaves no trace.
                        remove_path(&self.lock_path(&key))?;
                    }
                }
                continue;
            }
            let Some(_lock) = self.try_lock_key_for_removal(&key)? else {
                debug!(key = %key, "gc: key is locked by a running stage; skipping");
                report.skipped_locked.push(key);
                claimed.insert(key);
                if record_path.exists() {
                    report.records_kept += 1;
                }
                keep_outputs();
                continue;
            };
            // Judged before the record goes.
            let job = self.job_path(&key);
            let young_job = age(&job).is_some_and(|age| age < options.min_age)
                && self.complete_record(&key)?.is_none();
            report.young_jobs_spared += usize::from(young_job);
            if record_path.exists() {
                report.records_removed += 1;
                report.bytes_freed += disk_size(&record_path);
                if !dry_run {
                    remove_path(&record_path)?;
                }
            }
            let work = self.work_path(&key);
            if work.exists() {
                report.work_dirs_removed += 1;
                report.bytes_freed += disk_size(&work);
                if !dry_run {
                    remove_path(&work)?;
                }
            }
            for path in
                [(!young_job).then_some(job), Some(self.log_path(&key))].into_iter().flatten()
            {
                if path.exists() {
                    report.bytes_freed += disk_size(&path);
                    if !dry_run {
                        remove_path(&path)?;
                    }
                }
            }
            if CAN_REMOVE_LOCK_FILES {
                let existed = locked_before.contains(&key);
                report.locks_removed += usize::from(existed);
                // Taking the lock created the file if it was missing; a dry run removes only
                // that. Still holding it: a waiter on this file sees it unlinked and retries.
                if !dry_run || !existed {
                    remove_path(&self.lock_path(&key))?;
                }
            }
        }

        let now = SystemTime::now();
        let (objects, _) = scan_sharded(&self.dir("objects"), "")?;
        for (digest, path) in objects {
            if live.contains(&digest) {
                report.objects_kept += 1;
                continue;
            }
            let meta = fs::metadata(&path).ok();
            if !quiescent {
                let age = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .map(|t| now.duration_since(t).unwrap_or_default());
                if age.is_none_or(|age| age < options.min_age) {
                    report.skipped_young += 1;
                    report.objects_kept += 1;
                    continue;
                }
            }
            report.objects_removed += 1;
            report.bytes_freed += meta.map_or(0, |m| m.len());
            if !dry_run {
                remove_path(&path)?;
            }
        }

        self.gc_side_stores(&claimed, quiescent, options, &mut report)?;

        for path in self.stale_tmp(quiescent, options.min_age)? {
            report.tmp_removed += 1;
            report.bytes_freed += disk_size(&path);
            if !dry_run {
                remove_path(&path)?;
            }
        }
        // The memo write takes the activity lock shared, so let go of it first.
        drop(exclusive);
        report.index_entries_removed = self.prune_memo(dry_run)?;
        debug!(?report, "gc done");
        Ok(report)
    }
}
