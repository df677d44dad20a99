use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use progdiff_cache::{GcOptions, hash_bytes};

use super::{age, cache, object_files, record};

#[test]
fn keeps_what_is_kept_and_removes_the_rest() {
    let (d, cache) = cache();
    let shared = cache.put_bytes(b"shared by a and c").unwrap();
    let only_a = cache.put_bytes(b"only a").unwrap();
    let only_b = cache.put_bytes(b"only b, 1234567").unwrap();
    let loose = cache.put_bytes(b"no record at all").unwrap();
    let a = record("a", &[("x", shared), ("y", only_a)]);
    let b = record("b", &[("x", only_b)]);
    let c = record("c", &[("x", shared)]);
    for r in [&a, &b, &c] {
        cache.publish(r).unwrap();
    }
    fs::write(cache.work_dir(&a.key).unwrap().join("resume"), b"r").unwrap();
    fs::write(cache.work_dir(&b.key).unwrap().join("resume"), b"r").unwrap();
    let crashed = hash_bytes(b"crashed stage");
    cache.work_dir(&crashed).unwrap();
    drop(cache.lock_key(&b.key).unwrap());
    let gone = d.path().join("gone.bin");
    fs::write(&gone, b"g").unwrap();
    age(&gone, Duration::from_secs(3600));
    cache.file_digest(&gone).unwrap();
    fs::remove_file(&gone).unwrap();
    let keep = BTreeSet::from([a.key]);

    let snapshot = super::files_under(cache.bucket());
    let dry = cache.gc(&keep, true).unwrap();
    assert_eq!(super::files_under(cache.bucket()), snapshot, "a dry run removes nothing");
    assert!(dry.dry_run && dry.quiescent);
    assert_eq!((dry.records_kept, dry.records_removed), (1, 2));
    assert_eq!((dry.objects_kept, dry.objects_removed), (2, 2));
    // b's and the crashed stage's, and a's: a kept stage that completed needs no resume state.
    assert_eq!(dry.work_dirs_removed, 3);
    assert_eq!(dry.locks_removed, 1);
    assert_eq!(dry.index_entries_removed, 1);

    let report = cache.gc(&keep, false).unwrap();
    assert_eq!(
        (report.records_removed, report.objects_removed, report.work_dirs_removed),
        (2, 2, 3)
    );
    assert_eq!(report.bytes_freed, dry.bytes_freed);
    assert!(report.bytes_freed >= (only_b.size + loose.size + 2));
    assert_eq!(cache.record(&a.key).unwrap(), Some(a.clone()));
    assert_eq!(cache.record(&b.key).unwrap(), None);
    assert_eq!(cache.record(&c.key).unwrap(), None);
    for o in [shared, only_a] {
        assert!(cache.has_object(&o.digest));
    }
    for o in [only_b, loose] {
        assert!(!cache.has_object(&o.digest));
    }
    assert_eq!(object_files(&cache).len(), 2);
    assert!(!cache.bucket().join(format!("work/{}", a.key)).exists());
    assert!(!cache.bucket().join(format!("work/{}", b.key)).exists());
    assert!(!cache.bucket().join(format!("work/{crashed}")).exists());
    assert!(!cache.bucket().join(format!("locks/{}/{}.lock", b.key.prefix(), b.key)).exists());
    assert!(cache.verify().unwrap().is_clean());

    // idempotent
    let again = cache.gc(&keep, false).unwrap();
    assert_eq!((again.records_removed, again.objects_removed, again.bytes_freed), (0, 0, 0));
}

#[test]
fn running_stage_is_never_robbed() {
    let (_d, cache) = cache();
    let old = cache.put_bytes(b"old unreferenced").unwrap();
    age(&cache.object_path(&old.digest), Duration::from_secs(7200));
    let done = record("done", &[]);
    cache.publish(&done).unwrap();

    // A stage in flight: it holds its key and has put an object it has not published yet.
    let running = hash_bytes(b"running");
    let lock = cache.lock_key(&running).unwrap();
    let pending = cache.put_bytes(b"pending output").unwrap();
    fs::write(cache.work_dir(&running).unwrap().join("resume"), b"r").unwrap();

    let report = cache.gc(&BTreeSet::new(), false).unwrap();
    assert!(!report.quiescent);
    assert_eq!(report.skipped_locked, [running]);
    assert_eq!(report.skipped_young, 1);
    assert!(cache.has_object(&pending.digest), "young unreferenced object spared");
    assert!(!cache.has_object(&old.digest), "old unreferenced object removed");
    assert!(cache.work_dir(&running).unwrap().join("resume").exists());
    assert_eq!(cache.record(&done.key).unwrap(), None, "unlocked records still go");

    cache.publish(&record("running", &[("out", pending)])).unwrap();
    drop(lock);
    let report = cache.gc(&BTreeSet::from([running]), false).unwrap();
    assert!(report.quiescent);
    assert!(cache.has_object(&pending.digest));
}

#[test]
fn min_age_zero_sweeps_even_while_busy() {
    let (_d, cache) = cache();
    let o = cache.put_bytes(b"loose").unwrap();
    let _lock = cache.lock_key(&hash_bytes(b"busy")).unwrap();
    let options = GcOptions { dry_run: false, min_age: Duration::ZERO };
    let report = cache.gc_with(&BTreeSet::new(), &options).unwrap();
    assert_eq!(report.objects_removed, 1);
    assert!(!cache.has_object(&o.digest));
}

