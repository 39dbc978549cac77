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
