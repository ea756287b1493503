//! The plan a recipe declares: stage nodes with their options and recipe positions, and the
//! edges between their ports; validation that reports every problem at once; text and DOT
//! renderings for `longrl check` and `longrl graph`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use longrl_stdlib::script::ScriptFn;
use longrl_stdlib::{PlanEdge, PlanNode, PlanView, PortKind, Registry, StageContext, StageFactory};
use serde_json::Value;

/// A line and column in the recipe (1-based; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    pub fn new(line: usize, column: usize) -> Self {
        Self { line, column }
    }

    pub fn from_rhai(pos: rhai::Position) -> Self {
        Self { line: pos.line().unwrap_or(0), column: pos.position().unwrap_or(0) }
    }
}

/// A problem with the recipe, where it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub position: Position,
    pub message: String,
}

impl Problem {
    pub fn new(position: Position, message: impl Into<String>) -> Self {
        Self { position, message: message.into() }
    }
}

/// Problems rendered as `recipe.rhai:LINE:COL: message`, one per line.
#[derive(Debug, Clone)]
pub struct Problems {
    pub recipe: String,
    pub list: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.list.len();
        writeln!(f, "{} has {count} problem{}:", self.recipe, if count == 1 { "" } else { "s" })?;
        for problem in &self.list {
            if problem.position.line == 0 {
                writeln!(f, "  {}: {}", self.recipe, problem.message)?;
            } else {
                writeln!(f, "  {}:{}:{}: {}", self.recipe, problem.position.line, problem.position.column, problem.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// One stage instance in the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    pub id: usize,
    /// The stage's registry name.
    pub stage: String,
    /// Options as given (handles removed, closures as `{"$closure": n}`).
    pub options: Value,
    pub position: Position,
    /// Set for calls of a name the registry does not know (already reported).
    #[serde(skip)]
    pub unknown: bool,
}

impl Node {
    /// `filter#2`.
    pub fn label(&self) -> String {
        format!("{}#{}", self.stage, self.id)
    }
}

/// One end of an edge as declared: a node, and a port when the recipe named one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub node: usize,
    pub port: Option<String>,
}

/// An edge as declared; ports not named are chosen by kind at validation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Edge {
    pub from: Endpoint,
    pub to: Endpoint,
    pub position: Position,
}

/// A plan as the recipe declared it, not yet validated.
#[derive(Clone)]
pub struct Plan {
    /// How to name the recipe in messages (its path).
    pub recipe: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Problems found while the script ran (unknown stages, misplaced arguments).
    pub problems: Vec<Problem>,
    pub closures: Arc<Vec<ScriptFn>>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan").field("nodes", &self.nodes).field("edges", &self.edges).finish_non_exhaustive()
    }
}

/// An edge with both ports known.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedEdge {
    pub from: usize,
    pub from_port: &'static str,
    pub to: usize,
    pub to_port: &'static str,
    pub kind: PortKind,
}

/// A plan that passed validation: every node is a known stage with valid options, every
/// edge joins ports of one kind, required inputs are connected, and there is no cycle.
#[derive(Clone)]
pub struct ValidPlan {
    pub recipe: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<ResolvedEdge>,
    pub closures: Arc<Vec<ScriptFn>>,
    /// Things worth saying that do not stop a run (an output nobody reads).
    pub warnings: Vec<Problem>,
}

impl fmt::Debug for ValidPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidPlan").field("nodes", &self.nodes).field("edges", &self.edges).finish_non_exhaustive()
    }
}

impl Plan {
    /// Checks everything, returning every problem found, sorted by position.
    pub fn validate(self, registry: &Registry, ctx: &StageContext) -> Result<ValidPlan, Problems> {
        let mut problems = self.problems.clone();
        let node_ctx =
            |node: &Node| StageContext { label: node.label(), node: node.id, closures: Arc::clone(&self.closures), ..ctx.clone() };
        problems.extend(self.option_problems(registry, &node_ctx));
        let resolved = self.resolve_edges(registry, &mut problems);
        if self.nodes.is_empty() && problems.is_empty() {
            problems.push(Problem::new(Position::default(), "the recipe declares no stages"));
        }
        let warnings = self.check_ports(registry, &resolved, &mut problems);
        if let Some(cycle) = find_cycle(self.nodes.len(), &resolved) {
            let names: Vec<String> = cycle.iter().map(|&id| self.nodes[id].label()).collect();
            let position = self.nodes[cycle[0]].position;
            problems.push(Problem::new(position, format!("the plan has a cycle: {} -> {}", names.join(" -> "), names[0])));
        }
        problems.extend(shared_writes(&self.nodes, registry, &node_ctx));
        problems.extend(self.plan_problems(registry, &resolved));

        if problems.is_empty() {
            Ok(ValidPlan { recipe: self.recipe, nodes: self.nodes, edges: resolved, closures: self.closures, warnings })
        } else {
            problems.sort();
            problems.dedup();
            Err(Problems { recipe: self.recipe, list: problems })
        }
    }

