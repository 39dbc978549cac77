//! Fused groups: a node that holds a small sub-graph of elementwise, movement and
//! reduction ops, made by the fusion pass (`kiln-passes`). The CPU reference runs the
//! body op by op (so a fused graph computes exactly what the unfused one did); codegen
//! renders the body as one kernel.
//!
//! A body is a list of nodes in topological order. Operands refer to the group's inputs
//! (the fused node's operands, in order) or to outputs of earlier nodes.

use crate::host::HostTensor;
use crate::{Bindings, Dim, EvalError, Op, OutTypes, Shape, TensorType};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// A value inside a fused body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FusedRef {
    /// Input `i` of the group (operand `i` of the fused node).
    Input(u16),
    /// Output `output` of body node `node`.
    Node { node: u16, output: u8 },
}

/// One op of a fused body.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FusedNode {
    pub op: Op,
    pub operands: SmallVec<[FusedRef; 4]>,
    /// The op's output types (as its shape rule gives them for the operand types).
    pub outputs: OutTypes,
}

/// The two kernel forms a fused body can take (see [`FusedBody::kind`]). Codegen
/// renders each form as one kernel; the fusion pass only forms bodies of these kinds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // a short-lived classification, never stored in bulk
pub enum FusedKind {
    /// No reduction. Every output has the shape `domain`; one work item per element of
    /// it. Other body values may have any shape (slices, concats, broadcasts of inputs):
    /// they are computed from the output coordinate by index mapping.
    Elementwise { domain: Shape },
    /// Reductions over the trailing dims `cols` of tensors shaped `[rows.., cols..]`;
    /// one work item (a thread block) per row. Every body node that is not a reduction
    /// is full-shaped (`[rows.., cols..]`) or row-shaped (`[rows..]` with the reduced
    /// dims dropped or kept as 1s), and every reduction reduces exactly the `cols` axes
    /// of a full-shaped value; outputs are full- or row-shaped.
    Rows { rows: Shape, cols: Shape },
    /// A matrix-vector product with a fused prologue: the last body node is
    /// `y = matmul(x, w, transpose_b)` with `w` the last body input (`[n, k]`, read by
    /// nothing else) and `x [rows.., k]` a value of the rest of the body (the
    /// [`FusedBody::prologue`]), which has the form `prologue`: elementwise over x's
    /// shape, or row reductions over x's last axis with x full-shaped. The outputs are
    /// the prologue's (x among them) and then `y`, so the body runs either as one kernel
    /// (a GEMV that computes its x rows itself, for few rows) or as the prologue's kernel
    /// followed by the matmul.
    MatVec { prologue: Box<FusedKind>, x: FusedRef, weight: u16 },
}

/// The sub-graph of a fused node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FusedBody {
    /// Types of the group's inputs.
    pub inputs: Vec<TensorType>,
    /// Body nodes in topological order.
    pub nodes: Vec<FusedNode>,
    /// The group's outputs (the fused node's outputs, in order).
    pub outputs: Vec<FusedRef>,
}

impl FusedBody {
    /// The type of a value of the body.
    pub fn ty(&self, r: FusedRef) -> Option<&TensorType> {
        match r {
            FusedRef::Input(i) => self.inputs.get(i as usize),
            FusedRef::Node { node, output } => self.nodes.get(node as usize)?.outputs.get(output as usize),
        }
    }

