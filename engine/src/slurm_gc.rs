//! `cache gc`'s share of the `slurm` backend's files: which job computes a key
//! (`<cache>/v1/slurm/keys/`), the exit markers beside the instances' logs, Slurm's own output
//! files (`<cache>/v1/slurm/out/`) and the batch scripts (`<cache>/v1/slurm/scripts/`).
//!
//! A key's job record and exit marker go once its stage is finished with them — the key is not
//! kept, or its record is complete — and none of their jobs is still in a live state in the
//! queue. When the queue cannot be read (no Slurm client here, the controller down), only those
//! of complete records go: an unfinished stage's job may still be pending. An output file goes
//! with the job records that named its job, or, named by none, once it is older than the
//! minimum age (a job just submitted by another coordinator has no record yet). Scripts go once
//! older than the minimum age: `sbatch` keeps its own copy of the script, for requeues too.
//! A profile's own `log_dir` is not touched.
//!
//! The cache's own sweep runs in between, told to spare the stages a job may still compute
//! ([`SlurmFiles::in_flight`]): a pending or requeued job reads its job description when it
//! starts and resumes from its work area, and holds no lock until then.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use progdiff_cache::{Cache, Digest, disk_size, read_dir_sorted, remove_path, scan_sharded};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::slurm::{ExitMarker, KeyJob, is_live, job_name, squeue};

/// What [`SlurmFiles::gc`] removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SlurmGcReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// Why the queue could not be read, when it was asked and could not be.
    pub queue_error: Option<String>,
    /// Job records (`keys/`) removed.
    pub key_records_removed: usize,
    /// Exit markers removed.
    pub markers_removed: usize,
    /// Slurm output files (`out/`) removed.
    pub outputs_removed: usize,
    /// Batch scripts (`scripts/`) removed.
    pub scripts_removed: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Keys whose stage is finished (or not kept) but whose files stay: a job of theirs is
    /// still live, or the queue could not be read.
    pub keys_left: usize,
}

impl SlurmGcReport {
    /// Whether there is anything to say.
    pub fn is_empty(&self) -> bool {
        self.key_records_removed
            + self.markers_removed
            + self.outputs_removed
            + self.scripts_removed
            + self.keys_left
            == 0
    }
}

/// One key's files: its job record and its exit marker, with the jobs they name.
#[derive(Default)]
struct KeyFiles {
    record: Option<PathBuf>,
    marker: Option<PathBuf>,
    jobs: Vec<String>,
    /// The stage's record was complete when the files were read (before the cache's sweep,
    /// which removes the records of keys not kept).
    complete: bool,
}

/// The `slurm` backend's files in a cache, with the queue's live jobs (asked once, and only when
/// there are files to judge), read before either half of `cache gc` removes anything.
pub struct SlurmFiles {
    keys: BTreeMap<Digest, KeyFiles>,
    outputs: Vec<PathBuf>,
    scripts: Vec<PathBuf>,
    /// Jobs in a live state, or why the queue could not be read; `None`: not asked (no files).
    live: Option<Result<BTreeSet<String>, String>>,
}

impl SlurmFiles {
    /// Scans `cache`, asking `squeue` for the live jobs of its job name.
    pub fn scan(cache: &Cache) -> anyhow::Result<SlurmFiles> {
        // Jobs in a live state (or one this version does not know: never taken as ended).
        SlurmFiles::scan_with(cache, || {
            let queue = squeue(&job_name(cache)).map_err(|e| format!("{e:#}"))?;
            Ok(queue
                .into_values()
                .filter(|e| is_live(&e.state) != Some(false))
                .map(|e| e.job)
                .collect())
        })
    }

