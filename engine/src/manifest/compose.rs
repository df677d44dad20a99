//! `extends:` — a manifest written as changes to another one.
//!
//! The base file's mapping is merged under the extending one: mappings merge key by key
//! (recursively), any other value (a scalar, a list) replaces the inherited one, and `null`
//! removes the inherited entry (`prune: null` under `stages:` drops that stage). `name` is never
//! inherited: it namespaces the plan history, so it stays the extending file's own (or its file
//! stem). Bases may extend further bases; a cycle is an error. Every node remembers which file it
//! came from, so mistakes in an inherited value are reported at the base file's line and column.

use std::path::{Path, PathBuf};

use super::Cx;
use super::yaml::{self, Node, NodeKind};

/// How many files deep an `extends:` chain may go.
const MAX_DEPTH: usize = 32;

/// The key naming the base manifest.
pub(crate) const EXTENDS: &str = "extends";

impl Cx {
    /// Resolves `root`'s `extends:` (relative to `dir`), recursively; `chain` holds the canonical
    /// paths of the files being read, to find cycles. Returns the merged document without the
    /// `extends` key, or `None` after reporting why not.
    pub(crate) fn compose(
        &mut self,
        mut root: Node,
        dir: &Path,
        chain: &mut Vec<PathBuf>,
    ) -> Option<Node> {
        let NodeKind::Map(entries) = &mut root.kind else { return Some(root) };
        let Some(at) = entries.iter().position(|(k, _)| k.name == EXTENDS) else {
            return Some(root);
        };
        let (_, value) = entries.remove(at);
        let NodeKind::Str(rel) = &value.kind else {
            self.push_at(
                value.pos,
                EXTENDS,
                format!("must be the path of a manifest file, found {}", value.type_name()),
            );
            return None;
        };
        let path = if Path::new(rel).is_absolute() { PathBuf::from(rel) } else { dir.join(rel) };
        let canonical = match std::fs::canonicalize(&path) {
            Ok(c) => c,
            Err(e) => {
                self.push_at(value.pos, EXTENDS, format!("cannot read `{}`: {e}", path.display()));
                return None;
            }
        };
        if let Some(first) = chain.iter().position(|c| c == &canonical) {
            let mut shown: Vec<String> =
                chain[first..].iter().map(|c| format!("`{}`", c.display())).collect();
            shown.push(format!("`{}`", canonical.display()));
            self.push_at(value.pos, EXTENDS, format!("`extends` cycle: {}", shown.join(" -> ")));
            return None;
        }
        if chain.len() >= MAX_DEPTH {
            self.push_at(
                value.pos,
                EXTENDS,
                format!("`extends` chain deeper than {MAX_DEPTH} files"),
            );
            return None;
        }
        let text = match super::read_text(&path) {
            Ok(t) => t,
            Err(e) => {
                self.push_at(value.pos, EXTENDS, format!("cannot read `{}`: {e}", path.display()));
                return None;
            }
        };
        let src = self.add_file(path.display().to_string());
        let base = match yaml::parse_source(&text, src) {
            Ok(n) => n,
            Err(errs) => {
                for e in errs {
                    self.push_at(e.pos, &e.path, e.message);
                }
                return None;
            }
        };
        if !matches!(base.kind, NodeKind::Map(_)) {
            self.push_at(
                base.pos,
                "",
                format!("a manifest is a mapping, found {}", base.type_name()),
            );
            return None;
        }
        chain.push(canonical);
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = self.compose(base, &base_dir, chain);
        chain.pop();
        let mut base = base?;
        if let NodeKind::Map(entries) = &mut base.kind {
            entries.retain(|(k, _)| k.name != "name");
        }
        Some(merge(base, root))
    }
}

/// `over` merged onto `base` (see the module documentation).
pub(crate) fn merge(base: Node, over: Node) -> Node {
    match (base.kind, over.kind) {
        (NodeKind::Map(mut merged), NodeKind::Map(entries)) => {
            for (key, value) in entries {
                match merged.iter().position(|(k, _)| k.name == key.name) {
                    Some(i) if value.kind == NodeKind::Null => {
                        merged.remove(i);
                    }
                    Some(i) => {
                        let inherited = std::mem::replace(
                            &mut merged[i].1,
                            Node { pos: value.pos, kind: NodeKind::Null },
                        );
                        merged[i] = (key, merge(inherited, value));
                    }
                    None => merged.push((key, value)),
                }
            }
            Node { pos: over.pos, kind: NodeKind::Map(merged) }
        }
        (_, kind) => Node { pos: over.pos, kind },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(base: &str, over: &str) -> serde_json::Value {
        merge(yaml::parse(base).unwrap(), yaml::parse(over).unwrap()).to_json()
    }

    #[test]
    fn mappings_merge_other_values_replace_and_null_removes() {
        let v = merged(
            "a: {x: 1, y: [1, 2]}\nb: 2\nc: {z: 1}\n",
            "a: {y: [3], w: true}\nc: null\nd: 4\n",
        );
        assert_eq!(v, serde_json::json!({"a": {"x": 1, "y": [3], "w": true}, "b": 2, "d": 4}));
    }

    #[test]
    fn inherited_order_is_kept_and_new_keys_come_last() {
        let m = merge(
            yaml::parse("s: {c: 1, a: 2}\n").unwrap(),
            yaml::parse("s: {b: 0, a: 5}\n").unwrap(),
        );
        let NodeKind::Map(s) = &m.get("s").unwrap().kind else { panic!("a mapping") };
        let keys: Vec<&str> = s.iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(keys, ["c", "a", "b"]);
        assert_eq!(m.get("s").unwrap().get("a").unwrap().kind, NodeKind::Int(5));
    }
}
