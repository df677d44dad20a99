//! The stage graph: manifest stages expanded into stage instances (`for_each: group` gives one
//! instance per group: `prune[0]` ... `prune[N-1]`), in a topological order, drawable as DOT or
//! Mermaid. The graph is static: group counts come from the allocation stage's parameters, so
//! the whole DAG is known (and plannable) before anything runs.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::manifest::{ForEach, Manifest, StageDecl};

/// One runnable unit: a stage, or one group's copy of a fanned-out stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// `base`, `prune[3]`.
    pub id: String,
    /// Index of the stage in [`Manifest::stages`].
    pub stage: usize,
    /// Group index for fanned-out instances.
    pub group: Option<usize>,
    /// Indices (into [`Dag::instances`]) of the instances this one needs, in `needs` order.
    pub deps: Vec<usize>,
}

/// Stage instances in topological order (every instance after all its deps).
#[derive(Clone, Debug)]
pub struct Dag {
    /// The instances.
    pub instances: Vec<Instance>,
}

fn stage_graph(decls: &[StageDecl]) -> (DiGraph<usize, ()>, Vec<NodeIndex>) {
    let mut g = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..decls.len()).map(|i| g.add_node(i)).collect();
    let index: HashMap<&str, usize> =
        decls.iter().enumerate().map(|(i, d)| (d.name.as_str(), i)).collect();
    for (i, d) in decls.iter().enumerate() {
        for n in &d.needs {
            if let Some(&j) = index.get(n.as_str()) {
                g.add_edge(nodes[j], nodes[i], ());
            }
        }
    }
    (g, nodes)
}

/// A topological order that keeps manifest order wherever dependencies allow (Kahn's algorithm
/// taking the earliest-declared ready stage first), so plans read like the manifest.
fn stable_toposort(g: &DiGraph<usize, ()>) -> Vec<NodeIndex> {
    let mut indegree: Vec<usize> = g
        .node_indices()
        .map(|n| g.neighbors_directed(n, petgraph::Direction::Incoming).count())
        .collect();
    let mut ready: BTreeSet<(usize, NodeIndex)> =
        g.node_indices().filter(|n| indegree[n.index()] == 0).map(|n| (g[n], n)).collect();
    let mut order = Vec::with_capacity(g.node_count());
    while let Some(first) = ready.pop_first() {
        let n = first.1;
        order.push(n);
        for next in g.neighbors_directed(n, petgraph::Direction::Outgoing) {
            indegree[next.index()] -= 1;
            if indegree[next.index()] == 0 {
                ready.insert((g[next], next));
            }
        }
    }
    assert_eq!(order.len(), g.node_count(), "validated manifests have no cycles");
    order
}

/// A dependency cycle among the declared stages, as stage names in `needs` order, if any.
pub fn find_cycle(decls: &[StageDecl]) -> Option<Vec<String>> {
    let (g, _) = stage_graph(decls);
    let scc = tarjan_scc(&g).into_iter().find(|c| c.len() > 1)?;
    let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
    // Walk "is needed by" edges inside the component from its first stage (in manifest order)
    // until a stage repeats; the repeated stretch is a cycle.
    let start = *members.iter().min_by_key(|n| g[**n]).expect("non-empty");
    let mut path = vec![start];
    loop {
        let cur = *path.last().expect("non-empty");
        let next = g
            .neighbors_directed(cur, petgraph::Direction::Incoming)
            .filter(|n| members.contains(n))
            .min_by_key(|n| g[*n])
            .expect("a node of a cycle has a predecessor in it");
        if let Some(at) = path.iter().position(|&p| p == next) {
            let cycle = &path[at..];
            return Some(cycle.iter().map(|n| decls[g[*n]].name.clone()).collect());
        }
        path.push(next);
    }
}

/// The allocation stage a `for_each: group` stage takes its groups from: the single stage with
/// groups among its transitive needs.
pub fn allocation_of<'a>(decls: &'a [StageDecl], stage: &str) -> Result<&'a StageDecl, String> {
    let by_name: HashMap<&str, &StageDecl> = decls.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = by_name
        .get(stage)
        .map(|d| d.needs.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let mut found: Vec<&StageDecl> = Vec::new();
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        let Some(d) = by_name.get(n) else { continue };
        if d.params.groups().is_some() {
            found.push(d);
        } else {
            stack.extend(d.needs.iter().map(String::as_str));
        }
    }
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "`for_each: group` needs an `snr-allocate` stage among the stages `{stage}` needs (directly or through other stages)"
        )),
        many => Err(format!(
            "`for_each: group` is ambiguous: `{stage}` reaches several allocation stages ({})",
            many.iter().map(|d| format!("`{}`", d.name)).collect::<Vec<_>>().join(", ")
        )),
    }
}

