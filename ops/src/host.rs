//! Host tensors: a shape plus typed storage, the values the CPU semantics of every op are
//! defined on.
//!
//! **Compute form.** Float storage types (f16, bf16, fp8) compute in f32, and packed int4
//! computes as i8. The *compute form* of a tensor holds f16/bf16/f8e4m3 values as `F32`
//! storage and i4 values as `I8` storage, each value exactly representable in the tensor's
//! declared (logical) dtype. [`crate::Op::eval_compute`] works on compute-form tensors
//! and rounds float results to the logical output dtype, so a bf16 graph behaves like
//! bf16 storage with f32 math without converting at every op; [`crate::Op::eval`] wraps
//! it for tensors in their real storage.

use crate::{DType, EvalError};
use half::{bf16, f16};
use std::borrow::Cow;

/// Typed element storage. `I4` packs two signed 4-bit values per byte, low nibble first
/// (an odd count leaves the last high nibble zero).
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Raw fp8 e4m3 (`fn` variant: no infinities, `0x7f`/`0xff` are NaN, max ±448).
    F8E4M3(Vec<u8>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
    I4(Vec<u8>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
            HostData::F8E4M3(_) => DType::F8E4M3,
            HostData::I64(_) => DType::I64,
            HostData::I32(_) => DType::I32,
            HostData::I8(_) => DType::I8,
            HostData::U8(_) => DType::U8,
            HostData::Bool(_) => DType::Bool,
            HostData::I4(_) => DType::I4,
        }
    }

    /// Length of the storage vector (bytes for the packed i4).
    pub fn storage_len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F8E4M3(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::I8(v) => v.len(),
            HostData::U8(v) => v.len(),
            HostData::Bool(v) => v.len(),
            HostData::I4(v) => v.len(),
        }
    }

    /// Zero-filled storage for `n` elements.
    pub fn zeros(dtype: DType, n: usize) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(vec![0.0; n]),
            DType::F16 => HostData::F16(vec![f16::ZERO; n]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
            DType::F8E4M3 => HostData::F8E4M3(vec![0; n]),
            DType::I64 => HostData::I64(vec![0; n]),
            DType::I32 => HostData::I32(vec![0; n]),
            DType::I8 => HostData::I8(vec![0; n]),
            DType::U8 => HostData::U8(vec![0; n]),
            DType::Bool => HostData::Bool(vec![false; n]),
            DType::I4 => HostData::I4(vec![0; n.div_ceil(2)]),
        }
    }
}

/// An element type with its own storage variant (every dtype but fp8 and i4, which are
/// stored as bytes).
pub trait Element: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn slice(d: &HostData) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> HostData;
}

macro_rules! element {
    ($t:ty, $var:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$var;
            fn slice(d: &HostData) -> Option<&[Self]> {
                match d {
                    HostData::$var(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> HostData {
                HostData::$var(v)
            }
        }
    };
}
element!(f32, F32);
element!(f16, F16);
element!(bf16, BF16);
element!(i64, I64);
element!(i32, I32);
element!(i8, I8);
element!(u8, U8);
element!(bool, Bool);

/// Runs `$body` with `$T` aliased to the element type of `$data`'s variant; fp8 and i4
/// (byte-packed) storage yield an error (convert to the compute form first).
macro_rules! dispatch {
    ($data:expr, $op:expr, $T:ident => $body:expr) => {
        match $data {
            $crate::host::HostData::F32(_) => {
                type $T = f32;
                $body
            }
            $crate::host::HostData::F16(_) => {
                type $T = half::f16;
                $body
            }
            $crate::host::HostData::BF16(_) => {
                type $T = half::bf16;
                $body
            }
            $crate::host::HostData::I64(_) => {
                type $T = i64;
                $body
            }
            $crate::host::HostData::I32(_) => {
                type $T = i32;
                $body
            }
            $crate::host::HostData::I8(_) => {
                type $T = i8;
                $body
            }
            $crate::host::HostData::U8(_) => {
                type $T = u8;
                $body
            }
            $crate::host::HostData::Bool(_) => {
                type $T = bool;
                $body
            }
            other => Err($crate::EvalError::new(
                $op,
                format!("{} storage must be converted to its compute form first", other.dtype()),
            )),
        }
    };
}
pub(crate) use dispatch;

/// A tensor in host memory: a fixed shape and typed storage (row-major, contiguous).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: HostData,
}

/// The storage dtype a tensor of dtype `d` computes in: f32 for the float types, i8 for
/// i4, `d` itself otherwise.
pub const fn compute_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 | DType::F8E4M3 => DType::F32,
        DType::I4 => DType::I8,
        other => other,
    }
}

