//! `verify`: re-hash every object, check every record, find leftovers of crashed writers; and
//! `repair`, which removes what `verify` found broken.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
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
    /// Record outputs whose stored object has another size than the record says.
    pub size_mismatches: Vec<SizeMismatch>,
    /// Work areas of stages whose record is complete (left by a stage killed between
    /// publishing and cleaning up): nothing will resume from them.
    pub finished_work_dirs: Vec<PathBuf>,
    /// Leftovers of interrupted writers in `tmp/`.
    pub stale_tmp: Vec<PathBuf>,
    /// Files in `objects/` or `records/` that do not belong there (not named by a digest).
    pub stray_files: Vec<PathBuf>,
}

impl VerifyReport {
    /// `true` when nothing is wrong (leftovers — stale temp files, finished work areas — and
    /// strays count as wrong).
    pub fn is_clean(&self) -> bool {
        self.corrupt_objects.is_empty()
            && self.bad_records.is_empty()
            && self.missing_objects.is_empty()
            && self.size_mismatches.is_empty()
            && self.finished_work_dirs.is_empty()
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

/// A record output whose stored object has another size than the record says: the record
/// names another object than the one it was published with, or the object was damaged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SizeMismatch {
    /// The record's key.
    pub key: Digest,
    /// The record's stage instance id.
    pub id: String,
    /// The output name.
    pub output: String,
    /// The object.
    pub digest: Digest,
    /// The size the record says.
    pub recorded: u64,
    /// The size of the stored object.
    pub actual: u64,
}

/// What [`Cache::repair`] removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RepairReport {
    /// Corrupt objects removed.
    pub objects_removed: usize,
    /// Records removed: unreadable or changed since published, naming a corrupt, missing or
    /// differently sized object, or computed from such a record (see
    /// [`derived_records_removed`](Self::derived_records_removed)).
    pub records_removed: usize,
    /// Of [`records_removed`](Self::records_removed), those removed only because a stage they
    /// read from had a record that could not be trusted (transitively).
    pub derived_records_removed: usize,
    /// Work areas removed: finished ones, and resume state of stages that read from a record
    /// that could not be trusted.
    pub work_dirs_removed: usize,
    /// Stale temp entries removed.
    pub tmp_removed: usize,
    /// Records left alone because a running stage holds their key.
    pub skipped_locked: Vec<Digest>,
}

