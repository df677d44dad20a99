//! `sweep:` — one manifest, many variants.
//!
//! ```yaml
//! sweep:
//!   product: { allocate.groups: [4, 8], allocate.k: [0.3, 0.5] }   # Cartesian product
//!   zip: { allocate.k: [0.3, 0.5], finetune.steps: [100, 200] }    # paired lists
//!   variants:                                                      # named sets of values
//!     - { name: random, prune.proxy.kind: random }
//! ```
//!
//! Each `product` path, the `zip` group and the `variants` list is one axis; the variants of the
//! manifest are the Cartesian product of the axes, in the order written. A variant's name joins
//! its parts with `,`: `path=value` for product and zip values (the last path segment when that
//! is unambiguous: `groups=4,k=0.5`), the given name for an explicit variant.
//!
//! Seeds are an axis of their own: `seeds: N` (a top-level key) appends the axis
//! `seed = seed, seed+1, ..., seed+N-1` (the manifest's `seed:`, 0 by default) after the
//! sweep's axes (`groups=4,seed=0`), and `product: { seed: [...] }` is one too. The variants
//! that differ only by their seed axis are replicates of one configuration: each records the
//! name without its seed part ([`VariantSpec::seed_group`]), over which `progdiff report` folds
//! them into one row. `seeds: 1` is the manifest itself; `seeds:` does not change any key (the
//! variant `seed=0` of `seed: 0, seeds: 3` is the manifest with `seed: 0`).
//!
//! A path names a stage parameter (`allocate.k`, `prune.proxy.kind`, or `stages.allocate.k`) or a
//! section value (`model.channels`, `diffusion.steps`, `seed`, `data.path`). Each variant is the
//! manifest with its values written in at those paths and is validated in full; the swept value
//! nodes keep their own positions, so a bad value is reported where the sweep lists it. The stage
//! graph is the same in every variant: `kind`, `needs` and `for_each` cannot be swept.

use std::collections::{BTreeMap, BTreeSet};

use super::yaml::{Key, Node, NodeKind, Pos};
use super::{Cx, STAGE_KEYS, closest, quoted};

/// The key of the sweep section.
pub(crate) const SWEEP: &str = "sweep";
/// The top-level key of the seed axis.
pub(crate) const SEEDS: &str = "seeds";
/// More seeds than this is surely a mistake.
const MAX_SEEDS: usize = 1000;
const SWEEP_KEYS: &[&str] = &["product", "zip", "variants"];
/// Top-level sections whose values can be swept.
const SECTIONS: &[&str] = &["seed", "data", "model", "diffusion"];
/// More variants than this is surely a mistake.
const MAX_VARIANTS: usize = 10_000;

/// One value written in at a path.
#[derive(Clone, Debug)]
pub(crate) struct Override {
    /// Full path from the document root (`stages`, `allocate`, `k`).
    path: Vec<String>,
    /// The value, with its position in the sweep.
    value: Node,
}

/// A variant: its name and the values it sets.
#[derive(Clone, Debug)]
pub(crate) struct VariantSpec {
    /// `groups=4,k=0.5`.
    pub name: String,
    /// With a seed axis: the name without its seed part (`groups=4`; empty when the seed is
    /// the only axis). Variants with the same one are replicates of one configuration.
    pub seed_group: Option<String>,
    overrides: Vec<Override>,
}

/// `seeds: N` read: the seeds and where the key was written.
#[derive(Clone, Debug)]
pub(crate) struct Seeds {
    first: i64,
    count: usize,
    pos: Pos,
}

