use std::fs;

use progdiff_cache::hash_bytes;

use super::cache;

#[test]
fn odd_names_round_trip() {
    let (_d, cache) = cache();
    let names =
        ["prune[3]", "finetune[10]", "a/b", "..", ".", ".hidden", "with space", "ünï", "%2F"];
    for (i, name) in names.iter().enumerate() {
        cache.set_ref("cifar10 step-adaptive.yaml", name, &hash_bytes(&[i as u8])).unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            cache.get_ref("cifar10 step-adaptive.yaml", name).unwrap(),
            Some(hash_bytes(&[i as u8])),
            "{name}"
        );
        let path = cache.ref_path("cifar10 step-adaptive.yaml", name).unwrap();
        assert!(path.starts_with(cache.bucket().join("refs")), "{}", path.display());
        assert_eq!(path.parent().unwrap().parent().unwrap(), cache.bucket().join("refs"));
    }
    assert_eq!(
        fs::read_dir(cache.bucket().join("refs/cifar10%20step-adaptive.yaml")).unwrap().count(),
        names.len()
    );
}

#[test]
fn overwrite_namespaces_and_remove() {
    let (_d, cache) = cache();
    let (k1, k2) = (hash_bytes(b"1"), hash_bytes(b"2"));
    assert_eq!(cache.get_ref("m", "prune[0]").unwrap(), None);
    cache.set_ref("m", "prune[0]", &k1).unwrap();
    cache.set_ref("m", "prune[0]", &k2).unwrap();
    cache.set_ref("other", "prune[0]", &k1).unwrap();
    assert_eq!(cache.get_ref("m", "prune[0]").unwrap(), Some(k2));
    assert_eq!(cache.get_ref("other", "prune[0]").unwrap(), Some(k1));
    cache.remove_ref("m", "prune[0]").unwrap();
    cache.remove_ref("m", "prune[0]").unwrap();
    assert_eq!(cache.get_ref("m", "prune[0]").unwrap(), None);
    assert!(cache.set_ref("", "x", &k1).is_err());
}

#[test]
fn corrupt_ref_reads_as_unset() {
    let (_d, cache) = cache();
    cache.set_ref("m", "base", &hash_bytes(b"k")).unwrap();
    fs::write(cache.ref_path("m", "base").unwrap(), "garbage").unwrap();
    assert_eq!(cache.get_ref("m", "base").unwrap(), None);
}
