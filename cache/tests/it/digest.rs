use progdiff_cache::{Digest, hash_bytes, hash_file};

#[test]
fn golden_hash_bytes() {
    // Pinned: changing the hash function or its encoding invalidates every cache.
    assert_eq!(
        hash_bytes(b"progdiff").to_hex(),
        "f7ceff64d8a7a59b1a6b804f98bb1f61bafc3faf90c06567a0511da80b142f12"
    );
    assert_eq!(hash_bytes(b"progdiff").short(), "f7ceff64d8a7");
    assert_eq!(hash_bytes(b"progdiff").prefix(), "f7");
}

#[test]
fn golden_dir_digest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("sub/empty")).unwrap();
    std::fs::write(data.join("a.txt"), b"a").unwrap();
    std::fs::write(data.join("sub/b.txt"), b"b").unwrap();
    let (_d, cache) = super::cache();
    // Pinned: the directory digest format is part of every image-folder stage's key. Checked
    // independently: b3sum of "progdiff-dir-v1\0" + per file (u64 LE path length, path,
    // b3(content)).
    assert_eq!(
        cache.dir_digest(&data).unwrap().to_hex(),
        "65328d01e849be2283e5e4773fa53c4594bf274f0a5b2557133532260d70413f"
    );
}

#[test]
fn hash_file_matches_b3sum_convention() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"progdiff").unwrap();
    assert_eq!(hash_file(&p).unwrap(), hash_bytes(b"progdiff"));
}

#[test]
fn digest_display_parse() {
    let d = hash_bytes(b"x");
    assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
}
