//! Elementwise ops: unary, binary, `select`, `cast`. Inputs have identical shapes
//! (broadcasting is explicit through `expand`, inserted by the tracer) and, except for
//! `select`'s condition, identical dtypes.

use crate::{BinaryOp, DType, TensorType, UnaryOp};

fn same_shape(a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.shape != b.shape {
        return Err(format!("shapes differ: {} vs {}", a.shape, b.shape));
    }
    Ok(())
}

pub(crate) fn infer_unary(op: UnaryOp, x: &TensorType) -> Result<TensorType, String> {
    let ok = match op {
        UnaryOp::Not => x.dtype == DType::Bool,
        UnaryOp::Neg | UnaryOp::Abs => x.dtype.is_float() || (x.dtype.is_int() && x.dtype != DType::U8),
        _ => x.dtype.is_float(),
    };
    if !ok {
        return Err(format!("not defined for {}", x.dtype));
    }
    Ok(x.clone())
}

pub(crate) fn infer_binary(op: BinaryOp, a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    same_shape(a, b)?;
    if a.dtype != b.dtype {
        return Err(format!("dtypes differ: {} vs {}", a.dtype, b.dtype));
    }
    let ok = match op {
        BinaryOp::And => a.dtype == DType::Bool,
        BinaryOp::Pow => a.dtype.is_float(),
        BinaryOp::Eq => true,
        _ => a.dtype != DType::Bool,
    };
    if !ok {
        return Err(format!("not defined for {}", a.dtype));
    }
    let dtype = if op.is_comparison() { DType::Bool } else { a.dtype };
    Ok(TensorType::new(dtype, a.shape.clone()))
}

pub(crate) fn infer_select(inputs: &[TensorType]) -> Result<TensorType, String> {
    let (c, a, b) = (&inputs[0], &inputs[1], &inputs[2]);
    if c.dtype != DType::Bool {
        return Err(format!("condition must be bool, got {}", c.dtype));
    }
    same_shape(c, a)?;
    same_shape(a, b)?;
    if a.dtype != b.dtype {
        return Err(format!("dtypes differ: {} vs {}", a.dtype, b.dtype));
    }
    Ok(a.clone())
}