    /// Checks the body: operands refer to inputs or earlier nodes, each node's recorded
    /// output types are what its op's rule gives, no source or nested fused op, at least
    /// one output.
    pub fn check(&self) -> Result<(), String> {
        if self.outputs.is_empty() {
            return Err("a fused body needs at least one output".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.op.is_source() || matches!(n.op, Op::Fused(_)) {
                return Err(format!("body node {i}: `{}` cannot be inside a fused group", n.op.name()));
            }
            let mut tys = Vec::with_capacity(n.operands.len());
            for &r in &n.operands {
                let earlier = match r {
                    FusedRef::Input(_) => true,
                    FusedRef::Node { node, .. } => (node as usize) < i,
                };
                let ty = self.ty(r).filter(|_| earlier).ok_or_else(|| format!("body node {i}: bad operand {r:?}"))?;
                tys.push(ty.clone());
            }
            let out = n.op.infer(&tys).map_err(|e| format!("body node {i}: {e}"))?;
            if out != n.outputs {
                return Err(format!("body node {i}: recorded output types differ from the op's rule"));
            }
        }
        for &r in &self.outputs {
            self.ty(r).ok_or_else(|| format!("bad output {r:?}"))?;
        }
        Ok(())
    }

    /// Which kernel form the body takes, or why it fits neither (see [`FusedKind`]).
    pub fn kind(&self) -> Result<FusedKind, String> {
        if self.nodes.iter().any(|n| matches!(n.op, Op::MatMul { .. })) {
            return self.matvec_kind();
        }
        let reduces: Vec<(usize, &crate::Axes, &Shape)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Reduce { axes, .. } => Some((i, axes, &self.ty(n.operands[0])?.shape)),
                _ => None,
            })
            .collect();
        let out_shape = |r: FusedRef| self.ty(r).map(|t| t.shape.clone()).ok_or_else(|| format!("bad output {r:?}"));
        if reduces.is_empty() {
            let domain = out_shape(self.outputs[0])?;
            for &r in &self.outputs[1..] {
                let s = out_shape(r)?;
                if s != domain {
                    return Err(format!("elementwise group outputs differ in shape: {domain} vs {s}"));
                }
            }
            return Ok(FusedKind::Elementwise { domain });
        }
        let (_, axes0, full) = reduces[0];
        let rank = full.rank();
        let ncols = axes0.len();
        let trailing = |axes: &crate::Axes| {
            let mut a: Vec<usize> = axes.iter().copied().collect();
            a.sort_unstable();
            a == (rank - ncols..rank).collect::<Vec<_>>()
        };
        if ncols == 0 || ncols > rank {
            return Err("a reduction in a fused group must reduce at least one axis".into());
        }
        for &(i, axes, shape) in &reduces {
            if shape != full || axes.len() != ncols || !trailing(axes) {
                return Err(format!("body node {i}: reductions must all reduce the trailing {ncols} axes of {full}"));
            }
        }
        let rows = Shape::new(full.dims()[..rank - ncols].iter().cloned());
        let cols = Shape::new(full.dims()[rank - ncols..].iter().cloned());
        let kept = Shape::new(rows.dims().iter().cloned().chain((0..ncols).map(|_| Dim::fixed(1))));
        let fits = |s: &Shape| s == full || *s == rows || *s == kept;
        for (i, n) in self.nodes.iter().enumerate() {
            for t in &n.outputs {
                if !fits(&t.shape) {
                    return Err(format!(
                        "body node {i} (`{}`): shape {} is neither {full} nor a row of it",
                        n.op.name(),
                        t.shape
                    ));
                }
            }
        }
        for &r in &self.outputs {
            let s = out_shape(r)?;
            if !fits(&s) {
                return Err(format!("output shape {s} is neither {full} nor a row of it"));
            }
        }
        Ok(FusedKind::Rows { rows, cols })
    }

    /// The body without its trailing matmul (see [`FusedKind::MatVec`]): the same
    /// inputs but the weight, the same nodes but the last, the same outputs but `y`.
    /// `None` when the body does not end in a matmul reading the last input.
    pub fn prologue(&self) -> Option<FusedBody> {
        let last = self.nodes.last()?;
        let w = self.inputs.len().checked_sub(1)?;
        match (&last.op, &last.operands[..]) {
            (Op::MatMul { .. }, &[_, FusedRef::Input(i)]) if i as usize == w && self.outputs.len() >= 2 => {
                Some(FusedBody {
                    inputs: self.inputs[..w].to_vec(),
                    nodes: self.nodes[..self.nodes.len() - 1].to_vec(),
                    outputs: self.outputs[..self.outputs.len() - 1].to_vec(),
                })
            }
            _ => None,
        }
    }

    fn matvec_kind(&self) -> Result<FusedKind, String> {
        let bad = |m: &str| Err(format!("matrix-vector group: {m}"));
        let n = self.nodes.len();
        let last = &self.nodes[n - 1];
        let Op::MatMul { transpose_a: false, transpose_b: true } = last.op else {
            return bad("the last body node must be the only matmul, `x · wᵀ`");
        };
        if self.nodes[..n - 1].iter().any(|n| matches!(n.op, Op::MatMul { .. })) {
            return bad("only the last body node may be a matmul");
        }
        let Some(w) = self.inputs.len().checked_sub(1).map(|w| w as u16) else {
            return bad("the matmul's weight must be a body input");
        };
        let (x, wref) = (last.operands[0], last.operands[1]);
        if wref != FusedRef::Input(w) || self.inputs[w as usize].rank() != 2 {
            return bad("the matmul's weight must be the last body input, of rank 2");
        }
        if self.nodes.iter().flat_map(|n| n.operands.iter()).filter(|&&r| r == FusedRef::Input(w)).count() != 1 {
            return bad("only the matmul may read the weight");
        }
        if !matches!(x, FusedRef::Node { .. }) {
            return bad("x must be computed by the body (a group input needs no prologue)");
        }
        let y = FusedRef::Node { node: (n - 1) as u16, output: 0 };
        if self.outputs.last() != Some(&y) || self.outputs[..self.outputs.len() - 1].contains(&y) {
            return bad("y must be the last output, once");
        }
        if !self.outputs.contains(&x) {
            return bad("x must be an output (for the prologue kernel + matmul form)");
        }
        let pro = self.prologue().ok_or_else(|| "matrix-vector group: no prologue".to_string())?;
        let xs = self.ty(x).expect("checked").shape.clone();
        let k = xs.dims().last().cloned().ok_or_else(|| "matrix-vector group: x is a scalar".to_string())?;
        let fits = match pro.kind()? {
            FusedKind::Elementwise { domain } => domain == xs,
            FusedKind::Rows { rows, cols } => {
                cols.dims() == [k] && Shape::new(rows.dims().iter().cloned().chain([cols.dims()[0].clone()])) == xs
            }
            FusedKind::MatVec { .. } => false,
        };
        if !fits {
            return bad("the prologue must be elementwise over x or reduce x's last axis");
        }
        let prologue = Box::new(pro.kind()?);
        Ok(FusedKind::MatVec { prologue, x, weight: w })
    }

    /// The shape rule of the fused node.
    pub(crate) fn infer(&self, inputs: &[TensorType]) -> Result<OutTypes, String> {
        if inputs.len() != self.inputs.len() {
            return Err(format!("takes {} inputs, got {}", self.inputs.len(), inputs.len()));
        }
        for (i, (got, want)) in inputs.iter().zip(&self.inputs).enumerate() {
            if got != want {
                return Err(format!("input {i} is {got}, the body expects {want}"));
            }
        }
        self.check()?;
        Ok(self.outputs.iter().map(|&r| self.ty(r).expect("checked").clone()).collect())
    }

    /// Runs the body op by op on compute-form tensors (see [`Op::eval_compute`]).
    pub(crate) fn eval_compute(&self, inputs: &[&HostTensor], syms: &Bindings) -> Result<Vec<HostTensor>, EvalError> {
        let mut values: Vec<Vec<HostTensor>> = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let refs: SmallVec<[&HostTensor; 4]> = n
                .operands
                .iter()
                .map(|&r| match r {
                    FusedRef::Input(i) => inputs[i as usize],
                    FusedRef::Node { node, output } => &values[node as usize][output as usize],
                })
                .collect();
            let dtypes: SmallVec<[crate::DType; 2]> = n.outputs.iter().map(|t| t.dtype).collect();
            let out = n.op.eval_compute(&refs, &dtypes, syms)?;
            drop(refs);
            values.push(out);
        }
        Ok(self
            .outputs
            .iter()
            .map(|&r| match r {
                FusedRef::Input(i) => inputs[i as usize].clone(),
                FusedRef::Node { node, output } => values[node as usize][output as usize].clone(),
            })
            .collect())
    }
}