impl HostTensor {
    /// A tensor from shape and storage; errors if the storage length does not match the
    /// shape (for i4: `ceil(numel / 2)` bytes).
    pub fn new(shape: Vec<usize>, data: HostData) -> Result<HostTensor, EvalError> {
        let n: usize = shape.iter().product();
        let want = if data.dtype() == DType::I4 { n.div_ceil(2) } else { n };
        if data.storage_len() != want {
            return Err(EvalError::new(
                "tensor",
                format!(
                    "{} storage of length {} does not fit shape {shape:?} ({want} expected)",
                    data.dtype(),
                    data.storage_len()
                ),
            ));
        }
        Ok(HostTensor { shape, data })
    }

    /// A tensor from a vector of any [`Element`] type. Panics if the length does not match.
    pub fn from_vec<T: Element>(shape: &[usize], v: Vec<T>) -> HostTensor {
        match HostTensor::new(shape.to_vec(), T::wrap(v)) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// An f32 tensor. Panics if `v.len()` is not the product of `shape`.
    pub fn from_f32(shape: &[usize], v: Vec<f32>) -> HostTensor {
        HostTensor::from_vec(shape, v)
    }

    /// An i64 tensor. Panics if `v.len()` is not the product of `shape`.
    pub fn from_i64(shape: &[usize], v: Vec<i64>) -> HostTensor {
        HostTensor::from_vec(shape, v)
    }

    /// A bool tensor. Panics if `v.len()` is not the product of `shape`.
    pub fn from_bool(shape: &[usize], v: Vec<bool>) -> HostTensor {
        HostTensor::from_vec(shape, v)
    }

    /// A tensor of `dtype` holding `values` (given as f32) rounded/converted as by
    /// [`HostTensor::cast`]. Panics if the length does not match.
    pub fn from_f32_as(dtype: DType, shape: &[usize], values: Vec<f32>) -> HostTensor {
        HostTensor::from_f32(shape, values).cast(dtype)
    }

    pub fn zeros(dtype: DType, shape: &[usize]) -> HostTensor {
        let n = shape.iter().product();
        HostTensor { shape: shape.to_vec(), data: HostData::zeros(dtype, n) }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn data(&self) -> &HostData {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut HostData {
        &mut self.data
    }

    pub fn into_parts(self) -> (Vec<usize>, HostData) {
        (self.shape, self.data)
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        f32::slice(&self.data)
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        i64::slice(&self.data)
    }

    /// The elements, if the storage is of type `T`.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::slice(&self.data)
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<HostTensor, EvalError> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(EvalError::new(
                "reshape",
                format!("cannot reshape {:?} ({} elements) to {shape:?} ({n} elements)", self.shape, self.numel()),
            ));
        }
        Ok(HostTensor { shape, data: self.data })
    }

    /// Every element as f32 (bool as 0/1, integers converted with `as`).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::F8E4M3(v) => v.iter().map(|&x| f8e4m3_to_f32(x)).collect(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
            HostData::I4(v) => unpack_i4(v, self.numel()).into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Every element as i64 (floats truncated toward zero, saturating, NaN as 0).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            HostData::I64(v) => v.clone(),
            HostData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::I8(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::I4(v) => unpack_i4(v, self.numel()).into_iter().map(|x| x as i64).collect(),
            _ => self.to_f32_vec().into_iter().map(|x| x as i64).collect(),
        }
    }

