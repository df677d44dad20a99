//! A YAML document as a tree whose every node and mapping key remembers its line and column.
//!
//! serde_yaml reports only the first error and forgets positions once a value is built, but
//! validation must report every mistake at `file:line:col`. So the manifest is read from
//! yaml-rust2's marked events into [`Node`]s; scalars are typed by the YAML 1.2 core schema (plain
//! scalars only: a quoted `"1"` stays a string), then converted to JSON for serde.

use std::collections::HashMap;

use serde_json::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a manifest file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// Which file: 0 is the manifest given; files it `extends:` get further indices.
    pub src: usize,
}

impl Pos {
    /// Line `line`, column `col` of the manifest given (source 0).
    pub fn at(line: usize, col: usize) -> Self {
        Pos { line, col, src: 0 }
    }

    fn from_marker(m: Marker, src: usize) -> Self {
        Pos { line: m.line(), col: m.col() + 1, src }
    }
}

/// A YAML value with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the value starts.
    pub pos: Pos,
    /// The value.
    pub kind: NodeKind,
}

/// The shape of a [`Node`].
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// `null`, `~` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float (including `.inf` and `.nan`).
    Float(f64),
    /// Any other scalar, or a quoted one.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order; keys are strings with their own positions.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// Where the key starts.
    pub pos: Pos,
}

/// A YAML problem found while reading the document.
#[derive(Clone, Debug, PartialEq)]
pub struct YamlError {
    /// Where.
    pub pos: Pos,
    /// Dotted path of the enclosing mapping keys, when known.
    pub path: String,
    /// What.
    pub message: String,
}

impl Node {
    /// The value at `key` of a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key and value at `key` of a mapping node.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        match &self.kind {
            NodeKind::Map(entries) => {
                entries.iter().find(|(k, _)| k.name == key).map(|(k, v)| (k, v))
            }
            _ => None,
        }
    }

    /// A short name of the node's type for messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a float",
            NodeKind::Str(_) => "a string",
            NodeKind::Seq(_) => "a sequence",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// Finds the position for a serde error path below this node: the key's position when the
    /// last segment names a mapping key, else the value's. Stops at the deepest existing node.
    pub fn locate(&self, segments: &[String]) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for seg in segments {
            match &node.kind {
                NodeKind::Map(entries) => match entries.iter().find(|(k, _)| &k.name == seg) {
                    Some((k, v)) => {
                        pos = k.pos;
                        node = v;
                    }
                    None => return pos,
                },
                NodeKind::Seq(items) => {
                    match seg.parse::<usize>().ok().and_then(|i| items.get(i)) {
                        Some(v) => {
                            pos = v.pos;
                            node = v;
                        }
                        None => return pos,
                    }
                }
                _ => return pos,
            }
        }
        pos
    }

    /// The value as JSON, for serde.
    pub fn to_json(&self) -> Value {
        match &self.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Bool(b) => Value::Bool(*b),
            NodeKind::Int(i) => Value::from(*i),
            NodeKind::Float(f) => {
                serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null)
            }
            NodeKind::Str(s) => Value::String(s.clone()),
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect())
            }
        }
    }
}

/// Parses one YAML document. An empty document is an empty mapping at 1:1. Structural problems
/// (duplicate keys, non-scalar keys, several documents) are returned together; a syntax error
/// stops parsing and is returned alone.
pub fn parse(text: &str) -> Result<Node, Vec<YamlError>> {
    parse_source(text, 0)
}