    /// [`scan`](SlurmFiles::scan) with the live jobs from `queue`.
    fn scan_with(
        cache: &Cache,
        queue: impl FnOnce() -> Result<BTreeSet<String>, String>,
    ) -> anyhow::Result<SlurmFiles> {
        let slurm = cache.bucket().join("slurm");
        let mut keys: BTreeMap<Digest, KeyFiles> = BTreeMap::new();
        for (key, path) in scan_sharded(&slurm.join("keys"), ".json")?.0 {
            let files = keys.entry(key).or_default();
            files.jobs.extend(read::<KeyJob>(&path).map(|r| r.job));
            files.record = Some(path);
        }
        for (key, path) in scan_sharded(&cache.bucket().join("logs"), ".exit.json")?.0 {
            let files = keys.entry(key).or_default();
            files.jobs.extend(read::<ExitMarker>(&path).map(|m| m.job));
            files.marker = Some(path);
        }
        for (key, files) in &mut keys {
            files.complete = matches!(cache.complete_record(key), Ok(Some(_)));
        }
        let outputs = files_in(&slurm.join("out"), ".out")?;
        let scripts = files_in(&slurm.join("scripts"), ".sh")?;
        let any = !(keys.is_empty() && outputs.is_empty() && scripts.is_empty());
        Ok(SlurmFiles { keys, outputs, scripts, live: any.then(queue) })
    }

    fn is_live_job(&self, job: &str) -> bool {
        matches!(&self.live, Some(Ok(live)) if live.contains(job))
    }

    fn any_live(&self, files: &KeyFiles) -> bool {
        files.jobs.iter().any(|j| self.is_live_job(j))
    }

    /// Keys whose stage a Slurm job may still compute: not complete, submitted (a job record),
    /// and a job of theirs live in the queue, or the queue unreadable. The cache's own gc must
    /// spare them even when no manifest keeps them: a pending or requeued job reads its job
    /// description when it starts, and resumes from the work area.
    pub fn in_flight(&self) -> BTreeSet<Digest> {
        self.keys
            .iter()
            .filter(|(_, files)| {
                files.record.is_some()
                    && !files.complete
                    && match &self.live {
                        Some(Ok(_)) => self.any_live(files),
                        _ => true,
                    }
            })
            .map(|(key, _)| *key)
            .collect()
    }

    /// Removes the files that no kept, unfinished stage needs (see the module docs); `min_age`
    /// protects files that may belong to a submission in flight.
    pub fn gc(
        self,
        keep: &BTreeSet<Digest>,
        dry_run: bool,
        min_age: Duration,
    ) -> anyhow::Result<SlurmGcReport> {
        let mut report = SlurmGcReport { dry_run, ..SlurmGcReport::default() };
        let Some(queue) = &self.live else { return Ok(report) };
        report.queue_error = queue.as_ref().err().cloned();
        let readable = queue.is_ok();

        let mut removed_jobs = BTreeSet::new();
        let mut named_jobs = BTreeSet::new();
        for (key, files) in &self.keys {
            let finished = files.complete || !keep.contains(key);
            let removable =
                finished && if readable { !self.any_live(files) } else { files.complete };
            if !removable {
                report.keys_left += usize::from(finished);
                named_jobs.extend(files.jobs.iter().cloned());
                continue;
            }
            if let Some(path) = &files.record {
                report.key_records_removed += 1;
                report.bytes_freed += remove(path, dry_run)?;
            }
            if let Some(path) = &files.marker {
                report.markers_removed += 1;
                report.bytes_freed += remove(path, dry_run)?;
            }
            removed_jobs.extend(files.jobs.iter().cloned());
        }

        let now = SystemTime::now();
        let old = |path: &Path| {
            let modified = std::fs::symlink_metadata(path).and_then(|m| m.modified());
            modified.is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= min_age)
        };
        for path in &self.outputs {
            let Some(job) = path.file_name().and_then(|n| n.to_str()?.strip_suffix(".out")) else {
                continue;
            };
            if named_jobs.contains(job) || self.is_live_job(job) {
                continue;
            }
            if removed_jobs.contains(job) || old(path) {
                report.outputs_removed += 1;
                report.bytes_freed += remove(path, dry_run)?;
            }
        }
        for path in &self.scripts {
            if old(path) {
                report.scripts_removed += 1;
                report.bytes_freed += remove(path, dry_run)?;
            }
        }
        Ok(report)
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The plain files `dir/*<ext>`; a missing directory has none.
fn files_in(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| p.is_file() && p.to_str().is_some_and(|s| s.ends_with(ext)))
        .collect())
}