    /// Converts to another dtype. Floats round to nearest even (f16, bf16, fp8 e4m3; fp8
    /// saturates to ±448 and keeps NaN); float → int truncates toward zero and saturates
    /// (NaN → 0); int → int wraps, except → i4, which clamps to [-8, 7]; → bool tests
    /// `!= 0`; bool → number gives 0/1.
    pub fn cast(&self, to: DType) -> HostTensor {
        let c = self.to_compute();
        let out = cast_compute(&c, to);
        out.from_compute(to).expect("cast_compute yields the compute form of `to`")
    }

    /// This tensor in its compute form (borrowed when it already is).
    pub fn to_compute(&self) -> Cow<'_, HostTensor> {
        let data = match &self.data {
            HostData::F16(_) | HostData::BF16(_) | HostData::F8E4M3(_) => HostData::F32(self.to_f32_vec()),
            HostData::I4(v) => HostData::I8(unpack_i4(v, self.numel())),
            _ => return Cow::Borrowed(self),
        };
        Cow::Owned(HostTensor { shape: self.shape.clone(), data })
    }

    /// This tensor in its compute form.
    pub fn into_compute(self) -> HostTensor {
        match self.to_compute() {
            Cow::Owned(t) => t,
            Cow::Borrowed(_) => self,
        }
    }

    /// Converts a compute-form tensor to the storage of its logical dtype `dtype`
    /// (f32 → f16/bf16/fp8 rounding to nearest even, i8 → packed i4 clamping).
    pub fn from_compute(self, dtype: DType) -> Result<HostTensor, EvalError> {
        if self.dtype() == dtype {
            return Ok(self);
        }
        if self.dtype() != compute_dtype(dtype) {
            return Err(EvalError::new(
                "tensor",
                format!("{} storage is not the compute form of {dtype}", self.dtype()),
            ));
        }
        let n = self.numel();
        let data = match (self.data, dtype) {
            (HostData::F32(v), DType::F16) => HostData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            (HostData::F32(v), DType::BF16) => HostData::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            (HostData::F32(v), DType::F8E4M3) => HostData::F8E4M3(v.iter().map(|&x| f32_to_f8e4m3(x)).collect()),
            (HostData::I8(v), DType::I4) => HostData::I4(pack_i4(&v, n)),
            _ => unreachable!("compute_dtype covers every pair"),
        };
        Ok(HostTensor { shape: self.shape, data })
    }
}

/// Rounds f32 values in place to the nearest value of the float dtype `logical`.
pub fn round_f32_to(v: &mut [f32], logical: DType) {
    match logical {
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        DType::F8E4M3 => v.iter_mut().for_each(|x| *x = f8e4m3_to_f32(f32_to_f8e4m3(*x))),
        _ => {}
    }
}

/// Brings a compute-form result to its logical dtype's value set: float rounding, and
/// 4-bit two's-complement wrapping for i4 held as i8.
pub(crate) fn finish(t: &mut HostTensor, logical: DType) {
    match (&mut t.data, logical) {
        (HostData::F32(v), DType::F16 | DType::BF16 | DType::F8E4M3) => round_f32_to(v, logical),
        (HostData::I8(v), DType::I4) => v.iter_mut().for_each(|x| *x = (*x << 4) >> 4),
        _ => {}
    }
}

