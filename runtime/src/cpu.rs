//! The CPU reference executor.
//!
//! [`CpuExecutor::new`] checks the weights against the graph's params once, converts
//! them to their compute form (f16/bf16/fp8 → f32, i4 → i8; the values stay exactly
//! those of the declared dtype) and builds a plan: the live nodes in
//! [`Graph::topo_order`], a slot per value and each slot's use count. [`CpuExecutor::run`]
//! checks the feeds, binds the symbols from the input dims, then evaluates every node
//! with [`Op::eval_compute`], freeing each intermediate after its last use. Constants
//! are evaluated once, at construction.

use crate::error::RuntimeError;
use indexmap::IndexMap;
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{Bindings, DType, HostTensor, Op};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::collections::HashMap;

enum Kind {
    /// Graph input number `i` (in `graph.inputs()` order).
    Input(usize),
    /// Weight number `i` (in `graph.params()` order).
    Param(usize),
    /// Precomputed constant number `i`.
    Constant(usize),
    Compute,
}

struct Step {
    node: NodeId,
    kind: Kind,
    inputs: SmallVec<[usize; 4]>,
    outputs: SmallVec<[usize; 2]>,
    out_dtypes: SmallVec<[DType; 2]>,
}

/// Runs a graph on the CPU with the op set's reference semantics.
pub struct CpuExecutor {
    graph: Graph,
    /// Compute-form weights in `graph.params()` order.
    weights: Vec<HostTensor>,
    consts: Vec<HostTensor>,
    steps: Vec<Step>,
    /// Per slot: how many operand edges and graph outputs read it.
    uses: Vec<usize>,
    /// Graph outputs: name, slot, declared dtype.
    outputs: Vec<(String, usize, DType)>,
}

