use std::fs;

use progdiff_cache::{CacheError, MMAP_THRESHOLD, ObjectRef, hash_bytes};

use super::{cache, object_files};

#[test]
fn put_file_round_trip() {
    let (d, cache) = cache();
    let src = d.path().join("ckpt.bin");
    fs::write(&src, b"weights").unwrap();
    let obj = cache.put_file(&src).unwrap();
    assert_eq!(obj, ObjectRef { digest: hash_bytes(b"weights"), size: 7 });
    assert!(src.exists(), "put_file copies");
    assert_eq!(fs::read(cache.object_path(&obj.digest)).unwrap(), b"weights");
    assert!(cache.has_object(&obj.digest));
}

#[test]
fn identical_content_is_stored_once() {
    let (d, cache) = cache();
    let a = d.path().join("a");
    let b = d.path().join("b");
    fs::write(&a, b"same").unwrap();
    fs::write(&b, b"same").unwrap();
    let o1 = cache.put_file(&a).unwrap();
    let o2 = cache.put_file(&b).unwrap();
    let o3 = cache.put_bytes(b"same").unwrap();
    assert_eq!(o1, o2);
    assert_eq!(o1, o3);
    assert_eq!(object_files(&cache).len(), 1);
    cache.put_bytes(b"other").unwrap();
    assert_eq!(object_files(&cache).len(), 2);
    assert!(super::files_under(&cache.bucket().join("tmp")).is_empty());
}

#[test]
fn large_file_round_trip() {
    let (d, cache) = cache();
    let data: Vec<u8> = (0..MMAP_THRESHOLD as usize + 4097).map(|i| (i % 253) as u8).collect();
    let src = d.path().join("big");
    fs::write(&src, &data).unwrap();
    let obj = cache.put_file(&src).unwrap();
    assert_eq!(obj.digest, hash_bytes(&data));
    assert_eq!(obj.size, data.len() as u64);
    assert_eq!(cache.read_object(&obj.digest).unwrap(), data);
}

#[test]
fn put_file_move_from_staging_dir() {
    let (_d, cache) = cache();
    let staging = cache.staging_dir().unwrap();
    let out = staging.path().join("out.safetensors");
    fs::write(&out, b"tensor bytes").unwrap();
    let obj = cache.put_file_move(&out).unwrap();
    assert!(!out.exists());
    assert_eq!(cache.read_object(&obj.digest).unwrap(), b"tensor bytes");
    let staged = staging.path().to_path_buf();
    drop(staging);
    assert!(!staged.exists());
}

#[test]
fn put_directory_is_an_error() {
    let (d, cache) = cache();
    let err = cache.put_file(d.path()).unwrap_err();
    assert!(matches!(err, CacheError::NotAFile { .. }), "{err}");
    let err = cache.put_file_move(d.path()).unwrap_err();
    assert!(err.to_string().ends_with("` is not a regular file"), "{err}");
}

#[test]
fn open_creates_layout_and_tags() {
    let (_d, cache) = cache();
    for dir in ["objects", "records", "refs", "locks", "work", "tmp", "index"] {
        assert!(cache.bucket().join(dir).is_dir(), "{dir}");
    }
    assert!(cache.bucket().ends_with(".progdiff/v1"));
    assert!(cache.root().join("CACHEDIR.TAG").is_file());
    assert_eq!(fs::read_to_string(cache.root().join(".gitignore")).unwrap(), "*\n");
    // reopening is fine
    progdiff_cache::Cache::open(cache.root()).unwrap();
}