/// Issue 17: a kept key's work area survives while its stage is incomplete, and goes once its
/// record is complete (a kill between publishing and cleaning up leaves one).
#[test]
fn kept_work_dirs_go_only_once_their_stage_is_complete() {
    let (_d, cache) = cache();
    let key = hash_bytes(b"resumable");
    let resume = cache.work_dir(&key).unwrap().join("latest");
    fs::write(&resume, b"half trained").unwrap();
    let keep = BTreeSet::from([key]);
    assert_eq!(cache.gc(&keep, false).unwrap().work_dirs_removed, 0);
    assert!(resume.exists(), "no record yet: the next run resumes from it");
    let rec = record("resumable", &[("out", cache.put_bytes(b"out").unwrap())]);
    cache.publish(&rec).unwrap();
    // Held by a running process: left alone.
    let held = cache.lock_key(&rec.key).unwrap();
    assert_eq!(cache.gc(&keep, false).unwrap().work_dirs_removed, 0);
    drop(held);
    assert_eq!(cache.gc(&keep, false).unwrap().work_dirs_removed, 1);
    assert!(!resume.exists());
    assert!(cache.record(&rec.key).unwrap().is_some());
}

/// A side-store entry (a prune stage's memory bank) claimed by `keys`.
fn bank(
    cache: &progdiff_cache::Cache,
    name: &str,
    keys: &[progdiff_cache::Digest],
) -> std::path::PathBuf {
    let dir = cache.bucket().join("prune-banks").join(name);
    fs::create_dir_all(dir.join("owners")).unwrap();
    fs::write(dir.join("round-1.json"), b"{}").unwrap();
    for k in keys {
        fs::write(dir.join("owners").join(k.to_hex()), b"").unwrap();
    }
    dir
}

/// Issue 17: `gc` collects the memory banks no kept key claims.
#[test]
fn prune_banks_live_while_a_kept_or_running_key_claims_them() {
    let (_d, cache) = cache();
    let [kept, dropped, running] = ["kept", "dropped", "running"].map(|s| hash_bytes(s.as_bytes()));
    cache.publish(&record("kept", &[])).unwrap();
    cache.publish(&record("dropped", &[])).unwrap();
    let shared = bank(&cache, "shared", &[kept, dropped]);
    let orphan = bank(&cache, "orphan", &[dropped]);
    let unclaimed = bank(&cache, "unclaimed", &[]);
    let in_use = bank(&cache, "in-use", &[running]);
    for dir in [&shared, &orphan, &unclaimed, &in_use] {
        for entry in [dir.join("owners"), dir.join("round-1.json"), dir.to_path_buf()] {
            super::age(&entry, Duration::from_secs(7200));
        }
    }
    let keep = BTreeSet::from([kept]);

    let lock = cache.lock_key(&running).unwrap();
    let snapshot = super::files_under(cache.bucket());
    let dry = cache.gc_with(&keep, &GcOptions { dry_run: true, ..GcOptions::default() }).unwrap();
    assert_eq!((dry.side_dirs_kept, dry.side_dirs_removed), (2, 2));
    assert_eq!(super::files_under(cache.bucket()), snapshot, "a dry run removes nothing");
    let report = cache.gc(&keep, false).unwrap();
    assert!(!report.quiescent);
    assert_eq!((report.side_dirs_kept, report.side_dirs_removed), (2, 2));
    assert!(shared.join("round-1.json").exists() && in_use.exists());
    assert!(!orphan.exists() && !unclaimed.exists());
    drop(lock);

    // Nothing running: the running stage's bank goes with its key.
    let report = cache.gc(&keep, false).unwrap();
    assert!(report.quiescent);
    assert_eq!((report.side_dirs_kept, report.side_dirs_removed), (1, 1));
    assert!(shared.exists() && !in_use.exists());
    assert_eq!(cache.gc(&BTreeSet::new(), false).unwrap().side_dirs_removed, 1);
    assert!(!shared.exists());
}

/// While writers are active, a bank changed recently may belong to a stage that has not claimed
/// it yet.
#[test]
fn young_unclaimed_banks_are_spared_while_busy() {
    let (_d, cache) = cache();
    let fresh = bank(&cache, "fresh", &[]);
    let _busy = cache.lock_key(&hash_bytes(b"busy")).unwrap();
    let report = cache.gc(&BTreeSet::new(), false).unwrap();
    assert_eq!((report.side_dirs_kept, report.side_dirs_removed), (1, 0));
    assert!(fresh.exists());
}

/// A job description of a stage not kept is spared while young and the stage unfinished: a
/// coordinator may have just written it for a worker or Slurm job about to start, which holds
/// no lock before it does. Old, or of a completed stage, it goes.
#[test]
fn young_job_descriptions_of_unfinished_stages_are_spared() {
    let (_d, cache) = cache();
    let (fresh, stale) = (hash_bytes(b"about to start"), hash_bytes(b"failed long ago"));
    let done = record("done", &[]);
    cache.publish(&done).unwrap();
    for key in [fresh, stale, done.key] {
        cache.write_job(&key, b"{}").unwrap();
        std::io::Write::write_all(&mut cache.open_log(&key).unwrap(), b"log").unwrap();
    }
    age(&cache.job_path(&stale), Duration::from_secs(7200));

    let report = cache.gc(&BTreeSet::new(), false).unwrap();
    assert_eq!(report.young_jobs_spared, 1);
    assert!(cache.job_path(&fresh).exists());
    assert!(!cache.job_path(&stale).exists());
    assert!(!cache.job_path(&done.key).exists(), "a completed stage's description goes");
    for key in [fresh, stale, done.key] {
        assert!(!cache.log_path(&key).exists());
    }
    // Aged past the minimum, it goes too.
    let options = GcOptions { dry_run: false, min_age: Duration::ZERO };
    let report = cache.gc_with(&BTreeSet::new(), &options).unwrap();
    assert_eq!(report.young_jobs_spared, 0);
    assert!(!cache.job_path(&fresh).exists());
}