impl CpuExecutor {
    /// Verifies `graph` and checks `weights` against its params: every param supplied
    /// with exactly its dtype and shape, no other weights. All missing, unexpected and
    /// mis-shaped names are reported in one error.
    pub fn new(graph: Graph, mut weights: IndexMap<String, HostTensor>) -> Result<CpuExecutor, RuntimeError> {
        graph.verify()?;
        crate::feeds::check_weights(&graph, &weights)?;
        let weight_vals: Vec<HostTensor> = graph
            .params()
            .keys()
            .map(|name| weights.swap_remove(name).expect("checked above").into_compute())
            .collect();

        // Live nodes: those the outputs depend on.
        let mut live: HashMap<NodeId, ()> = HashMap::new();
        let mut stack: Vec<NodeId> = graph.outputs().values().map(|v| v.node).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n, ()).is_none() {
                stack.extend(graph.operands(n).iter().map(|v| v.node));
            }
        }

        let mut slot_of: HashMap<Value, usize> = HashMap::new();
        let mut uses: Vec<usize> = Vec::new();
        let mut steps = Vec::new();
        let mut consts = Vec::new();
        for n in graph.topo_order() {
            if !live.contains_key(&n) {
                continue;
            }
            let node = graph.node(n);
            let inputs: SmallVec<[usize; 4]> = graph
                .operands(n)
                .iter()
                .map(|v| {
                    let s = slot_of[v];
                    uses[s] += 1;
                    s
                })
                .collect();
            let outputs: SmallVec<[usize; 2]> = (0..node.outputs.len())
                .map(|i| {
                    slot_of.insert(Value::new(n, i as u8), uses.len());
                    uses.push(0);
                    uses.len() - 1
                })
                .collect();
            let out_dtypes = node.outputs.iter().map(|t| t.dtype).collect();
            let kind = match &node.op {
                Op::Input { name, .. } => Kind::Input(graph.inputs().get_index_of(name).expect("verified")),
                Op::Param { name, .. } => Kind::Param(graph.params().get_index_of(name).expect("verified")),
                Op::Constant { .. } => {
                    let mut v =
                        node.op.eval_compute(&[], &[node.outputs[0].dtype], &Bindings::new()).map_err(|source| {
                            RuntimeError::Eval {
                                node: n.index(),
                                op: node.op.name().into(),
                                scope: node.scope.clone(),
                                source,
                            }
                        })?;
                    consts.push(v.remove(0));
                    Kind::Constant(consts.len() - 1)
                }
                _ => Kind::Compute,
            };
            steps.push(Step { node: n, kind, inputs, outputs, out_dtypes });
        }
        let outputs = graph
            .outputs()
            .iter()
            .map(|(name, v)| {
                let s = slot_of[v];
                uses[s] += 1;
                (name.clone(), s, graph.value_type(*v).dtype)
            })
            .collect();
        Ok(CpuExecutor { graph, weights: weight_vals, consts, steps, uses, outputs })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph: every graph input must be fed (and nothing else) with its dtype
    /// and rank; symbols take their values from input dims that are a single symbol.
    /// Returns the graph outputs by name, in the graph's output order.
    pub fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, RuntimeError> {
        let b = crate::feeds::bind(&self.graph, feeds)?;
        let inputs: Vec<&HostTensor> = self.graph.inputs().keys().map(|k| &feeds[k]).collect();
        let mut remaining = self.uses.clone();
        let mut slots: Vec<Option<Cow<'_, HostTensor>>> = (0..remaining.len()).map(|_| None).collect();
        for step in &self.steps {
            let node = self.graph.node(step.node);
            let eval_err = |source| RuntimeError::Eval {
                node: step.node.index(),
                op: node.op.name().into(),
                scope: node.scope.clone(),
                source,
            };
            let outs: Vec<Cow<'_, HostTensor>> = match step.kind {
                Kind::Input(i) => vec![inputs[i].to_compute()],
                Kind::Param(i) => vec![Cow::Borrowed(&self.weights[i])],
                Kind::Constant(i) => vec![Cow::Borrowed(&self.consts[i])],
                Kind::Compute => {
                    // Only a reshape (which has an operand) may move its input.
                    let src = step.inputs.first().copied();
                    let movable = src.is_some_and(|s| remaining[s] == 1 && matches!(slots[s], Some(Cow::Owned(_))));
                    match &node.op {
                        // A reshape of a value nothing else reads moves it.
                        Op::Reshape(to) if movable => {
                            let shape = to.eval(&b).map_err(|r| eval_err(kiln_ops::EvalError::new("reshape", r)))?;
                            let src = src.expect("a reshape has an operand");
                            let t = slots[src].take().expect("movable").into_owned();
                            vec![Cow::Owned(t.reshape(shape).map_err(eval_err)?)]
                        }
                        op => {
                            let ins: SmallVec<[&HostTensor; 4]> = step
                                .inputs
                                .iter()
                                .map(|&s| slots[s].as_deref().expect("operands are computed before use"))
                                .collect();
                            let r = op.eval_compute(&ins, &step.out_dtypes, &b).map_err(eval_err)?;
                            r.into_iter().map(Cow::Owned).collect()
                        }
                    }
                }
            };
            for &s in &step.inputs {
                remaining[s] -= 1;
                if remaining[s] == 0 {
                    slots[s] = None;
                }
            }
            if cfg!(debug_assertions) {
                for (t, ty) in outs.iter().zip(&node.outputs) {
                    let expected = ty.shape.eval(&b).unwrap_or_default();
                    if t.shape() != expected.as_slice() {
                        return Err(RuntimeError::ShapeMismatch {
                            node: step.node.index(),
                            op: node.op.name().into(),
                            ty: ty.to_string(),
                            expected,
                            got: t.shape().to_vec(),
                        });
                    }
                }
            }
            for (t, &s) in outs.into_iter().zip(&step.outputs) {
                if remaining[s] > 0 {
                    slots[s] = Some(t);
                }
            }
        }
        let mut result = IndexMap::with_capacity(self.outputs.len());
        for (name, s, dtype) in &self.outputs {
            remaining[*s] -= 1;
            let t = if remaining[*s] == 0 {
                slots[*s].take().expect("outputs are computed").into_owned()
            } else {
                slots[*s].as_deref().expect("outputs are computed").clone()
            };
            let t = t.from_compute(*dtype).map_err(|source| RuntimeError::Eval {
                node: self.graph.outputs()[name].node.index(),
                op: "output".into(),
                scope: String::new(),
                source,
            })?;
            result.insert(name.clone(), t);
        }
        Ok(result)
    }
}
