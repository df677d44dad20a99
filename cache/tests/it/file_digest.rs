use std::fs;
use std::time::Duration;

use progdiff_cache::{Cache, hash_bytes};

use super::{age, cache};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn memo_hit_on_second_call_and_across_processes() {
    let (d, cache) = cache();
    let data = d.path().join("data.bin");
    fs::write(&data, b"training data").unwrap();
    age(&data, HOUR);
    let first = cache.file_digest_info(&data).unwrap();
    assert!(!first.memo_hit);
    assert_eq!(first.digest, hash_bytes(b"training data"));
    assert_eq!(first.size, 13);
    let second = cache.file_digest_info(&data).unwrap();
    assert!(second.memo_hit);
    assert_eq!(second.digest, first.digest);
    // a relative path to the same file hits the same entry
    let rel = d.path().join("./data.bin");
    assert!(cache.file_digest_info(&rel).unwrap().memo_hit);
    // persisted: a new handle (another process) hits too
    let again = Cache::open(cache.root()).unwrap();
    assert!(again.file_digest_info(&data).unwrap().memo_hit);
    assert_eq!(again.file_digest(&data).unwrap(), first.digest);
}

#[test]
fn rehashes_after_change() {
    let (d, cache) = cache();
    let data = d.path().join("data.bin");
    fs::write(&data, b"version 1").unwrap();
    age(&data, 2 * HOUR);
    let v1 = cache.file_digest_info(&data).unwrap();
    assert!(cache.file_digest_info(&data).unwrap().memo_hit);

    // same size, new content, new mtime
    fs::write(&data, b"version 2").unwrap();
    age(&data, HOUR);
    let v2 = cache.file_digest_info(&data).unwrap();
    assert!(!v2.memo_hit);
    assert_ne!(v2.digest, v1.digest);
    assert_eq!(v2.digest, hash_bytes(b"version 2"));

    // new size, mtime forced back to the memoised one: the size still tells
    fs::write(&data, b"version three").unwrap();
    age(&data, HOUR);
    assert_eq!(cache.file_digest(&data).unwrap(), hash_bytes(b"version three"));
}

#[test]
fn just_written_files_are_not_memoised() {
    let (d, cache) = cache();
    let data = d.path().join("fresh.bin");
    fs::write(&data, b"fresh").unwrap();
    assert!(!cache.file_digest_info(&data).unwrap().memo_hit);
    assert!(!cache.file_digest_info(&data).unwrap().memo_hit, "racy files are re-hashed");
}

#[test]
fn corrupt_memo_is_ignored_and_rebuilt() {
    let (d, cache) = cache();
    let data = d.path().join("data.bin");
    fs::write(&data, b"x").unwrap();
    age(&data, HOUR);
    cache.file_digest(&data).unwrap();
    let memo = cache.bucket().join("index/files.json");
    fs::write(&memo, b"{ not json").unwrap();
    let fresh = Cache::open(cache.root()).unwrap();
    let fd = fresh.file_digest_info(&data).unwrap();
    assert!(!fd.memo_hit);
    assert_eq!(fd.digest, hash_bytes(b"x"));
    assert!(fresh.file_digest_info(&data).unwrap().memo_hit);
    serde_json::from_slice::<serde_json::Value>(&fs::read(&memo).unwrap()).unwrap();
}

#[test]
fn two_handles_merge_their_entries() {
    let (d, cache) = cache();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::write(&a, b"a").unwrap();
    fs::write(&b, b"b").unwrap();
    age(&a, HOUR);
    age(&b, HOUR);
    let other = Cache::open(cache.root()).unwrap();
    cache.file_digest(&a).unwrap();
    other.file_digest(&b).unwrap(); // writes after `cache` did; must keep `a`
    let third = Cache::open(cache.root()).unwrap();
    assert!(third.file_digest_info(&a).unwrap().memo_hit);
    assert!(third.file_digest_info(&b).unwrap().memo_hit);
}

#[test]
fn dir_digest_tracks_content_and_names() {
    let (d, cache) = cache();
    let images = d.path().join("images");
    fs::create_dir_all(images.join("cat")).unwrap();
    fs::write(images.join("cat/0.png"), b"png0").unwrap();
    fs::write(images.join("cat/1.png"), b"png1").unwrap();
    let d1 = cache.dir_digest(&images).unwrap();
    assert_eq!(cache.dir_digest(&images).unwrap(), d1);
    fs::create_dir_all(images.join("empty")).unwrap();
    assert_eq!(cache.dir_digest(&images).unwrap(), d1, "empty dirs do not count");
    fs::rename(images.join("cat/1.png"), images.join("cat/2.png")).unwrap();
    let d2 = cache.dir_digest(&images).unwrap();
    assert_ne!(d2, d1, "renames count");
    fs::write(images.join("cat/2.png"), b"PNG1").unwrap();
    assert_ne!(cache.dir_digest(&images).unwrap(), d2, "content counts");
    assert!(cache.dir_digest(&d.path().join("missing")).is_err());
}
