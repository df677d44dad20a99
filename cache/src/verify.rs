//! `verify`: re-hash every object, check every record, find leftovers of crashed writers; and
//! `repair`, which removes what `verify` found broken.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::Serialize;
use tracing::{debug, warn};

use crate::cache::{Cache, disk_size, read_dir_sorted, remove_path, scan_sharded};
use crate::digest::{Digest, hash_file};
use crate::error::Result;
use crate::record::{RecordError, load_record};
use crate::work::staging_in_use;

/// While a writer is active, temp entries younger than this are presumed to be its own.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(60 * 60);

/// What [`Cache::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub objects_checked: usize,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Record files read.
    pub records_checked: usize,
    /// Objects whose content does not match their name.
    pub corrupt_objects: Vec<CorruptObject>,
    /// Record files that cannot be parsed or name another key.
    pub bad_records: Vec<BadRecord>,
    /// Record outputs whose object is not stored.
    pub missing_objects: Vec<MissingObject>,
    /// Leftovers of interrupted writers in `tmp/`.
    pub stale_tmp: Vec<PathBuf>,
    /// Files in `objects/` or `records/` that do not belong there (not named by a digest).
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    /// `true` when nothing is wrong (stale temp files and strays count as wrong).
    pub fn is_clean(&self) -> bool {
        self.corrupt_objects.is_empty()
            && self.bad_records.is_empty()
            && self.missing_objects.is_empty()
            && self.stale_tmp.is_empty()
            && self.stray_files.is_empty()
    }
}

/// An object whose content hashes to something other than its name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CorruptObject {
    /// The object file.
    pub path: PathBuf,
    /// The digest it is named by.
    pub expected: Digest,
    /// The digest of its content, or `None` if it could not be read.
    pub actual: Option<Digest>,
    /// Why it could not be read, if so.
    pub error: Option<String>,
}

/// A record file that cannot be used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BadRecord {
    /// The record file.
    pub path: PathBuf,
    /// The key its file name says it holds.
    pub key: Digest,
    /// Why it cannot be used.
    pub reason: String,
}

/// A record output whose object is absent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MissingObject {
    /// The record's key.
    pub key: Digest,
    /// The record's stage instance id.
    pub id: String,
    /// The output name.
    pub output: String,
    /// The missing object.
    pub digest: Digest,
}

/// What [`Cache::repair`] removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RepairReport {
    /// Corrupt objects removed.
    pub objects_removed: usize,
    /// Records removed (unreadable, or naming a corrupt or missing object).
    pub records_removed: usize,
    /// Stale temp entries removed.
    pub tmp_removed: usize,
    /// Records left alone because a running stage holds their key.
    pub skipped_locked: Vec<Digest>,
}

impl Cache {
    /// Re-hashes every object (in parallel) and checks every record; reports corrupt objects,
    /// unreadable records, records naming missing objects, stale temp entries and stray files.
    /// Changes nothing; see [`repair`](Cache::repair).
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let (objects, stray_objects) = scan_sharded(&self.dir("objects"), "")?;
        report.objects_checked = objects.len();
        report.corrupt_objects = objects
            .par_iter()
            .filter_map(|(expected, path)| {
                let (actual, error) = match hash_file(path) {
                    Ok(actual) if actual == *expected => return None,
                    Ok(actual) => (Some(actual), None),
                    Err(e) => (None, Some(crate::error_chain(&e))),
                };
                warn!(path = %path.display(), "corrupt object");
                Some(CorruptObject { path: path.clone(), expected: *expected, actual, error })
            })
            .collect();
        report.bytes_checked = objects.iter().map(|(_, p)| disk_size(p)).sum();