/// [`parse`] for source file number `src` (positions carry it).
pub fn parse_source(text: &str, src: usize) -> Result<Node, Vec<YamlError>> {
    let mut builder = Builder { src, ..Builder::default() };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(vec![YamlError {
            pos: Pos::from_marker(*e.marker(), src),
            path: String::new(),
            message: format!("invalid YAML: {}", e.info()),
        }]);
    }
    let mut errors = builder.errors;
    if builder.docs.len() > 1 {
        errors.push(YamlError {
            pos: builder.docs[1].pos,
            path: String::new(),
            message: "a manifest is a single YAML document, found several".into(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(builder
        .docs
        .into_iter()
        .next()
        .unwrap_or(Node { pos: Pos { line: 1, col: 1, src }, kind: NodeKind::Map(Vec::new()) }))
}

enum Frame {
    Seq { pos: Pos, anchor: usize, items: Vec<Node> },
    Map { pos: Pos, anchor: usize, entries: Vec<(Key, Node)>, pending: Option<Key> },
}

/// The most values a document may hold once its aliases are expanded: manifests are small, and
/// a "billion laughs" document (aliases of aliases) must fail fast instead of exhausting memory.
pub const MAX_VALUES: usize = 100_000;

/// The deepest nesting of sequences and mappings a document may have (deeper input would
/// exhaust the stack of every recursive walk over it).
pub const MAX_DEPTH: usize = 64;

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
    /// Anchored nodes with the number of values each holds.
    anchors: HashMap<usize, (Node, usize)>,
    errors: Vec<YamlError>,
    src: usize,
    /// Values built so far, aliases expanded.
    values: usize,
    /// Set once a budget is exceeded: the rest of the document is skipped.
    over_budget: bool,
}

impl Builder {
    fn path(&self) -> String {
        self.stack
            .iter()
            .filter_map(|f| match f {
                Frame::Map { pending: Some(k), .. } => Some(k.name.clone()),
                Frame::Seq { items, .. } => Some(items.len().to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Counts `n` more values; false (after reporting once) past [`MAX_VALUES`].
    fn spend(&mut self, n: usize, pos: Pos) -> bool {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_VALUES && !self.over_budget {
            self.over_budget = true;
            self.errors.push(YamlError {
                pos,
                path: self.path(),
                message: format!(
                    "the document expands to more than {MAX_VALUES} values (aliases of aliases?); \
                     a manifest is far smaller"
                ),
            });
        }
        !self.over_budget
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let size = count_values(&node);
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let path = self.path();
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, pending, .. }) => match pending.take() {
                None => {
                    let name = match &node.kind {
                        NodeKind::Str(s) => s.clone(),
                        NodeKind::Int(i) => i.to_string(),
                        NodeKind::Float(f) => f.to_string(),
                        NodeKind::Bool(b) => b.to_string(),
                        NodeKind::Null => "null".into(),
                        _ => {
                            self.errors.push(YamlError {
                                pos: node.pos,
                                path: path.clone(),
                                message: format!(
                                    "mapping keys must be scalars, found {}",
                                    node.type_name()
                                ),
                            });
                            "<invalid key>".into()
                        }
                    };
                    if entries.iter().any(|(k, _)| k.name == name) {
                        let full =
                            if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                        self.errors.push(YamlError {
                            pos: node.pos,
                            path: full,
                            message: format!("duplicate key `{name}`"),
                        });
                    }
                    *pending = Some(Key { name, pos: node.pos });
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark, self.src);
        if self.over_budget {
            return;
        }
        if matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
            && self.stack.len() >= MAX_DEPTH
        {
            self.over_budget = true;
            self.errors.push(YamlError {
                pos,
                path: self.path(),
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
            return;
        }
        if matches!(ev, Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..))
            && !self.spend(1, pos)
        {
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let kind = if tag.is_some_and(|t| t.handle == "!!" && t.suffix == "str")
                    || style != TScalarStyle::Plain
                {
                    NodeKind::Str(text)
                } else {
                    resolve_plain(&text)
                };
                self.push_value(Node { pos, kind }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq { pos, anchor, items: Vec::new() })
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map { pos, anchor, entries: Vec::new(), pending: None })
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => {
                        (Node { pos, kind: NodeKind::Seq(items) }, anchor)
                    }
                    Some(Frame::Map { pos, anchor, entries, .. }) => {
                        (Node { pos, kind: NodeKind::Map(entries) }, anchor)
                    }
                    None => return,
                };
                self.push_value(node, anchor);
            }
            Event::Alias(id) => {
                let size = self.anchors.get(&id).map_or(1, |(_, size)| *size);
                if !self.spend(size, pos) {
                    return;
                }
                let node = match self.anchors.get(&id) {
                    Some((n, _)) => Node { pos, kind: n.kind.clone() },
                    None => {
                        self.errors.push(YamlError {
                            pos,
                            path: self.path(),
                            message: "unknown alias".into(),
                        });
                        Node { pos, kind: NodeKind::Null }
                    }
                };
                self.push_value(node, 0);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// The number of values in `node` (itself included).
fn count_values(node: &Node) -> usize {
    match &node.kind {
        NodeKind::Seq(items) => 1 + items.iter().map(count_values).sum::<usize>(),
        NodeKind::Map(entries) => {
            1 + entries.iter().map(|(_, v)| 1 + count_values(v)).sum::<usize>()
        }
        _ => 1,
    }
}

/// Types a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(s: &str) -> NodeKind {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return NodeKind::Null,
        "true" | "True" | "TRUE" => return NodeKind::Bool(true),
        "false" | "False" | "FALSE" => return NodeKind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return NodeKind::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return NodeKind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return NodeKind::Float(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = s.parse::<i64>()
    {
        return NodeKind::Int(i);
    }
    if let Some(hex) = s.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return NodeKind::Int(i);
    }
    if let Some(oct) = s.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return NodeKind::Int(i);
    }
    if is_core_float(s)
        && let Ok(f) = s.parse::<f64>()
    {
        return NodeKind::Float(f);
    }
    NodeKind::Str(s.to_string())
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - s;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  c: [x, 2.5]\n").unwrap();
        let (k, v) = n.entry("a").unwrap();
        assert_eq!(k.pos, Pos::at(1, 1));
        assert_eq!(v.pos, Pos::at(1, 4));
        let c = n.get("b").unwrap().entry("c").unwrap();
        assert_eq!(c.0.pos, Pos::at(3, 3));
        assert_eq!(n.locate(&["b".into(), "c".into(), "1".into()]), Pos::at(3, 10));
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let n =
            parse("a: 1.0e-4\nb: '1'\nc: ~\nd: true\ne: 0x10\nf: 1e3\ng: abc\nh: -7\n").unwrap();
        assert_eq!(n.get("a").unwrap().kind, NodeKind::Float(1.0e-4));
        assert_eq!(n.get("b").unwrap().kind, NodeKind::Str("1".into()));
        assert_eq!(n.get("c").unwrap().kind, NodeKind::Null);
        assert_eq!(n.get("d").unwrap().kind, NodeKind::Bool(true));
        assert_eq!(n.get("e").unwrap().kind, NodeKind::Int(16));
        assert_eq!(n.get("f").unwrap().kind, NodeKind::Float(1000.0));
        assert_eq!(n.get("g").unwrap().kind, NodeKind::Str("abc".into()));
        assert_eq!(n.get("h").unwrap().kind, NodeKind::Int(-7));
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_reported_with_positions() {
        let errs = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].pos, Pos::at(3, 1));
        assert!(errs[0].message.contains("duplicate key `a`"));
        let errs = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(errs[0].message.starts_with("invalid YAML"), "{errs:?}");
    }

    #[test]
    fn aliases_copy_the_anchored_value() {
        let n = parse("x: &m {a: 1}\ny: *m\n").unwrap();
        assert_eq!(n.get("y").unwrap().to_json(), serde_json::json!({"a": 1}));
    }
}
