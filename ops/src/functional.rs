//! High-level functions as short compositions of primitive ops.
//!
//! They are written against [`Trace`], which the tracer's `Tensor` implements, so the op
//! set does not depend on the graph. Every method of [`TensorExt`] records primitive ops
//! only; broadcasting (numpy rules, right-aligned) is made explicit with `expand` here.
//! Negative axes count from the end.

use crate::{
    AttentionAttrs, BinaryOp, ConstValues, DType, Dim, F32Bits, Mask, Op, ReduceOp, Shape, TensorType, UnaryOp,
};
use smallvec::SmallVec;

/// A traced tensor: something that knows its type and can record ops.
pub trait Trace: Copy + Sized {
    type Error;
    fn ty(&self) -> TensorType;
    /// Records `op` on `inputs` (self is the context, usually `inputs[0]`) and returns
    /// every output.
    fn record(self, op: Op, inputs: &[Self]) -> Result<SmallVec<[Self; 2]>, Self::Error>;
    /// An error for a misuse that no op rule sees (an axis out of range, …).
    fn error(self, op: &str, reason: String) -> Self::Error;
}

/// The DSL's tensor methods. Implemented for every [`Trace`] type.
pub trait TensorExt: Trace {
    fn shape(&self) -> Shape {
        self.ty().shape
    }
    fn dtype(&self) -> DType {
        self.ty().dtype
    }
    fn rank(&self) -> usize {
        self.ty().rank()
    }
    /// The size of `axis` (negative counts from the end).
    fn dim(&self, axis: isize) -> Result<Dim, Self::Error> {
        let a = self.axis("dim", axis)?;
        Ok(self.shape().dim(a).clone())
    }
    fn axis(&self, op: &str, axis: isize) -> Result<usize, Self::Error> {
        let r = self.rank() as isize;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return Err(self.error(op, format!("axis {axis} out of range for {}", self.ty())));
        }
        Ok(a as usize)
    }
    fn op1(self, op: Op) -> Result<Self, Self::Error> {
        Ok(self.record(op, &[self])?[0])
    }

    // ---- elementwise -------------------------------------------------------------
    fn unary(self, u: UnaryOp) -> Result<Self, Self::Error> {
        self.op1(Op::Unary(u))
    }
    fn binary(self, b: BinaryOp, other: Self) -> Result<Self, Self::Error> {
        let (x, y) = broadcast_pair(self, other, b.name())?;
        Ok(self.record(Op::Binary(b), &[x, y])?[0])
    }
    fn add(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Add, o)
    }
    fn sub(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Sub, o)
    }
    fn mul(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Mul, o)
    }
    fn div(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Div, o)
    }
    fn maximum(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Max, o)
    }
    fn minimum(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Min, o)
    }
    fn pow(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Pow, o)
    }
    fn lt(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Lt, o)
    }
    fn eq_(self, o: Self) -> Result<Self, Self::Error> {
        self.binary(BinaryOp::Eq, o)
    }
    fn neg(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Neg)
    }
    fn exp(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Exp)
    }
    fn log(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Log)
    }
    fn sqrt(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Sqrt)
    }
    fn rsqrt(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Rsqrt)
    }
    fn recip(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Recip)
    }
    fn sin(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Sin)
    }
    fn cos(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Cos)
    }
    fn tanh(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Tanh)
    }
    fn erf(self) -> Result<Self, Self::Error> {
        self.unary(UnaryOp::Erf)
    }
    fn cast(self, to: DType) -> Result<Self, Self::Error> {
        if self.dtype() == to {
            return Ok(self);
        }
        self.op1(Op::Cast(to))
    }
    /// `a` where `self` (bool) holds, else `b` (all three broadcast together).
    fn select(self, a: Self, b: Self) -> Result<Self, Self::Error> {
        let shape = broadcast_shapes(&[self.shape(), a.shape(), b.shape()]).map_err(|r| self.error("select", r))?;
        let (c, a, b) = (self.broadcast_to(&shape)?, a.broadcast_to(&shape)?, b.broadcast_to(&shape)?);
        Ok(self.record(Op::Select, &[c, a, b])?[0])
    }
    /// A scalar constant of this tensor's dtype (shape `[]`).
    fn scalar(self, v: f64) -> Result<Self, Self::Error> {
        self.constant(TensorType::new(self.dtype(), Shape::scalar()), &[v])
    }
    /// A constant tensor; float values are rounded to `ty.dtype` by the executor.
    fn constant(self, ty: TensorType, values: &[f64]) -> Result<Self, Self::Error> {
        let values = if ty.dtype.is_float() {
            ConstValues::Float(values.iter().map(|&v| F32Bits::new(v as f32)).collect())
        } else {
            ConstValues::Int(values.iter().map(|&v| v as i64).collect())
        };
        Ok(self.record(Op::Constant { ty, values }, &[])?[0])
    }
    fn add_scalar(self, v: f64) -> Result<Self, Self::Error> {
        self.add(self.scalar(v)?)
    }
    fn mul_scalar(self, v: f64) -> Result<Self, Self::Error> {
        self.mul(self.scalar(v)?)
    }

    // ---- reductions --------------------------------------------------------------
    fn reduce(self, op: ReduceOp, axes: &[isize], keep_dims: bool) -> Result<Self, Self::Error> {
        let axes = axes.iter().map(|&a| self.axis(op.name(), a)).collect::<Result<_, _>>()?;
        self.op1(Op::Reduce { op, axes, keep_dims })
    }
    fn sum(self, axes: &[isize], keep_dims: bool) -> Result<Self, Self::Error> {
        self.reduce(ReduceOp::Sum, axes, keep_dims)
    }
    fn max(self, axes: &[isize], keep_dims: bool) -> Result<Self, Self::Error> {
        self.reduce(ReduceOp::Max, axes, keep_dims)
    }
    fn mean(self, axes: &[isize], keep_dims: bool) -> Result<Self, Self::Error> {
        self.reduce(ReduceOp::Mean, axes, keep_dims)
    }
    fn argmax(self, axis: isize) -> Result<Self, Self::Error> {
        let axis = self.axis("argmax", axis)?;
        self.op1(Op::ArgMax { axis })
    }
    /// (values, indices) of the `k` largest along `axis`, descending.
    fn top_k(self, k: usize, axis: isize) -> Result<(Self, Self), Self::Error> {
        let axis = self.axis("topk", axis)?;
        let out = self.record(Op::TopK { k, axis }, &[self])?;
        Ok((out[0], out[1]))
    }

    // ---- movement ----------------------------------------------------------------
    fn reshape(self, shape: impl Into<Shape>) -> Result<Self, Self::Error> {
        let shape = shape.into();
        if shape == self.shape() {
            return Ok(self);
        }
        self.op1(Op::Reshape(shape))
    }
    fn permute(self, perm: &[usize]) -> Result<Self, Self::Error> {
        self.op1(Op::Permute(perm.iter().copied().collect()))
    }
    /// Swaps two axes.
    fn transpose(self, a: isize, b: isize) -> Result<Self, Self::Error> {
        let (a, b) = (self.axis("transpose", a)?, self.axis("transpose", b)?);
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }
    fn slice(self, axis: isize, start: impl Into<Dim>, end: impl Into<Dim>) -> Result<Self, Self::Error> {
        let axis = self.axis("slice", axis)?;
        self.op1(Op::Slice { axis, start: start.into(), end: end.into() })
    }
    /// Splits `axis` into `n` equal parts.
    fn chunk(self, n: usize, axis: isize) -> Result<Vec<Self>, Self::Error> {
        let dim = self.dim(axis)?;
        let part = dim
            .div_exact(n)
            .ok_or_else(|| self.error("chunk", format!("axis of size {dim} does not split into {n}")))?;
        (0..n).map(|i| self.slice(axis, &part * &Dim::fixed(i), &part * &Dim::fixed(i + 1))).collect()
    }
    fn concat(self, others: &[Self], axis: isize) -> Result<Self, Self::Error> {
        let axis = self.axis("concat", axis)?;
        let all: Vec<Self> = std::iter::once(self).chain(others.iter().copied()).collect();
        Ok(self.record(Op::Concat { axis }, &all)?[0])
    }
    fn broadcast_to(self, shape: &Shape) -> Result<Self, Self::Error> {
        if &self.shape() == shape {
            return Ok(self);
        }
        self.op1(Op::Expand(shape.clone()))
    }
    /// Inserts a size-1 axis at `axis` (0..=rank).
    fn unsqueeze(self, axis: usize) -> Result<Self, Self::Error> {
        let mut dims = self.shape().0;
        if axis > dims.len() {
            return Err(self.error("unsqueeze", format!("axis {axis} out of range for {}", self.ty())));
        }
        dims.insert(axis, Dim::fixed(1));
        self.reshape(Shape(dims))
    }
    /// Rows of `self` picked by integer `ids` along `axis`.
    fn gather(self, ids: Self, axis: isize) -> Result<Self, Self::Error> {
        let axis = self.axis("gather", axis)?;
        Ok(self.record(Op::Gather { axis }, &[self, ids])?[0])
    }
    fn matmul(self, b: Self) -> Result<Self, Self::Error> {
        self.matmul_t(b, false, false)
    }
    fn matmul_t(self, b: Self, transpose_a: bool, transpose_b: bool) -> Result<Self, Self::Error> {
        Ok(self.record(Op::MatMul { transpose_a, transpose_b }, &[self, b])?[0])
    }

    // ---- composites --------------------------------------------------------------
    /// `x · wᵀ (+ bias)` with `w [out, in]` as stored by PyTorch.
    fn linear(self, w: Self, bias: Option<Self>) -> Result<Self, Self::Error> {
        let y = self.matmul_t(w, false, true)?;
        match bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
    fn softmax(self, axis: isize) -> Result<Self, Self::Error> {
        let m = self.max(&[axis], true)?;
        let e = self.sub(m)?.exp()?;
        e.div(e.sum(&[axis], true)?)
    }
    /// `x / sqrt(mean(x², last axis) + eps) · weight`, computed in f32 and cast back
    /// (as HF's `LlamaRMSNorm`).
    fn rms_norm(self, weight: Self, eps: f64) -> Result<Self, Self::Error> {
        let dt = self.dtype();
        let x = self.cast(DType::F32)?;
        let var = x.mul(x)?.mean(&[-1], true)?;
        let y = x.mul(var.add_scalar(eps)?.rsqrt()?)?.cast(dt)?;
        weight.mul(y)
    }
    fn layer_norm(self, weight: Self, bias: Option<Self>, eps: f64) -> Result<Self, Self::Error> {
        let dt = self.dtype();
        let x = self.cast(DType::F32)?;
        let c = x.sub(x.mean(&[-1], true)?)?;
        let var = c.mul(c)?.mean(&[-1], true)?;
        let y = c.mul(var.add_scalar(eps)?.rsqrt()?)?.cast(dt)?.mul(weight)?;
        match bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
    fn sigmoid(self) -> Result<Self, Self::Error> {
        self.neg()?.exp()?.add_scalar(1.0)?.recip()
    }
    fn silu(self) -> Result<Self, Self::Error> {
        self.div(self.neg()?.exp()?.add_scalar(1.0)?)
    }
    /// GELU with the erf formulation (`nn.GELU()`).
    fn gelu_erf(self) -> Result<Self, Self::Error> {
        let e = self.mul_scalar(std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
        self.mul(e.add_scalar(1.0)?)?.mul_scalar(0.5)
    }
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    fn gelu_tanh(self) -> Result<Self, Self::Error> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let x3 = self.mul(self)?.mul(self)?;
        let inner = self.add(x3.mul_scalar(0.044715)?)?.mul_scalar(c)?;
        self.mul(inner.tanh()?.add_scalar(1.0)?)?.mul_scalar(0.5)
    }
    /// Rotary embedding in the "rotate half" layout (HF Llama): `x [b, s, h, d]`,
    /// `cos`/`sin [s, d]`: `x·cos + rotate_half(x)·sin`.
    fn rope(self, cos: Self, sin: Self) -> Result<Self, Self::Error> {
        let d = self.dim(-1)?;
        let half = d.div_exact(2).ok_or_else(|| self.error("rope", format!("head_dim {d} is odd")))?;
        let x1 = self.slice(-1, 0, half.clone())?;
        let x2 = self.slice(-1, half, d)?;
        let rot = x2.neg()?.concat(&[x1], -1)?;
        let s = cos.dim(0)?;
        let dd = cos.dim(1)?;
        let (cos, sin) = (cos.reshape([s.clone(), Dim::fixed(1), dd.clone()])?, sin.reshape([s, Dim::fixed(1), dd])?);
        self.mul(cos)?.add(rot.mul(sin)?)
    }
    /// Fused attention (see [`Op::Attention`]).
    fn attention(self, k: Self, v: Self, mask: Mask, scale: f32) -> Result<Self, Self::Error> {
        let attrs = AttentionAttrs { mask, scale: F32Bits::new(scale) };
        Ok(self.record(Op::Attention(attrs), &[self, k, v])?[0])
    }
}

impl<T: Trace> TensorExt for T {}

/// The numpy broadcast of several shapes, or why not.
pub fn broadcast_shapes(shapes: &[Shape]) -> Result<Shape, String> {
    let rank = shapes.iter().map(Shape::rank).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut d = Dim::fixed(1);
        for s in shapes {
            if let Some(j) = (i + s.rank()).checked_sub(rank) {
                let sd = s.dim(j);
                if sd.as_fixed() == Some(1) || *sd == d {
                    continue;
                }
                if d.as_fixed() == Some(1) {
                    d = sd.clone();
                } else {
                    let all: Vec<String> = shapes.iter().map(|s| s.to_string()).collect();
                    return Err(format!("cannot broadcast shapes {}", all.join(" and ")));
                }
            }
        }
        out.push(d);
    }
    Ok(Shape::from(out))
}

fn broadcast_pair<T: Trace>(a: T, b: T, op: &str) -> Result<(T, T), T::Error> {
    let (sa, sb) = (a.ty().shape, b.ty().shape);
    if sa == sb {
        return Ok((a, b));
    }
    let s = broadcast_shapes(&[sa, sb]).map_err(|r| a.error(op, r))?;
    Ok((a.broadcast_to(&s)?, b.broadcast_to(&s)?))
}