/// Casts a compute-form tensor to the compute form of `to`, values in `to`'s value set.
pub(crate) fn cast_compute(x: &HostTensor, to: DType) -> HostTensor {
    let shape = x.shape.clone();
    let data = match (compute_dtype(to), &x.data) {
        (DType::F32, HostData::F32(v)) => {
            let mut v = v.clone();
            round_f32_to(&mut v, to);
            HostData::F32(v)
        }
        (DType::F32, _) => {
            let mut v = x.to_f32_vec();
            round_f32_to(&mut v, to);
            HostData::F32(v)
        }
        (DType::Bool, HostData::Bool(v)) => HostData::Bool(v.clone()),
        (DType::Bool, HostData::F32(v)) => HostData::Bool(v.iter().map(|&x| x != 0.0).collect()),
        (DType::Bool, _) => HostData::Bool(x.to_i64_vec().into_iter().map(|x| x != 0).collect()),
        (DType::I8, _) if to == DType::I4 => {
            let v: Vec<i64> = match &x.data {
                HostData::F32(v) => v.iter().map(|&f| f as i64).collect(),
                _ => x.to_i64_vec(),
            };
            HostData::I8(v.into_iter().map(|x| x.clamp(-8, 7) as i8).collect())
        }
        (d, HostData::F32(v)) => float_to_int(v, d),
        (d, _) => {
            let v = x.to_i64_vec();
            match d {
                DType::I64 => HostData::I64(v),
                DType::I32 => HostData::I32(v.into_iter().map(|x| x as i32).collect()),
                DType::I8 => HostData::I8(v.into_iter().map(|x| x as i8).collect()),
                DType::U8 => HostData::U8(v.into_iter().map(|x| x as u8).collect()),
                _ => unreachable!("every compute dtype is handled"),
            }
        }
    };
    HostTensor { shape, data }
}

fn float_to_int(v: &[f32], d: DType) -> HostData {
    match d {
        DType::I64 => HostData::I64(v.iter().map(|&x| x as i64).collect()),
        DType::I32 => HostData::I32(v.iter().map(|&x| x as i32).collect()),
        DType::I8 => HostData::I8(v.iter().map(|&x| x as i8).collect()),
        DType::U8 => HostData::U8(v.iter().map(|&x| x as u8).collect()),
        _ => unreachable!("integer compute dtypes only"),
    }
}

/// fp8 e4m3 (`fn`: bias 7, no infinities, NaN = `s.1111.111`, max ±448) from f32,
/// rounding to nearest even and saturating to ±448 (infinities included); NaN → NaN.
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    if a < 0.015625 {
        // Subnormal range (below 2^-6): multiples of 2^-9. A rounding up to 8·2^-9 is
        // the smallest normal, whose encoding is 0x08 as well.
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127; // -6..=8
    let frac = a / f32::from_bits(((e + 127) as u32) << 23) - 1.0; // [0, 1)
    let mut m = (frac * 8.0).round_ties_even() as i32;
    let mut e = e;
    if m == 8 {
        m = 0;
        e += 1;
    }
    sign | (((e + 7) as u8) << 3) | m as u8
}

/// f32 from fp8 e4m3 bits.
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    if b & 0x7f == 0x7f {
        return f32::NAN * sign;
    }
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    let mag = if e == 0 { m / 512.0 } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
    sign * mag
}

/// Packs i8 values (clamped to [-8, 7]) two per byte, low nibble first.
pub fn pack_i4(v: &[i8], n: usize) -> Vec<u8> {
    let nib = |i: usize| -> u8 { v.get(i).map_or(0, |&x| (x.clamp(-8, 7) as u8) & 0xf) };
    (0..n.div_ceil(2)).map(|b| nib(2 * b) | (nib(2 * b + 1) << 4)).collect()
}

/// Unpacks `n` signed 4-bit values, low nibble first.
pub fn unpack_i4(bytes: &[u8], n: usize) -> Vec<i8> {
    (0..n)
        .map(|i| {
            let b = bytes[i / 2];
            let nib = if i % 2 == 0 { b << 4 } else { b & 0xf0 };
            (nib as i8) >> 4
        })
        .collect()
}
