//! Source ops: `input`, `param`, `const`, `arange`. Inputs and params take their type
//! from the op itself; their values come from the executor's feeds and weights.

use crate::{ConstValues, DType, TensorType};

pub(crate) fn infer_constant(ty: &TensorType, values: &ConstValues) -> Result<TensorType, String> {
    let n = ty
        .shape
        .as_fixed()
        .ok_or_else(|| format!("a constant needs a fixed shape, got {}", ty.shape))?
        .iter()
        .product::<usize>();
    if values.len() != n {
        return Err(format!("{} values for shape {} ({n} elements)", values.len(), ty.shape));
    }
    match (values, ty.dtype.is_float()) {
        (ConstValues::Float(_), true) | (ConstValues::Int(_), false) => Ok(ty.clone()),
        _ if ty.dtype == DType::I4 => Err("i4 constants are not supported".into()),
        _ => Err(format!("value kind does not match dtype {}", ty.dtype)),
    }
}

// ---- CPU semantics (compute form; see `host`) -------------------------------------------

use crate::host::{compute_dtype, finish, HostData, HostTensor};
use crate::{Bindings, Dim, EvalError};

/// A constant's values at its type's shape (a single value fills the whole shape), in
/// the compute form of its dtype, floats rounded to the dtype.
pub(crate) fn eval_constant(ty: &TensorType, values: &ConstValues, syms: &Bindings) -> Result<HostTensor, EvalError> {
    let shape = crate::movement::eval_shape("const", &ty.shape, syms)?;
    let n: usize = shape.iter().product();
    if values.len() != n && values.len() != 1 {
        return Err(EvalError::new("const", format!("{} values for shape {shape:?} ({n} elements)", values.len())));
    }
    let ints = |v: &[i64]| -> Vec<i64> { v.iter().copied().cycle().take(n).collect() };
    let data = match (values, compute_dtype(ty.dtype)) {
        (ConstValues::Float(v), DType::F32) => HostData::F32(v.iter().map(|x| x.get()).cycle().take(n).collect()),
        (ConstValues::Int(v), DType::I64) => HostData::I64(ints(v)),
        (ConstValues::Int(v), DType::I32) => HostData::I32(ints(v).into_iter().map(|x| x as i32).collect()),
        (ConstValues::Int(v), DType::I8) => HostData::I8(ints(v).into_iter().map(|x| x as i8).collect()),
        (ConstValues::Int(v), DType::U8) => HostData::U8(ints(v).into_iter().map(|x| x as u8).collect()),
        (ConstValues::Int(v), DType::Bool) => HostData::Bool(ints(v).into_iter().map(|x| x != 0).collect()),
        _ => return Err(EvalError::new("const", format!("value kind does not match dtype {}", ty.dtype))),
    };
    let mut t = HostTensor::new(shape, data)?;
    finish(&mut t, ty.dtype);
    Ok(t)
}

/// `start, start+1, …` (`len` values) as i64.
pub(crate) fn eval_arange(start: &Dim, len: &Dim, syms: &Bindings) -> Result<HostTensor, EvalError> {
    let s = start.eval(syms).map_err(|r| EvalError::new("arange", r))? as i64;
    let n = len.eval(syms).map_err(|r| EvalError::new("arange", r))?;
    Ok(HostTensor::from_i64(&[n], (s..s + n as i64).collect()))
}
