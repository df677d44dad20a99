//! Stage records: `records/<ab>/<key>.json`, one per completed stage instance.
//!
//! On disk a record is the [`StageRecord`] as JSON plus a `checksum` field: blake3 over the
//! canonical JSON (object keys sorted, no whitespace) of everything else in the file. A record
//! edited or damaged after it was published (an output pointing at another object, a changed
//! size) no longer matches its checksum and is treated like an unparsable one: absent for
//! [`Cache::record`], reported by `verify`, removed by `repair`. Records written before checksums
//! existed have none and are read as they are.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::atomic::FILE_MODE;
use crate::cache::{Cache, scan_sharded};
use crate::digest::{Digest, hash_bytes};
use crate::error::{CacheError, Result, io_err};
use crate::object::{ObjectRef, touch};
use crate::time::rfc3339_utc;

/// What a completed stage instance produced, under the key it was computed for.
///
/// Its existence is the cache hit: a stage that failed or was interrupted has no record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// blake3 of [`fingerprint`](Self::fingerprint) in its canonical serialisation.
    pub key: Digest,
    /// The stage instance id, e.g. `prune[3]`.
    pub id: String,
    /// The stage kind, e.g. `prune`.
    pub kind: String,
    /// Output name -> stored object.
    pub outputs: BTreeMap<String, ObjectRef>,
    /// The canonical fingerprint the key was hashed from, kept so a later plan can explain
    /// what changed.
    pub fingerprint: serde_json::Value,
    /// When, where and with what it ran.
    pub meta: RecordMeta,
}

/// Provenance of a record. Not part of the key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecordMeta {
    /// Start time, RFC 3339 UTC with milliseconds ([`rfc3339_utc`]), e.g.
    /// `2026-05-01T12:34:56.789Z`; fixed width, so it sorts chronologically.
    pub started_at: String,
    /// End time, same format.
    pub finished_at: String,
    /// Wall-clock seconds the stage took.
    pub duration_s: f64,
    /// The device it ran on, e.g. `cuda:0` or `cpu`.
    pub device: String,
    /// The host it ran on.
    pub host: String,
    /// Version of progdiff that produced it.
    pub progdiff_version: String,
    /// Other versions that matter (`libtorch`, `tch`, `cuda`, ...).
    pub versions: BTreeMap<String, String>,
}

impl StageRecord {
    /// The keys of the stage instances this one read, from its fingerprint's `upstream` field
    /// (upstream instance id -> key in hex, as the engine's fingerprint has it). `repair` follows
    /// them to invalidate records computed from a record it removes.
    pub fn upstream_keys(&self) -> Vec<Digest> {
        let Some(upstream) = self.fingerprint.get("upstream").and_then(|u| u.as_object()) else {
            return Vec::new();
        };
        upstream.values().filter_map(|v| v.as_str()?.parse().ok()).collect()
    }
}

impl RecordMeta {
    /// Meta for a stage that ran from `started` to `finished` on this host, with this crate's
    /// version (the workspace's) as `progdiff_version`; `device` and `versions` are left for the
    /// caller.
    pub fn timed(started: SystemTime, finished: SystemTime) -> Self {
        Self {
            started_at: rfc3339_utc(started),
            finished_at: rfc3339_utc(finished),
            duration_s: finished.duration_since(started).unwrap_or_default().as_secs_f64(),
            host: host_name(),
            progdiff_version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Self::default()
        }
    }
}

/// This machine's host name, or an empty string if it cannot be found.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Why a record file was not loaded.
pub(crate) enum RecordError {
    Missing,
    Invalid(String),
    Io(CacheError),
}

impl Cache {
    /// Where the record for `key` lives (whether or not it exists).
    pub fn record_path(&self, key: &Digest) -> PathBuf {
        self.sharded("records", key, ".json")
    }