    /// The stages of the plan whose name the registry knows.
    fn known_nodes<'a>(&'a self, registry: &'a Registry) -> impl Iterator<Item = (&'a Node, &'a Arc<dyn StageFactory>)> {
        self.nodes.iter().filter(|n| !n.unknown).filter_map(|n| registry.get(&n.stage).map(|factory| (n, factory)))
    }

    /// Unknown stages, and what each stage's own check finds wrong with its options.
    fn option_problems(&self, registry: &Registry, node_ctx: &dyn Fn(&Node) -> StageContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        for node in self.nodes.iter().filter(|n| !n.unknown) {
            let Some(factory) = registry.get(&node.stage) else {
                problems.push(Problem::new(node.position, format!("unknown stage `{}`", node.stage)));
                continue;
            };
            for message in factory.check(&node.options, &node_ctx(node)) {
                problems.push(Problem::new(node.position, format!("{}: {message}", node.stage)));
            }
        }
        problems
    }

    /// Each edge between known stages, its ports picked ([`resolve_edge`]); the ones that
    /// cannot be resolved become problems.
    fn resolve_edges(&self, registry: &Registry, problems: &mut Vec<Problem>) -> Vec<ResolvedEdge> {
        let mut resolved = Vec::new();
        for edge in &self.edges {
            let (Some(from), Some(to)) = (self.nodes.get(edge.from.node), self.nodes.get(edge.to.node)) else {
                problems.push(Problem::new(edge.position, "edge refers to a stage that does not exist"));
                continue;
            };
            if from.unknown || to.unknown {
                continue;
            }
            let (Some(from_factory), Some(to_factory)) = (registry.get(&from.stage), registry.get(&to.stage)) else {
                continue;
            };
            match resolve_edge(edge, from, to, from_factory.outputs(), to_factory.inputs()) {
                Ok(r) => resolved.push(r),
                Err(message) => problems.push(Problem::new(edge.position, message)),
            }
        }
        resolved
    }

    /// Required inputs left unconnected and model inputs fed twice are problems; a stage's
    /// only records output that nothing reads is a warning (returned).
    fn check_ports(&self, registry: &Registry, resolved: &[ResolvedEdge], problems: &mut Vec<Problem>) -> Vec<Problem> {
        // Edges by port, so that large plans check in linear time.
        let mut into_ports: BTreeMap<(usize, &str), usize> = BTreeMap::new();
        let mut used_outputs: BTreeSet<(usize, &str)> = BTreeSet::new();
        for edge in resolved {
            *into_ports.entry((edge.to, edge.to_port)).or_default() += 1;
            used_outputs.insert((edge.from, edge.from_port));
        }
        let mut warnings = Vec::new();
        for (node, factory) in self.known_nodes(registry) {
            for port in factory.inputs() {
                let count = into_ports.get(&(node.id, port.name)).copied().unwrap_or(0);
                if port.required && count == 0 {
                    problems.push(Problem::new(
                        node.position,
                        format!("{}: input `{}` ({}) is not connected", node.stage, port.name, port.kind),
                    ));
                }
                if port.kind == PortKind::Model && count > 1 {
                    problems.push(Problem::new(
                        node.position,
                        format!("{}: input `{}` takes one model but has {count} edges", node.stage, port.name),
                    ));
                }
            }
            for port in factory.outputs() {
                let used = used_outputs.contains(&(node.id, port.name));
                if !used && factory.outputs().len() == 1 && port.kind == PortKind::Records {
                    warnings.push(Problem::new(node.position, format!("{}: output `{}` is not used by any stage", node.stage, port.name)));
                }
            }
        }
        warnings
    }

    /// The checks stages make of the plan around them (e.g. a curriculum's chained phases).
    fn plan_problems(&self, registry: &Registry, resolved: &[ResolvedEdge]) -> Vec<Problem> {
        let view_nodes: Vec<PlanNode> =
            self.nodes.iter().filter(|n| !n.unknown).map(|n| PlanNode { id: n.id, stage: &n.stage, options: &n.options }).collect();
        let view_edges: Vec<PlanEdge> =
            resolved.iter().map(|e| PlanEdge { from: e.from, from_port: e.from_port, to: e.to, to_port: e.to_port }).collect();
        let view = PlanView { nodes: &view_nodes, edges: &view_edges };
        let mut problems = Vec::new();
        for (node, factory) in self.known_nodes(registry) {
            for (id, message) in factory.check_plan(&view, node.id) {
                let position = self.nodes.get(id).map_or(node.position, |n| n.position);
                problems.push(Problem::new(position, message));
            }
        }
        problems
    }
}

