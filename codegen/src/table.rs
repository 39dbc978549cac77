//! The per-op table: C storage and compute types of each dtype, and the C expression of
//! every elementwise op (`UnaryOp`, `BinaryOp`, `Select`, `Cast`) in terms of its operands
//! `a`, `b`, `c` held in their compute types. This is the one place that maps ops to C.

use kiln_ops::{BinaryOp, DType, UnaryOp};

/// The C type a dtype is stored as on the device, or `None` if the GPU backend does not
/// handle it yet (fp8, packed int4).
pub fn storage_type(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "float",
        DType::F16 => "kiln_f16",
        DType::BF16 => "kiln_bf16",
        DType::I64 => "i64",
        DType::I32 => "int",
        DType::I8 => "signed char",
        DType::U8 => "unsigned char",
        DType::Bool => "bool",
        DType::F8E4M3 | DType::I4 => return None,
    })
}

/// The C type values of `d` are computed in: f32 for every float, `int` for 8-bit
/// integers (results wrap when stored), the type itself otherwise.
pub fn compute_type(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 | DType::F16 | DType::BF16 => "float",
        DType::I64 => "i64",
        DType::I32 | DType::I8 | DType::U8 => "int",
        DType::Bool => "bool",
        DType::F8E4M3 | DType::I4 => return None,
    })
}

/// An unsigned C type of the same size as `d`'s elements, for raw copies.
pub fn word_type(d: DType) -> Option<&'static str> {
    Some(match d.bits() {
        8 => "unsigned char",
        16 => "unsigned short",
        32 => "unsigned int",
        64 => "unsigned long long",
        _ => return None,
    })
}

/// `op(a)` for an operand of dtype `d`, or `None` where the op is not defined for `d`
/// (mirrors the op's dtype rule).
pub fn unary_expr(op: UnaryOp, d: DType) -> Option<String> {
    let float = d.is_float();
    let signed_int = matches!(d, DType::I64 | DType::I32 | DType::I8);
    let s = match op {
        UnaryOp::Neg if float || signed_int => "-a",
        UnaryOp::Abs if float => "fabsf(a)",
        UnaryOp::Abs if signed_int => "(a < 0 ? -a : a)",
        UnaryOp::Exp if float => "expf(a)",
        UnaryOp::Log if float => "logf(a)",
        UnaryOp::Sqrt if float => "sqrtf(a)",
        UnaryOp::Rsqrt if float => "1.0f / sqrtf(a)",
        UnaryOp::Recip if float => "1.0f / a",
        UnaryOp::Sin if float => "sinf(a)",
        UnaryOp::Cos if float => "cosf(a)",
        UnaryOp::Tanh if float => "tanhf(a)",
        UnaryOp::Erf if float => "erff(a)",
        UnaryOp::Not if d == DType::Bool => "!a",
        _ => return None,
    };
    Some(s.to_string())
}

/// `a op b` for operands of dtype `d` (the result is bool for comparisons).
pub fn binary_expr(op: BinaryOp, d: DType) -> Option<String> {
    let float = d.is_float();
    let num = d != DType::Bool && storage_type(d).is_some();
    let s = match op {
        BinaryOp::Add if num => "a + b",
        BinaryOp::Sub if num => "a - b",
        BinaryOp::Mul if num => "a * b",
        BinaryOp::Div if num => "a / b",
        BinaryOp::Max if float => "kiln_fmax(a, b)",
        BinaryOp::Min if float => "kiln_fmin(a, b)",
        BinaryOp::Max if num => "(a > b ? a : b)",
        BinaryOp::Min if num => "(a < b ? a : b)",
        BinaryOp::Pow if float => "powf(a, b)",
        BinaryOp::Lt if num => "a < b",
        BinaryOp::Eq if storage_type(d).is_some() => "a == b",
        BinaryOp::And if d == DType::Bool => "a && b",
        _ => return None,
    };
    Some(s.to_string())
}

/// `select(c, a, b)`: the condition is the first operand.
pub fn select_expr() -> String {
    "a ? b : c".to_string()
}

/// Converts `a` (compute type of `from`) to the compute type of `to` with the CPU
/// semantics of `cast`: float → int truncates and saturates (NaN → 0), int → int wraps,
/// → bool tests `!= 0`, bool → number gives 0/1. Float rounding happens at the store.
pub fn cast_expr(from: DType, to: DType) -> Option<String> {
    compute_type(from)?;
    compute_type(to)?;
    let s = match (from, to) {
        (f, t) if f == t => "a",
        (_, DType::Bool) if from.is_float() => "a != 0.0f",
        (_, DType::Bool) => "a != 0",
        (DType::Bool, t) if t.is_float() => "(a ? 1.0f : 0.0f)",
        (DType::Bool, DType::I64) => "(i64)a",
        (DType::Bool, _) => "(int)a",
        (f, t) if f.is_float() && t.is_float() => "a",
        (f, DType::I64) if f.is_float() => "kiln_f2i64(a)",
        (f, DType::I32) if f.is_float() => "kiln_f2i32(a)",
        (f, DType::I8) if f.is_float() => "kiln_f2i8(a)",
        (f, DType::U8) if f.is_float() => "kiln_f2u8(a)",
        (_, t) if t.is_float() => "(float)a",
        (_, DType::I64) => "(i64)a",
        (_, DType::I32) => "(int)a",
        (_, DType::I8) => "(int)(signed char)a",
        (_, DType::U8) => "(int)(unsigned char)a",
        _ => return None,
    };
    Some(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ops::{Op, Shape, TensorType};

    /// The table covers exactly the (op, dtype) pairs the op set's dtype rules accept
    /// (among the dtypes the GPU stores).
    #[test]
    fn table_matches_the_dtype_rules() {
        let gpu_dtypes: Vec<DType> = DType::ALL.into_iter().filter(|d| storage_type(*d).is_some()).collect();
        let t = |d| TensorType::new(d, Shape::fixed(&[2]));
        for &d in &gpu_dtypes {
            for u in UnaryOp::ALL {
                let rule = Op::Unary(u).infer(&[t(d)]).is_ok();
                assert_eq!(unary_expr(u, d).is_some(), rule, "{} on {d}", u.name());
            }
            for b in BinaryOp::ALL {
                let rule = Op::Binary(b).infer(&[t(d), t(d)]).is_ok();
                assert_eq!(binary_expr(b, d).is_some(), rule, "{} on {d}", b.name());
            }
            for &to in &gpu_dtypes {
                assert!(cast_expr(d, to).is_some(), "cast {d} -> {to}");
            }
        }
    }
}