    /// The record for `key`, or `None` if the stage has not completed under that key.
    ///
    /// A record file that cannot be parsed (or names another key) is treated as absent, with a
    /// warning, so that a re-run replaces it; [`verify`](Cache::verify) reports it.
    pub fn record(&self, key: &Digest) -> Result<Option<StageRecord>> {
        let path = self.record_path(key);
        match load_record(&path, Some(key)) {
            Ok(record) => {
                debug!(key = %key, id = %record.id, path = %path.display(), "record hit");
                Ok(Some(record))
            }
            Err(RecordError::Missing) => {
                debug!(key = %key, path = %path.display(), "record miss");
                Ok(None)
            }
            Err(RecordError::Invalid(reason)) => {
                warn!(path = %path.display(), reason, "ignoring unreadable record");
                Ok(None)
            }
            Err(RecordError::Io(e)) => Err(e),
        }
    }

    /// The record for `key` if the stage is complete: the record is readable and every object
    /// it names is stored with the recorded size. What counts as a cache hit.
    pub fn complete_record(&self, key: &Digest) -> Result<Option<StageRecord>> {
        let Some(record) = self.record(key)? else { return Ok(None) };
        for (output, object) in &record.outputs {
            let path = self.object_path(&object.digest);
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() && meta.len() == object.size => {}
                Ok(meta) => {
                    warn!(
                        key = %key, output, path = %path.display(), recorded = object.size,
                        actual = meta.len(), "stored object has another size than its record says"
                    );
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    debug!(key = %key, output, "record names a missing object");
                    return Ok(None);
                }
                Err(e) => return Err(io_err("read metadata of", &path)(e)),
            }
        }
        Ok(Some(record))
    }

    /// Publishes a record atomically, replacing any record for the same key, with its checksum
    /// (blake3 of the canonical JSON of its other fields; see the [crate docs](crate)).
    ///
    /// Every output's object must already be stored with the recorded size. Call it while
    /// holding the key's [`KeyLock`](crate::KeyLock).
    pub fn publish(&self, record: &StageRecord) -> Result<()> {
        let _active = self.activity_shared()?;
        for (output, object) in &record.outputs {
            let path = self.object_path(&object.digest);
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() && meta.len() == object.size => touch(&path),
                Ok(meta) => {
                    return Err(CacheError::ObjectSizeMismatch {
                        id: record.id.clone(),
                        output: output.clone(),
                        digest: object.digest,
                        expected: object.size,
                        actual: meta.len(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(CacheError::MissingObject {
                        key: record.key,
                        id: record.id.clone(),
                        output: output.clone(),
                        digest: object.digest,
                    });
                }
                Err(e) => return Err(io_err("read metadata of", &path)(e)),
            }
        }
        let path = self.record_path(&record.key);
        let json = encode_record(record)
            .map_err(|source| CacheError::Serialize { path: path.clone(), source })?;
        self.write_atomic(&path, &json, FILE_MODE)?;
        debug!(key = %record.key, id = %record.id, path = %path.display(), "published record");
        Ok(())
    }

    /// Removes the record for `key` (if any), so the stage runs again. Take the key's lock first.
    pub fn remove_record(&self, key: &Digest) -> Result<()> {
        self.writable("remove a record")?;
        let path = self.record_path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Every readable record, sorted by finish time (then id, then key). Unreadable records are
    /// skipped with a warning; [`verify`](Cache::verify) reports them.
    pub fn list(&self) -> Result<Vec<StageRecord>> {
        let (found, _stray) = scan_sharded(&self.dir("records"), ".json")?;
        let mut records = Vec::with_capacity(found.len());
        for (key, path) in found {
            match load_record(&path, Some(&key)) {
                Ok(record) => records.push(record),
                Err(RecordError::Missing) => {}
                Err(RecordError::Invalid(reason)) => {
                    warn!(path = %path.display(), reason, "skipping unreadable record");
                }
                Err(RecordError::Io(e)) => return Err(e),
            }
        }
        records.sort_by(|a, b| {
            (&a.meta.finished_at, &a.id, &a.key).cmp(&(&b.meta.finished_at, &b.id, &b.key))
        });
        Ok(records)
    }
}

/// The field holding a record file's checksum.
const CHECKSUM: &str = "checksum";

/// A record file's checksum: blake3 over a domain tag and the canonical JSON of its fields other
/// than the checksum (object keys sorted at every depth, no whitespace), so it does not depend on
/// how the file is laid out or on which fields this version of the struct knows.
fn checksum_of(value: &serde_json::Value) -> Digest {
    fn canonical(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                keys.into_iter().map(|k| (k.clone(), canonical(&o[k]))).collect()
            }
            serde_json::Value::Array(a) => a.iter().map(canonical).collect(),
            other => other.clone(),
        }
    }
    let mut bytes = b"progdiff-record-v1\0".to_vec();
    serde_json::to_writer(&mut bytes, &canonical(value)).expect("JSON values serialise");
    hash_bytes(&bytes)
}

