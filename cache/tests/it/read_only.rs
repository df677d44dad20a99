//! Issue 17: a read-only cache serves what it holds and writes nothing.

use std::collections::BTreeSet;
use std::fs;

use progdiff_cache::{Cache, CacheError, hash_bytes};

use super::{cache, files_under, record};

/// Paths, sizes and mtimes of everything under `dir`.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let m = fs::metadata(&p).unwrap();
            (p, m.len(), m.modified().unwrap())
        })
        .collect()
}

fn assert_read_only<T: std::fmt::Debug>(result: progdiff_cache::Result<T>, action: &str) {
    match result {
        Err(e @ CacheError::ReadOnly { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with(&format!("cannot {action}: the cache `")), "{text}");
            assert!(text.ends_with("` is read-only"), "{text}");
        }
        other => panic!("expected a read-only error for `{action}`, got {other:?}"),
    }
}

#[test]
fn a_read_only_cache_serves_records_and_verifies_but_writes_nothing() {
    let (d, writer) = cache();
    let o = writer.put_bytes(b"result").unwrap();
    let rec = record("base", &[("out", o)]);
    writer.publish(&rec).unwrap();
    writer.set_ref("m", "base", &rec.key).unwrap();
    drop(writer);
    let input = d.path().join("data.bin");
    fs::write(&input, b"data").unwrap();
    let before = snapshot(d.path());

    let cache = Cache::open_read_only(d.path().join(".progdiff")).unwrap();
    assert!(cache.is_read_only());
    assert_eq!(cache.complete_record(&rec.key).unwrap(), Some(rec.clone()));
    assert_eq!(cache.read_object(&o.digest).unwrap(), b"result");
    assert_eq!(cache.get_ref("m", "base").unwrap(), Some(rec.key));
    assert_eq!(cache.list().unwrap().len(), 1);
    assert_eq!(cache.file_digest(&input).unwrap(), hash_bytes(b"data"), "computed, not memoised");
    let report = cache.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(cache.sweep_tmp().unwrap(), 0);
    assert_eq!(cache.remove_finished_work_dirs().unwrap(), 0);

    let key = hash_bytes(b"new");
    assert_read_only(cache.put_bytes(b"x"), "write to it");
    assert_read_only(cache.put_file(&input), "write to it");
    assert_read_only(cache.publish(&record("new", &[])), "write to it");
    assert_read_only(cache.lock_key(&key), "write to it");
    assert_read_only(cache.try_lock_key(&key), "write to it");
    assert_read_only(cache.staging_dir(), "write to it");
    assert_read_only(cache.set_ref("m", "x", &key), "write to it");
    assert_read_only(cache.work_dir(&key), "create a work area");
    assert_read_only(cache.open_log(&key), "write a job log");
    assert_read_only(cache.remove_record(&rec.key), "remove a record");
    assert_read_only(cache.gc(&BTreeSet::new(), true), "collect garbage");
    assert_read_only(cache.repair(&report), "repair it");
    assert_eq!(snapshot(d.path()), before, "nothing was written");

    // A cache that does not exist reads as empty.
    let absent = Cache::open_read_only(d.path().join("absent")).unwrap();
    assert_eq!(absent.record(&rec.key).unwrap(), None);
    assert!(absent.verify().unwrap().is_clean());
    assert!(!d.path().join("absent").exists());
}

/// What `open` does on a directory it may not write. Root writes through permission bits, so
/// this only tells something when the tests do not run as root (the end-to-end tests also use a
/// real read-only mount where one can be made).
#[test]
fn open_falls_back_to_read_only_where_it_cannot_write() {
    let (d, writer) = cache();
    let o = writer.put_bytes(b"result").unwrap();
    let rec = record("base", &[("out", o)]);
    writer.publish(&rec).unwrap();
    drop(writer);
    let root = d.path().join(".progdiff");
    let set_mode = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        for p in [root.clone(), root.join("v1")]
            .into_iter()
            .chain(fs::read_dir(root.join("v1")).unwrap().map(|e| e.unwrap().path()))
        {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    set_mode(0o555);
    let writable = tempfile::tempfile_in(root.join("v1/tmp")).is_ok();
    let cache = Cache::open(&root).unwrap();
    assert_eq!(cache.is_read_only(), !writable);
    assert_eq!(cache.complete_record(&rec.key).unwrap(), Some(rec));
    assert!(cache.verify().unwrap().is_clean());
    set_mode(0o755);
    assert!(!Cache::open(&root).unwrap().is_read_only());
}