impl Seeds {
    /// How many seeds.
    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

impl VariantSpec {
    /// `root` with this variant's values written in.
    pub(crate) fn apply(&self, root: &Node) -> Node {
        let mut doc = root.clone();
        for o in &self.overrides {
            set_path(&mut doc, &o.path, o.value.clone());
        }
        doc
    }
}

/// One option of an axis: its name part and its values.
type Choice = (String, Vec<Override>);

/// An axis: its options, and whether it is a seed axis.
type Axis = (Vec<Choice>, bool);

/// A swept path (index into the list of paths read) and its values.
type PathValues = (usize, Vec<Node>);

/// A path as written, resolved.
struct SweptPath {
    written: String,
    full: Vec<String>,
    pos: Pos,
}

impl Cx {
    /// Reads the top-level `seeds:` value `node` of document `root` (whose `seed:` is the first
    /// seed). `None` with the mistake reported.
    pub(crate) fn seeds(&mut self, root: &Node, node: &Node) -> Option<Seeds> {
        let count = match node.kind {
            NodeKind::Int(n) if n >= 1 && n as usize <= MAX_SEEDS => n as usize,
            NodeKind::Int(n) => {
                self.push_at(
                    node.pos,
                    SEEDS,
                    format!("must be between 1 and {MAX_SEEDS}, got {n}"),
                );
                return None;
            }
            _ => {
                self.push_at(
                    node.pos,
                    SEEDS,
                    format!(
                        "must be the number of seeds to run (an integer), found {}",
                        node.type_name()
                    ),
                );
                return None;
            }
        };
        let first = match root.get("seed") {
            None => 0,
            Some(Node { kind: NodeKind::Int(i), .. }) if *i >= 0 => *i,
            Some(n) => {
                self.push_at(n.pos, "seed", "must be a non-negative integer");
                return None;
            }
        };
        if first.checked_add(count as i64).is_none() {
            self.push_at(node.pos, SEEDS, format!("seed {first} + {count} seeds overflows"));
            return None;
        }
        Some(Seeds { first, count, pos: node.pos })
    }

    /// The variants of document `root`: its `sweep:` section `node` (if any) and its seeds (if
    /// `seeds:` asks for more than one). `None` when there is no sweep and a single seed, or
    /// when the sweep has mistakes (all reported).
    pub(crate) fn variants(
        &mut self,
        root: &Node,
        node: Option<&Node>,
        seeds: Option<&Seeds>,
    ) -> Option<Vec<VariantSpec>> {
        let seeds = seeds.filter(|s| s.count > 1);
        let seed_axis = seeds.map(|s| {
            let choices = (0..s.count as i64)
                .map(|i| {
                    let value = Node { pos: s.pos, kind: NodeKind::Int(s.first + i) };
                    let name = format!("seed={}", s.first + i);
                    (name, vec![Override { path: vec!["seed".into()], value }])
                })
                .collect();
            (choices, true)
        });
        match node {
            Some(node) => self.sweep(root, node, seed_axis, seeds.map(|s| s.pos)),
            None => {
                let (choices, _) = seed_axis?;
                Some(
                    choices
                        .into_iter()
                        .map(|(name, overrides)| VariantSpec {
                            name,
                            seed_group: Some(String::new()),
                            overrides,
                        })
                        .collect(),
                )
            }
        }
    }

