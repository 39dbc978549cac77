//! Movement ops: `reshape`, `permute`, `slice`, `concat`, `expand`, `gather`.

use crate::{Dim, Shape, TensorType};

pub(crate) fn infer_reshape(x: &TensorType, to: &Shape) -> Result<TensorType, String> {
    let (a, b) = (x.shape.numel(), to.numel());
    if a != b {
        return Err(format!("cannot reshape {} ({a} elements) to {to} ({b} elements)", x.shape));
    }
    Ok(TensorType::new(x.dtype, to.clone()))
}

pub(crate) fn infer_permute(x: &TensorType, perm: &[usize]) -> Result<TensorType, String> {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() {
        return Err(format!("permutation {perm:?} has {} axes, tensor has rank {}", perm.len(), x.rank()));
    }
    for &p in perm {
        if p >= x.rank() || std::mem::replace(&mut seen[p], true) {
            return Err(format!("{perm:?} is not a permutation of 0..{}", x.rank()));
        }
    }
    Ok(TensorType::new(x.dtype, Shape::new(perm.iter().map(|&p| x.shape.dim(p).clone()))))
}

pub(crate) fn infer_slice(x: &TensorType, axis: usize, start: &Dim, end: &Dim) -> Result<TensorType, String> {
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    let len = end - start;
    let size = x.shape.dim(axis);
    if let (Some(s), Some(e)) = (start.as_fixed(), end.as_fixed()) {
        if s > e {
            return Err(format!("start {s} is after end {e}"));
        }
    }
    if let (Some(e), Some(n)) = (end.as_fixed(), size.as_fixed()) {
        if e > n {
            return Err(format!("end {e} exceeds axis {axis} of size {n}"));
        }
    }
    let mut dims = x.shape.0.clone();
    dims[axis] = len;
    Ok(TensorType::new(x.dtype, Shape(dims)))
}

pub(crate) fn infer_concat(xs: &[TensorType], axis: usize) -> Result<TensorType, String> {
    let first = &xs[0];
    if axis >= first.rank() {
        return Err(format!("axis {axis} out of range for rank {}", first.rank()));
    }
    let mut total = Dim::fixed(0);
    for x in xs {
        if x.dtype != first.dtype {
            return Err(format!("dtypes differ: {} vs {}", first.dtype, x.dtype));
        }
        if x.rank() != first.rank() {
            return Err(format!("ranks differ: {} vs {}", first.shape, x.shape));
        }
        for i in (0..x.rank()).filter(|&i| i != axis) {
            if x.shape.dim(i) != first.shape.dim(i) {
                return Err(format!("dim {i} differs: {} vs {}", first.shape, x.shape));
            }
        }
        total = &total + x.shape.dim(axis);
    }
    let mut dims = first.shape.0.clone();
    dims[axis] = total;
    Ok(TensorType::new(first.dtype, Shape(dims)))
}

pub(crate) fn infer_expand(x: &TensorType, to: &Shape) -> Result<TensorType, String> {
    if to.rank() < x.rank() {
        return Err(format!("cannot expand {} to lower rank {to}", x.shape));
    }
    let off = to.rank() - x.rank();
    for (i, d) in x.shape.dims().iter().enumerate() {
        let t = to.dim(off + i);
        if d != t && d.as_fixed() != Some(1) {
            return Err(format!("cannot expand {} to {to}: dim {i} is {d}, not 1 or {t}", x.shape));
        }
    }
    Ok(TensorType::new(x.dtype, to.clone()))
}

pub(crate) fn infer_gather(data: &TensorType, idx: &TensorType, axis: usize) -> Result<TensorType, String> {
    if axis >= data.rank() {
        return Err(format!("axis {axis} out of range for rank {}", data.rank()));
    }
    if !matches!(idx.dtype, crate::DType::I64 | crate::DType::I32) {
        return Err(format!("indices must be i64 or i32, got {}", idx.dtype));
    }
    let d = data.shape.dims();
    let dims = d[..axis].iter().chain(idx.shape.dims()).chain(&d[axis + 1..]).cloned();
    Ok(TensorType::new(data.dtype, Shape::new(dims)))
}

