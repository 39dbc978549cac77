//! `matmul`: batched matrix product over the last two dims, with optional transposes.
//! `b` of rank 2 is shared by every batch (a weight); otherwise batch dims must match.

use crate::{Shape, TensorType};

pub(crate) fn infer_matmul(a: &TensorType, b: &TensorType, ta: bool, tb: bool) -> Result<TensorType, String> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err("both operands need rank >= 2".into());
    }
    if a.dtype != b.dtype {
        return Err(format!("dtypes differ: {} vs {}", a.dtype, b.dtype));
    }
    if !a.dtype.is_float() {
        return Err(format!("not defined for {}", a.dtype));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if ta { (&a.shape.0[ra - 1], &a.shape.0[ra - 2]) } else { (&a.shape.0[ra - 2], &a.shape.0[ra - 1]) };
    let (kb, n) = if tb { (&b.shape.0[rb - 1], &b.shape.0[rb - 2]) } else { (&b.shape.0[rb - 2], &b.shape.0[rb - 1]) };
    if ka != kb {
        return Err(format!("contraction dims differ: {ka} vs {kb}"));
    }
    if rb != 2 && a.shape.0[..ra - 2] != b.shape.0[..rb - 2] {
        return Err("batch dims differ".into());
    }
    let dims = a.shape.0[..ra - 2].iter().cloned().chain([m.clone(), n.clone()]);
    Ok(TensorType::new(a.dtype, Shape::new(dims)))
}