    /// Parses the `sweep:` section `node` of document `root` into its variants, with
    /// `seed_axis` (from `seeds:` at `seeds_pos`) as the last axis. `None` when the sweep has
    /// mistakes (all reported).
    fn sweep(
        &mut self,
        root: &Node,
        node: &Node,
        seed_axis: Option<Axis>,
        seeds_pos: Option<Pos>,
    ) -> Option<Vec<VariantSpec>> {
        let NodeKind::Map(entries) = &node.kind else {
            self.push_at(
                node.pos,
                SWEEP,
                format!(
                    "must be a mapping with {}, found {}",
                    quoted(SWEEP_KEYS),
                    node.type_name()
                ),
            );
            return None;
        };
        if entries.is_empty() {
            self.push_at(
                node.pos,
                SWEEP,
                format!("declares nothing to sweep: use {}", quoted(SWEEP_KEYS)),
            );
            return None;
        }
        for (k, _) in entries {
            if !SWEEP_KEYS.contains(&k.name.as_str()) {
                self.push_at(
                    k.pos,
                    &format!("{SWEEP}.{}", k.name),
                    super::unknown_key(&k.name, SWEEP_KEYS),
                );
            }
        }
        // Every path, to find duplicates and to name product/zip values unambiguously.
        let mut listed: Vec<SweptPath> = Vec::new();
        let mut axes: Vec<Axis> = Vec::new();
        let mut labelled: Vec<(usize, Vec<PathValues>)> = Vec::new();
        if let Some(product) = node.get("product") {
            for (pi, values) in self.path_lists(root, product, "product", &mut listed) {
                labelled.push((axes.len(), vec![(pi, values)]));
                // `product: { seed: [...] }` is a seed axis.
                axes.push((Vec::new(), listed[pi].full == ["seed"]));
            }
        }
        if let Some(zip) = node.get("zip") {
            {
                let lists = self.path_lists(root, zip, "zip", &mut listed);
                let mut equal = true;
                {
                    let len = lists.first().map(|(_, v)| v.len()).unwrap_or(0);
                    let first = lists.first().map(|(pi, _)| listed[*pi].written.clone());
                    for (pi, values) in &lists {
                        if values.len() != len {
                            let p = &listed[*pi];
                            self.push_at(
                                p.pos,
                                &format!("{SWEEP}.zip.{}", p.written),
                                format!(
                                    "zipped lists must have equal lengths: {} values here, {len} for `{}`",
                                    values.len(),
                                    first.clone().unwrap_or_default()
                                ),
                            );
                            equal = false;
                        }
                    }
                }
                {
                    if !lists.is_empty() && equal {
                        labelled.push((axes.len(), lists));
                        axes.push((Vec::new(), false));
                    }
                }
            }
        }
        let explicit = match node.get("variants") {
            Some(v) => match self.explicit_variants(root, v, &mut listed) {
                Some(choices) => {
                    axes.push((choices, false));
                    true
                }
                None => false,
            },
            None => false,
        };
        // A path swept on two axes would make the variants ambiguous.
        let mut axis_of_path: BTreeMap<&[String], &SweptPath> = BTreeMap::new();
        let mut explicit_paths: BTreeSet<&[String]> = BTreeSet::new();
        for (pi, p) in listed.iter().enumerate() {
            let in_explicit =
                explicit && !labelled.iter().any(|(_, l)| l.iter().any(|(i, _)| *i == pi));
            if in_explicit {
                explicit_paths.insert(&p.full);
            }
        }
        for (_, lists) in &labelled {
            for (pi, _) in lists {
                let p = &listed[*pi];
                if let Some(prev) = axis_of_path.insert(&p.full, p) {
                    self.push_at(
                        p.pos,
                        &format!("{SWEEP}.{}", p.written),
                        format!("`{}` is swept twice (also at line {})", p.written, prev.pos.line),
                    );
                } else if explicit_paths.contains(p.full.as_slice()) {
                    self.push_at(
                        p.pos,
                        &format!("{SWEEP}.{}", p.written),
                        format!("`{}` is swept here and also set by `variants`", p.written),
                    );
                }
            }
        }
        // With mistakes reported, the variants are still built from what could be read, so
        // the values are checked too and every mistake shows at once.
        // Name parts of product and zip values.
        let labelled_paths: Vec<usize> =
            labelled.iter().flat_map(|(_, l)| l.iter().map(|(i, _)| *i)).collect();
        let short = |pi: usize| -> String {
            let last = listed[pi].full.last().cloned().unwrap_or_default();
            let clash =
                labelled_paths.iter().any(|&o| o != pi && listed[o].full.last() == Some(&last));
            if clash { listed[pi].written.clone() } else { last }
        };
        for (axis, lists) in &labelled {
            let len = lists[0].1.len();
            axes[*axis].0 = (0..len)
                .map(|i| {
                    let name = lists
                        .iter()
                        .map(|(pi, values)| format!("{}={}", short(*pi), show_value(&values[i])))
                        .collect::<Vec<_>>()
                        .join(",");
                    let overrides = lists
                        .iter()
                        .map(|(pi, values)| Override {
                            path: listed[*pi].full.clone(),
                            value: values[i].clone(),
                        })
                        .collect();
                    (name, overrides)
                })
                .collect();
        }
        if let (Some(pos), Some(p)) = (seeds_pos, listed.iter().find(|p| p.full == ["seed"])) {
            self.push_at(
                p.pos,
                &format!("{SWEEP}.{}", p.written),
                format!(
                    "`seed` is swept here and `{SEEDS}:` (line {}) sets the seeds too: use one",
                    pos.line
                ),
            );
            return None;
        }
        axes.extend(seed_axis);
        let seeded = axes.iter().any(|(_, seed)| *seed);
        let total = axes.iter().try_fold(1usize, |acc, a| acc.checked_mul(a.0.len()));
        match total {
            Some(n) if n <= MAX_VARIANTS => {}
            _ => {
                self.push_at(
                    node.pos,
                    SWEEP,
                    format!("expands to more than {MAX_VARIANTS} variants"),
                );
                return None;
            }
        }
        let join = |a: &str, part: &str| {
            if a.is_empty() { part.to_string() } else { format!("{a},{part}") }
        };
        let mut variants: Vec<VariantSpec> = vec![VariantSpec {
            name: String::new(),
            seed_group: seeded.then(String::new),
            overrides: Vec::new(),
        }];
        for (axis, is_seed) in &axes {
            let mut next = Vec::with_capacity(variants.len() * axis.len());
            for v in &variants {
                for (part, overrides) in axis {
                    let mut o = v.overrides.clone();
                    o.extend(overrides.iter().cloned());
                    let seed_group = match (&v.seed_group, is_seed) {
                        (Some(g), false) => Some(join(g, part)),
                        (g, _) => g.clone(),
                    };
                    next.push(VariantSpec { name: join(&v.name, part), seed_group, overrides: o });
                }
            }
            variants = next;
        }
        let mut seen = BTreeSet::new();
        for v in &variants {
            if !seen.insert(v.name.clone()) {
                self.push_at(
                    node.pos,
                    SWEEP,
                    format!(
                        "two variants are both named `{}`: make the values or names distinct",
                        v.name
                    ),
                );
                return None;
            }
        }
        Some(variants)
    }

