//! The closed op set. `Op` is an enum with typed attributes; each variant's shape/dtype
//! rule and CPU semantics live in the module of its class (`elementwise`, `reduce`,
//! `movement`, `linalg`, `attention`, `index`, `source`), and this file dispatches.
//!
//! Attributes are also exposed as a list of named [`Attr`]s (`attrs` / `from_parts`) so
//! that printers and parsers stay generic over the op set.

use crate::{DType, Dim, FusedBody, OpError, Shape, TensorType};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::fmt;

pub type Axes = SmallVec<[usize; 4]>;
/// Output types of a node (most ops have one).
pub type OutTypes = SmallVec<[TensorType; 1]>;

/// An `f32` attribute, compared and hashed by bit pattern (so hash-consing is exact).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct F32Bits(pub u32);

impl F32Bits {
    pub fn new(v: f32) -> F32Bits {
        F32Bits(v.to_bits())
    }
    pub fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl fmt::Debug for F32Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sin,
    Cos,
    Tanh,
    Erf,
    /// Logical not of a bool tensor.
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// `a < b`, producing bool.
    Lt,
    /// `a == b`, producing bool.
    Eq,
    /// Logical and of bools.
    And,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Max,
    Mean,
}

/// Which keys a query may attend to. Query `i` sits at absolute position
/// `kv_len - q_len + i` (the queries are the last `q_len` positions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mask {
    /// Every key.
    None,
    /// Keys at positions `<=` the query's.
    Causal,
    /// Causal, and only the last `window` positions (the query's own included).
    SlidingWindow(u32),
}

/// Attributes of the fused attention op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttentionAttrs {
    pub mask: Mask,
    /// Multiplies `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: F32Bits,
}

/// A literal tensor of fixed shape. Float values are stored as f32 (already rounded to
/// the dtype), integer and bool values as i64.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConstValues {
    Float(Vec<F32Bits>),
    Int(Vec<i64>),
}