// ---- CPU semantics (compute-form tensors; see `host`) ----------------------------------

use crate::host::{dispatch, Element, HostData, HostTensor};
use crate::{Bindings, EvalError};

fn eval_dim(op: &str, d: &Dim, syms: &Bindings) -> Result<usize, EvalError> {
    d.eval(syms).map_err(|r| EvalError::new(op, r))
}

pub(crate) fn eval_shape(op: &str, s: &Shape, syms: &Bindings) -> Result<Vec<usize>, EvalError> {
    s.dims().iter().map(|d| eval_dim(op, d, syms)).collect()
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Copies the elements of the strided view (`shape`, element `strides`) of `src` into a
/// contiguous row-major vector. Adjacent axes that are contiguous with each other are
/// merged first, so the inner loop runs over the longest possible runs.
pub(crate) fn strided_copy<T: Copy>(src: &[T], shape: &[usize], strides: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let (mut sh, mut st): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match (sh.last_mut(), st.last()) {
            (Some(pd), Some(&ps)) if ps == s * d => {
                *pd *= d;
                *st.last_mut().expect("same length") = s;
            }
            _ => {
                sh.push(d);
                st.push(s);
            }
        }
    }
    let r = sh.len();
    if r == 0 {
        out.push(src[0]);
        return out;
    }
    let (last, ls) = (sh[r - 1], st[r - 1]);
    let mut idx = vec![0usize; r - 1];
    let mut base = 0usize;
    loop {
        match ls {
            1 => out.extend_from_slice(&src[base..base + last]),
            0 => out.extend(std::iter::repeat_n(src[base], last)),
            _ => out.extend((0..last).map(|j| src[base + j * ls])),
        }
        let mut ax = r - 1;
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            base += st[ax];
            if idx[ax] < sh[ax] {
                break;
            }
            base -= st[ax] * sh[ax];
            idx[ax] = 0;
        }
    }
}

fn strided(op: &str, x: &HostTensor, shape: &[usize], strides: &[usize]) -> Result<HostTensor, EvalError> {
    let data = dispatch!(x.data(), op, T => Ok(T::wrap(strided_copy(T::slice(x.data()).expect("dispatched"), shape, strides))))?;
    HostTensor::new(shape.to_vec(), data)
}

pub(crate) fn eval_reshape(x: &HostTensor, to: &Shape, syms: &Bindings) -> Result<HostTensor, EvalError> {
    let shape = eval_shape("reshape", to, syms)?;
    x.clone().reshape(shape)
}

pub(crate) fn eval_permute(x: &HostTensor, perm: &[usize]) -> Result<HostTensor, EvalError> {
    let r = x.rank();
    let mut seen = vec![false; r];
    if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
        return Err(EvalError::new("permute", format!("{perm:?} is not a permutation of 0..{r}")));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x.clone());
    }
    let st = row_major_strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    strided("permute", x, &shape, &strides)
}

