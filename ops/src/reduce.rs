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