impl Dag {
    /// Expands a validated manifest's stages into instances.
    pub fn build(m: &Manifest) -> Dag {
        let (g, _) = stage_graph(&m.stages);
        let order = stable_toposort(&g);
        let mut instances: Vec<Instance> = Vec::new();
        // stage index -> instance indices (one, or one per group)
        let mut of_stage: HashMap<usize, Vec<usize>> = HashMap::new();
        for n in order {
            let si = g[n];
            let decl = &m.stages[si];
            let groups = match decl.for_each {
                Some(ForEach::Group) => {
                    let alloc = allocation_of(&m.stages, &decl.name).expect("validated");
                    Some(alloc.params.groups().expect("allocation stages define groups"))
                }
                None => None,
            };
            let make_deps = |instances: &[Instance], group: Option<usize>| -> Vec<usize> {
                let mut deps = Vec::new();
                for need in &decl.needs {
                    let ui = m.stages.iter().position(|d| &d.name == need).expect("validated");
                    let ups = &of_stage[&ui];
                    match (group, m.stages[ui].for_each) {
                        (Some(g), Some(ForEach::Group)) => {
                            // Same group when both fan out over the same allocation; every
                            // instance otherwise.
                            if let Some(&u) = ups.iter().find(|&&u| instances[u].group == Some(g)) {
                                deps.push(u);
                            } else {
                                deps.extend(ups);
                            }
                        }
                        _ => deps.extend(ups),
                    }
                }
                deps
            };
            let mut mine = Vec::new();
            match groups {
                Some(count) => {
                    for g in 0..count {
                        let deps = make_deps(&instances, Some(g));
                        mine.push(instances.len());
                        instances.push(Instance {
                            id: format!("{}[{g}]", decl.name),
                            stage: si,
                            group: Some(g),
                            deps,
                        });
                    }
                }
                None => {
                    let deps = make_deps(&instances, None);
                    mine.push(instances.len());
                    instances.push(Instance {
                        id: decl.name.clone(),
                        stage: si,
                        group: None,
                        deps,
                    });
                }
            }
            of_stage.insert(si, mine);
        }
        Dag { instances }
    }

    /// The instances as graph nodes (id, kind, ids of the instances needed).
    pub fn nodes(&self, m: &Manifest) -> Vec<GraphNode> {
        self.instances
            .iter()
            .map(|inst| GraphNode {
                id: inst.id.clone(),
                kind: m.stages[inst.stage].params.kind().to_string(),
                needs: inst.deps.iter().map(|&d| self.instances[d].id.clone()).collect(),
            })
            .collect()
    }
}

/// A node to draw.
#[derive(Clone, Debug)]
pub struct GraphNode {
    /// Instance id.
    pub id: String,
    /// Stage kind.
    pub kind: String,
    /// Ids of the nodes it needs (all present in the list drawn).
    pub needs: Vec<String>,
}

/// Graphviz DOT of `nodes`, labelled with id and kind.
pub fn to_dot(name: &str, nodes: &[GraphNode]) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", quote(name));
    for n in nodes {
        let id = quote(&n.id);
        let _ = writeln!(s, "  \"{id}\" [label=\"{id}\\n{}\"];", n.kind);
    }
    for n in nodes {
        for d in &n.needs {
            let _ = writeln!(s, "  \"{}\" -> \"{}\";", quote(d), quote(&n.id));
        }
    }
    s.push_str("}\n");
    s
}

/// Mermaid flowchart of `nodes`.
pub fn to_mermaid(nodes: &[GraphNode]) -> String {
    let index: HashMap<&str, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let mut s = String::from("flowchart LR\n");
    for (i, n) in nodes.iter().enumerate() {
        let _ = writeln!(s, "  n{i}[\"{}<br/>{}\"]", n.id.replace('"', "#quot;"), n.kind);
    }
    for (i, n) in nodes.iter().enumerate() {
        for d in &n.needs {
            let _ = writeln!(s, "  n{} --> n{i}", index[d.as_str()]);
        }
    }
    s
}
