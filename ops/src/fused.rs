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
    /// A matrix-vector product with a fused prologue, and optionally an epilogue: one
    /// body node is `y = matmul(x, w, transpose_b)` with `w` the last body input
    /// (`[n, k]`, read by nothing else) and `x [rows.., k]` a value of the nodes before
    /// it (the [`FusedBody::prologue`]), which has the form `prologue`: elementwise over
    /// x's shape, or row reductions over x's last axis with x full-shaped. The nodes
    /// after it, if any, are the [`Epilogue`]. The outputs are the prologue's (x among
    /// them), then the epilogue's, then `y`, so the body runs as one kernel (a GEMV that
    /// computes its x rows itself, for few rows), or as the prologue's kernel followed
    /// by the matmul (a GEMV that also computes the epilogue for few rows; a GEMM and
    /// the epilogue's kernel otherwise).
    MatVec { prologue: Box<FusedKind>, x: FusedRef, weight: u16, epilogue: Option<Epilogue> },
}

/// The elementwise tail of a [`FusedKind::MatVec`] body, computed from y by the GEMV
/// blocks that computed it: the nodes after the matmul, elementwise over `domain`
/// (`[rows.., width]`, y's rows), reading y only through slices of its last axis that
/// start at `offsets` (each `width` wide; offset 0 and width `n` for y itself). So
/// output column `j` needs y's columns `offsets[s] + j` only: a GEMV block that owns
/// those rows of w computes the epilogue of its columns (SwiGLU's `silu(gate) · up`
/// over the halves of a fused gate_up product). The epilogue's other operands are body
/// inputs (constants, biases) or values computed from them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Epilogue {
    pub domain: Shape,
    pub width: usize,
    pub offsets: SmallVec<[usize; 4]>,
}

