//! Compiles the stages of a [`Spec`] into a DAG: who must publish before whom.
//!
//! **Architecture invariant:** pure — no I/O. Edges come only from the spec: B depends on A when
//! one of B's inputs overlaps A's output folder (B reads what A writes), or B lists A in `after`.
//! The topological order breaks ties by file order, so plans and logs are stable.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;
use serde::Serialize;

use crate::spec::{Spec, SpecError};

/// Why one stage depends on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeKind {
    /// The downstream stage reads the upstream's output folder.
    Data,
    /// The downstream stage lists the upstream in `after`.
    After,
}

/// The compiled stage graph. Node weights are stage indices into `Spec::stages`.
#[derive(Debug)]
pub struct Graph {
    dag: DiGraph<usize, EdgeKind>,
    order: Vec<usize>,
}

impl Graph {
    /// Compiles `spec`; a cycle is a located error naming the whole cycle.
    pub fn compile(spec: &Spec) -> Result<Graph, Box<SpecError>> {
        let mut dag = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..spec.stages.len()).map(|i| dag.add_node(i)).collect();
        let outputs = spec.output_index();
        // Who each stage reads from, on all cores; the edges are then added in stage order.
        use rayon::prelude::*;
        let upstreams: Vec<Vec<usize>> = spec
            .stages
            .par_iter()
            .with_min_len(256)
            .map(|stage| {
                let mut upstream: Vec<usize> = stage
                    .inputs
                    .iter()
                    .flat_map(|input| outputs.overlapping(input.base()))
                    .collect();
                upstream.sort_unstable();
                upstream.dedup();
                upstream
            })
            .collect();
        for (b, (stage, upstream)) in spec.stages.iter().zip(upstreams).enumerate() {
            for a in upstream {
                dag.update_edge(nodes[a], nodes[b], EdgeKind::Data);
            }
            for name in &stage.after {
                if let Some(a) = spec.stage_index(name) {
                    if dag.find_edge(nodes[a], nodes[b]).is_none() {
                        dag.add_edge(nodes[a], nodes[b], EdgeKind::After);
                    }
                }
            }
        }
        let graph = Graph {
            dag,
            order: Vec::new(),
        };
        match graph.topological_order() {
            Ok(order) => Ok(Graph { order, ..graph }),
            Err(cycle) => {
                let names: Vec<&str> = cycle
                    .iter()
                    .map(|&i| spec.stages[i].name.as_str())
                    .collect();
                let first = cycle[0];
                let message = if cycle.len() == 2 {
                    format!("stage `{}` reads its own output folder", names[0])
                } else {
                    format!("dependency cycle: {}", names.join(" → "))
                };
                Err(Box::new(spec.error_at(
                    &format!("/stages/{first}/name"),
                    message,
                    "part of the cycle",
                    Some("a stage may only read folders produced by stages that do not (indirectly) read its own output".into()),
                )))
            }
        }
    }

    /// Kahn's algorithm with the smallest stage index first; on a cycle, the cycle's path with the
    /// first stage repeated at the end.
    fn topological_order(&self) -> Result<Vec<usize>, Vec<usize>> {
        let n = self.dag.node_count();
        let mut indegree: Vec<usize> = (0..n)
            .map(|i| {
                self.dag
                    .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for next in self
                .dag
                .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            {
                indegree[next.index()] -= 1;
                if indegree[next.index()] == 0 {
                    ready.push(Reverse(next.index()));
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Every node left has an incoming edge from another node left: walk backwards until a
        // node repeats, which closes a cycle.
        let left: BTreeSet<usize> = (0..n).filter(|i| indegree[*i] > 0).collect();
        let start = *left.iter().next().expect("a node is left over");
        let mut path = vec![start];
        loop {
            let current = *path.last().unwrap();
            let prev = self
                .dag
                .neighbors_directed(NodeIndex::new(current), Direction::Incoming)
                .map(|p| p.index())
                .filter(|p| left.contains(p))
                .min()
                .expect("a leftover node has a leftover predecessor");
            if let Some(pos) = path.iter().position(|&p| p == prev) {
                let mut cycle: Vec<usize> = path[pos..].to_vec();
                cycle.reverse();
                // Start at the stage that comes first in the file, for a stable message.
                let first = cycle
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| **s)
                    .map_or(0, |(i, _)| i);
                cycle.rotate_left(first);
                cycle.push(cycle[0]);
                return Err(cycle);
            }
            path.push(prev);
        }
    }

    /// Stage indices in the order they can run.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Direct upstream stages of `stage`.
    pub fn upstream(&self, stage: usize) -> Vec<usize> {
        let mut up: Vec<usize> = self
            .dag
            .neighbors_directed(NodeIndex::new(stage), Direction::Incoming)
            .map(|n| n.index())
            .collect();
        up.sort_unstable();
        up
    }

    /// `stages` and everything they (transitively) need.
    pub fn with_dependencies(&self, stages: &[usize]) -> BTreeSet<usize> {
        self.closure(stages, Direction::Incoming)
    }

    /// `stages` and everything (transitively) downstream of them.
    pub fn with_dependents(&self, stages: &[usize]) -> BTreeSet<usize> {
        self.closure(stages, Direction::Outgoing)
    }

    fn closure(&self, stages: &[usize], direction: Direction) -> BTreeSet<usize> {
        let mut seen: BTreeSet<usize> = stages.iter().copied().collect();
        let mut todo: Vec<usize> = stages.to_vec();
        while let Some(i) = todo.pop() {
            for n in self.dag.neighbors_directed(NodeIndex::new(i), direction) {
                if seen.insert(n.index()) {
                    todo.push(n.index());
                }
            }
        }
        seen
    }

    /// Every edge as (upstream, downstream, kind), sorted.
    pub fn edges(&self) -> Vec<(usize, usize, EdgeKind)> {
        let mut edges: Vec<_> = self
            .dag
            .edge_indices()
            .map(|e| {
                let (a, b) = self.dag.edge_endpoints(e).unwrap();
                (a.index(), b.index(), self.dag[e])
            })
            .collect();
        edges.sort_by_key(|&(a, b, _)| (a, b));
        edges
    }

    /// Graphviz dot.
    pub fn to_dot(&self, spec: &Spec) -> String {
        let mut out = String::from("digraph pipe {\n  rankdir=LR;\n  node [shape=box];\n");
        for &i in &self.order {
            let s = &spec.stages[i];
            out += &format!(
                "  {:?} [label={:?}];\n",
                s.name,
                format!("{}\n→ {}/", s.name, s.output_dir)
            );
        }
        for (a, b, kind) in self.edges() {
            let style = if kind == EdgeKind::After {
                " [style=dashed]"
            } else {
                ""
            };
            out += &format!(
                "  {:?} -> {:?}{style};\n",
                spec.stages[a].name, spec.stages[b].name
            );
        }
        out + "}\n"
    }

    /// Mermaid flowchart.
    pub fn to_mermaid(&self, spec: &Spec) -> String {
        let mut out = String::from("flowchart LR\n");
        for &i in &self.order {
            let s = &spec.stages[i];
            out += &format!("  s{i}[\"{} → {}/\"]\n", s.name, s.output_dir);
        }
        for (a, b, kind) in self.edges() {
            let arrow = if kind == EdgeKind::After {
                "-.->"
            } else {
                "-->"
            };
            out += &format!("  s{a} {arrow} s{b}\n");
        }
        out
    }

    /// JSON: stages in topological order and edges.
    pub fn to_json(&self, spec: &Spec) -> serde_json::Value {
        let stages: Vec<_> = self.order.iter().map(|&i| {
            let s = &spec.stages[i];
            serde_json::json!({
                "name": s.name,
                "outputDir": s.output_dir,
                "inputs": s.inputs.iter().map(|i| match i {
                    crate::spec::Input::Path(p) => p.clone(),
                    crate::spec::Input::Glob { pattern, .. } => pattern.clone(),
                }).collect::<Vec<_>>(),
                "upstream": self.upstream(i).iter().map(|&u| spec.stages[u].name.clone()).collect::<Vec<_>>(),
            })
        }).collect();
        let edges: Vec<_> = self.edges().into_iter().map(|(a, b, kind)| {
            serde_json::json!({"from": spec.stages[a].name, "to": spec.stages[b].name, "kind": kind})
        }).collect();
        serde_json::json!({"stages": stages, "edges": edges})
    }
}