impl Cache {
    /// Re-hashes every object (in parallel) and checks every record; reports corrupt objects,
    /// unreadable records (including those changed since published: see the record checksum),
    /// records naming missing objects or objects of another size, work areas of completed
    /// stages, stale temp entries and stray files. Changes nothing (and works on a read-only
    /// cache); see [`repair`](Cache::repair).
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
                        match fs::metadata(self.object_path(&object.digest)) {
                            Ok(meta) if meta.is_file() && meta.len() != object.size => {
                                report.size_mismatches.push(SizeMismatch {
                                    key,
                                    id: record.id.clone(),
                                    output: output.clone(),
                                    digest: object.digest,
                                    recorded: object.size,
                                    actual: meta.len(),
                                });
                            }
                            Ok(meta) if meta.is_file() => {}
                            _ => report.missing_objects.push(MissingObject {
                                key,
                                id: record.id.clone(),
                                output: output.clone(),
                                digest: object.digest,
                            }),
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
        report.finished_work_dirs = self.finished_work_dirs()?;
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

    /// Removes what `report` found broken, so the affected stages run again: corrupt objects;
    /// records that cannot be trusted (unreadable or changed since published, naming a corrupt
    /// object or one of another size) and records naming a missing object; finished work areas
    /// and stale temp entries. Keys a running stage holds are left alone. Stray files are left
    /// for a human.
    ///
    /// **Nothing computed from untrusted bytes survives.** A stage that read the outputs of an
    /// untrusted record may have computed from damaged bytes, so its record goes too, and so,
    /// transitively, do the records computed from it; work areas of those stages (resume state
    /// computed from the same bytes) are removed as well. Dependencies are read from each
    /// record's fingerprint ([`StageRecord::upstream_keys`](crate::StageRecord::upstream_keys)) and, for stages that never
    /// completed, from their job description's `upstream[].key`. A record whose object is merely
    /// missing is removed without its dependents: nothing says its bytes were wrong when they
    /// were read.
    pub fn repair(&self, report: &VerifyReport) -> Result<RepairReport> {
        self.writable("repair it")?;
        let mut out = RepairReport::default();
        for corrupt in &report.corrupt_objects {
            remove_path(&corrupt.path)?;
            out.objects_removed += 1;
        }
        let mut untrusted: BTreeSet<Digest> = report.bad_records.iter().map(|b| b.key).collect();
        untrusted.extend(report.size_mismatches.iter().map(|m| m.key));
        let corrupt: BTreeSet<Digest> = report.corrupt_objects.iter().map(|c| c.expected).collect();
        let (records, _) = scan_sharded(&self.dir("records"), ".json")?;
        // Every stage instance the cache knows, with the keys it reads from.
        let mut reads: BTreeMap<Digest, Vec<Digest>> = BTreeMap::new();
        for (key, path) in records {
            if let Ok(record) = load_record(&path, Some(&key)) {
                if record.outputs.values().any(|o| corrupt.contains(&o.digest)) {
                    untrusted.insert(key);
                }
                reads.insert(key, record.upstream_keys());
            }
        }
        for (key, path) in scan_sharded(&self.dir("jobs"), ".json")?.0 {
            if let Some(upstream) = job_upstream_keys(&path) {
                reads.entry(key).or_default().extend(upstream);
            }
        }
        let derived = dependents(&untrusted, &reads);
        let missing: BTreeSet<Digest> = report.missing_objects.iter().map(|m| m.key).collect();

        let doomed: BTreeSet<Digest> =
            untrusted.iter().chain(&derived).chain(&missing).copied().collect();
        for key in doomed {
            let record = self.record_path(&key);
            let work = self.work_path(&key);
            let wipe_work = untrusted.contains(&key) || derived.contains(&key);
            let has_work = wipe_work && work.exists();
            if !record.exists() && !has_work {
                continue;
            }
            let Some(_lock) = self.try_lock_key_for_removal(&key)? else {
                out.skipped_locked.push(key);
                continue;
            };
            if record.exists() {
                remove_path(&record)?;
                out.records_removed += 1;
                if !untrusted.contains(&key) && !missing.contains(&key) {
                    out.derived_records_removed += 1;
                }
            }
            if has_work {
                remove_path(&work)?;
                out.work_dirs_removed += 1;
            }
        }
        out.work_dirs_removed += self.remove_finished_work_dirs()?;
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
        if self.read_only {
            return Ok(0);
        }
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

/// The keys that read, directly or through others, from a key in `roots` (`reads`: key -> the
/// keys it reads from). `roots` themselves are not included unless they read from another root.
fn dependents(roots: &BTreeSet<Digest>, reads: &BTreeMap<Digest, Vec<Digest>>) -> BTreeSet<Digest> {
    let mut found: BTreeSet<Digest> = BTreeSet::new();
    loop {
        let before = found.len();
        for (key, upstream) in reads {
            if upstream.iter().any(|u| roots.contains(u) || found.contains(u)) {
                found.insert(*key);
            }
        }
        if found.len() == before {
            return found;
        }
    }
}

/// The upstream keys a job description names (`upstream[].key`, as the engine writes it), or
/// `None` if it cannot be read.
fn job_upstream_keys(path: &Path) -> Option<Vec<Digest>> {
    let job: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    Some(
        job.get("upstream")?
            .as_array()?
            .iter()
            .filter_map(|u| u.get("key")?.as_str()?.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_bytes;

    #[test]
    fn dependents_are_transitive_and_exclude_unrelated_keys() {
        let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(|s| hash_bytes(s.as_bytes()));
        // b reads a, c reads b, d reads c and e, e reads nothing.
        let reads = BTreeMap::from([(b, vec![a]), (c, vec![b]), (d, vec![c, e]), (e, vec![])]);
        assert_eq!(dependents(&BTreeSet::from([a]), &reads), BTreeSet::from([b, c, d]));
        assert_eq!(dependents(&BTreeSet::from([e]), &reads), BTreeSet::from([d]));
        assert_eq!(dependents(&BTreeSet::from([d]), &reads), BTreeSet::new());
    }
}
