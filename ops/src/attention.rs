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

// ---- CPU semantics (compute-form tensors; see `host`) ----------------------------------

use crate::host::{HostData, HostTensor};
use crate::{AttentionAttrs, EvalError, Mask};
use rayon::prelude::*;

/// The keys `lo..hi` query position `pos` may attend to among `t` keys.
pub fn allowed_keys(mask: Mask, pos: usize, t: usize) -> (usize, usize) {
    match mask {
        Mask::None => (0, t),
        Mask::Causal => (0, pos + 1),
        Mask::SlidingWindow(w) => ((pos + 1).saturating_sub(w as usize), pos + 1),
    }
}

pub(crate) fn eval_attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    attrs: &AttentionAttrs,
) -> Result<HostTensor, EvalError> {
    let err = |r: String| EvalError::new("attention", r);
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(err(format!("q, k, v need rank 4, got {:?}, {:?}, {:?}", q.shape(), k.shape(), v.shape())));
    }
    let (HostData::F32(qv), HostData::F32(kv), HostData::F32(vv)) = (q.data(), k.data(), v.data()) else {
        return Err(err(format!("needs f32 compute storage, got {}, {}, {}", q.dtype(), k.dtype(), v.dtype())));
    };
    let (b, s, h, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (t, kh) = (k.shape()[1], k.shape()[2]);
    let dv = v.shape()[3];
    let ok = k.shape()[0] == b && v.shape()[0] == b && k.shape()[3] == d && v.shape()[1] == t && v.shape()[2] == kh;
    if !ok {
        return Err(err(format!("incompatible shapes q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape())));
    }
    if kh == 0 || h % kh != 0 {
        return Err(err(format!("{h} query heads are not a multiple of {kh} kv heads")));
    }
    if t < s {
        return Err(err(format!("{t} keys are fewer than {s} queries")));
    }
    let group = h / kh;
    let scale = attrs.scale.get();
    // Per (batch, head): an [s, dv] block, later scattered to [b, s, h, dv].
    let block = s * dv;
    let mut tmp = vec![0f32; b * h * block];
    let work = |(bh, out): (usize, &mut [f32])| {
        let (bi, hi) = (bh / h, bh % h);
        let kvh = hi / group;
        let mut scores = vec![0f32; t];
        for i in 0..s {
            let pos = t - s + i;
            let (lo, hi_k) = allowed_keys(attrs.mask, pos, t);
            let o = &mut out[i * dv..(i + 1) * dv];
            if lo >= hi_k {
                continue;
            }
            let qrow = &qv[((bi * s + i) * h + hi) * d..][..d];
            let mut max = f32::NEG_INFINITY;
            for j in lo..hi_k {
                let krow = &kv[((bi * t + j) * kh + kvh) * d..][..d];
                let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                scores[j] = dot * scale;
                max = max.max(scores[j]);
            }
            let mut sum = 0f32;
            for sc in &mut scores[lo..hi_k] {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            for j in lo..hi_k {
                let p = scores[j] * inv;
                let vrow = &vv[((bi * t + j) * kh + kvh) * dv..][..dv];
                for (x, &y) in o.iter_mut().zip(vrow) {
                    *x += p * y;
                }
            }
        }
    };
    if block > 0 {
        if b * h * s * t * (d + dv) >= 1 << 16 {
            tmp.par_chunks_mut(block).enumerate().for_each(work);
        } else {
            tmp.chunks_mut(block).enumerate().for_each(work);
        }
    }
    let out = if h == 1 || s == 1 {
        tmp // [b, h, s, dv] and [b, s, h, dv] coincide
    } else {
        crate::movement::strided_copy(&tmp, &[b, s, h, dv], &[h * block, dv, block, 1])
    };
    HostTensor::new(vec![b, s, h, dv], HostData::F32(out))
}
