//! Dequantization of ggml tensor types to f32, following llama.cpp's
//! `ggml-quants.c` (`dequantize_row_*`) block layouts exactly.
//!
//! | type | block | bytes | layout |
//! |------|-------|-------|--------|
//! | Q4_0 | 32  | 18  | f16 d, u8 qs[16]: x[j] = d·(lo(qs[j])−8), x[j+16] = d·(hi(qs[j])−8) |
//! | Q4_1 | 32  | 20  | f16 d, f16 m, u8 qs[16]: x[j] = d·lo(qs[j])+m, x[j+16] = d·hi(qs[j])+m |
//! | Q8_0 | 32  | 34  | f16 d, i8 qs[32]: x[j] = d·qs[j] |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, u8 scales[12] (8 6-bit scale/min pairs), u8 qs[128] |
//! | Q6_K | 256 | 210 | u8 ql[128], u8 qh[64], i8 scales[16], f16 d |

use super::GgmlType;
use half::{bf16, f16};

/// Types [`dequantize`] handles.
pub const SUPPORTED: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Elements per block of the 32-element formats.
pub const QK: usize = 32;
/// Elements per super-block of the k-quants.
pub const QK_K: usize = 256;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes `n` elements of type `ty` stored in `data`. Errors (as plain text, the
/// caller names the tensor) when the type is not supported or the sizes disagree.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if !SUPPORTED.contains(&ty) {
        let names: Vec<_> = SUPPORTED.iter().map(|t| t.name()).collect();
        return Err(format!(
            "cannot dequantize type {ty} (ggml type id {}); supported types: {}",
            ty.id(),
            names.join(", ")
        ));
    }
    if !n.is_multiple_of(ty.block_size()) {
        return Err(format!("{n} elements of {ty} are not a whole number of {}-element blocks", ty.block_size()));
    }
    let want = ty.bytes_for(n).ok_or_else(|| format!("{n} elements of {ty} overflow the byte count"))?;
    if data.len() != want {
        return Err(format!("{n} elements of {ty} need {want} bytes, got {}", data.len()));
    }
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => dequantize_q8_0(data, &mut out),
        GgmlType::Q4_0 => dequantize_q4_0(data, &mut out),
        GgmlType::Q4_1 => dequantize_q4_1(data, &mut out),
        GgmlType::Q4_K => dequantize_q4_k(data, &mut out),
        GgmlType::Q6_K => dequantize_q6_k(data, &mut out),
        _ => unreachable!("checked against SUPPORTED"),
    }
    Ok(out)
}

/// Q8_0: blocks of 34 bytes (`f16 d`, `i8 qs[32]`). `out.len()` must be
/// `data.len() / 34 * 32`.
pub fn dequantize_q8_0(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
            *yj = d * f32::from(q as i8);
        }
    }
}

/// Q4_0: blocks of 18 bytes (`f16 d`, `u8 qs[16]`); byte j holds element j in its low
/// nibble and element j+16 in its high nibble, both offset by 8.
pub fn dequantize_q4_0(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        for j in 0..QK / 2 {
            y[j] = d * (i32::from(qs[j] & 0x0f) - 8) as f32;
            y[j + QK / 2] = d * (i32::from(qs[j] >> 4) - 8) as f32;
        }
    }
}

/// Q4_1: blocks of 20 bytes (`f16 d`, `f16 m`, `u8 qs[16]`); nibbles as Q4_0, unsigned,
/// `x = d·q + m`.
pub fn dequantize_q4_1(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        for j in 0..QK / 2 {
            y[j] = f32::from(qs[j] & 0x0f) * d + m;
            y[j + QK / 2] = f32::from(qs[j] >> 4) * d + m;
        }
    }
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8)
/// packed in the 12 scale bytes of a Q4_K/Q5_K super-block.
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: super-blocks of 144 bytes (`f16 d`, `f16 dmin`, `u8 scales[12]`, `u8 qs[128]`).
/// Each 64 elements use 32 bytes of `qs`: the low nibbles are the first 32 elements
/// (sub-block scale/min 2i), the high nibbles the next 32 (sub-block 2i+1);
/// `x = d·sc·q − dmin·m`.
pub fn dequantize_q4_k(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (i, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = get_scale_min_k4(2 * i, scales);
            let (sc2, m2) = get_scale_min_k4(2 * i + 1, scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            for l in 0..32 {
                y[l] = d1 * f32::from(q[l] & 0x0f) - m1;
                y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// Q6_K: super-blocks of 210 bytes (`u8 ql[128]`, `u8 qh[64]`, `i8 scales[16]`,
/// `f16 d`). Each half of 128 elements uses 64 bytes of `ql`, 32 of `qh` and 8 scales;
/// the 6-bit values (offset by 32) are the nibbles of `ql` with two bits of `qh` on
/// top; each scale covers 16 elements; `x = d·scale·q`.
pub fn dequantize_q6_k(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let y = &mut y[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                let s = |k: usize| d * f32::from(sc[is + k] as i8);
                y[l] = s(0) * q1 as f32;
                y[l + 32] = s(2) * q2 as f32;
                y[l + 64] = s(4) * q3 as f32;
                y[l + 96] = s(6) * q4 as f32;
            }
        }
    }
}
