//! Canonicalization: dead-code elimination, exact CSE and algebraic simplification.

use crate::pass::removable;
use crate::Pass;
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{BinaryOp, Bindings, ConstValues, DType, F32Bits, HostTensor, Op};
use std::collections::{HashMap, HashSet};

/// Nodes some output depends on.
pub(crate) fn live_nodes(g: &Graph) -> HashSet<NodeId> {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().values().map(|v| v.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n).iter().map(|v| v.node));
        }
    }
    live
}

/// Removes every non-source node that no output depends on. Inputs and params stay:
/// they are the graph's interface (the weights a plan expects).
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn spec(&self) -> crate::Spec {
        crate::Spec::NoDeadCode
    }
    fn run(&self, g: &mut Graph) -> Result<usize, crate::PassError> {
        let live = live_nodes(g);
        let mut removed = 0;
        for n in g.topo_order().into_iter().rev() {
            if !live.contains(&n) && removable(&g.node(n).op) {
                g.remove_node(n).map_err(|e| crate::PassError::Failed { pass: "dce", msg: e.to_string() })?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Merges nodes with the same op and operands (exact CSE). Insertion already
/// hash-conses; this catches duplicates that rewrites create.
pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, crate::PassError> {
        let mut seen: HashMap<(Op, Vec<Value>), NodeId> = HashMap::new();
        let mut merged = 0;
        for n in g.topo_order() {
            let key = (g.node(n).op.clone(), g.operands(n).to_vec());
            match seen.get(&key) {
                Some(&first) => {
                    for i in 0..g.node(n).outputs.len() {
                        g.replace_all_uses(Value::new(n, i as u8), Value::new(first, i as u8));
                    }
                    merged += 1;
                }
                None => {
                    seen.insert(key, n);
                }
            }
        }
        Ok(merged)
    }
}

/// Folds nodes whose operands are all constants into one constant, evaluated with the op
/// set's reference semantics (so folding never changes a value). Only single-output nodes
/// of a fixed shape up to [`ConstFold::MAX_ELEMENTS`] are folded, so a broadcast constant
/// is not materialized at full size.
pub struct ConstFold;

impl ConstFold {
    pub const MAX_ELEMENTS: usize = 1 << 16;
}

impl Pass for ConstFold {
    fn name(&self) -> &'static str {
        "fold"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, crate::PassError> {
        let mut folded = 0;
        for n in g.topo_order() {
            let node = g.node(n);
            let operands = g.operands(n);
            let foldable = !node.op.is_source()
                && node.outputs.len() == 1
                && node.outputs[0].dtype != DType::I4
                && node.outputs[0].shape.as_fixed().is_some_and(|d| d.iter().product::<usize>() <= Self::MAX_ELEMENTS)
                && operands.iter().all(|v| matches!(g.node(v.node).op, Op::Constant { .. }));
            if !foldable {
                continue;
            }
            let values: Vec<HostTensor> = operands
                .iter()
                .map(|v| eval_constant(g, v.node))
                .collect::<Result<_, _>>()
                .map_err(|msg| crate::PassError::Failed { pass: "fold", msg })?;
            let refs: Vec<&HostTensor> = values.iter().collect();
            // An op that fails on these constants (e.g. an index out of range) is left
            // for the executor to report with its node and scope.
            let Ok(out) = node.op.eval(&refs, &Bindings::new()) else { continue };
            let ty = node.outputs[0].clone();
            let values = if ty.dtype.is_float() {
                ConstValues::Float(out[0].to_f32_vec().into_iter().map(F32Bits::new).collect())
            } else {
                ConstValues::Int(out[0].to_i64_vec())
            };
            let scope = node.scope.clone();
            let c = g
                .add(Op::Constant { ty, values }, &[], &scope)
                .map_err(|e| crate::PassError::Failed { pass: "fold", msg: e.to_string() })?;
            g.replace_all_uses(Value::from(n), Value::from(c));
            folded += 1;
        }
        Ok(folded)
    }
}

fn eval_constant(g: &Graph, n: NodeId) -> Result<HostTensor, String> {
    let op = &g.node(n).op;
    op.eval(&[], &Bindings::new()).map(|mut v| v.remove(0)).map_err(|e| e.to_string())
}

/// Local algebraic simplifications, applied to a fixpoint:
/// identity reshape/permute/expand/slice/cast/concat → operand; reshape∘reshape →
/// reshape; permute∘permute → one permute; widening-then-narrowing cast pairs → the
/// original; `x*1`, `x/1`, `x+0`, `x-0` → `x`.
pub struct Simplify;

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }
    fn run(&self, g: &mut Graph) -> Result<usize, crate::PassError> {
        let mut total = 0;
        loop {
            let mut changed = 0;
            for n in g.topo_order() {
                // Dead nodes are left to DCE: rewriting them changes nothing.
                let is_output = g.outputs().values().any(|v| v.node == n);
                if !g.contains(n) || (g.users(n).is_empty() && !is_output) {
                    continue;
                }
                if let Some(new) = simplify_node(g, n) {
                    if new != Value::from(n) {
                        g.replace_all_uses(Value::from(n), new);
                        changed += 1;
                    }
                }
            }
            total += changed;
            if changed == 0 {
                return Ok(total);
            }
        }
    }
}