/// A record as its file holds it: pretty JSON with its checksum (what [`Cache::publish`] writes,
/// and what a remote cache stores).
pub fn encode_record(record: &StageRecord) -> std::result::Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(record)?;
    let checksum = checksum_of(&value);
    if let Some(fields) = value.as_object_mut() {
        fields.insert(CHECKSUM.into(), checksum.to_hex().into());
    }
    let mut json = serde_json::to_vec_pretty(&value)?;
    json.push(b'\n');
    Ok(json)
}

/// Parses a record file's bytes ([`encode_record`]), checking its checksum and that it holds
/// `expect_key` if given; the error says what is wrong.
pub fn decode_record(
    bytes: &[u8],
    expect_key: Option<&Digest>,
) -> std::result::Result<StageRecord, String> {
    match parse_record(bytes, expect_key) {
        Ok(r) => Ok(r),
        Err(RecordError::Invalid(m)) => Err(m),
        Err(RecordError::Missing) => Err("missing".into()),
        Err(RecordError::Io(e)) => Err(e.to_string()),
    }
}

/// Reads and parses a record file, checking that it holds `expect_key` if given.
pub(crate) fn load_record(
    path: &Path,
    expect_key: Option<&Digest>,
) -> Result<StageRecord, RecordError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RecordError::Missing),
        Err(e) => return Err(RecordError::Io(io_err("read", path)(e))),
    };
    parse_record(&bytes, expect_key)
}

fn parse_record(bytes: &[u8], expect_key: Option<&Digest>) -> Result<StageRecord, RecordError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid(e.to_string()))?;
    let stored = value.as_object_mut().and_then(|fields| fields.remove(CHECKSUM));
    let actual = checksum_of(&value);
    let record: StageRecord =
        serde_json::from_value(value).map_err(|e| RecordError::Invalid(e.to_string()))?;
    if let Some(stored) = stored {
        let stored = stored.as_str().and_then(|s| s.parse::<Digest>().ok()).ok_or_else(|| {
            RecordError::Invalid(format!("its `{CHECKSUM}` is not a digest: {stored}"))
        })?;
        if stored != actual {
            return Err(RecordError::Invalid(format!(
                "checksum mismatch: it was changed after it was published (its `{CHECKSUM}` is \
                 `{stored}`, its content hashes to `{actual}`)"
            )));
        }
    }
    if let Some(key) = expect_key
        && record.key != *key
    {
        return Err(RecordError::Invalid(format!("holds key `{}`", record.key)));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_bytes;
    use std::time::Duration;

    #[test]
    fn meta_timed() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let meta = RecordMeta::timed(t0, t0 + Duration::from_millis(2500));
        assert_eq!(meta.started_at, "2023-11-14T22:13:20.000Z");
        assert_eq!(meta.finished_at, "2023-11-14T22:13:22.500Z");
        assert_eq!(meta.duration_s, 2.5);
        assert_eq!(meta.progdiff_version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn record_with_wrong_key_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let rec = StageRecord {
            key: hash_bytes(b"a"),
            id: "s".into(),
            kind: "k".into(),
            outputs: BTreeMap::new(),
            fingerprint: serde_json::json!({}),
            meta: RecordMeta::default(),
        };
        cache.publish(&rec).unwrap();
        let other = hash_bytes(b"b");
        fs::create_dir_all(cache.record_path(&other).parent().unwrap()).unwrap();
        fs::copy(cache.record_path(&rec.key), cache.record_path(&other)).unwrap();
        assert_eq!(cache.record(&rec.key).unwrap(), Some(rec));
        assert_eq!(cache.record(&other).unwrap(), None);
    }
}
