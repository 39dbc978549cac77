//! The IR container: a petgraph `StableGraph` of [`Node`]s whose edges carry which
//! output of the producer feeds which input slot of the consumer. Graph inputs, params
//! and outputs are kept in `IndexMap`s so every dump is deterministic. Insertion is
//! hash-consed: adding an op that already exists with the same inputs returns the
//! existing node, so CSE is exact and free.

use crate::{Error, Result};
use indexmap::IndexMap;
use kiln_ops::{Op, OpError, OutTypes, TensorType};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use smallvec::SmallVec;
use std::collections::{BinaryHeap, HashMap};

pub type NodeId = NodeIndex<u32>;

/// One output of one node: what a tensor handle refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub output: u8,
}

impl Value {
    pub fn new(node: NodeId, output: u8) -> Value {
        Value { node, output }
    }
}

impl From<NodeId> for Value {
    fn from(node: NodeId) -> Value {
        Value { node, output: 0 }
    }
}

/// A node: its op, the types of its outputs and the module path it was traced in.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub outputs: OutTypes,
    /// Module path (`model.layers.0.self_attn`), empty at the top level.
    pub scope: String,
}

/// An edge: output `output` of the source feeds input `slot` of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub slot: u16,
    pub output: u8,
}

type CseKey = (Op, SmallVec<[Value; 4]>);

#[derive(Clone, Debug, Default)]
pub struct Graph {
    g: StableGraph<Node, Edge, petgraph::Directed, u32>,
    cse: HashMap<CseKey, NodeId>,
    inputs: IndexMap<String, NodeId>,
    params: IndexMap<String, NodeId>,
    outputs: IndexMap<String, Value>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds `op` on `inputs` (type-checked by the op's rule), or returns the existing
    /// identical node. Sources (`input`, `param`) must go through [`Graph::add_input`] /
    /// [`Graph::add_param`] so their names are registered.
    pub fn add(&mut self, op: Op, inputs: &[Value], scope: &str) -> Result<NodeId, OpError> {
        let key: CseKey = (op, inputs.iter().copied().collect());
        if let Some(&n) = self.cse.get(&key) {
            return Ok(n);
        }
        let in_types: Vec<TensorType> = inputs.iter().map(|v| self.value_type(*v).clone()).collect();
        let outputs = key.0.infer(&in_types)?;
        let n = self.g.add_node(Node { op: key.0.clone(), outputs, scope: scope.to_string() });
        for (slot, v) in inputs.iter().enumerate() {
            self.g.add_edge(v.node, n, Edge { slot: slot as u16, output: v.output });
        }
        self.cse.insert(key, n);
        Ok(n)
    }

    pub fn add_input(&mut self, name: &str, ty: TensorType) -> Result<NodeId> {
        if self.inputs.contains_key(name) {
            return Err(Error::DuplicateName { kind: "input", name: name.into() });
        }
        let n = self.add(Op::Input { name: name.into(), ty }, &[], "").expect("sources always type-check");
        self.inputs.insert(name.into(), n);
        Ok(n)
    }

    pub fn add_param(&mut self, name: &str, ty: TensorType, scope: &str) -> Result<NodeId> {
        if self.params.contains_key(name) {
            return Err(Error::DuplicateName { kind: "param", name: name.into() });
        }
        let n = self.add(Op::Param { name: name.into(), ty }, &[], scope).expect("sources always type-check");
        self.params.insert(name.into(), n);
        Ok(n)
    }

    pub fn set_output(&mut self, name: &str, v: Value) -> Result<()> {
        if self.outputs.contains_key(name) {
            return Err(Error::DuplicateName { kind: "output", name: name.into() });
        }
        self.outputs.insert(name.into(), v);
        Ok(())
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.g[n]
    }

    pub fn contains(&self, n: NodeId) -> bool {
        self.g.contains_node(n)
    }

    pub fn value_type(&self, v: Value) -> &TensorType {
        &self.g[v.node].outputs[v.output as usize]
    }

    pub fn inputs(&self) -> &IndexMap<String, NodeId> {
        &self.inputs
    }

    pub fn params(&self) -> &IndexMap<String, NodeId> {
        &self.params
    }

    pub fn outputs(&self) -> &IndexMap<String, Value> {
        &self.outputs
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// The underlying petgraph, for algorithms and viewers.
    pub fn petgraph(&self) -> &StableGraph<Node, Edge, petgraph::Directed, u32> {
        &self.g
    }

    /// The values feeding `n`, in slot order.
    pub fn operands(&self, n: NodeId) -> SmallVec<[Value; 4]> {
        let mut e: SmallVec<[(u16, Value); 4]> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (e.weight().slot, Value::new(e.source(), e.weight().output)))
            .collect();
        e.sort_by_key(|x| x.0);
        e.into_iter().map(|x| x.1).collect()
    }

    /// The nodes that read any output of `n`, with the slot they read it into; sorted.
    pub fn users(&self, n: NodeId) -> Vec<(NodeId, u16)> {
        let mut u: Vec<_> =
            self.g.edges_directed(n, Direction::Outgoing).map(|e| (e.target(), e.weight().slot)).collect();
        u.sort();
        u
    }

    /// Every node in a deterministic topological order: among ready nodes, the one
    /// added first goes first (so a traced graph keeps its trace order).
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut indeg: HashMap<NodeId, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in self.g.edge_references() {
            *indeg.get_mut(&e.target()).expect("edge target exists") += 1;
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeId>> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| std::cmp::Reverse(n)).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(std::cmp::Reverse(n)) = ready.pop() {
            order.push(n);
            let mut targets: Vec<NodeId> = self.g.edges_directed(n, Direction::Outgoing).map(|e| e.target()).collect();
            targets.sort();
            for t in targets {
                let d = indeg.get_mut(&t).expect("edge target exists");
                *d -= 1;
                if *d == 0 {
                    ready.push(std::cmp::Reverse(t));
                }
            }
        }
        order
    }

