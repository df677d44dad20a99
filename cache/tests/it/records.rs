use std::fs;

use progdiff_cache::{CacheError, hash_bytes};

use super::{cache, record};

#[test]
fn publish_then_read() {
    let (_d, cache) = cache();
    let ckpt = cache.put_bytes(b"ckpt").unwrap();
    let metrics = cache.put_bytes(b"{\"loss\": 0.1}").unwrap();
    let rec = record("base", &[("checkpoint", ckpt), ("metrics", metrics)]);
    assert_eq!(cache.record(&rec.key).unwrap(), None);
    cache.publish(&rec).unwrap();
    let back = cache.record(&rec.key).unwrap().unwrap();
    assert_eq!(back, rec);
    assert_eq!(back.meta.started_at, "2023-11-14T22:13:20.000Z");
    let path = cache.record_path(&rec.key);
    assert!(path.ends_with(format!("v1/records/{}/{}.json", rec.key.prefix(), rec.key)));
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["outputs"]["checkpoint"]["digest"], ckpt.digest.to_hex());
    assert_eq!(json["fingerprint"]["steps"], 10);
}

#[test]
fn publish_requires_every_object() {
    let (_d, cache) = cache();
    let mut absent = cache.put_bytes(b"x").unwrap();
    absent.digest = hash_bytes(b"not stored");
    let rec = record("prune[3]", &[("pruned", absent)]);
    let err = cache.publish(&rec).unwrap_err();
    assert!(matches!(err, CacheError::MissingObject { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "record `prune[3]` (`{}`) names output `pruned` with object `{}`, which is not in the cache",
            rec.key, absent.digest
        )
    );
    assert_eq!(cache.record(&rec.key).unwrap(), None);

    let mut wrong_size = cache.put_bytes(b"abc").unwrap();
    wrong_size.size = 4;
    let err = cache.publish(&record("s", &[("o", wrong_size)])).unwrap_err();
    assert!(matches!(err, CacheError::ObjectSizeMismatch { expected: 4, actual: 3, .. }), "{err}");
}

#[test]
fn republish_replaces() {
    let (_d, cache) = cache();
    let mut rec = record("eval", &[]);
    cache.publish(&rec).unwrap();
    rec.meta.device = "cuda:0".into();
    cache.publish(&rec).unwrap();
    assert_eq!(cache.record(&rec.key).unwrap().unwrap().meta.device, "cuda:0");
}

#[test]
fn unparsable_record_is_absent_not_a_panic() {
    let (_d, cache) = cache();
    let rec = record("base", &[]);
    cache.publish(&rec).unwrap();
    fs::write(cache.record_path(&rec.key), b"{\"key\": tru").unwrap();
    assert_eq!(cache.record(&rec.key).unwrap(), None);
    assert!(cache.list().unwrap().is_empty());
    // a re-run replaces it
    cache.publish(&rec).unwrap();
    assert_eq!(cache.record(&rec.key).unwrap(), Some(rec));
}

#[test]
fn list_sorted_by_finish_time() {
    let (_d, cache) = cache();
    let mut late = record("late", &[]);
    late.meta.finished_at = "2024-01-01T00:00:00.000Z".into();
    let mut early = record("early", &[]);
    early.meta.finished_at = "2023-01-01T00:00:00.000Z".into();
    cache.publish(&late).unwrap();
    cache.publish(&early).unwrap();
    let ids: Vec<_> = cache.list().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["early", "late"]);
    cache.remove_record(&early.key).unwrap();
    cache.remove_record(&early.key).unwrap();
    assert_eq!(cache.list().unwrap().len(), 1);
}
