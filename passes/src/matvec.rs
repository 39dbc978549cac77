//! Prologue fusion into matrix-vector products: a fused group whose value `x` feeds only
//! a matmul `x · wᵀ` with a weight `w [n, k]` joins it, so the kernel that streams `w`
//! for few rows of x (the decode GEMV) computes x itself instead of reading it: an
//! RMSNorm (with the residual add before it) becomes the prologue of the projection after
//! it, SwiGLU's `silu(gate) · up` the prologue of the down projection. The result is one
//! [`Op::Fused`] node of the [`kiln_ops::FusedKind::MatVec`] kind: the group's body with
//! the matmul appended, the group's outputs (x among them, so the body can also run as
//! the group's kernel followed by the matmul, for many rows) and then the matmul's.
//!
//! The rule, generic like fusion's (no names or scopes):
//! * the matmul has `transpose_b` (the `linear` layout) and reads a graph param of rank
//!   2 as `w`;
//! * x is an output of a fused group of the elementwise or row-reduction kind (not
//!   already a matrix-vector group) that the matmul is the only reader of and that is no
//!   graph output (so never a KV append, whose result is a `present` output), and the
//!   group's form fits x: elementwise over x, or reductions over x's last axis.
//!
//! Every block of the fused GEMV computes the prologue over the whole of x (a few KiB
//! from L2) once, then streams its share of `w`; blocks are one wave (see
//! `kiln_codegen::decode::gemv_prologue_items`), so the prologue costs one short
//! latency per product, and an LM head takes its final norm as well.
//!
//! The fused node's scope is the common module path of the group's and the matmul's.
//!
//! [`FuseEpilogue`], run after it, then moves SwiGLU on from down's prologue to become
//! the epilogue of the gate_up product that computes its input.

use crate::fusion::{common_scope, remove_dead};
use crate::{Pass, PassError, Spec};
use kiln_graph::{Graph, Value};
use kiln_ops::{FusedKind, FusedNode, FusedRef, Op};
use smallvec::smallvec;

/// The matrix-vector prologue fusion pass (see the module docs).
pub struct FuseMatVec;

impl Pass for FuseMatVec {
    fn name(&self) -> &'static str {
        "fuse_matvec"
    }
    fn spec(&self) -> Spec {
        Spec::Fused
    }
    fn run(&self, g: &mut Graph) -> Result<usize, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "fuse_matvec", msg };
        let mut made = 0;
        for m in g.topo_order() {
            if !g.contains(m) {
                continue;
            }
            let Some((x, w)) = candidate(g, m) else { continue };
            let f = x.node;
            let Op::Fused(body) = &g.node(f).op else { unreachable!("checked by candidate") };
            let mut body = (**body).clone();
            let xr = body.outputs[x.output as usize];
            let wi = body.inputs.len() as u16;
            body.inputs.push(g.value_type(w).clone());
            body.nodes.push(FusedNode {
                op: g.node(m).op.clone(),
                operands: smallvec![xr, FusedRef::Input(wi)],
                outputs: g.node(m).outputs.clone(),
            });
            let y = FusedRef::Node { node: (body.nodes.len() - 1) as u16, output: 0 };
            body.outputs.push(y);
            if body.kind().is_err() {
                continue; // a form the GEMV cannot take: leave the two nodes as they are
            }
            let mut inputs = g.operands(f).to_vec();
            inputs.push(w);
            let scope = common_scope([g.node(f).scope.as_str(), g.node(m).scope.as_str()].into_iter());
            let n_out = body.outputs.len();
            let fused = g.add(Op::Fused(Box::new(body)), &inputs, &scope).map_err(|e| fail(e.to_string()))?;
            for i in 0..n_out - 1 {
                g.replace_all_uses(Value::new(f, i as u8), Value::new(fused, i as u8));
            }
            g.replace_all_uses(Value::new(m, 0), Value::new(fused, (n_out - 1) as u8));
            made += 1;
        }
        remove_dead(g).map_err(fail)?;
        Ok(made)
    }
}

