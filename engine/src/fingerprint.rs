//! Cache keys. A stage instance's key is blake3 over the canonical JSON of its [`Fingerprint`]:
//! kind + implementation version + the effective values of exactly the manifest values it reads +
//! group index + upstream keys + digests of external input files.
//!
//! Not in the key: device, job count, log level, cache location, secrets. Keys depend only on
//! fingerprints, never on outputs, so every key of a manifest is known before anything runs.

use std::collections::BTreeMap;

use progdiff_cache::Digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bump to invalidate every key (a change to the fingerprint's shape or meaning).
pub const FINGERPRINT_FORMAT: u32 = 1;

/// What a stage instance's key is computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`FINGERPRINT_FORMAT`].
    pub format: u32,
    /// Stage kind.
    pub kind: String,
    /// The kind's implementation version.
    pub version: u32,
    /// Dotted path -> effective value, for every manifest value the stage reads.
    pub params: BTreeMap<String, Value>,
    /// Group index of a fanned-out instance.
    pub group: Option<usize>,
    /// Upstream instance id -> its key (hex).
    pub upstream: BTreeMap<String, String>,
    /// External input (as written in the manifest) -> content digest (hex).
    pub inputs: BTreeMap<String, String>,
}

impl Fingerprint {
    /// The canonical serialisation: JSON with object keys sorted at every depth, no whitespace.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("fingerprints serialise");
        serde_json::to_vec(&canonical(&value)).expect("JSON values serialise")
    }

    /// The cache key.
    pub fn key(&self) -> Digest {
        progdiff_cache::hash_bytes(&self.canonical_bytes())
    }

    /// Human-readable reasons why `self` differs from an earlier fingerprint `old` of the same
    /// stage instance. `upstream_cause` gives, for an upstream id, the root cause of its change.
    pub fn diff(
        &self,
        old: &Fingerprint,
        upstream_cause: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let mut reasons = Vec::new();
        if old.format != self.format {
            reasons.push(format!("cache key format {} -> {}", old.format, self.format));
        }
        if old.kind != self.kind {
            reasons.push(format!("kind `{}` -> `{}`", old.kind, self.kind));
        } else if old.version != self.version {
            reasons.push(format!(
                "`{}` implementation {} -> {}",
                self.kind, old.version, self.version
            ));
        }
        for (k, v) in &self.params {
            match old.params.get(k) {
                Some(o) if o == v => {}
                Some(o) => reasons.push(format!("`{k}` {} -> {}", show(o), show(v))),
                None => reasons.push(format!("`{k}` set to {}", show(v))),
            }
        }
        for k in old.params.keys().filter(|k| !self.params.contains_key(*k)) {
            reasons.push(format!("`{k}` no longer read"));
        }
        if old.group != self.group {
            reasons.push(format!("group {:?} -> {:?}", old.group, self.group));
        }
        for (id, key) in &self.upstream {
            match old.upstream.get(id) {
                Some(o) if o == key => {}
                Some(_) => match upstream_cause(id) {
                    Some(cause) => reasons.push(format!("upstream `{id}` changed ({cause})")),
                    None => reasons.push(format!("upstream `{id}` changed")),
                },
                None => reasons.push(format!("new upstream `{id}`")),
            }
        }
        for id in old.upstream.keys().filter(|k| !self.upstream.contains_key(*k)) {
            reasons.push(format!("upstream `{id}` removed"));
        }
        for (path, d) in &self.inputs {
            match old.inputs.get(path) {
                Some(o) if o == d => {}
                Some(_) => reasons.push(format!("input `{path}` changed")),
                None => reasons.push(format!("new input `{path}`")),
            }
        }
        for path in old.inputs.keys().filter(|k| !self.inputs.contains_key(*k)) {
            reasons.push(format!("input `{path}` removed"));
        }
        reasons
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => other.to_string(),
    }
}

/// `v` with object keys sorted at every depth.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let sorted: BTreeMap<&String, Value> =
                o.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp() -> Fingerprint {
        Fingerprint {
            format: FINGERPRINT_FORMAT,
            kind: "snr-allocate".into(),
            version: 1,
            params: [
                ("allocate.k".to_string(), json!(0.5)),
                ("allocate.groups".to_string(), json!(10)),
                ("diffusion.steps".to_string(), json!(4000)),
                ("diffusion.schedule".to_string(), json!("cosine")),
            ]
            .into(),
            group: None,
            upstream: [("base".to_string(), "ab".repeat(32))].into(),
            inputs: BTreeMap::new(),
        }
    }

    #[test]
    fn canonical_form_is_pinned() {
        let bytes = String::from_utf8(fp().canonical_bytes()).unwrap();
        assert_eq!(
            bytes,
            format!(
                "{{\"format\":1,\"group\":null,\"inputs\":{{}},\"kind\":\"snr-allocate\",\"params\":{{\"allocate.groups\":10,\"allocate.k\":0.5,\"diffusion.schedule\":\"cosine\",\"diffusion.steps\":4000}},\"upstream\":{{\"base\":\"{}\"}},\"version\":1}}",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn golden_key() {
        // Changing this value invalidates every user's cache: bump FINGERPRINT_FORMAT instead of
        // editing the expectation when the change is intended.
        assert_eq!(fp().key().to_string(), GOLDEN);
    }
    const GOLDEN: &str = "c8a574917868ab92aa144fe8dfbbb0cc15e797854b7f07e65fabbd88b0c5be28";

    #[test]
    fn nested_objects_are_sorted() {
        let v = json!({"b": {"y": 1, "x": 2}, "a": [ {"d": 1, "c": 2} ]});
        assert_eq!(
            serde_json::to_string(&canonical(&v)).unwrap(),
            r#"{"a":[{"c":2,"d":1}],"b":{"x":2,"y":1}}"#
        );
    }

    #[test]
    fn diff_names_changed_values_and_upstreams() {
        let old = fp();
        let mut new = fp();
        new.params.insert("allocate.k".into(), json!(0.3));
        new.upstream.insert("base".into(), "cd".repeat(32));
        let reasons =
            new.diff(&old, &|id| (id == "base").then(|| "`base.steps` 1 -> 2".to_string()));
        assert_eq!(
            reasons,
            vec![
                "`allocate.k` 0.5 -> 0.3".to_string(),
                "upstream `base` changed (`base.steps` 1 -> 2)".to_string()
            ]
        );
        assert!(fp().diff(&old, &|_| None).is_empty());
    }
}