/// Picks the ports of an edge: named ones must exist; unnamed ones are the only port of the
/// edge's kind on that side.
fn resolve_edge(
    edge: &Edge,
    from: &Node,
    to: &Node,
    outputs: &'static [longrl_stdlib::PortSpec],
    inputs: &'static [longrl_stdlib::PortSpec],
) -> Result<ResolvedEdge, String> {
    let find = |ports: &'static [longrl_stdlib::PortSpec], name: &str| ports.iter().find(|p| p.name == name);
    let names =
        |ports: &[longrl_stdlib::PortSpec]| ports.iter().map(|p| format!("`{}` ({})", p.name, p.kind)).collect::<Vec<_>>().join(", ");
    if outputs.is_empty() {
        return Err(format!("`{}` has no outputs, so it cannot feed `{}`", from.stage, to.stage));
    }
    if inputs.is_empty() {
        return Err(format!("`{}` takes no inputs, but `{}` is connected to it", to.stage, from.stage));
    }
    // Named ports first.
    let named_out = match &edge.from.port {
        Some(name) => {
            Some(find(outputs, name).ok_or_else(|| format!("`{}` has no output `{name}` (its outputs: {})", from.stage, names(outputs)))?)
        }
        None => None,
    };
    let named_in = match &edge.to.port {
        Some(name) => {
            Some(find(inputs, name).ok_or_else(|| format!("`{}` has no input `{name}` (its inputs: {})", to.stage, names(inputs)))?)
        }
        None => None,
    };
    let (out_port, in_port) = match (named_out, named_in) {
        (Some(o), Some(i)) => (o, i),
        (Some(o), None) => (o, pick(inputs, o.kind).map_err(|n| no_port(to, "input", o.kind, n, inputs))?),
        (None, Some(i)) => (pick(outputs, i.kind).map_err(|n| wrong_kind(from, to, i, n, outputs))?, i),
        (None, None) => {
            let o = if outputs.len() == 1 {
                &outputs[0]
            } else {
                let kinds: Vec<PortKind> = inputs.iter().map(|p| p.kind).collect();
                let candidates: Vec<_> = outputs.iter().filter(|p| kinds.contains(&p.kind)).collect();
                match candidates.as_slice() {
                    [one] => *one,
                    _ => return Err(format!("`{}` has several outputs ({}); pick one with .output(\"name\")", from.stage, names(outputs))),
                }
            };
            (o, pick(inputs, o.kind).map_err(|n| no_port(to, "input", o.kind, n, inputs))?)
        }
    };
    if out_port.kind != in_port.kind {
        return Err(format!(
            "wrong kind of edge: `{}` output `{}` carries {}, but `{}` input `{}` takes {}",
            from.stage, out_port.name, out_port.kind, to.stage, in_port.name, in_port.kind
        ));
    }
    Ok(ResolvedEdge { from: from.id, from_port: out_port.name, to: to.id, to_port: in_port.name, kind: out_port.kind })
}

