//! `attention`: softmax(scale · q kᵀ + mask) v with grouped KV heads.
//!
//! Layouts: `q [b, s, h, d]`, `k [b, t, kh, d]`, `v [b, t, kh, dv]`, output
//! `[b, s, h, dv]`. `t` counts the cached keys plus the new ones (the caller appends new
//! keys to the cache with `concat` on axis 1), so query `i` is at position `t - s + i`.

use crate::{Shape, TensorType};

pub(crate) fn infer_attention(inputs: &[TensorType]) -> Result<TensorType, String> {
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err("q, k and v must have rank 4 ([batch, seq, heads, head_dim])".into());
    }
    if q.dtype != k.dtype || k.dtype != v.dtype || !q.dtype.is_float() {
        return Err(format!("q, k, v need one float dtype, got {}, {}, {}", q.dtype, k.dtype, v.dtype));
    }
    let (qs, ks, vs) = (q.shape.dims(), k.shape.dims(), v.shape.dims());
    if qs[0] != ks[0] || ks[0] != vs[0] {
        return Err("batch sizes differ".into());
    }
    if ks[1] != vs[1] {
        return Err(format!("k and v lengths differ: {} vs {}", ks[1], vs[1]));
    }
    if ks[2] != vs[2] {
        return Err(format!("k and v head counts differ: {} vs {}", ks[2], vs[2]));
    }
    if qs[3] != ks[3] {
        return Err(format!("q and k head_dim differ: {} vs {}", qs[3], ks[3]));
    }
    if let (Some(h), Some(kh)) = (qs[2].as_fixed(), ks[2].as_fixed()) {
        if kh == 0 || h % kh != 0 {
            return Err(format!("{h} query heads are not a multiple of {kh} kv heads"));
        }
    }
    Ok(TensorType::new(q.dtype, Shape::new([qs[0].clone(), qs[1].clone(), qs[2].clone(), vs[3].clone()])))
}
