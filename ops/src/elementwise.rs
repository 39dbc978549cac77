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

// ---- CPU semantics (compute-form tensors; see `host`) ----------------------------------

use crate::host::{cast_compute, dispatch, Element, HostData, HostTensor};
use crate::EvalError;
use rayon::prelude::*;

/// Elementwise loops at least this long run on the rayon pool.
const PAR_MIN: usize = 1 << 15;

fn map1<T: Element, U: Element>(x: &[T], f: impl Fn(T) -> U + Sync + Send) -> Vec<U> {
    if x.len() >= PAR_MIN {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

fn map2<T: Element, U: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> U + Sync + Send) -> Vec<U> {
    if a.len() >= PAR_MIN {
        a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect()
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}

fn check_same_shape(op: &str, a: &HostTensor, b: &HostTensor) -> Result<(), EvalError> {
    if a.shape() != b.shape() {
        return Err(EvalError::new(op, format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

fn not_defined(op: &str, d: DType) -> EvalError {
    EvalError::new(op, format!("not defined for {d}"))
}

/// The error function, accurate to about 1e-7 (Taylor series near 0, the Numerical
/// Recipes `erfc` rational approximation elsewhere), evaluated in f64.
pub fn erf(x: f32) -> f32 {
    let x = x as f64;
    let z = x.abs();
    if z < 0.5 {
        // 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = x * x;
        let (mut term, mut sum) = (x, x);
        for n in 1..12 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        return (sum * std::f64::consts::FRAC_2_SQRT_PI) as f32;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    (if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }) as f32
}

fn unary_f32(op: UnaryOp) -> Option<fn(f32) -> f32> {
    Some(match op {
        UnaryOp::Neg => |x: f32| -x,
        UnaryOp::Abs => f32::abs,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Log => f32::ln,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Rsqrt => |x: f32| 1.0 / x.sqrt(),
        UnaryOp::Recip => |x: f32| 1.0 / x,
        UnaryOp::Sin => f32::sin,
        UnaryOp::Cos => f32::cos,
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::Erf => erf,
        UnaryOp::Not => return None,
    })
}

pub(crate) fn eval_unary(op: UnaryOp, x: &HostTensor) -> Result<HostTensor, EvalError> {
    let name = op.name();
    macro_rules! int {
        ($v:expr) => {
            match op {
                UnaryOp::Neg => map1($v, |x| x.wrapping_neg()),
                UnaryOp::Abs => map1($v, |x| x.wrapping_abs()),
                _ => return Err(not_defined(name, x.dtype())),
            }
        };
    }
    let data = match x.data() {
        HostData::F32(v) => HostData::F32(map1(v, unary_f32(op).ok_or_else(|| not_defined(name, x.dtype()))?)),
        HostData::I64(v) => HostData::I64(int!(v)),
        HostData::I32(v) => HostData::I32(int!(v)),
        HostData::I8(v) => HostData::I8(int!(v)),
        HostData::Bool(v) if op == UnaryOp::Not => HostData::Bool(map1(v, |b| !b)),
        _ => return Err(not_defined(name, x.dtype())),
    };
    HostTensor::new(x.shape().to_vec(), data)
}

/// `max`/`min` that propagate NaN (like `torch.maximum`).
pub(crate) fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

pub(crate) fn eval_binary(op: BinaryOp, a: &HostTensor, b: &HostTensor) -> Result<HostTensor, EvalError> {
    let name = op.name();
    check_same_shape(name, a, b)?;
    if a.dtype() != b.dtype() {
        return Err(EvalError::new(name, format!("dtypes differ: {} vs {}", a.dtype(), b.dtype())));
    }
    macro_rules! int {
        ($x:expr, $var:ident, $t:ty) => {{
            let (x, y): (&[$t], &[$t]) = ($x, <$t as Element>::slice(b.data()).expect("same dtype"));
            match op {
                BinaryOp::Add => HostData::$var(map2(x, y, |p, q| p.wrapping_add(q))),
                BinaryOp::Sub => HostData::$var(map2(x, y, |p, q| p.wrapping_sub(q))),
                BinaryOp::Mul => HostData::$var(map2(x, y, |p, q| p.wrapping_mul(q))),
                BinaryOp::Div => {
                    if y.contains(&0) {
                        return Err(EvalError::new(name, "integer division by zero"));
                    }
                    HostData::$var(map2(x, y, |p, q| p.wrapping_div(q)))
                }
                BinaryOp::Max => HostData::$var(map2(x, y, |p, q| p.max(q))),
                BinaryOp::Min => HostData::$var(map2(x, y, |p, q| p.min(q))),
                BinaryOp::Lt => HostData::Bool(map2(x, y, |p, q| p < q)),
                BinaryOp::Eq => HostData::Bool(map2(x, y, |p, q| p == q)),
                BinaryOp::Pow | BinaryOp::And => return Err(not_defined(name, a.dtype())),
            }
        }};
    }
    let data = match a.data() {
        HostData::F32(x) => {
            let y = b.as_f32().expect("same dtype");
            match op {
                BinaryOp::Add => HostData::F32(map2(x, y, |p, q| p + q)),
                BinaryOp::Sub => HostData::F32(map2(x, y, |p, q| p - q)),
                BinaryOp::Mul => HostData::F32(map2(x, y, |p, q| p * q)),
                BinaryOp::Div => HostData::F32(map2(x, y, |p, q| p / q)),
                BinaryOp::Max => HostData::F32(map2(x, y, fmax)),
                BinaryOp::Min => HostData::F32(map2(x, y, fmin)),
                BinaryOp::Pow => HostData::F32(map2(x, y, f32::powf)),
                BinaryOp::Lt => HostData::Bool(map2(x, y, |p, q| p < q)),
                BinaryOp::Eq => HostData::Bool(map2(x, y, |p, q| p == q)),
                BinaryOp::And => return Err(not_defined(name, a.dtype())),
            }
        }
        HostData::I64(x) => int!(x, I64, i64),
        HostData::I32(x) => int!(x, I32, i32),
        HostData::I8(x) => int!(x, I8, i8),
        HostData::U8(x) => int!(x, U8, u8),
        HostData::Bool(x) => {
            let y = b.as_slice::<bool>().expect("same dtype");
            match op {
                BinaryOp::And => HostData::Bool(map2(x, y, |p, q| p && q)),
                BinaryOp::Eq => HostData::Bool(map2(x, y, |p, q| p == q)),
                _ => return Err(not_defined(name, a.dtype())),
            }
        }
        _ => return Err(not_defined(name, a.dtype())),
    };
    HostTensor::new(a.shape().to_vec(), data)
}

pub(crate) fn eval_select(c: &HostTensor, a: &HostTensor, b: &HostTensor) -> Result<HostTensor, EvalError> {
    check_same_shape("select", c, a)?;
    check_same_shape("select", a, b)?;
    let cond = c
        .as_slice::<bool>()
        .ok_or_else(|| EvalError::new("select", format!("condition must be bool, got {}", c.dtype())))?;
    if a.dtype() != b.dtype() {
        return Err(EvalError::new("select", format!("dtypes differ: {} vs {}", a.dtype(), b.dtype())));
    }
    let data = dispatch!(a.data(), "select", T => {
        let x = T::slice(a.data()).expect("dispatched");
        let y = T::slice(b.data()).expect("same dtype");
        Ok(T::wrap(cond.iter().zip(x.iter().zip(y)).map(|(&c, (&p, &q))| if c { p } else { q }).collect()))
    })?;
    HostTensor::new(a.shape().to_vec(), data)
}

pub(crate) fn eval_cast(x: &HostTensor, to: DType) -> HostTensor {
    cast_compute(x, to)
}
