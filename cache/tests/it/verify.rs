use std::fs;

use progdiff_cache::{Digest, hash_bytes};

use super::{cache, derived, flip_byte, record};

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

/// Writes `record`'s file as `edit` changes its JSON, keeping the (now stale) checksum.
fn edit_record(
    cache: &progdiff_cache::Cache,
    key: &Digest,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let path = cache.record_path(key);
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

/// Issue 17: a record whose size disagrees with its object, and one pointing at another existing
/// object, are reported, no longer served, and repaired.
#[test]
fn records_disagreeing_with_their_objects_are_reported_and_repaired() {
    let (_d, cache) = cache();
    let model = cache.put_bytes(b"model weights 1").unwrap();
    let ema = cache.put_bytes(b"ema weights 123").unwrap();
    let other = cache.put_bytes(b"another stage's output").unwrap();
    let base = record("base", &[("model", model), ("ema", ema)]);
    let eval = record("eval", &[("metrics", other)]);
    cache.publish(&base).unwrap();
    cache.publish(&eval).unwrap();
    assert!(cache.verify().unwrap().is_clean());

    // The record's own size, edited: the checksum catches it, the size check too.
    edit_record(&cache, &base.key, |j| j["outputs"]["model"]["size"] = 999.into());
    let report = cache.verify().unwrap();
    assert_eq!(report.size_mismatches.len(), 0, "an untrusted record is not read further");
    assert_eq!(report.bad_records.len(), 1, "{report:?}");
    assert!(report.bad_records[0].reason.starts_with("checksum mismatch"), "{report:?}");
    assert_eq!(cache.record(&base.key).unwrap(), None, "never served");

    // Without a checksum (a record from before checksums), the size check alone catches it.
    edit_record(&cache, &base.key, |j| {
        j.as_object_mut().unwrap().remove("checksum");
    });
    let report = cache.verify().unwrap();
    assert!(report.bad_records.is_empty(), "{report:?}");
    assert_eq!(report.size_mismatches.len(), 1, "{report:?}");
    let m = &report.size_mismatches[0];
    assert_eq!((m.key, m.output.as_str(), m.recorded, m.actual), (base.key, "model", 999, 15));
    assert_eq!(cache.complete_record(&base.key).unwrap(), None, "not a hit");

    // Pointing at another existing object of the same size: only the checksum can tell.
    cache.publish(&base).unwrap();
    edit_record(&cache, &eval.key, |j| {
        j["outputs"]["metrics"] = serde_json::json!({ "digest": ema.digest, "size": ema.size })
    });
    let report = cache.verify().unwrap();
    assert_eq!(report.bad_records.len(), 1, "{report:?}");
    assert_eq!(report.bad_records[0].key, eval.key);
    assert!(report.bad_records[0].reason.contains("changed after it was published"));
    let repaired = cache.repair(&report).unwrap();
    assert_eq!(repaired.records_removed, 1);
    assert_eq!(cache.record(&eval.key).unwrap(), None);
    assert_eq!(cache.record(&base.key).unwrap(), Some(base));
    assert!(cache.verify().unwrap().is_clean());
}

/// Issue 17: repair removes what was computed from a corrupt object, transitively, with the
/// resume state of stages that read it; unrelated records and those that merely lost an object
/// keep their dependents.
#[test]
fn repair_removes_everything_computed_from_a_corrupt_object() {
    let (_d, cache) = cache();
    let put = |s: &str| cache.put_bytes(s.as_bytes()).unwrap();
    let base = record("base", &[("ema", put("base ema bytes"))]);
    let alloc = record("allocate", &[("allocation", put("groups"))]);
    let prune = derived("prune[0]", &[("model", put("pruned"))], &[&base, &alloc]);
    let finetune = derived("finetune[0]", &[("ema", put("tuned"))], &[&prune, &alloc]);
    let eval = derived("eval", &[("metrics", put("fid 3.1"))], &[&finetune]);
    let lonely = record("features", &[("extractor", put("inception"))]);
    let uses_lonely = derived("fid", &[("stats", put("stats"))], &[&lonely]);
    for r in [&base, &alloc, &prune, &finetune, &eval, &lonely, &uses_lonely] {
        cache.publish(r).unwrap();
    }
    // A second fine-tune was interrupted: resume state computed from the pruned model, and the
    // job description saying what it reads.
    let partial = hash_bytes(b"finetune[1]");
    let resume = cache.work_dir(&partial).unwrap().join("latest");
    fs::write(&resume, b"trained on bad bytes").unwrap();
    let job =
        serde_json::json!({ "key": partial, "upstream": [{ "id": "prune[1]", "key": prune.key }] });
    cache.write_job(&partial, &serde_json::to_vec(&job).unwrap()).unwrap();
    // An unrelated interrupted stage keeps its resume state.
    let unrelated = hash_bytes(b"other");
    let keeps = cache.work_dir(&unrelated).unwrap().join("latest");
    fs::write(&keeps, b"fine").unwrap();

    flip_byte(&cache.object_path(&base.outputs["ema"].digest), 2);
    fs::remove_file(cache.object_path(&lonely.outputs["extractor"].digest)).unwrap();
    let report = cache.verify().unwrap();
    assert_eq!((report.corrupt_objects.len(), report.missing_objects.len()), (1, 1));
    let repaired = cache.repair(&report).unwrap();
    assert_eq!(repaired.objects_removed, 1);
    assert_eq!((repaired.records_removed, repaired.derived_records_removed), (5, 3));
    assert_eq!(repaired.work_dirs_removed, 1);
    for gone in [&base, &prune, &finetune, &eval, &lonely] {
        assert_eq!(cache.record(&gone.key).unwrap(), None, "{}", gone.id);
    }
    for kept in [&alloc, &uses_lonely] {
        assert!(cache.record(&kept.key).unwrap().is_some(), "{}", kept.id);
    }
    assert!(!resume.exists(), "no resuming from state computed from the corrupt object");
    assert!(keeps.exists());
    assert!(cache.verify().unwrap().is_clean());
}

/// Issue 17: a stage killed between publishing its record and removing its work area leaves a
/// work area nothing resumes from: reported, and removed by repair and by the next run's sweep.
#[test]
fn work_dirs_of_completed_stages_are_reported_and_removed() {
    let (_d, cache) = cache();
    let o = cache.put_bytes(b"done").unwrap();
    let done = record("done", &[("out", o)]);
    let unfinished = hash_bytes(b"unfinished");
    for key in [done.key, unfinished] {
        fs::write(cache.work_dir(&key).unwrap().join("latest"), b"state").unwrap();
    }
    cache.publish(&done).unwrap();
    let leftover = cache.bucket().join(format!("work/{}", done.key));
    let report = cache.verify().unwrap();
    assert_eq!(report.finished_work_dirs, std::slice::from_ref(&leftover));
    assert!(!report.is_clean());
    assert_eq!(cache.repair(&report).unwrap().work_dirs_removed, 1);
    assert!(!leftover.exists());
    assert!(cache.bucket().join(format!("work/{unfinished}/latest")).exists());
    assert!(cache.verify().unwrap().is_clean());

    fs::write(cache.work_dir(&done.key).unwrap().join("latest"), b"state").unwrap();
    let held = cache.lock_key(&done.key).unwrap();
    assert_eq!(cache.remove_finished_work_dirs().unwrap(), 0, "a held key is left alone");
    drop(held);
    assert_eq!(cache.remove_finished_work_dirs().unwrap(), 1);
    assert!(!leftover.exists());
}