/// The only port of `kind`; `Err(count)` when there are none or several.
fn pick(ports: &'static [longrl_stdlib::PortSpec], kind: PortKind) -> Result<&'static longrl_stdlib::PortSpec, usize> {
    let matching: Vec<_> = ports.iter().filter(|p| p.kind == kind).collect();
    match matching.as_slice() {
        [one] => Ok(one),
        other => Err(other.len()),
    }
}

fn no_port(node: &Node, side: &str, kind: PortKind, count: usize, ports: &[longrl_stdlib::PortSpec]) -> String {
    let listed = ports.iter().map(|p| format!("`{}` ({})", p.name, p.kind)).collect::<Vec<_>>().join(", ");
    if count == 0 {
        format!("wrong kind of edge: `{}` has no {side} that takes {kind} (its {side}s: {listed})", node.stage)
    } else {
        format!("`{}` has several {side}s that take {kind}; name one (its {side}s: {listed})", node.stage)
    }
}

fn wrong_kind(from: &Node, to: &Node, input: &longrl_stdlib::PortSpec, count: usize, outputs: &[longrl_stdlib::PortSpec]) -> String {
    let listed = outputs.iter().map(|p| format!("{}", p.kind)).collect::<Vec<_>>().join(", ");
    if count == 0 {
        format!("wrong kind of edge: `{}` input `{}` takes {}, but `{}` produces {listed}", to.stage, input.name, input.kind, from.stage)
    } else {
        format!("`{}` has several outputs of kind {}; pick one with .output(\"name\")", from.stage, input.kind)
    }
}

/// A cycle among the edges, as node ids in order, if there is one. Depth-first with an
/// explicit stack, so a chain of any length cannot overflow the thread's stack.
fn find_cycle(node_count: usize, edges: &[ResolvedEdge]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut successors: Vec<Vec<usize>> = vec![Vec::new(); node_count];
    for edge in edges.iter().filter(|e| e.from < node_count && e.to < node_count) {
        successors[edge.from].push(edge.to);
    }
    let mut marks = vec![Mark::New; node_count];
    for root in 0..node_count {
        if marks[root] != Mark::New {
            continue;
        }
        // The path from the root, each node with the index of its next successor to visit.
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        marks[root] = Mark::Active;
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            let Some(&child) = successors[node].get(*next) else {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match marks[child] {
                Mark::Active => {
                    let start = path.iter().position(|&(n, _)| n == child).unwrap_or(0);
                    return Some(path[start..].iter().map(|&(n, _)| n).collect());
                }
                Mark::New => {
                    marks[child] = Mark::Active;
                    path.push((child, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// Files the run directory itself holds: no stage may write them.
const RUN_FILES: [&str; 9] =
    ["recipe.rhai", "plan.json", "run.json", "metrics.jsonl", "report.json", "report.html", "stages", "checkpoints", ".lock"];

/// Problems of stages that would write the same file or directory (or one of the run's own).
fn shared_writes<'a>(nodes: &'a [Node], registry: &Registry, ctx: &dyn Fn(&Node) -> StageContext) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut writers: BTreeMap<PathBuf, &'a Node> = BTreeMap::new();
    for node in nodes.iter().filter(|n| !n.unknown) {
        let Some(factory) = registry.get(&node.stage) else { continue };
        for path in factory.writes(&node.options, &ctx(node)) {
            let path: PathBuf = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
            if path.is_relative() && RUN_FILES.iter().any(|f| path == Path::new(f)) {
                problems.push(Problem::new(
                    node.position,
                    format!("{}: writes {}, a file of the run directory itself; pick another name", node.stage, path.display()),
                ));
            } else if let Some(first) = writers.get(&path) {
                problems.push(Problem::new(
                    node.position,
                    format!(
                        "{}: writes {}, which {} (line {}) writes too; give one of them another path or name",
                        node.stage,
                        path.display(),
                        first.label(),
                        first.position.line
                    ),
                ));
            } else {
                writers.insert(path, node);
            }
        }
    }
    problems
}

impl ValidPlan {
    /// The plan as indented text: each stage with its options and where its inputs come from.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let options = match &node.options {
                Value::Object(map) if map.is_empty() => String::new(),
                other => format!(" {other}"),
            };
            out.push_str(&format!("{:<16} line {:>3}  {}{}\n", node.label(), node.position.line, node.stage, options));
            for edge in self.edges.iter().filter(|e| e.to == node.id) {
                out.push_str(&format!("    {} <- {}.{} ({})\n", edge.to_port, self.nodes[edge.from].label(), edge.from_port, edge.kind));
            }
        }
        out
    }

    /// The plan in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph plan {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
        for node in &self.nodes {
            out.push_str(&format!("  n{} [label=\"{}\\nline {}\"];\n", node.id, node.label(), node.position.line));
        }
        for edge in &self.edges {
            let style = match edge.kind {
                PortKind::Records => "solid",
                PortKind::Model => "bold",
                PortKind::Reports => "dashed",
                PortKind::Reward => "dotted",
            };
            out.push_str(&format!("  n{} -> n{} [label=\"{}\", style={style}];\n", edge.from, edge.to, edge.kind));
        }
        out.push_str("}\n");
        out
    }

    /// The plan as JSON (saved in the run directory).
    pub fn to_json(&self) -> Value {
        let closures: Vec<Value> =
            self.closures.iter().map(|c| serde_json::json!({ "at": c.origin(), "fingerprint": c.fingerprint() })).collect();
        serde_json::json!({ "recipe": self.recipe, "nodes": self.nodes, "edges": self.edges, "closures": closures })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(length: usize) -> Vec<ResolvedEdge> {
        (1..length).map(|to| ResolvedEdge { from: to - 1, from_port: "records", to, to_port: "input", kind: PortKind::Records }).collect()
    }

    #[test]
    fn a_chain_of_a_hundred_thousand_stages_does_not_overflow_the_stack() {
        let edges = chain(100_000);
        // A small stack: a recursive walk would overflow it long before the end.
        let found = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || find_cycle(100_000, &edges))
            .expect("thread")
            .join()
            .expect("no overflow");
        assert_eq!(found, None);
    }

    #[test]
    fn a_cycle_is_found_in_order() {
        let mut edges = chain(5);
        edges.push(ResolvedEdge { from: 4, from_port: "records", to: 2, to_port: "input", kind: PortKind::Records });
        assert_eq!(find_cycle(5, &edges), Some(vec![2, 3, 4]));
    }
}