/// If every element of `v` is one constant, that constant.
fn splat_value(g: &Graph, v: Value) -> Option<f64> {
    match &g.node(v.node).op {
        Op::Constant { values, .. } => {
            let vals: Vec<f64> = match values {
                ConstValues::Float(f) => f.iter().map(|x| x.get() as f64).collect(),
                ConstValues::Int(i) => i.iter().map(|&x| x as f64).collect(),
            };
            let first = *vals.first()?;
            vals.iter().all(|&x| x == first).then_some(first)
        }
        Op::Expand(_) | Op::Reshape(_) => splat_value(g, g.operands(v.node)[0]),
        _ => None,
    }
}

/// Casting `from` to `to` and back loses nothing.
fn widens_exactly(from: DType, to: DType) -> bool {
    use DType::*;
    matches!(
        (from, to),
        (F16 | BF16 | F8E4M3, F32) | (F8E4M3, F16 | BF16) | (I32 | I8 | U8, I64) | (I8 | U8, I32) | (Bool, _)
    ) && from != to
}

fn simplify_node(g: &mut Graph, n: NodeId) -> Option<Value> {
    let node = g.node(n).clone();
    let ops = g.operands(n);
    let out_ty = node.outputs.first()?.clone();
    let first = ops.first().copied();
    let same_type_as_input = |g: &Graph| first.map(|v| g.value_type(v) == &out_ty).unwrap_or(false);
    match &node.op {
        Op::Reshape(_) | Op::Expand(_) | Op::Cast(_) | Op::Permute(_) | Op::Slice { .. }
            if same_type_as_input(g) && is_identity_move(&node.op) =>
        {
            first
        }
        Op::Concat { .. } if ops.len() == 1 => first,
        Op::Reshape(shape) => {
            let x = first?;
            if g.value_type(x).shape == *shape {
                return Some(x);
            }
            match g.node(x.node).op {
                Op::Reshape(_) => {
                    let inner = g.operands(x.node)[0];
                    g.add(Op::Reshape(shape.clone()), &[inner], &node.scope).ok().map(Value::from)
                }
                _ => None,
            }
        }
        Op::Permute(p2) => {
            let x = first?;
            if p2.iter().enumerate().all(|(i, &p)| i == p) {
                return Some(x);
            }
            match &g.node(x.node).op {
                Op::Permute(p1) => {
                    let composed = p2.iter().map(|&i| p1[i]).collect();
                    let inner = g.operands(x.node)[0];
                    g.add(Op::Permute(composed), &[inner], &node.scope).ok().map(Value::from)
                }
                _ => None,
            }
        }
        Op::Cast(to) => {
            let x = first?;
            if g.value_type(x).dtype == *to {
                return Some(x);
            }
            match &g.node(x.node).op {
                Op::Cast(mid) => {
                    let inner = g.operands(x.node)[0];
                    let orig = g.value_type(inner).dtype;
                    (orig == *to && widens_exactly(orig, *mid)).then_some(inner)
                }
                _ => None,
            }
        }
        Op::Expand(s) => {
            let x = first?;
            (g.value_type(x).shape == *s).then_some(x)
        }
        Op::Slice { axis, start, end } => {
            let x = first?;
            let full = start.as_fixed() == Some(0) && g.value_type(x).shape.dim(*axis) == end;
            full.then_some(x)
        }
        Op::Binary(b) => {
            let (a, c) = (ops[0], ops[1]);
            let (sa, sc) = (splat_value(g, a), splat_value(g, c));
            match b {
                BinaryOp::Mul if sc == Some(1.0) => Some(a),
                BinaryOp::Mul if sa == Some(1.0) => Some(c),
                BinaryOp::Div if sc == Some(1.0) => Some(a),
                BinaryOp::Add if sc == Some(0.0) => Some(a),
                BinaryOp::Add if sa == Some(0.0) => Some(c),
                BinaryOp::Sub if sc == Some(0.0) => Some(a),
                _ => None,
            }
        }
        _ => None,
    }
}

fn is_identity_move(op: &Op) -> bool {
    match op {
        Op::Permute(p) => p.iter().enumerate().all(|(i, &x)| i == x),
        Op::Slice { start, .. } => start.as_fixed() == Some(0),
        _ => true,
    }
}