    /// `product:` / `zip:` — a mapping of paths to non-empty lists of values.
    fn path_lists(
        &mut self,
        root: &Node,
        node: &Node,
        what: &str,
        listed: &mut Vec<SweptPath>,
    ) -> Vec<PathValues> {
        let NodeKind::Map(entries) = &node.kind else {
            self.push_at(
                node.pos,
                &format!("{SWEEP}.{what}"),
                format!("must map dotted paths to lists of values, found {}", node.type_name()),
            );
            return Vec::new();
        };
        if entries.is_empty() {
            self.push_at(node.pos, &format!("{SWEEP}.{what}"), "sweeps no path");
        }
        let mut out = Vec::new();
        for (key, values) in entries {
            let full = self.resolve_path(root, key, what);
            let items = match &values.kind {
                NodeKind::Seq(items) if !items.is_empty() => Some(items.clone()),
                NodeKind::Seq(_) => {
                    self.push_at(
                        values.pos,
                        &format!("{SWEEP}.{what}.{}", key.name),
                        "lists no value",
                    );
                    None
                }
                _ => {
                    self.push_at(
                        values.pos,
                        &format!("{SWEEP}.{what}.{}", key.name),
                        format!(
                            "must be a list of values, found {} (write `[...]`)",
                            values.type_name()
                        ),
                    );
                    None
                }
            };
            if let (Some(full), Some(items)) = (full, items) {
                listed.push(SweptPath { written: key.name.clone(), full, pos: key.pos });
                out.push((listed.len() - 1, items));
            }
        }
        out
    }