/// The most slices of y an [`Epilogue`] may read.
pub const EPILOGUE_MAX_SLICES: usize = 4;

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

    /// The index of the body's matmul node, when it has one reading the last input as
    /// its weight.
    pub fn matmul_node(&self) -> Option<usize> {
        let w = self.inputs.len().checked_sub(1)?;
        self.nodes.iter().position(
            |n| matches!((&n.op, &n.operands[..]), (Op::MatMul { .. }, &[_, FusedRef::Input(i)]) if i as usize == w),
        )
    }

    /// The part of a [`FusedKind::MatVec`] body before its matmul: the same inputs but
    /// the weight, the nodes before the matmul, the outputs computed by them (x among
    /// them). `None` when the body has no matmul reading the last input, or no output
    /// before `y`.
    pub fn prologue(&self) -> Option<FusedBody> {
        let p = self.matmul_node()?;
        let w = self.inputs.len() - 1;
        let before = |r: &FusedRef| match *r {
            FusedRef::Input(i) => (i as usize) < w,
            FusedRef::Node { node, .. } => (node as usize) < p,
        };
        let outputs: Vec<FusedRef> = self.outputs.iter().copied().filter(before).collect();
        if outputs.is_empty() {
            return None;
        }
        Some(FusedBody { inputs: self.inputs[..w].to_vec(), nodes: self.nodes[..p].to_vec(), outputs })
    }

    /// The part of a [`FusedKind::MatVec`] body after its matmul, as an elementwise body
    /// of its own: input 0 is y, input `1 + i` the body's input `i` (all but the
    /// weight), the nodes after the matmul, the outputs computed by them. `None` when the
    /// body has no matmul reading the last input or nothing after it.
    pub fn epilogue(&self) -> Option<FusedBody> {
        let p = self.matmul_node()?;
        if p + 1 == self.nodes.len() {
            return None;
        }
        let w = self.inputs.len() - 1;
        let map = |r: FusedRef| -> Option<FusedRef> {
            match r {
                FusedRef::Input(i) if (i as usize) < w => Some(FusedRef::Input(i + 1)),
                FusedRef::Input(_) => None,
                FusedRef::Node { node, output } if node as usize == p => (output == 0).then_some(FusedRef::Input(0)),
                FusedRef::Node { node, output } if node as usize > p => {
                    Some(FusedRef::Node { node: node - p as u16 - 1, output })
                }
                FusedRef::Node { .. } => None,
            }
        };
        let mut nodes = Vec::with_capacity(self.nodes.len() - p - 1);
        for n in &self.nodes[p + 1..] {
            let operands = n.operands.iter().map(|&r| map(r)).collect::<Option<SmallVec<[FusedRef; 4]>>>()?;
            nodes.push(FusedNode { op: n.op.clone(), operands, outputs: n.outputs.clone() });
        }
        let outputs: Vec<FusedRef> = self
            .outputs
            .iter()
            .filter(|r| matches!(r, FusedRef::Node { node, .. } if *node as usize > p))
            .map(|&r| map(r))
            .collect::<Option<Vec<_>>>()?;
        let y = self.nodes[p].outputs[0].clone();
        let inputs = std::iter::once(y).chain(self.inputs[..w].iter().cloned()).collect();
        Some(FusedBody { inputs, nodes, outputs })
    }

    fn matvec_kind(&self) -> Result<FusedKind, String> {
        let bad = |m: &str| Err(format!("matrix-vector group: {m}"));
        if self.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { .. })).count() != 1 {
            return bad("the body must have one matmul");
        }
        let Some(p) = self.matmul_node() else {
            return bad("the matmul's weight must be the last body input");
        };
        let mm = &self.nodes[p];
        let Op::MatMul { transpose_a: false, transpose_b: true } = mm.op else {
            return bad("the matmul must be `x · wᵀ`");
        };
        let Some(w) = self.inputs.len().checked_sub(1).map(|w| w as u16) else {
            return bad("the matmul's weight must be a body input");
        };
        let (x, wref) = (mm.operands[0], mm.operands[1]);
        if wref != FusedRef::Input(w) || self.inputs[w as usize].rank() != 2 {
            return bad("the matmul's weight must be the last body input, of rank 2");
        }
        if self.nodes.iter().flat_map(|n| n.operands.iter()).filter(|&&r| r == FusedRef::Input(w)).count() != 1 {
            return bad("only the matmul may read the weight");
        }
        if !matches!(x, FusedRef::Node { .. }) {
            return bad("x must be computed by the body (a group input needs no prologue)");
        }
        let y = FusedRef::Node { node: p as u16, output: 0 };
        if self.outputs.last() != Some(&y) || self.outputs[..self.outputs.len() - 1].contains(&y) {
            return bad("y must be the last output, once");
        }
        // Outputs: the prologue's, then the epilogue's, then y.
        let stage = |r: &FusedRef| match *r {
            FusedRef::Input(_) => 0,
            FusedRef::Node { node, .. } => match (node as usize).cmp(&p) {
                std::cmp::Ordering::Less => 0,
                std::cmp::Ordering::Equal => 2,
                std::cmp::Ordering::Greater => 1,
            },
        };
        if self.outputs.windows(2).any(|o| stage(&o[0]) > stage(&o[1])) {
            return bad("the outputs must be the prologue's, then the epilogue's, then y");
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
        let epilogue = if p + 1 < self.nodes.len() { Some(self.epilogue_form(p)?) } else { None };
        Ok(FusedKind::MatVec { prologue, x, weight: w, epilogue })
    }

    /// The [`Epilogue`] of a matrix-vector body whose matmul is node `p`, or why the
    /// nodes after it are not one.
    fn epilogue_form(&self, p: usize) -> Result<Epilogue, String> {
        let bad = |m: String| Err(format!("matrix-vector group epilogue: {m}"));
        let Some(epi) = self.epilogue() else {
            return bad("it may read y, the body's inputs and its own values only".into());
        };
        if epi.outputs.is_empty() {
            return bad("it computes no output".into());
        }
        let domain = match epi.kind()? {
            FusedKind::Elementwise { domain } => domain,
            _ => return bad("it must be elementwise (no reduction, no matmul)".into()),
        };
        let yt = &self.nodes[p].outputs[0];
        let (yd, dd) = (yt.shape.dims(), domain.dims());
        if dd.len() != yd.len() || dd[..dd.len() - 1] != yd[..yd.len() - 1] {
            return bad(format!("its domain {domain} does not have y's rows ({})", yt.shape));
        }
        let (Some(width), Some(n)) = (dd[dd.len() - 1].as_fixed(), yd[yd.len() - 1].as_fixed()) else {
            return bad("y's columns and the epilogue's must be fixed".into());
        };
        let last = yd.len() - 1;
        // Which epilogue values depend on y; those are read at the output coordinate.
        let mut from_y = vec![false; epi.nodes.len()];
        let mut offsets: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, nd) in epi.nodes.iter().enumerate() {
            let reads_y = nd.operands.contains(&FusedRef::Input(0));
            let dep = nd.operands.iter().any(|r| matches!(r, FusedRef::Node { node, .. } if from_y[*node as usize]));
            if reads_y {
                let offset = match (&nd.op, nd.operands.len()) {
                    (Op::Slice { axis, start, end }, 1) if *axis == last => match (start.as_fixed(), end.as_fixed()) {
                        (Some(s), Some(e)) if e >= s && e - s == width => s,
                        _ => return bad(format!("body node {i}: a slice of y must be {width} columns wide")),
                    },
                    _ if nd.op.is_elementwise() && width == n && nd.outputs[0].shape == domain => 0,
                    _ => {
                        return bad(format!(
                            "body node {i} (`{}`) reads y other than through a slice of its columns",
                            nd.op.name()
                        ))
                    }
                };
                if !offsets.contains(&offset) {
                    offsets.push(offset);
                }
                from_y[i] = true;
            }
            if dep {
                if !(nd.op.is_elementwise() && nd.outputs.iter().all(|t| t.shape == domain)) {
                    return bad(format!(
                        "body node {i} (`{}`) moves values computed from y (only elementwise ops over {domain} may use them)",
                        nd.op.name()
                    ));
                }
                from_y[i] = true;
            }
        }
        if offsets.is_empty() || offsets.len() > EPILOGUE_MAX_SLICES {
            return bad(format!("it reads y through {} slices (1..={EPILOGUE_MAX_SLICES})", offsets.len()));
        }
        Ok(Epilogue { domain, width, offsets })
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
