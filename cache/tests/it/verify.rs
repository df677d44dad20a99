use std::fs;

use progdiff_cache::hash_bytes;

use super::{cache, flip_byte, record};

#[test]
fn clean_cache_verifies_clean() {
    let (_d, cache) = cache();
    let o = cache.put_bytes(b"fine").unwrap();
    cache.publish(&record("base", &[("ckpt", o)])).unwrap();
    let report = cache.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.objects_checked, report.records_checked, report.bytes_checked), (1, 1, 4));
}

#[test]
fn flipped_byte_is_reported_and_repaired() {
    let (_d, cache) = cache();
    let good = cache.put_bytes(b"good object").unwrap();
    let bad = cache.put_bytes(b"checkpoint bytes").unwrap();
    let uses_bad = record("prune[1]", &[("ckpt", bad)]);
    let uses_good = record("base", &[("ckpt", good)]);
    cache.publish(&uses_bad).unwrap();
    cache.publish(&uses_good).unwrap();
    let path = cache.object_path(&bad.digest);
    flip_byte(&path, 3);

    let report = cache.verify().unwrap();
    assert_eq!(report.corrupt_objects.len(), 1, "{report:?}");
    let corrupt = &report.corrupt_objects[0];
    assert_eq!(corrupt.path, path);
    assert_eq!(corrupt.expected, bad.digest);
    assert_eq!(corrupt.actual, Some(hash_bytes(&fs::read(&path).unwrap())));
    assert!(!report.is_clean());

    let repaired = cache.repair(&report).unwrap();
    assert_eq!((repaired.objects_removed, repaired.records_removed), (1, 1));
    assert!(!path.exists());
    assert_eq!(cache.record(&uses_bad.key).unwrap(), None, "its stage will run again");
    assert!(cache.record(&uses_good.key).unwrap().is_some());
    assert!(cache.verify().unwrap().is_clean());
}

#[test]
fn unparsable_record_and_missing_object_are_reported() {
    let (_d, cache) = cache();
    let o = cache.put_bytes(b"x").unwrap();
    let broken = record("broken", &[]);
    cache.publish(&broken).unwrap();
    fs::write(cache.record_path(&broken.key), b"not json").unwrap();
    let orphan = record("orphan", &[("out", o)]);
    cache.publish(&orphan).unwrap();
    fs::remove_file(cache.object_path(&o.digest)).unwrap();

    let report = cache.verify().unwrap();
    assert_eq!(report.bad_records.len(), 1);
    assert_eq!(report.bad_records[0].key, broken.key);
    assert!(report.bad_records[0].reason.contains("expected ident"), "{:?}", report.bad_records);
    assert_eq!(report.missing_objects.len(), 1);
    assert_eq!(report.missing_objects[0].id, "orphan");
    assert_eq!(report.missing_objects[0].output, "out");

    let repaired = cache.repair(&report).unwrap();
    assert_eq!(repaired.records_removed, 2);
    assert!(cache.verify().unwrap().is_clean());
}

#[test]
fn crash_leftover_in_tmp_is_never_an_object() {
    let (_d, cache) = cache();
    // A writer that died between writing its temp file and renaming it.
    let content = b"half a checkpoi";
    let leftover = cache.bucket().join("tmp/.obj-crashed.tmp");
    fs::write(&leftover, content).unwrap();
    let would_be = hash_bytes(content);
    assert!(!cache.has_object(&would_be));
    assert!(super::object_files(&cache).is_empty());

    let report = cache.verify().unwrap();
    assert_eq!(report.stale_tmp, std::slice::from_ref(&leftover));
    assert_eq!(report.objects_checked, 0);
    let gc = cache.gc(&Default::default(), false).unwrap();
    assert_eq!(gc.tmp_removed, 1);
    assert!(!leftover.exists());
    assert!(cache.verify().unwrap().is_clean());
}

#[test]
fn live_staging_dir_is_not_stale() {
    let (_d, cache) = cache();
    let staging = cache.staging_dir().unwrap();
    fs::write(staging.path().join("part"), b"x").unwrap();
    assert!(cache.verify().unwrap().stale_tmp.is_empty());
    let gc = cache.gc(&Default::default(), false).unwrap();
    assert_eq!(gc.tmp_removed, 0);
    assert!(staging.path().join("part").exists());
}

#[test]
fn stray_files_are_reported() {
    let (_d, cache) = cache();
    let stray = cache.bucket().join("objects/zz");
    fs::create_dir_all(&stray).unwrap();
    fs::write(stray.join("notes.txt"), b"hi").unwrap();
    assert_eq!(cache.verify().unwrap().stray_files, [stray.join("notes.txt")]);
}