impl ConstValues {
    pub fn len(&self) -> usize {
        match self {
            ConstValues::Float(v) => v.len(),
            ConstValues::Int(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One operation of the IR.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    // ---- sources (no inputs) -------------------------------------------------------
    /// A graph input, fed at run time.
    Input {
        name: String,
        ty: TensorType,
    },
    /// A named weight; names follow module paths (`model.layers.0.mlp.up_proj.weight`).
    Param {
        name: String,
        ty: TensorType,
    },
    /// A literal tensor.
    Constant {
        ty: TensorType,
        values: ConstValues,
    },
    /// `i64[len]` holding `start, start+1, …` (`start` may be a symbol such as `past`).
    Arange {
        start: Dim,
        len: Dim,
    },
    // ---- elementwise ---------------------------------------------------------------
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `select(cond, a, b)`: `a` where `cond`, else `b`.
    Select,
    Cast(DType),
    // ---- reductions ----------------------------------------------------------------
    Reduce {
        op: ReduceOp,
        axes: Axes,
        keep_dims: bool,
    },
    ArgMax {
        axis: usize,
    },
    /// Largest `k` along `axis`, sorted descending: outputs (values, i64 indices).
    TopK {
        k: usize,
        axis: usize,
    },
    // ---- movement ------------------------------------------------------------------
    Reshape(Shape),
    Permute(Axes),
    /// Elements `start..end` along `axis`.
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
    },
    Concat {
        axis: usize,
    },
    /// Broadcast to a shape (right-aligned; input dims equal to the target or 1).
    Expand(Shape),
    /// `data` indexed along `axis` by an integer tensor (embedding lookup for axis 0).
    Gather {
        axis: usize,
    },
    // ---- structured ----------------------------------------------------------------
    /// Batched matrix product over the last two dims; `b` of rank 2 broadcasts.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `q [b, s, h, d]`, `k [b, t, kh, d]`, `v [b, t, kh, dv]` → `[b, s, h, dv]`,
    /// with `h % kh == 0` (GQA/MQA) and `t >= s` (the KV cache plus the new keys).
    Attention(AttentionAttrs),
    // ---- fused -----------------------------------------------------------------------
    /// A fused group (made by the fusion pass): its operands are the body's inputs, its
    /// outputs the body's outputs. See [`crate::fused`].
    Fused(Box<FusedBody>),
}

/// An attribute value, for generic printing and parsing.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Bool(bool),
    F32(f32),
    Str(String),
    DType(DType),
    Dim(Dim),
    Shape(Shape),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Mask(Mask),
}

/// How an op's inputs are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

impl Op {
    /// The op's name in the text format.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "const",
            Op::Arange { .. } => "arange",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Select => "select",
            Op::Cast(_) => "cast",
            Op::Reduce { op, .. } => op.name(),
            Op::ArgMax { .. } => "argmax",
            Op::TopK { .. } => "topk",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Expand(_) => "expand",
            Op::Gather { .. } => "gather",
            Op::MatMul { .. } => "matmul",
            Op::Attention(_) => "attention",
            Op::Fused(_) => "fused",
        }
    }

    pub const fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Arange { .. })
    }

    /// One output element depends on the input elements at the same index only.
    pub const fn is_elementwise(&self) -> bool {
        matches!(self, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast(_))
    }

    pub const fn is_reduce(&self) -> bool {
        matches!(self, Op::Reduce { .. } | Op::ArgMax { .. } | Op::TopK { .. })
    }

    /// Only moves or repeats elements.
    pub const fn is_movement(&self) -> bool {
        matches!(
            self,
            Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } | Op::Concat { .. } | Op::Expand(_) | Op::Gather { .. }
        )
    }

    pub const fn is_structured(&self) -> bool {
        matches!(self, Op::MatMul { .. } | Op::Attention(_))
    }

    pub fn arity(&self) -> Arity {
        match self {
            _ if self.is_source() => Arity::Exactly(0),
            Op::Unary(_) | Op::Cast(_) | Op::Reduce { .. } | Op::ArgMax { .. } => Arity::Exactly(1),
            Op::TopK { .. } | Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } => Arity::Exactly(1),
            Op::Expand(_) => Arity::Exactly(1),
            Op::Binary(_) | Op::Gather { .. } | Op::MatMul { .. } => Arity::Exactly(2),
            Op::Select | Op::Attention(_) => Arity::Exactly(3),
            Op::Concat { .. } => Arity::AtLeast(1),
            Op::Fused(b) => Arity::Exactly(b.inputs.len()),
            _ => unreachable!("every op has an arity"),
        }
    }

    /// The shape and dtype rule: the output types for these input types, or an error
    /// naming the op, the reason and all input types.
    pub fn infer(&self, inputs: &[TensorType]) -> Result<OutTypes, OpError> {
        let err = |reason: String| OpError { op: self.name().to_string(), reason, inputs: inputs.to_vec() };
        match self.arity() {
            Arity::Exactly(n) if inputs.len() != n => {
                return Err(err(format!("takes {n} inputs, got {}", inputs.len())))
            }
            Arity::AtLeast(n) if inputs.len() < n => {
                return Err(err(format!("takes at least {n} inputs, got {}", inputs.len())))
            }
            _ => {}
        }
        let one = |t: TensorType| -> OutTypes { smallvec::smallvec![t] };
        match self {
            Op::Input { ty, .. } | Op::Param { ty, .. } => Ok(one(ty.clone())),
            Op::Constant { ty, values } => crate::source::infer_constant(ty, values).map(one).map_err(err),
            Op::Arange { len, .. } => Ok(one(TensorType::new(DType::I64, Shape::new([len.clone()])))),
            Op::Unary(u) => crate::elementwise::infer_unary(*u, &inputs[0]).map(one).map_err(err),
            Op::Binary(b) => crate::elementwise::infer_binary(*b, &inputs[0], &inputs[1]).map(one).map_err(err),
            Op::Select => crate::elementwise::infer_select(inputs).map(one).map_err(err),
            Op::Cast(to) => Ok(one(TensorType::new(*to, inputs[0].shape.clone()))),
            Op::Reduce { axes, keep_dims, .. } => {
                crate::reduce::infer_reduce(&inputs[0], axes, *keep_dims).map(one).map_err(err)
            }
            Op::ArgMax { axis } => crate::reduce::infer_argmax(&inputs[0], *axis).map(one).map_err(err),
            Op::TopK { k, axis } => crate::reduce::infer_topk(&inputs[0], *k, *axis).map_err(err),
            Op::Reshape(s) => crate::movement::infer_reshape(&inputs[0], s).map(one).map_err(err),
            Op::Permute(p) => crate::movement::infer_permute(&inputs[0], p).map(one).map_err(err),
            Op::Slice { axis, start, end } => {
                crate::movement::infer_slice(&inputs[0], *axis, start, end).map(one).map_err(err)
            }
            Op::Concat { axis } => crate::movement::infer_concat(inputs, *axis).map(one).map_err(err),
            Op::Expand(s) => crate::movement::infer_expand(&inputs[0], s).map(one).map_err(err),
            Op::Gather { axis } => crate::movement::infer_gather(&inputs[0], &inputs[1], *axis).map(one).map_err(err),
            Op::MatMul { transpose_a, transpose_b } => {
                crate::linalg::infer_matmul(&inputs[0], &inputs[1], *transpose_a, *transpose_b).map(one).map_err(err)
            }
            Op::Attention(_) => crate::attention::infer_attention(inputs).map(one).map_err(err),
            Op::Fused(b) => b.infer(inputs).map_err(err),
        }
    }

    /// The attributes as named values (the text format prints them in this order).
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let axes = |a: &Axes| Attr::Ints(a.iter().map(|&x| x as i64).collect());
        match self {
            Op::Input { name, .. } | Op::Param { name, .. } => vec![("name", Attr::Str(name.clone()))],
            Op::Constant { values, .. } => vec![(
                "values",
                match values {
                    ConstValues::Float(v) => Attr::Floats(v.iter().map(|x| x.get()).collect()),
                    ConstValues::Int(v) => Attr::Ints(v.clone()),
                },
            )],
            Op::Arange { start, len } => vec![("start", Attr::Dim(start.clone())), ("len", Attr::Dim(len.clone()))],
            Op::Unary(_) | Op::Binary(_) | Op::Select => vec![],
            Op::Cast(to) => vec![("to", Attr::DType(*to))],
            Op::Reduce { axes: a, keep_dims, .. } => vec![("axes", axes(a)), ("keep_dims", Attr::Bool(*keep_dims))],
            Op::ArgMax { axis } => vec![("axis", Attr::Int(*axis as i64))],
            Op::TopK { k, axis } => vec![("k", Attr::Int(*k as i64)), ("axis", Attr::Int(*axis as i64))],
            Op::Reshape(s) | Op::Expand(s) => vec![("shape", Attr::Shape(s.clone()))],
            Op::Permute(p) => vec![("perm", axes(p))],
            Op::Slice { axis, start, end } => vec![
                ("axis", Attr::Int(*axis as i64)),
                ("start", Attr::Dim(start.clone())),
                ("end", Attr::Dim(end.clone())),
            ],
            Op::Concat { axis } | Op::Gather { axis } => vec![("axis", Attr::Int(*axis as i64))],
            Op::MatMul { transpose_a, transpose_b } => {
                vec![("transpose_a", Attr::Bool(*transpose_a)), ("transpose_b", Attr::Bool(*transpose_b))]
            }
            Op::Attention(a) => vec![("mask", Attr::Mask(a.mask)), ("scale", Attr::F32(a.scale.get()))],
            // The body is not an attribute list: the text format prints it as a block.
            Op::Fused(_) => vec![],
        }
    }

    /// Rebuilds an op from its name, attributes and (for sources) its output type.
    /// The inverse of [`Op::name`] + [`Op::attrs`]; errors say what is missing or wrong.
    pub fn from_parts(name: &str, attrs: &[(String, Attr)], out: Option<&TensorType>) -> Result<Op, String> {
        let mut seen = vec![false; attrs.len()];
        let mut get = |key: &str| -> Result<Attr, String> {
            let i =
                attrs.iter().position(|(k, _)| k == key).ok_or_else(|| format!("`{name}` needs attribute `{key}`"))?;
            seen[i] = true;
            Ok(attrs[i].1.clone())
        };
        let bad = |key: &str, a: &Attr| format!("attribute `{key}` of `{name}` has the wrong kind: {a:?}");
        macro_rules! want {
            ($key:literal, $pat:ident) => {
                match get($key)? {
                    Attr::$pat(v) => v,
                    other => return Err(bad($key, &other)),
                }
            };
        }
        let usize_of =
            |key: &str, v: i64| usize::try_from(v).map_err(|_| format!("attribute `{key}` must be >= 0, got {v}"));
        let axes_of =
            |key: &str, v: Vec<i64>| -> Result<Axes, String> { v.into_iter().map(|x| usize_of(key, x)).collect() };
        let ty = || out.cloned().ok_or_else(|| format!("`{name}` needs its output type"));
        let op = match name {
            "input" => Op::Input { name: want!("name", Str), ty: ty()? },
            "param" => Op::Param { name: want!("name", Str), ty: ty()? },
            "const" => {
                let ty = ty()?;
                let values = match get("values")? {
                    Attr::Floats(v) => ConstValues::Float(v.into_iter().map(F32Bits::new).collect()),
                    Attr::Ints(v) if ty.dtype.is_float() => {
                        ConstValues::Float(v.into_iter().map(|x| F32Bits::new(x as f32)).collect())
                    }
                    Attr::Ints(v) => ConstValues::Int(v),
                    other => return Err(bad("values", &other)),
                };
                Op::Constant { ty, values }
            }
            "arange" => Op::Arange { start: want!("start", Dim), len: want!("len", Dim) },
            "select" => Op::Select,
            "cast" => Op::Cast(want!("to", DType)),
            "argmax" => Op::ArgMax { axis: usize_of("axis", want!("axis", Int))? },
            "topk" => Op::TopK { k: usize_of("k", want!("k", Int))?, axis: usize_of("axis", want!("axis", Int))? },
            "reshape" => Op::Reshape(want!("shape", Shape)),
            "expand" => Op::Expand(want!("shape", Shape)),
            "permute" => Op::Permute(axes_of("perm", want!("perm", Ints))?),
            "slice" => Op::Slice {
                axis: usize_of("axis", want!("axis", Int))?,
                start: want!("start", Dim),
                end: want!("end", Dim),
            },
            "concat" => Op::Concat { axis: usize_of("axis", want!("axis", Int))? },
            "gather" => Op::Gather { axis: usize_of("axis", want!("axis", Int))? },
            "matmul" => Op::MatMul { transpose_a: want!("transpose_a", Bool), transpose_b: want!("transpose_b", Bool) },
            "attention" => {
                Op::Attention(AttentionAttrs { mask: want!("mask", Mask), scale: F32Bits::new(want!("scale", F32)) })
            }
            _ => {
                if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == name) {
                    Op::Unary(*u)
                } else if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == name) {
                    Op::Binary(*b)
                } else if let Some(r) = ReduceOp::ALL.iter().find(|r| r.name() == name) {
                    Op::Reduce {
                        op: *r,
                        axes: axes_of("axes", want!("axes", Ints))?,
                        keep_dims: want!("keep_dims", Bool),
                    }
                } else {
                    return Err(format!("unknown op `{name}`"));
                }
            }
        };
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!("`{name}` has no attribute `{}`", attrs[i].0));
        }
        Ok(op)
    }
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 12] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Not,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Erf => "erf",
            UnaryOp::Not => "not",
        }
    }
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 10] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
        BinaryOp::Lt,
        BinaryOp::Eq,
        BinaryOp::And,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
            BinaryOp::Lt => "lt",
            BinaryOp::Eq => "eq",
            BinaryOp::And => "and",
        }
    }
    /// Produces bool rather than the input dtype.
    pub const fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Lt | BinaryOp::Eq)
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean];
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Mean => "reduce_mean",
        }
    }
}