/// `(x, w)` when matmul node `m` takes a prologue (see the module docs).
fn candidate(g: &Graph, m: kiln_graph::NodeId) -> Option<(Value, Value)> {
    let Op::MatMul { transpose_a: false, transpose_b: true } = g.node(m).op else { return None };
    let ops = g.operands(m);
    let (x, w) = (ops[0], ops[1]);
    let wt = g.value_type(w);
    if !matches!(g.node(w.node).op, Op::Param { .. }) || wt.rank() != 2 {
        return None;
    }
    let Op::Fused(body) = &g.node(x.node).op else { return None };
    if !matches!(body.kind(), Ok(FusedKind::Elementwise { .. } | FusedKind::Rows { .. })) {
        return None;
    }
    // The matmul is x's only reader, and x is no graph output.
    let readers = g.users(x.node).into_iter().filter(|&(u, slot)| g.operands(u)[slot as usize] == x).count();
    if readers != 1 || g.outputs().values().any(|&v| v == x) {
        return None;
    }
    Some((x, w))
}

/// Epilogue fusion into matrix-vector products: an elementwise prologue of one
/// matrix-vector group that reads the `y` of another only through slices of its columns
/// moves into that other group as its [`kiln_ops::Epilogue`], so the GEMV that computes
/// `y` also computes it (SwiGLU's `silu(gate) · up` from the fused gate_up product), and
/// the group that had it becomes a plain matmul. The graph keeps its kernel count (a
/// fused group in, a fused group out); a decode step launches one kernel fewer per layer.
///
/// The rule, generic (no names or scopes): group `C` is a [`FusedKind::MatVec`] without
/// an epilogue whose prologue is elementwise; one of its operands is the `y` of another
/// such group `P` (read by `C` alone, no graph output); `C`'s other prologue operands
/// are sources (constants, params) or defined before `P`; and the body made of `P`'s,
/// then `C`'s prologue, passes [`kiln_ops::FusedBody::kind`] as a matrix-vector group
/// with an epilogue (elementwise over `y`'s rows, `y` read through up to four column
/// slices of one width).
pub struct FuseEpilogue;

impl Pass for FuseEpilogue {
    fn name(&self) -> &'static str {
        "fuse_epilogue"
    }
    fn spec(&self) -> Spec {
        Spec::Fused
    }
    fn run(&self, g: &mut Graph) -> Result<usize, PassError> {
        let fail = |msg: String| PassError::Failed { pass: "fuse_epilogue", msg };
        let mut made = 0;
        loop {
            let order = g.topo_order();
            let pos: std::collections::HashMap<kiln_graph::NodeId, usize> =
                order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
            let Some((p, c, iy, body)) = order.iter().find_map(|&c| epilogue_candidate(g, c, &pos)) else { break };
            let (pops, cops) = (g.operands(p).to_vec(), g.operands(c).to_vec());
            let (Op::Fused(pb), Op::Fused(cb)) = (&g.node(p).op, &g.node(c).op) else { unreachable!("checked") };
            let (np_out, nc_pro) = (pb.outputs.len(), cb.outputs.len() - 1);
            let mut inputs: Vec<Value> = pops[..pops.len() - 1].to_vec();
            inputs.extend(cops[..cops.len() - 1].iter().enumerate().filter(|&(j, _)| j != iy).map(|(_, &v)| v));
            inputs.push(pops[pops.len() - 1]);
            let wc = cops[cops.len() - 1];
            let scope = common_scope([g.node(p).scope.as_str(), g.node(c).scope.as_str()].into_iter());
            // The matmul goes back to its weight's module (`…mlp.down_proj`), as traced.
            let c_scope = match g.node(cops[cops.len() - 1].node).scope.as_str() {
                "" => g.node(c).scope.clone(),
                s => s.to_string(),
            };
            let mm_op = match cb.nodes.last().map(|n| &n.op) {
                Some(op @ Op::MatMul { .. }) => op.clone(),
                _ => unreachable!("a matrix-vector body ends in its matmul"),
            };
            // C's x is the new group's output np_out - 1 + (x's index among C's outputs).
            let Ok(FusedKind::MatVec { x, .. }) = cb.kind() else { unreachable!("checked") };
            let xi = cb.outputs.iter().position(|&r| r == x).expect("x is an output");
            let fused = g.add(Op::Fused(Box::new(body)), &inputs, &scope).map_err(|e| fail(e.to_string()))?;
            let x_new = Value::new(fused, (np_out - 1 + xi) as u8);
            let mm = g.add(mm_op, &[x_new, wc], &c_scope).map_err(|e| fail(e.to_string()))?;
            for i in 0..np_out - 1 {
                g.replace_all_uses(Value::new(p, i as u8), Value::new(fused, i as u8));
            }
            g.replace_all_uses(Value::new(p, (np_out - 1) as u8), Value::new(fused, (np_out - 1 + nc_pro) as u8));
            for i in 0..nc_pro {
                g.replace_all_uses(Value::new(c, i as u8), Value::new(fused, (np_out - 1 + i) as u8));
            }
            g.replace_all_uses(Value::new(c, nc_pro as u8), Value::new(mm, 0));
            remove_dead(g).map_err(fail)?;
            made += 1;
        }
        Ok(made)
    }
}