/// Removes `path` (unless `dry_run`); its size.
fn remove(path: &Path, dry_run: bool) -> anyhow::Result<u64> {
    let size = disk_size(path);
    if !dry_run {
        remove_path(path)?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use progdiff_cache::{RecordMeta, StageRecord};

    use super::*;

    fn key(n: u8) -> Digest {
        progdiff_cache::hash_bytes(&[n])
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A job record and an exit marker for `key`, naming `job`, and Slurm's output file of it.
    fn job_files(cache: &Cache, key: &Digest, job: &str) {
        let k = key.to_string();
        let slurm = cache.bucket().join("slurm");
        let record = format!(
            r#"{{"key":"{k}","job":"{job}","id":"s","submitted":"2026-12-02T00:00:00.000Z"}}"#
        );
        write(&slurm.join("keys").join(&k[..2]).join(format!("{k}.json")), &record);
        let marker = format!(r#"{{"exit_code":0,"job":"{job}","restarts":0}}"#);
        write(&crate::slurm::marker_path(cache, key), &marker);
        write(&slurm.join("out").join(format!("{job}.out")), "slurm output\n");
    }

    fn complete(cache: &Cache, key: &Digest) {
        let outputs = BTreeMap::from([("x".to_string(), cache.put_bytes(b"x").unwrap())]);
        let record = StageRecord {
            key: *key,
            id: "s".into(),
            kind: "command".into(),
            outputs,
            fingerprint: serde_json::json!({}),
            meta: RecordMeta::default(),
        };
        cache.publish(&record).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = walk(dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        read_dir_sorted(dir)
            .unwrap()
            .into_iter()
            .flat_map(|p| if p.is_dir() { walk(&p) } else { vec![p] })
            .collect()
    }

    fn gc_with_queue(
        cache: &Cache,
        keep: &BTreeSet<Digest>,
        dry_run: bool,
        min_age: Duration,
        queue: impl FnOnce() -> Result<BTreeSet<String>, String>,
    ) -> anyhow::Result<SlurmGcReport> {
        SlurmFiles::scan_with(cache, queue)?.gc(keep, dry_run, min_age)
    }

    #[test]
    fn stages_a_job_may_still_compute_are_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        // 1: complete. 2: pending job. 3: its job ended (failed). 4: a marker only.
        let (k1, k2, k3, k4) = (key(1), key(2), key(3), key(4));
        job_files(&cache, &k1, "31");
        job_files(&cache, &k2, "32");
        job_files(&cache, &k3, "33");
        write(&crate::slurm::marker_path(&cache, &k4), r#"{"exit_code":1,"job":"34"}"#);
        complete(&cache, &k1);
        let live = || Ok(BTreeSet::from(["31".to_string(), "32".to_string()]));
        let files = SlurmFiles::scan_with(&cache, live).unwrap();
        assert_eq!(files.in_flight(), BTreeSet::from([k2]));
        // Unreadable queue: every submitted, unfinished stage may still be pending.
        let no_queue = || Err("no squeue".to_string());
        let files = SlurmFiles::scan_with(&cache, no_queue).unwrap();
        assert_eq!(files.in_flight(), BTreeSet::from([k2, k3]));
    }

    #[test]
    fn completeness_is_judged_before_the_cache_sweep_removes_records() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let done = key(1);
        job_files(&cache, &done, "41");
        complete(&cache, &done);
        let files = SlurmFiles::scan_with(&cache, || Err("no squeue".to_string())).unwrap();
        // The cache's own sweep (run between the scan and this gc) removes the record of the
        // stage no manifest keeps: its job still finished, so its files go.
        cache.gc(&BTreeSet::new(), false).unwrap();
        let r = files.gc(&BTreeSet::new(), false, Duration::ZERO).unwrap();
        assert_eq!((r.key_records_removed, r.markers_removed, r.keys_left), (1, 1, 0), "{r:?}");
    }

    #[test]
    fn nothing_to_collect_asks_no_queue() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let r = gc_with_queue(&cache, &BTreeSet::new(), false, Duration::ZERO, || {
            panic!("the queue was asked")
        })
        .unwrap();
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn finished_stages_lose_their_slurm_files_unless_a_job_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        // 1: kept, complete. 2: kept, failed (its output says why). 3: not kept, job ended.
        // 4: not kept, but its (requeued) job is live. 5: not kept, its marker only.
        let (k1, k2, k3, k4, k5) = (key(1), key(2), key(3), key(4), key(5));
        job_files(&cache, &k1, "11");
        job_files(&cache, &k2, "12_0");
        job_files(&cache, &k3, "12_1");
        job_files(&cache, &k4, "14");
        write(&crate::slurm::marker_path(&cache, &k5), r#"{"exit_code":1,"job":"15"}"#);
        complete(&cache, &k1);
        let slurm = cache.bucket().join("slurm");
        write(&slurm.join("out/99.out"), "a job no record names, just written");
        write(&slurm.join("scripts/abc.sh"), "#!/bin/bash\n");
        let keep = BTreeSet::from([k1, k2]);
        let live = || Ok(BTreeSet::from(["14".to_string()]));

        let before = names(cache.bucket());
        let dry = gc_with_queue(&cache, &keep, true, Duration::from_secs(3600), live).unwrap();
        assert_eq!(names(cache.bucket()), before, "a dry run removes nothing");
        let r = gc_with_queue(&cache, &keep, false, Duration::from_secs(3600), live).unwrap();
        assert_eq!(r, SlurmGcReport { dry_run: false, ..dry.clone() });
        assert_eq!(
            (r.key_records_removed, r.markers_removed, r.outputs_removed, r.scripts_removed),
            (2, 3, 2, 0),
            "{r:?}"
        );
        assert_eq!(r.keys_left, 1, "key 4's job is live");
        assert!(r.bytes_freed > 0);
        let (s2, s4) = (k2.to_string(), k4.to_string());
        let mut records = vec![format!("{s2}.json"), format!("{s4}.json")];
        records.sort();
        assert_eq!(names(&slurm.join("keys")), records);
        let mut markers = vec![format!("{s2}.exit.json"), format!("{s4}.exit.json")];
        markers.sort();
        let logs: Vec<String> = names(&cache.bucket().join("logs"))
            .into_iter()
            .filter(|n| n.ends_with(".exit.json"))
            .collect();
        assert_eq!(logs, markers);
        assert_eq!(names(&slurm.join("out")), ["12_0.out", "14.out", "99.out"]);
        assert_eq!(names(&slurm.join("scripts")), ["abc.sh"], "young scripts stay");

        // Old enough: the unnamed output and the script go too.
        let r = gc_with_queue(&cache, &keep, false, Duration::ZERO, live).unwrap();
        assert_eq!((r.outputs_removed, r.scripts_removed, r.keys_left), (1, 1, 1), "{r:?}");
        assert_eq!(names(&slurm.join("out")), ["12_0.out", "14.out"]);
        // Key 4's job ended: its files go; the failed, kept key 2 keeps them.
        let r =
            gc_with_queue(&cache, &keep, false, Duration::ZERO, || Ok(BTreeSet::new())).unwrap();
        assert_eq!((r.key_records_removed, r.markers_removed, r.outputs_removed), (1, 1, 1));
        assert_eq!(names(&slurm.join("out")), ["12_0.out"]);
    }

    #[test]
    fn an_unreadable_queue_spares_unfinished_stages() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (done, other) = (key(1), key(2));
        job_files(&cache, &done, "21");
        job_files(&cache, &other, "22");
        complete(&cache, &done);
        let no_queue = || Err("`squeue` failed: slurm_load_jobs error".to_string());
        let r = gc_with_queue(&cache, &BTreeSet::new(), false, Duration::ZERO, no_queue).unwrap();
        assert_eq!(r.queue_error.as_deref(), Some("`squeue` failed: slurm_load_jobs error"));
        // The complete key's files go; the other's job may still be pending: they stay, and its
        // output too although it is old.
        assert_eq!((r.key_records_removed, r.markers_removed, r.outputs_removed), (1, 1, 1));
        assert_eq!(r.keys_left, 1);
        let slurm = cache.bucket().join("slurm");
        assert_eq!(names(&slurm.join("keys")), [format!("{other}.json")]);
        assert_eq!(names(&slurm.join("out")), ["22.out"]);
    }
}
