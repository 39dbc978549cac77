//! Reductions: `reduce_sum`, `reduce_max`, `reduce_mean` over a set of axes, `argmax`
//! and `topk` along one axis.

use crate::{Axes, DType, OutTypes, Shape, TensorType};

fn check_axis(x: &TensorType, axis: usize) -> Result<(), String> {
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    Ok(())
}

pub(crate) fn infer_reduce(x: &TensorType, axes: &Axes, keep_dims: bool) -> Result<TensorType, String> {
    if axes.is_empty() {
        return Err("needs at least one axis".into());
    }
    for (i, &a) in axes.iter().enumerate() {
        check_axis(x, a)?;
        if axes[..i].contains(&a) {
            return Err(format!("axis {a} repeated"));
        }
    }
    if x.dtype == DType::Bool || x.dtype == DType::I4 {
        return Err(format!("not defined for {}", x.dtype));
    }
    let dims = x.shape.dims().iter().enumerate().filter_map(|(i, d)| match axes.contains(&i) {
        true if keep_dims => Some(crate::Dim::fixed(1)),
        true => None,
        false => Some(d.clone()),
    });
    Ok(TensorType::new(x.dtype, Shape::new(dims)))
}

pub(crate) fn infer_argmax(x: &TensorType, axis: usize) -> Result<TensorType, String> {
    check_axis(x, axis)?;
    let dims = x.shape.dims().iter().enumerate().filter(|(i, _)| *i != axis).map(|(_, d)| d.clone());
    Ok(TensorType::new(DType::I64, Shape::new(dims)))
}

pub(crate) fn infer_topk(x: &TensorType, k: usize, axis: usize) -> Result<OutTypes, String> {
    check_axis(x, axis)?;
    if k == 0 {
        return Err("k must be at least 1".into());
    }
    if let Some(n) = x.shape.dim(axis).as_fixed() {
        if k > n {
            return Err(format!("k = {k} exceeds the axis size {n}"));
        }
    }
    let mut dims = x.shape.0.clone();
    dims[axis] = crate::Dim::fixed(k);
    Ok(smallvec::smallvec![TensorType::new(x.dtype, Shape(dims.clone())), TensorType::new(DType::I64, Shape(dims)),])
}

// ---- CPU semantics (compute-form tensors; see `host`) ----------------------------------

use crate::host::{dispatch, Element, HostData, HostTensor};
use crate::{EvalError, ReduceOp};
use rayon::prelude::*;
use std::cmp::Ordering;

/// `(outer, n, inner)` sizes around the axes `a0..=a1` of `shape`.
pub(crate) fn lanes(shape: &[usize], a0: usize, a1: usize) -> (usize, usize, usize) {
    let p = |s: &[usize]| s.iter().product::<usize>();
    (p(&shape[..a0]), p(&shape[a0..=a1]), p(&shape[a1 + 1..]))
}

fn check_axis_eval(op: &str, x: &HostTensor, axis: usize) -> Result<(), EvalError> {
    if axis >= x.rank() {
        return Err(EvalError::new(op, format!("axis {axis} out of range for shape {:?}", x.shape())));
    }
    Ok(())
}

/// Folds each lane of `n` elements (stride `inner`) of `x` into one value.
fn fold_lanes<T: Element, A: Copy + Send + Sync>(
    x: &[T],
    (outer, n, inner): (usize, usize, usize),
    init: A,
    f: impl Fn(A, T) -> A + Sync + Send,
    fin: impl Fn(A) -> T + Sync + Send,
) -> Vec<T> {
    if inner == 1 {
        if n == 0 {
            return vec![fin(init); outer];
        }
        let row = |r: &[T]| fin(r.iter().fold(init, |a, &v| f(a, v)));
        return if x.len() >= 1 << 15 { x.par_chunks(n).map(row).collect() } else { x.chunks(n).map(row).collect() };
    }
    let mut acc = vec![init; outer * inner];
    for o in 0..outer {
        let dst = &mut acc[o * inner..(o + 1) * inner];
        for j in 0..n {
            let src = &x[(o * n + j) * inner..(o * n + j + 1) * inner];
            for (a, &v) in dst.iter_mut().zip(src) {
                *a = f(*a, v);
            }
        }
    }
    acc.into_iter().map(fin).collect()
}