    /// `variants:` — a list of mappings, each with a `name` and paths to values.
    fn explicit_variants(
        &mut self,
        root: &Node,
        node: &Node,
        listed: &mut Vec<SweptPath>,
    ) -> Option<Vec<Choice>> {
        let here = format!("{SWEEP}.variants");
        let NodeKind::Seq(items) = &node.kind else {
            self.push_at(
                node.pos,
                &here,
                format!(
                    "must be a list of `{{ name: ..., <path>: <value>, ... }}` mappings, found {}",
                    node.type_name()
                ),
            );
            return None;
        };
        if items.is_empty() {
            self.push_at(node.pos, &here, "lists no variant");
            return None;
        }
        let mut ok = true;
        let mut names: BTreeMap<String, Pos> = BTreeMap::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("{here}.{i}");
            let NodeKind::Map(entries) = &item.kind else {
                self.push_at(
                    item.pos,
                    &at,
                    format!("a variant is a mapping with a `name`, found {}", item.type_name()),
                );
                ok = false;
                continue;
            };
            let name = match item.get("name") {
                Some(Node { kind: NodeKind::Str(s), pos }) => {
                    if let Some(problem) = bad_variant_name(s) {
                        self.push_at(*pos, &format!("{at}.name"), problem);
                        ok = false;
                    } else if let Some(prev) = names.insert(s.clone(), *pos) {
                        self.push_at(
                            *pos,
                            &format!("{at}.name"),
                            format!("variant `{s}` is named twice (also at line {})", prev.line),
                        );
                        ok = false;
                    }
                    s.clone()
                }
                Some(n) => {
                    self.push_at(
                        n.pos,
                        &format!("{at}.name"),
                        format!("must be a string, found {}", n.type_name()),
                    );
                    ok = false;
                    continue;
                }
                None => {
                    self.push_at(item.pos, &at, "missing `name`: explicit variants are named");
                    ok = false;
                    continue;
                }
            };
            let mut overrides = Vec::new();
            for (key, value) in entries.iter().filter(|(k, _)| k.name != "name") {
                match self.resolve_path(root, key, "variants") {
                    Some(full) => {
                        listed.push(SweptPath {
                            written: key.name.clone(),
                            full: full.clone(),
                            pos: key.pos,
                        });
                        overrides.push(Override { path: full, value: value.clone() });
                    }
                    None => ok = false,
                }
            }
            out.push((name, overrides));
        }
        ok.then_some(out)
    }

    /// The full path of a swept dotted path, checked against the document.
    fn resolve_path(&mut self, root: &Node, key: &Key, what: &str) -> Option<Vec<String>> {
        let at = format!("{SWEEP}.{what}.{}", key.name);
        let segs: Vec<String> = key.name.split('.').map(str::to_string).collect();
        if segs.iter().any(String::is_empty) {
            self.push_at(
                key.pos,
                &at,
                format!("`{}` is not a dotted path like `allocate.k`", key.name),
            );
            return None;
        }
        let stage_names: Vec<&str> = match root.get("stages").map(|n| &n.kind) {
            Some(NodeKind::Map(e)) => e.iter().map(|(k, _)| k.name.as_str()).collect(),
            _ => Vec::new(),
        };
        let first = segs[0].as_str();
        let full: Vec<String> = if first == "stages" || SECTIONS.contains(&first) {
            segs.clone()
        } else if stage_names.contains(&first) {
            std::iter::once("stages".to_string()).chain(segs.iter().cloned()).collect()
        } else if ["name", SWEEP, super::compose::EXTENDS].contains(&first) {
            self.push_at(key.pos, &at, format!("`{first}` cannot be swept"));
            return None;
        } else {
            let mut msg = format!(
                "`{first}` is neither a stage ({}) nor a section ({})",
                quoted(&stage_names),
                quoted(SECTIONS)
            );
            if let Some(s) =
                closest(first, stage_names.iter().copied().chain(SECTIONS.iter().copied()))
            {
                msg.push_str(&format!("\nhint: did you mean `{s}`?"));
            }
            self.push_at(key.pos, &at, msg);
            return None;
        };
        if full[0] == "stages" {
            match full.get(1) {
                Some(stage) if stage_names.contains(&stage.as_str()) => {}
                Some(stage) => {
                    let mut msg = format!("unknown stage `{stage}`");
                    if let Some(s) = closest(stage, stage_names.iter().copied()) {
                        msg.push_str(&format!("\nhint: did you mean `{s}`?"));
                    }
                    self.push_at(key.pos, &at, msg);
                    return None;
                }
                None => {
                    self.push_at(key.pos, &at, "names no stage: write `<stage>.<parameter>`");
                    return None;
                }
            }
            match full.get(2) {
                None => {
                    self.push_at(
                        key.pos,
                        &at,
                        format!("names the whole stage `{}`: sweep one of its parameters", full[1]),
                    );
                    return None;
                }
                Some(p) if STAGE_KEYS.contains(&p.as_str()) => {
                    self.push_at(
                        key.pos,
                        &at,
                        format!("`{p}` cannot be swept: every variant has the same stage graph (use a separate manifest with `extends:`)"),
                    );
                    return None;
                }
                Some(_) => {}
            }
        } else if first == "seed" && segs.len() > 1 {
            self.push_at(key.pos, &at, "`seed` is a number: it has no fields");
            return None;
        }
        // Every existing node along the way must be able to hold the next segment.
        let mut node = root;
        for (i, seg) in full.iter().enumerate().take(full.len() - 1) {
            let next = match &node.kind {
                NodeKind::Map(_) => node.get(seg),
                NodeKind::Seq(items) => match seg.parse::<usize>() {
                    Ok(j) if j < items.len() => items.get(j),
                    _ => {
                        self.push_at(
                            key.pos,
                            &at,
                            format!(
                                "`{}` is a list of {} values: `{seg}` is not an index of it",
                                full[..i].join("."),
                                items.len()
                            ),
                        );
                        return None;
                    }
                },
                _ => {
                    self.push_at(
                        key.pos,
                        &at,
                        format!(
                            "`{}` is {}: it has no field `{seg}`",
                            full[..i].join("."),
                            node.type_name()
                        ),
                    );
                    return None;
                }
            };
            match next {
                Some(n) => node = n,
                None => break, // created when the value is written in
            }
        }
        if let (NodeKind::Seq(items), Some(last)) = (&node.kind, full.last())
            && last.parse::<usize>().map_or(true, |j| j >= items.len())
        {
            self.push_at(
                key.pos,
                &at,
                format!("`{last}` is not an index of a list of {} values", items.len()),
            );
            return None;
        }
        Some(full)
    }
}