/// `(P, C, index of P's y among C's operands, the merged body)` when group `c` can give
/// its prologue to the group computing its x's input (see [`FuseEpilogue`]).
fn epilogue_candidate(
    g: &Graph,
    c: kiln_graph::NodeId,
    pos: &std::collections::HashMap<kiln_graph::NodeId, usize>,
) -> Option<(kiln_graph::NodeId, kiln_graph::NodeId, usize, kiln_ops::FusedBody)> {
    let Op::Fused(cb) = &g.node(c).op else { return None };
    let Ok(FusedKind::MatVec { prologue, epilogue: None, .. }) = cb.kind() else { return None };
    if !matches!(*prologue, FusedKind::Elementwise { .. }) {
        return None;
    }
    let cops = g.operands(c);
    let is_y_of_matvec = |v: Value| match &g.node(v.node).op {
        Op::Fused(pb) => {
            matches!(pb.kind(), Ok(FusedKind::MatVec { epilogue: None, .. }))
                && v.output as usize == pb.outputs.len() - 1
        }
        _ => false,
    };
    let ys: Vec<usize> = (0..cops.len() - 1).filter(|&j| is_y_of_matvec(cops[j])).collect();
    let [iy] = ys[..] else { return None };
    let y = cops[iy];
    let p = y.node;
    let readers: usize = g.users(p).into_iter().filter(|&(u, slot)| g.operands(u)[slot as usize] == y).count();
    if readers != 1 || g.outputs().values().any(|&v| v == y) {
        return None;
    }
    // C's other prologue operands are sources or come before P, so none depends on P
    // (the merged group takes them as inputs).
    let ppos = pos[&p];
    let early = |v: &Value| v.node != p && (g.node(v.node).op.is_source() || pos[&v.node] < ppos);
    if cops[..cops.len() - 1].iter().enumerate().any(|(j, v)| j != iy && !early(v)) {
        return None;
    }
    let Op::Fused(pb) = &g.node(p).op else { return None };
    let cpro = cb.prologue()?;
    let pm = pb.matmul_node()?;
    let wp = (pb.inputs.len() - 1) as u16;
    let others: Vec<usize> = (0..cpro.inputs.len()).filter(|&j| j != iy).collect();
    let new_w = (wp as usize + others.len()) as u16;
    let mut inputs: Vec<kiln_ops::TensorType> = pb.inputs[..wp as usize].to_vec();
    inputs.extend(others.iter().map(|&j| cpro.inputs[j].clone()));
    inputs.push(pb.inputs[wp as usize].clone());
    let remap_p = |r: FusedRef| match r {
        FusedRef::Input(i) if i == wp => FusedRef::Input(new_w),
        other => other,
    };
    let base = pb.nodes.len() as u16;
    let remap_c = |r: FusedRef| match r {
        FusedRef::Input(j) if j as usize == iy => FusedRef::Node { node: pm as u16, output: 0 },
        FusedRef::Input(j) => {
            FusedRef::Input(wp + others.iter().position(|&o| o == j as usize).expect("an other input") as u16)
        }
        FusedRef::Node { node, output } => FusedRef::Node { node: node + base, output },
    };
    let mut nodes: Vec<FusedNode> = pb
        .nodes
        .iter()
        .map(|n| FusedNode {
            op: n.op.clone(),
            operands: n.operands.iter().map(|&r| remap_p(r)).collect(),
            outputs: n.outputs.clone(),
        })
        .collect();
    nodes.extend(cpro.nodes.iter().map(|n| FusedNode {
        op: n.op.clone(),
        operands: n.operands.iter().map(|&r| remap_c(r)).collect(),
        outputs: n.outputs.clone(),
    }));
    let mut outputs: Vec<FusedRef> = pb.outputs[..pb.outputs.len() - 1].to_vec();
    outputs.extend(cpro.outputs.iter().map(|&r| remap_c(r)));
    outputs.push(FusedRef::Node { node: pm as u16, output: 0 });
    let body = kiln_ops::FusedBody { inputs, nodes, outputs };
    match body.kind() {
        Ok(FusedKind::MatVec { epilogue: Some(_), .. }) => Some((p, c, iy, body)),
        _ => None,
    }
}