// ---- CPU semantics ---------------------------------------------------------------------

use crate::host::{compute_dtype, finish, HostTensor};
use crate::{Bindings, EvalError};

impl Op {
    /// The output dtypes for inputs of these dtypes (the dtype half of [`Op::infer`],
    /// without the checks).
    pub fn out_dtypes(&self, inputs: &[DType]) -> SmallVec<[DType; 2]> {
        let first = inputs.first().copied().unwrap_or(DType::F32);
        let one = |d: DType| -> SmallVec<[DType; 2]> { smallvec::smallvec![d] };
        match self {
            Op::Input { ty, .. } | Op::Param { ty, .. } | Op::Constant { ty, .. } => one(ty.dtype),
            Op::Arange { .. } | Op::ArgMax { .. } => one(DType::I64),
            Op::Binary(b) if b.is_comparison() => one(DType::Bool),
            Op::Select => one(inputs.get(1).copied().unwrap_or(first)),
            Op::Cast(to) => one(*to),
            Op::TopK { .. } => smallvec::smallvec![first, DType::I64],
            Op::Fused(b) => b.outputs.iter().map(|&r| b.ty(r).map_or(first, |t| t.dtype)).collect(),
            _ => one(first),
        }
    }

    /// Evaluates the op on host tensors in their storage dtypes: float types compute in
    /// f32 and results are rounded to the output dtype. Symbolic attributes (arange
    /// bounds, slice bounds, reshape/expand targets) take their values from `syms`.
    /// Errors (never panics) on inputs the op does not accept.
    pub fn eval(&self, inputs: &[&HostTensor], syms: &Bindings) -> Result<Vec<HostTensor>, EvalError> {
        let in_dtypes: SmallVec<[DType; 4]> = inputs.iter().map(|t| t.dtype()).collect();
        let out_dtypes = self.out_dtypes(&in_dtypes);
        let compute: SmallVec<[std::borrow::Cow<'_, HostTensor>; 4]> = inputs.iter().map(|t| t.to_compute()).collect();
        let refs: SmallVec<[&HostTensor; 4]> = compute.iter().map(|c| c.as_ref()).collect();
        let outs = self.eval_compute(&refs, &out_dtypes, syms)?;
        outs.into_iter().zip(out_dtypes).map(|(t, d)| t.from_compute(d)).collect()
    }

    /// Evaluates the op on tensors in their compute form (see [`crate::host`]):
    /// `out_dtypes` are the logical output dtypes (as given by [`Op::out_dtypes`] or a
    /// graph's node types); results come back in compute form, float values rounded to
    /// their logical dtype. This is what executors call, keeping f16/bf16 values as f32
    /// between ops.
    pub fn eval_compute(
        &self,
        inputs: &[&HostTensor],
        out_dtypes: &[DType],
        syms: &Bindings,
    ) -> Result<Vec<HostTensor>, EvalError> {
        let bad_arity = match self.arity() {
            Arity::Exactly(n) => inputs.len() != n,
            Arity::AtLeast(n) => inputs.len() < n,
        };
        if bad_arity {
            return Err(EvalError::new(
                self.name(),
                format!("{:?} inputs given, expected {:?}", inputs.len(), self.arity()),
            ));
        }
        let one = |t: HostTensor| vec![t];
        let mut outs = match self {
            Op::Input { name, .. } => {
                return Err(EvalError::new("input", format!("input `{name}` takes its value from the feeds")))
            }
            Op::Param { name, .. } => {
                return Err(EvalError::new("param", format!("param `{name}` takes its value from the weights")))
            }
            Op::Constant { ty, values } => one(crate::source::eval_constant(ty, values, syms)?),
            Op::Arange { start, len } => one(crate::source::eval_arange(start, len, syms)?),
            Op::Unary(u) => one(crate::elementwise::eval_unary(*u, inputs[0])?),
            Op::Binary(b) => one(crate::elementwise::eval_binary(*b, inputs[0], inputs[1])?),
            Op::Select => one(crate::elementwise::eval_select(inputs[0], inputs[1], inputs[2])?),
            Op::Cast(to) => one(crate::elementwise::eval_cast(inputs[0], *to)),
            Op::Reduce { op, axes, keep_dims } => one(crate::reduce::eval_reduce(*op, inputs[0], axes, *keep_dims)?),
            Op::ArgMax { axis } => one(crate::reduce::eval_argmax(inputs[0], *axis)?),
            Op::TopK { k, axis } => crate::reduce::eval_topk(inputs[0], *k, *axis)?,
            Op::Reshape(s) => one(crate::movement::eval_reshape(inputs[0], s, syms)?),
            Op::Permute(p) => one(crate::movement::eval_permute(inputs[0], p)?),
            Op::Slice { axis, start, end } => one(crate::movement::eval_slice(inputs[0], *axis, start, end, syms)?),
            Op::Concat { axis } => one(crate::movement::eval_concat(inputs, *axis)?),
            Op::Expand(s) => one(crate::movement::eval_expand(inputs[0], s, syms)?),
            Op::Gather { axis } => one(crate::movement::eval_gather(inputs[0], inputs[1], *axis)?),
            Op::MatMul { transpose_a, transpose_b } => {
                one(crate::linalg::eval_matmul(inputs[0], inputs[1], *transpose_a, *transpose_b)?)
            }
            Op::Attention(a) => one(crate::attention::eval_attention(inputs[0], inputs[1], inputs[2], a)?),
            Op::Fused(b) => b.eval_compute(inputs, syms)?,
        };
        // Movement and selection only copy values that already have the logical type.
        let computes = !(self.is_movement() || matches!(self, Op::Select | Op::ArgMax { .. } | Op::TopK { .. }));
        for (t, &d) in outs.iter_mut().zip(out_dtypes) {
            if t.dtype() != compute_dtype(d) {
                return Err(EvalError::new(
                    self.name(),
                    format!(
                        "produced {} storage but the output is {d} (inputs: {:?})",
                        t.dtype(),
                        inputs.iter().map(|x| x.dtype()).collect::<Vec<_>>()
                    ),
                ));
            }
            if computes {
                finish(t, d);
            }
        }
        Ok(outs)
    }
}
