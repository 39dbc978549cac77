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
