//! Integration tests of the cache, one module per area.

mod digest;
mod file_digest;
mod gc;
mod leases;
mod locks;
mod objects;
mod read_only;
mod records;
mod refs;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use progdiff_cache::{Cache, ObjectRef, RecordMeta, StageRecord, hash_bytes};
use tempfile::TempDir;

/// A fresh cache in a temp dir (kept alive by the returned guard).
pub fn cache() -> (TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join(".progdiff")).unwrap();
    (dir, cache)
}

/// A record for the key `hash_bytes(seed)` with the given outputs.
pub fn record(seed: &str, outputs: &[(&str, ObjectRef)]) -> StageRecord {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    StageRecord {
        key: hash_bytes(seed.as_bytes()),
        id: seed.to_owned(),
        kind: "train".to_owned(),
        outputs: outputs.iter().map(|(n, o)| ((*n).to_owned(), *o)).collect::<BTreeMap<_, _>>(),
        fingerprint: serde_json::json!({ "kind": "train", "version": 1, "steps": 10, "seed": seed }),
        meta: RecordMeta {
            device: "cpu".into(),
            ..RecordMeta::timed(t0, t0 + Duration::from_secs(3))
        },
    }
}

/// A record like [`record`] whose fingerprint says it read the stages of `upstream` (as the
/// engine's fingerprint does: `upstream` maps instance ids to keys in hex).
pub fn derived(
    seed: &str,
    outputs: &[(&str, ObjectRef)],
    upstream: &[&StageRecord],
) -> StageRecord {
    let mut r = record(seed, outputs);
    r.fingerprint["upstream"] =
        upstream.iter().map(|u| (u.id.clone(), serde_json::Value::from(u.key.to_hex()))).collect();
    r
}

/// Every file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The object files in the cache.
pub fn object_files(cache: &Cache) -> Vec<PathBuf> {
    files_under(&cache.bucket().join("objects"))
}

/// Sets a file's (or a directory's) mtime `ago` in the past (so the file-digest memo trusts it,
/// or gc judges it old).
pub fn age(path: &Path, ago: Duration) {
    let f = std::fs::File::open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

/// Makes an object writable and flips one byte in it.
pub fn flip_byte(path: &Path, at: usize) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}