pub(crate) fn eval_reduce(
    op: ReduceOp,
    x: &HostTensor,
    axes: &[usize],
    keep_dims: bool,
) -> Result<HostTensor, EvalError> {
    let name = op.name();
    if axes.is_empty() {
        return Err(EvalError::new(name, "needs at least one axis"));
    }
    let mut sorted: Vec<usize> = axes.to_vec();
    sorted.sort_unstable();
    for (i, &a) in sorted.iter().enumerate() {
        check_axis_eval(name, x, a)?;
        if i > 0 && sorted[i - 1] == a {
            return Err(EvalError::new(name, format!("axis {a} repeated")));
        }
    }
    let out_shape: Vec<usize> = x
        .shape()
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| match sorted.contains(&i) {
            true if keep_dims => Some(1),
            true => None,
            false => Some(d),
        })
        .collect();
    // Reduce a contiguous block of axes; move scattered axes to the end first.
    let contiguous = sorted.windows(2).all(|w| w[1] == w[0] + 1);
    let permuted;
    let (x, a0, a1) = if contiguous {
        (x, sorted[0], *sorted.last().expect("non-empty"))
    } else {
        let perm: Vec<usize> = (0..x.rank()).filter(|i| !sorted.contains(i)).chain(sorted.iter().copied()).collect();
        permuted = crate::movement::eval_permute(x, &perm)?;
        (&permuted, x.rank() - sorted.len(), x.rank() - 1)
    };
    let l = lanes(x.shape(), a0, a1);
    let n = l.1;
    macro_rules! int {
        ($v:expr, $var:ident, $t:ty) => {
            HostData::$var(match op {
                ReduceOp::Sum => fold_lanes($v, l, 0i64, |a, v| a.wrapping_add(v as i64), |a| a as $t),
                ReduceOp::Mean => fold_lanes(
                    $v,
                    l,
                    0i64,
                    |a, v| a.wrapping_add(v as i64),
                    |a| a.checked_div(n as i64).unwrap_or(0) as $t,
                ),
                ReduceOp::Max => fold_lanes($v, l, <$t>::MIN, |a, v| a.max(v), |a| a),
            })
        };
    }
    let data = match x.data() {
        HostData::F32(v) => HostData::F32(match op {
            ReduceOp::Sum => fold_lanes(v, l, 0f32, |a, v| a + v, |a| a),
            ReduceOp::Mean => fold_lanes(v, l, 0f32, |a, v| a + v, |a| a / n as f32),
            ReduceOp::Max => fold_lanes(v, l, f32::NEG_INFINITY, crate::elementwise::fmax, |a| a),
        }),
        HostData::I64(v) => int!(v, I64, i64),
        HostData::I32(v) => int!(v, I32, i32),
        HostData::I8(v) => int!(v, I8, i8),
        HostData::U8(v) => int!(v, U8, u8),
        _ => return Err(EvalError::new(name, format!("not defined for {}", x.dtype()))),
    };
    HostTensor::new(out_shape, data)
}

/// Descending order with NaN (`v != v`) first; ties keep the lower index first.
fn desc<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    #[allow(clippy::eq_op)]
    let (an, bn) = (a != a, b != b);
    match (an, bn) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => b.partial_cmp(a).unwrap_or(Ordering::Equal),
    }
}

pub(crate) fn eval_argmax(x: &HostTensor, axis: usize) -> Result<HostTensor, EvalError> {
    check_axis_eval("argmax", x, axis)?;
    let (outer, n, inner) = lanes(x.shape(), axis, axis);
    if n == 0 {
        return Err(EvalError::new("argmax", format!("axis {axis} of shape {:?} is empty", x.shape())));
    }
    let mut out_shape = x.shape().to_vec();
    out_shape.remove(axis);
    let idx = dispatch!(x.data(), "argmax", T => {
        let v = T::slice(x.data()).expect("dispatched");
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| &v[(o * n + j) * inner + i];
                let mut best = 0;
                for j in 1..n {
                    // First maximum wins: only a strictly greater value (or a first NaN) moves it.
                    if desc(at(j), at(best)) == Ordering::Less {
                        best = j;
                    }
                }
                out.push(best as i64);
            }
        }
        Ok(out)
    })?;
    HostTensor::new(out_shape, HostData::I64(idx))
}

pub(crate) fn eval_topk(x: &HostTensor, k: usize, axis: usize) -> Result<Vec<HostTensor>, EvalError> {
    check_axis_eval("topk", x, axis)?;
    let (outer, n, inner) = lanes(x.shape(), axis, axis);
    if k == 0 || k > n {
        return Err(EvalError::new("topk", format!("k = {k} must be in 1..={n} (axis {axis} of {:?})", x.shape())));
    }
    let mut out_shape = x.shape().to_vec();
    out_shape[axis] = k;
    let (vals, idx) = dispatch!(x.data(), "topk", T => {
        let v = T::slice(x.data()).expect("dispatched");
        let mut vals: Vec<T> = Vec::with_capacity(outer * k * inner);
        let mut idx = vec![0i64; outer * k * inner];
        vals.resize(outer * k * inner, v[0]);
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| &v[(o * n + j) * inner + i];
                let cmp = |a: &usize, b: &usize| desc(at(*a), at(*b)).then(a.cmp(b));
                order.clear();
                order.extend(0..n);
                if k < n {
                    order.select_nth_unstable_by(k - 1, cmp);
                    order.truncate(k);
                }
                order.sort_unstable_by(cmp);
                for (r, &j) in order.iter().enumerate() {
                    let dst = (o * k + r) * inner + i;
                    vals[dst] = *at(j);
                    idx[dst] = j as i64;
                }
            }
        }
        Ok((T::wrap(vals), idx))
    })?;
    Ok(vec![HostTensor::new(out_shape.clone(), vals)?, HostTensor::new(out_shape, HostData::I64(idx))?])
}