pub(crate) fn eval_slice(
    x: &HostTensor,
    axis: usize,
    start: &Dim,
    end: &Dim,
    syms: &Bindings,
) -> Result<HostTensor, EvalError> {
    if axis >= x.rank() {
        return Err(EvalError::new("slice", format!("axis {axis} out of range for shape {:?}", x.shape())));
    }
    let (s, e) = (eval_dim("slice", start, syms)?, eval_dim("slice", end, syms)?);
    let size = x.shape()[axis];
    if s > e || e > size {
        return Err(EvalError::new(
            "slice",
            format!("range {s}..{e} (`{start}..{end}`) is invalid for axis {axis} of size {size}"),
        ));
    }
    let (outer, _, inner) = crate::reduce::lanes(x.shape(), axis, axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = e - s;
    let data = dispatch!(x.data(), "slice", T => {
        let v = T::slice(x.data()).expect("dispatched");
        let mut out = Vec::with_capacity(outer * (e - s) * inner);
        for o in 0..outer {
            out.extend_from_slice(&v[(o * size + s) * inner..(o * size + e) * inner]);
        }
        Ok(T::wrap(out))
    })?;
    HostTensor::new(shape, data)
}

pub(crate) fn eval_concat(xs: &[&HostTensor], axis: usize) -> Result<HostTensor, EvalError> {
    let first = xs.first().ok_or_else(|| EvalError::new("concat", "needs at least one input"))?;
    if axis >= first.rank() {
        return Err(EvalError::new("concat", format!("axis {axis} out of range for shape {:?}", first.shape())));
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for x in xs {
        if x.dtype() != first.dtype() {
            return Err(EvalError::new("concat", format!("dtypes differ: {} vs {}", first.dtype(), x.dtype())));
        }
        let same =
            x.rank() == first.rank() && (0..x.rank()).filter(|&i| i != axis).all(|i| x.shape()[i] == first.shape()[i]);
        if !same {
            return Err(EvalError::new("concat", format!("shapes differ: {:?} vs {:?}", first.shape(), x.shape())));
        }
        shape[axis] += x.shape()[axis];
    }
    let (outer, _, inner) = crate::reduce::lanes(first.shape(), axis, axis);
    let data = dispatch!(first.data(), "concat", T => {
        let parts: Vec<&[T]> = xs.iter().map(|x| T::slice(x.data()).expect("same dtype")).collect();
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for (p, x) in parts.iter().zip(xs) {
                let chunk = x.shape()[axis] * inner;
                out.extend_from_slice(&p[o * chunk..(o + 1) * chunk]);
            }
        }
        Ok(T::wrap(out))
    })?;
    HostTensor::new(shape, data)
}

pub(crate) fn eval_expand(x: &HostTensor, to: &Shape, syms: &Bindings) -> Result<HostTensor, EvalError> {
    let shape = eval_shape("expand", to, syms)?;
    if shape.len() < x.rank() {
        return Err(EvalError::new("expand", format!("cannot expand {:?} to lower rank {shape:?}", x.shape())));
    }
    if shape == x.shape() {
        return Ok(x.clone());
    }
    let off = shape.len() - x.rank();
    let st = row_major_strides(x.shape());
    let mut strides = vec![0; shape.len()];
    for (i, &d) in x.shape().iter().enumerate() {
        let t = shape[off + i];
        if d == t {
            strides[off + i] = st[i];
        } else if d != 1 {
            return Err(EvalError::new(
                "expand",
                format!("cannot expand {:?} to {shape:?}: dim {i} is {d}", x.shape()),
            ));
        }
    }
    strided("expand", x, &shape, &strides)
}

pub(crate) fn eval_gather(data: &HostTensor, idx: &HostTensor, axis: usize) -> Result<HostTensor, EvalError> {
    if axis >= data.rank() {
        return Err(EvalError::new("gather", format!("axis {axis} out of range for shape {:?}", data.shape())));
    }
    let ids: Vec<i64> = match idx.data() {
        HostData::I64(v) => v.clone(),
        HostData::I32(v) => v.iter().map(|&x| x as i64).collect(),
        _ => return Err(EvalError::new("gather", format!("indices must be i64 or i32, got {}", idx.dtype()))),
    };
    let (outer, size, inner) = crate::reduce::lanes(data.shape(), axis, axis);
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= size) {
        return Err(EvalError::new("gather", format!("index {bad} out of range for axis {axis} of size {size}")));
    }
    let d = data.shape();
    let shape: Vec<usize> = d[..axis].iter().chain(idx.shape()).chain(&d[axis + 1..]).copied().collect();
    let out = dispatch!(data.data(), "gather", T => {
        let v = T::slice(data.data()).expect("dispatched");
        let mut out = Vec::with_capacity(outer * ids.len() * inner);
        for o in 0..outer {
            for &i in &ids {
                let at = (o * size + i as usize) * inner;
                out.extend_from_slice(&v[at..at + inner]);
            }
        }
        Ok(T::wrap(out))
    })?;
    HostTensor::new(shape, out)
}
