//! Graph IR of a decoder-only transformer.
//!
//! [`Graph::build`] turns a validated [`ModelSpec`] into an immutable petgraph `DiGraph` whose
//! nodes are the ops of one forward pass (embedding, RMSNorm, linear, RoPE, attention,
//! SiLU-gate multiply, residual add, final norm, lm_head) and whose edges carry the operand slot
//! they feed. Nodes are addressable by their Hugging Face module name
//! (`model.layers.3.self_attn.q_proj`), and linear nodes keep the tensor names of their weights.
//! Analyses never mutate the graph: they build side tables keyed by [`NodeId`] or by name.

mod builder;
mod dump;
mod ops;

use std::collections::BTreeMap;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::model::ModelSpec;

pub use ops::{Linear, LinearKind, Node, Op};

/// Index of a node in the graph.
pub type NodeId = NodeIndex;

/// The immutable decoder graph. Edge weights are operand slots of the target node.
#[derive(Debug, Clone)]
pub struct Graph {
    spec: ModelSpec,
    graph: DiGraph<Node, usize>,
    order: Vec<NodeId>,
    by_name: BTreeMap<String, NodeId>,
}

impl Graph {
    /// Builds the graph of `spec`'s decoder.
    pub fn build(spec: &ModelSpec) -> Graph {
        let graph = builder::build(spec);
        // The builder adds nodes in execution order and every edge points from an earlier
        // node to a later one, so index order is a topological order (and a stable one).
        debug_assert!(graph.edge_indices().all(|e| {
            let (a, b) = graph.edge_endpoints(e).expect("edge exists");
            a < b
        }));
        let order = graph.node_indices().collect();
        let by_name = graph
            .node_indices()
            .map(|id| (graph[id].name.clone(), id))
            .collect();
        Graph {
            spec: spec.clone(),
            graph,
            order,
            by_name,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    /// Nodes in a topological order (stable: the build order).
    pub fn topo_order(&self) -> &[NodeId] {
        &self.order
    }

    /// Operands of `id`, ordered by slot.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(usize, NodeId)> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, src)| src).collect()
    }

    /// The nodes that consume the value of `id`, in topological order.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self
            .graph
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Number of nodes that consume the value of `id`.
    pub fn consumer_count(&self, id: NodeId) -> usize {
        self.graph.edges_directed(id, Direction::Outgoing).count()
    }

    /// The node with this Hugging Face module name.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// Every linear node (including lm_head) in topological order.
    pub fn linears(&self) -> impl Iterator<Item = (NodeId, &Linear)> + '_ {
        self.order
            .iter()
            .filter_map(|&id| match &self.graph[id].op {
                Op::Linear(l) => Some((id, l)),
                _ => None,
            })
    }

    /// Every MoE router (module names such as `model.layers.1.mlp.gate`) in topological order.
    pub fn routers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.order
            .iter()
            .copied()
            .filter(|&id| matches!(self.graph[id].op, Op::Router { .. }))
    }

    /// Every projection inside a decoder block (q, k, v, o, gate, up, down): all linear layers
    /// but lm_head (which plans cover too: see [`Graph::linears`]).
    pub fn block_linears(&self) -> impl Iterator<Item = (NodeId, &Linear)> + '_ {
        self.linears().filter(|(_, l)| l.kind != LinearKind::LmHead)
    }

    /// The residual-stream node that feeds decoder block `layer` (the embedding for block 0).
    /// Everything in blocks `>= layer` depends on earlier nodes only through it, which is what
    /// lets an executor start a forward pass there.
    pub fn block_input(&self, layer: usize) -> Option<NodeId> {
        if layer == 0 {
            self.find("model.embed_tokens")
        } else {
            self.block_output(layer - 1)
        }
    }

    /// The residual-stream node that block `layer` produces.
    pub fn block_output(&self, layer: usize) -> Option<NodeId> {
        self.find(&format!("model.layers.{layer}.residual_mlp"))
    }

    /// The final node, producing logits.
    pub fn output(&self) -> NodeId {
        *self.order.last().expect("a graph has nodes")
    }

    /// Stable, human-readable dump of the graph (one node per line).
    pub fn dump(&self) -> String {
        dump::dump(self)
    }
}