        let (records, stray_records) = scan_sharded(&self.dir("records"), ".json")?;
        report.records_checked = records.len();
        for (key, path) in records {
            match load_record(&path, Some(&key)) {
                Ok(record) => {
                    for (output, object) in &record.outputs {
                        if !self.has_object(&object.digest) {
                            report.missing_objects.push(MissingObject {
                                key,
                                id: record.id.clone(),
                                output: output.clone(),
                                digest: object.digest,
                            });
                        }
                    }
                }
                Err(RecordError::Missing) => {}
                Err(RecordError::Invalid(reason)) => {
                    report.bad_records.push(BadRecord { path, key, reason });
                }
                Err(RecordError::Io(e)) => {
                    report.bad_records.push(BadRecord {
                        path,
                        key,
                        reason: crate::error_chain(&e),
                    });
                }
            }
        }
        report.stray_files = stray_objects.into_iter().chain(stray_records).collect();
        let exclusive = self.try_activity_exclusive()?;
        report.stale_tmp = self.stale_tmp(exclusive.is_some(), DEFAULT_MIN_AGE)?;
        drop(exclusive);
        debug!(
            objects = report.objects_checked,
            records = report.records_checked,
            clean = report.is_clean(),
            "verified cache"
        );
        Ok(report)
    }

    /// Removes what `report` found broken: corrupt objects, unreadable records, records that
    /// name a corrupt or missing object (so their stages run again), and stale temp entries.
    /// Records whose key is locked by a running stage are left alone. Stray files are left for a
    /// human.
    pub fn repair(&self, report: &VerifyReport) -> Result<RepairReport> {
        let mut out = RepairReport::default();
        for corrupt in &report.corrupt_objects {
            remove_path(&corrupt.path)?;
            out.objects_removed += 1;
        }
        let mut doomed: BTreeSet<Digest> = report.bad_records.iter().map(|b| b.key).collect();
        doomed.extend(report.missing_objects.iter().map(|m| m.key));
        let corrupt: BTreeSet<Digest> = report.corrupt_objects.iter().map(|c| c.expected).collect();
        if !corrupt.is_empty() {
            let (records, _) = scan_sharded(&self.dir("records"), ".json")?;
            for (key, path) in records {
                if let Ok(record) = load_record(&path, Some(&key))
                    && record.outputs.values().any(|o| corrupt.contains(&o.digest))
                {
                    doomed.insert(key);
                }
            }
        }
        for key in doomed {
            let Some(_lock) = self.try_lock_key_for_removal(&key)? else {
                out.skipped_locked.push(key);
                continue;
            };
            remove_path(&self.record_path(&key))?;
            out.records_removed += 1;
        }
        for path in &report.stale_tmp {
            remove_path(path)?;
            out.tmp_removed += 1;
        }
        Ok(out)
    }

    /// Removes the leftovers of crashed writers (e.g. a `kill -9`ed run) from `tmp/`, if no
    /// other writer is active right now; otherwise removes nothing. `progdiff run` calls this
    /// before it starts. Returns the number of entries removed.
    pub fn sweep_tmp(&self) -> Result<usize> {
        let Some(_exclusive) = self.try_activity_exclusive()? else { return Ok(0) };
        let stale = self.stale_tmp(true, DEFAULT_MIN_AGE)?;
        for path in &stale {
            remove_path(path)?;
        }
        if !stale.is_empty() {
            debug!(removed = stale.len(), "swept leftovers of crashed writers from tmp/");
        }
        Ok(stale.len())
    }

    /// Entries of `tmp/` left by writers that are gone: all of them when no writer is active
    /// (`quiescent`), else those older than `min_age` that no live staging dir holds.
    pub(crate) fn stale_tmp(&self, quiescent: bool, min_age: Duration) -> Result<Vec<PathBuf>> {
        let now = SystemTime::now();
        Ok(read_dir_sorted(&self.tmp_root())?
            .into_iter()
            .filter(|path| {
                if quiescent {
                    return true;
                }
                let old = fs::symlink_metadata(path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= min_age);
                old && !staging_in_use(path)
            })
            .collect())
    }
}
