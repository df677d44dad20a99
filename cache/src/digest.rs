//! [`Digest`], the blake3 content hash every key and object is named by, and the functions that
//! compute it.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{CacheError, Result, io_err};

/// Files larger than this are memory-mapped and hashed on all cores
/// ([`blake3::Hasher::update_mmap_rayon`]); smaller ones are read with one thread, where thread
/// start-up would cost more than it saves.
pub const MMAP_THRESHOLD: u64 = 16 * 1024 * 1024;

/// A 32-byte blake3 digest: the name of an object (its content hash) or of a stage record (the
/// hash of the stage's canonical fingerprint).
///
/// Displays, parses and serialises as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Digest {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }

    /// The first two hex characters: the shard directory under which the digest's files live.
    pub fn prefix(&self) -> String {
        self.to_hex()[..2].to_owned()
    }

    /// The first 12 hex characters, for messages and tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// A string that is not 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest `{value}`: expected 64 hex characters")]
pub struct ParseDigestError {
    /// The rejected string (cut to 80 characters).
    pub value: String,
}

impl FromStr for Digest {
    type Err = ParseDigestError;

    /// Parses 64 hex characters (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDigestError { value: s.chars().take(80).collect() };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(err());
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(err());
            };
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// blake3 of a byte slice.
pub fn hash_bytes(bytes: &[u8]) -> Digest {
    blake3::hash(bytes).into()
}

/// blake3 of a file's content.
///
/// Files up to [`MMAP_THRESHOLD`] are read directly; larger ones are memory-mapped and hashed
/// with rayon, so a 1 GiB checkpoint hashes at the speed of `b3sum`.
pub fn hash_file(path: &Path) -> Result<Digest> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("read metadata of", path))?;
    if !meta.is_file() {
        return Err(CacheError::NotAFile { path: path.to_path_buf() });
    }
    let mut hasher = blake3::Hasher::new();
    if meta.len() > MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path).map_err(io_err("hash", path))?;
    } else {
        hasher.update_reader(&file).map_err(io_err("hash", path))?;
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = hash_bytes(b"abc");
        let hex = d.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<Digest>().unwrap(), d);
        assert_eq!(hex.to_uppercase().parse::<Digest>().unwrap(), d);
        assert_eq!(d.to_string(), hex);
        assert_eq!(d.prefix(), hex[..2]);
        assert_eq!(d.short(), hex[..12]);
        assert_eq!(hex, blake3::hash(b"abc").to_hex().as_str());
    }

    #[test]
    fn rejects_bad_hex() {
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert!(err.to_string().starts_with("invalid digest `"), "{err}");
        }
    }

    #[test]
    fn serde_as_hex_string() {
        let d = hash_bytes(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"nope\"").is_err());
    }

    #[test]
    fn hash_file_small_and_large_agree_with_hash_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 100_000, MMAP_THRESHOLD as usize + 12_345] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &data).unwrap();
            assert_eq!(hash_file(&p).unwrap(), hash_bytes(&data), "len {len}");
        }
    }

    #[test]
    fn hash_file_rejects_directories() {
        let dir = tempfile::tempdir().unwrap();
        let err = hash_file(dir.path()).unwrap_err();
        assert!(matches!(err, CacheError::NotAFile { .. }), "{err}");
    }
}
