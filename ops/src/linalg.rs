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

// ---- CPU semantics (compute-form tensors; see `host`) ----------------------------------

use crate::host::{HostData, HostTensor};
use crate::EvalError;
use rayon::prelude::*;

/// Problems with at least this many multiply-adds use gemm's rayon parallelism.
const PAR_FLOPS: usize = 1 << 17;

/// `dst[m, n] = op(a) · op(b)` where `a` holds `[m, k]` (or `[k, m]` if `ta`) and `b`
/// holds `[k, n]` (or `[n, k]` if `tb`), row-major. Transposes are strides, not copies.
pub fn gemm_f32(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    parallel: bool,
) {
    assert!(dst.len() == m * n && a.len() == m * k && b.len() == k * n, "gemm_f32: operand sizes do not match");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let par = if parallel { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee every (row, col) addressed through these
    // strides lies inside `dst`, `a` and `b`, and `dst` does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

pub(crate) fn eval_matmul(a: &HostTensor, b: &HostTensor, ta: bool, tb: bool) -> Result<HostTensor, EvalError> {
    let err = |r: String| EvalError::new("matmul", r);
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 {
        return Err(err(format!("both operands need rank >= 2, got {:?} and {:?}", a.shape(), b.shape())));
    }
    let (HostData::F32(av), HostData::F32(bv)) = (a.data(), b.data()) else {
        return Err(err(format!("needs f32 compute storage, got {} and {}", a.dtype(), b.dtype())));
    };
    let (sa, sb) = (a.shape(), b.shape());
    let (m, ka) = if ta { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
    let (kb, n) = if tb { (sb[rb - 1], sb[rb - 2]) } else { (sb[rb - 2], sb[rb - 1]) };
    if ka != kb {
        return Err(err(format!("contraction dims differ: {ka} vs {kb} ({sa:?}, {sb:?})")));
    }
    let k = ka;
    if rb != 2 && sa[..ra - 2] != sb[..rb - 2] {
        return Err(err(format!("batch dims differ: {sa:?} vs {sb:?}")));
    }
    let batch: usize = sa[..ra - 2].iter().product();
    let shared_b = rb == 2;
    let mut out = vec![0f32; batch * m * n];
    let flops = m * n * k;
    let b_of = |i: usize| if shared_b { &bv[..] } else { &bv[i * k * n..(i + 1) * k * n] };
    if batch > 1 && flops < PAR_FLOPS && batch * flops >= PAR_FLOPS && m * n > 0 {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| gemm_f32(dst, &av[i * m * k..(i + 1) * m * k], b_of(i), (m, n, k), (ta, tb), false));
    } else if m * n > 0 {
        for (i, dst) in out.chunks_mut(m * n).enumerate() {
            gemm_f32(dst, &av[i * m * k..(i + 1) * m * k], b_of(i), (m, n, k), (ta, tb), flops >= PAR_FLOPS);
        }
    }
    let shape: Vec<usize> = sa[..ra - 2].iter().copied().chain([m, n]).collect();
    HostTensor::new(shape, HostData::F32(out))
}