/// Why `s` cannot name a variant, if it cannot.
fn bad_variant_name(s: &str) -> Option<String> {
    if s.trim().is_empty() {
        return Some("a variant name cannot be empty".into());
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '/') {
        return Some(format!("variant names cannot contain {c:?}"));
    }
    None
}

/// Writes `value` at `path` below `doc`, creating mappings on the way; the key written takes the
/// value's position, so errors about it point into the sweep.
fn set_path(doc: &mut Node, path: &[String], value: Node) {
    let (last, parents) = path.split_last().expect("paths are non-empty");
    let mut node = doc;
    for seg in parents {
        node = child_mut(node, seg, value.pos);
    }
    match &mut node.kind {
        NodeKind::Seq(items) => {
            let i: usize = last.parse().expect("checked index");
            items[i] = value;
        }
        NodeKind::Map(entries) => {
            let key = Key { name: last.clone(), pos: value.pos };
            match entries.iter().position(|(k, _)| &k.name == last) {
                Some(i) => entries[i] = (key, value),
                None => entries.push((key, value)),
            }
        }
        _ => {
            node.kind = NodeKind::Map(vec![(Key { name: last.clone(), pos: value.pos }, value)]);
        }
    }
}

fn child_mut<'a>(node: &'a mut Node, seg: &str, pos: Pos) -> &'a mut Node {
    if !matches!(node.kind, NodeKind::Map(_) | NodeKind::Seq(_)) {
        node.kind = NodeKind::Map(Vec::new());
    }
    match &mut node.kind {
        NodeKind::Seq(items) => {
            let i: usize = seg.parse().expect("checked index");
            &mut items[i]
        }
        NodeKind::Map(entries) => {
            let i = match entries.iter().position(|(k, _)| k.name == seg) {
                Some(i) => i,
                None => {
                    entries.push((
                        Key { name: seg.to_string(), pos },
                        Node { pos, kind: NodeKind::Map(Vec::new()) },
                    ));
                    entries.len() - 1
                }
            };
            &mut entries[i].1
        }
        _ => unreachable!("made a mapping above"),
    }
}

/// A value as it appears in a variant name.
pub(crate) fn show_value(n: &Node) -> String {
    match &n.kind {
        NodeKind::Null => "null".into(),
        NodeKind::Bool(b) => b.to_string(),
        NodeKind::Int(i) => i.to_string(),
        NodeKind::Float(f) => f.to_string(),
        NodeKind::Str(s) => s.clone(),
        NodeKind::Seq(items) => {
            format!("[{}]", items.iter().map(show_value).collect::<Vec<_>>().join(" "))
        }
        NodeKind::Map(entries) => format!(
            "{{{}}}",
            entries
                .iter()
                .map(|(k, v)| format!("{}={}", k.name, show_value(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}
