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