    /// Points every use of `old` (node inputs and graph outputs) at `new`.
    pub fn replace_all_uses(&mut self, old: Value, new: Value) {
        let uses: Vec<_> = self
            .g
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().output == old.output)
            .map(|e| (e.id(), e.target(), e.weight().slot))
            .collect();
        for (id, target, slot) in uses {
            let key = self.cse_key(target);
            self.cse.remove(&key);
            self.g.remove_edge(id);
            self.g.add_edge(new.node, target, Edge { slot, output: new.output });
            let key = self.cse_key(target);
            self.cse.entry(key).or_insert(target);
        }
        for v in self.outputs.values_mut() {
            if *v == old {
                *v = new;
            }
        }
    }

    /// Removes a node that nothing uses (no consumers, not an output).
    pub fn remove_node(&mut self, n: NodeId) -> Result<Node> {
        if self.g.edges_directed(n, Direction::Outgoing).next().is_some() || self.outputs.values().any(|v| v.node == n)
        {
            return Err(Error::Verify(format!("cannot remove node {} that is still used", n.index())));
        }
        let key = self.cse_key(n);
        if self.cse.get(&key) == Some(&n) {
            self.cse.remove(&key);
        }
        self.inputs.retain(|_, v| *v != n);
        self.params.retain(|_, v| *v != n);
        Ok(self.g.remove_node(n).expect("node exists"))
    }

    fn cse_key(&self, n: NodeId) -> CseKey {
        (self.g[n].op.clone(), self.operands(n))
    }

    /// Checks the invariants: operand counts and types agree with each op's rule, every
    /// edge reads an existing output, slots are dense, the graph is acyclic, and the
    /// name maps point at live nodes of the right kind.
    pub fn verify(&self) -> Result<()> {
        crate::verify::verify(self)
    }
}
