//! CPU semantics of every op against hand-computed values (and, for attention, a naive
//! reference written out here).

use half::{bf16, f16};
use kiln_ops::host::{f32_to_f8e4m3, f8e4m3_to_f32};
use kiln_ops::{
    AttentionAttrs, BinaryOp, Bindings, ConstValues, DType, Dim, F32Bits, HostData, HostTensor, Mask, Op, ReduceOp,
    Shape, Sym, TensorType, UnaryOp,
};

fn f(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(shape, v.to_vec())
}

fn i(shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_i64(shape, v.to_vec())
}

fn b(shape: &[usize], v: &[bool]) -> HostTensor {
    HostTensor::from_bool(shape, v.to_vec())
}

fn syms(pairs: &[(&str, usize)]) -> Bindings {
    pairs.iter().map(|&(s, v)| (Sym::new(s), v)).collect()
}

fn eval(op: Op, ins: &[&HostTensor]) -> HostTensor {
    eval_with(op, ins, &Bindings::new())
}

fn eval_with(op: Op, ins: &[&HostTensor], s: &Bindings) -> HostTensor {
    let mut out = op.eval(ins, s).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn eval_err(op: Op, ins: &[&HostTensor]) -> String {
    op.eval(ins, &Bindings::new()).unwrap_err().to_string()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(ok, "element {k}: got {g}, want {w} (got {got:?}, want {want:?})");
    }
}

#[track_caller]
fn assert_f32(t: &HostTensor, shape: &[usize], want: &[f32]) {
    assert_eq!(t.shape(), shape);
    assert_close(t.as_f32().unwrap_or_else(|| panic!("{} is not f32", t.dtype())), want, 1e-6);
}

// ---- host tensors and casts --------------------------------------------------------------

#[test]
fn host_tensor_construction_checks_lengths() {
    let e = HostTensor::new(vec![2, 3], HostData::F32(vec![0.0; 5])).unwrap_err();
    assert_eq!(e.to_string(), "tensor: f32 storage of length 5 does not fit shape [2, 3] (6 expected)");
    assert!(HostTensor::new(vec![3], HostData::I4(vec![0; 2])).is_ok());
    assert!(HostTensor::new(vec![3], HostData::I4(vec![0; 3])).is_err());
    let z = HostTensor::zeros(DType::BF16, &[2, 2]);
    assert_eq!((z.dtype(), z.numel(), z.to_f32_vec()), (DType::BF16, 4, vec![0.0; 4]));
    assert_eq!(i(&[2], &[3, -4]).to_f32_vec(), vec![3.0, -4.0]);
    assert_eq!(b(&[2], &[true, false]).to_f32_vec(), vec![1.0, 0.0]);
    assert!(f(&[1], &[1.0]).as_i64().is_none());
}

#[test]
fn bf16_and_f16_round_to_nearest_even() {
    let x = f(&[4], &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-7), 2.7]);
    let y = x.cast(DType::BF16);
    assert_eq!(y.dtype(), DType::BF16);
    // Ties go to the even mantissa: 1 + 2^-8 -> 1, 1 + 3·2^-8 -> 1 + 2^-6.
    assert_eq!(y.to_f32_vec(), vec![1.0, 1.015625, 1.0078125, 2.703125]);
    let x = f(&[4], &[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 70000.0, -0.1]);
    let y = x.cast(DType::F16);
    assert_eq!(y.as_slice::<f16>().unwrap()[0], f16::ONE);
    assert_eq!(y.to_f32_vec()[..3], [1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]);
    assert_eq!(y.to_f32_vec()[3], f16::from_f32(-0.1).to_f32());
    assert_eq!(
        HostTensor::from_f32_as(DType::BF16, &[1], vec![3.0]).as_slice::<bf16>().unwrap(),
        &[bf16::from_f32(3.0)]
    );
}

#[test]
fn fp8_e4m3_encoding_by_hand() {
    let cases: [(f32, u8); 14] = [
        (0.0, 0x00),
        (1.0, 0x38),
        (0.5, 0x30),
        (-2.0, 0xc0),
        (448.0, 0x7e),
        (1000.0, 0x7e),
        (f32::NEG_INFINITY, 0xfe),
        (2f32.powi(-9), 0x01),        // smallest subnormal
        (2f32.powi(-10), 0x00),       // tie between 0 and 2^-9: even
        (3.0 * 2f32.powi(-10), 0x02), // tie between 1 and 2 subnormal steps: even
        (1.0625, 0x38),               // 1 + 1/16: tie between mantissa 0 and 1
        (1.1875, 0x3a),               // 1 + 3/16: tie between 1 and 2
        (0.015625, 0x08),             // 2^-6, smallest normal
        (240.0, 0x77),                // 1.875 · 2^7
    ];
    for (x, bits) in cases {
        assert_eq!(f32_to_f8e4m3(x), bits, "encoding {x}");
    }
    assert_eq!(f32_to_f8e4m3(f32::NAN) & 0x7f, 0x7f);
    assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
    assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(f8e4m3_to_f32(0xb8), -1.0);
    assert!(f8e4m3_to_f32(0x7f).is_nan() && f8e4m3_to_f32(0xff).is_nan());
    let t = f(&[3], &[1.0, 500.0, f32::NAN]).cast(DType::F8E4M3);
    assert_eq!(t.data(), &HostData::F8E4M3(vec![0x38, 0x7e, 0x7f]));
    let back = t.cast(DType::F32).to_f32_vec();
    assert_eq!(back[..2], [1.0, 448.0]);
    assert!(back[2].is_nan());
}

#[test]
fn int4_packs_low_nibble_first_and_clamps() {
    let t = i(&[5], &[-8, 7, 3, -1, 5]).cast(DType::I4);
    assert_eq!(t.data(), &HostData::I4(vec![0x78, 0xf3, 0x05]));
    assert_eq!(t.to_f32_vec(), vec![-8.0, 7.0, 3.0, -1.0, 5.0]);
    let c = i(&[4], &[-20, 20, -9, 8]).cast(DType::I4);
    assert_eq!(c.to_f32_vec(), vec![-8.0, 7.0, -8.0, 7.0]);
    let c = f(&[3], &[2.9, -3.9, 100.0]).cast(DType::I4);
    assert_eq!(c.cast(DType::I64).as_i64().unwrap(), &[2, -3, 7]);
}

#[test]
fn casts_between_kinds() {
    let x = f(&[4], &[-1.7, 2.9, f32::NAN, 1e10]);
    assert_eq!(x.cast(DType::I32).data(), &HostData::I32(vec![-1, 2, 0, i32::MAX]));
    assert_eq!(f(&[1], &[-3.0]).cast(DType::U8).data(), &HostData::U8(vec![0]));
    assert_eq!(i(&[2], &[300, -1]).cast(DType::U8).data(), &HostData::U8(vec![44, 255]));
    assert_eq!(f(&[3], &[0.0, -0.5, f32::NAN]).cast(DType::Bool).data(), &HostData::Bool(vec![false, true, true]));
    assert_eq!(b(&[2], &[true, false]).cast(DType::F32).to_f32_vec(), vec![1.0, 0.0]);
    // Through the op: f32 -> bf16 rounds; the storage is bf16.
    let y = eval(Op::Cast(DType::BF16), &[&f(&[1], &[1.0 + 3.0 * 2f32.powi(-8)])]);
    assert_eq!(y.data(), &HostData::BF16(vec![bf16::from_f32(1.015625)]));
    let y = eval(Op::Cast(DType::I64), &[&f(&[2], &[-2.5, 2.5])]);
    assert_eq!(y.as_i64().unwrap(), &[-2, 2]);
}

// ---- elementwise ---------------------------------------------------------------------------

#[test]
fn every_unary_op() {
    let pi = std::f32::consts::PI;
    let cases: [(UnaryOp, f32, f32); 11] = [
        (UnaryOp::Neg, 1.5, -1.5),
        (UnaryOp::Abs, -2.0, 2.0),
        (UnaryOp::Exp, 1.0, std::f32::consts::E),
        (UnaryOp::Log, std::f32::consts::E, 1.0),
        (UnaryOp::Sqrt, 4.0, 2.0),
        (UnaryOp::Rsqrt, 4.0, 0.5),
        (UnaryOp::Recip, 4.0, 0.25),
        (UnaryOp::Sin, pi / 2.0, 1.0),
        (UnaryOp::Cos, 0.0, 1.0),
        (UnaryOp::Tanh, 0.5, 0.462_117_16),
        (UnaryOp::Erf, 0.5, 0.520_499_9),
    ];
    for (op, x, want) in cases {
        let y = eval(Op::Unary(op), &[&f(&[1], &[x])]);
        assert_close(y.as_f32().unwrap(), &[want], 1e-6);
    }
    let y = eval(Op::Unary(UnaryOp::Erf), &[&f(&[5], &[0.0, 0.1, -1.5, 2.0, 4.0])]);
    assert_close(y.as_f32().unwrap(), &[0.0, 0.112_462_92, -0.966_105_15, 0.995_322_3, 0.999_999_98], 2e-7);
    let y = eval(Op::Unary(UnaryOp::Not), &[&b(&[2], &[true, false])]);
    assert_eq!(y.data(), &HostData::Bool(vec![false, true]));
    let y = eval(Op::Unary(UnaryOp::Neg), &[&i(&[2], &[3, -4])]);
    assert_eq!(y.as_i64().unwrap(), &[-3, 4]);
    let y = eval(Op::Unary(UnaryOp::Abs), &[&HostTensor::from_vec(&[2], vec![-3i32, 4])]);
    assert_eq!(y.data(), &HostData::I32(vec![3, 4]));
    // bf16 storage: computed in f32, rounded to bf16.
    let y = eval(Op::Unary(UnaryOp::Exp), &[&f(&[1], &[1.0]).cast(DType::BF16)]);
    assert_eq!(y.data(), &HostData::BF16(vec![bf16::from_f32(2.71875)]));
    assert_eq!(eval_err(Op::Unary(UnaryOp::Exp), &[&i(&[1], &[1])]), "exp: not defined for i64");
    assert_eq!(eval_err(Op::Unary(UnaryOp::Not), &[&f(&[1], &[1.0])]), "not: not defined for f32");
}

#[test]
fn every_binary_op_on_floats() {
    let a = f(&[4], &[1.0, -2.0, 3.0, 2.0]);
    let c = f(&[4], &[2.0, 4.0, 3.0, 0.5]);
    let run = |op| eval(Op::Binary(op), &[&a, &c]);
    assert_f32(&run(BinaryOp::Add), &[4], &[3.0, 2.0, 6.0, 2.5]);
    assert_f32(&run(BinaryOp::Sub), &[4], &[-1.0, -6.0, 0.0, 1.5]);
    assert_f32(&run(BinaryOp::Mul), &[4], &[2.0, -8.0, 9.0, 1.0]);
    assert_f32(&run(BinaryOp::Div), &[4], &[0.5, -0.5, 1.0, 4.0]);
    assert_f32(&run(BinaryOp::Max), &[4], &[2.0, 4.0, 3.0, 2.0]);
    assert_f32(&run(BinaryOp::Min), &[4], &[1.0, -2.0, 3.0, 0.5]);
    assert_f32(&run(BinaryOp::Pow), &[4], &[1.0, 16.0, 27.0, std::f32::consts::SQRT_2]);
    assert_eq!(run(BinaryOp::Lt).data(), &HostData::Bool(vec![true, true, false, false]));
    assert_eq!(run(BinaryOp::Eq).data(), &HostData::Bool(vec![false, false, true, false]));
    // NaN propagates through max/min in either position.
    let n = f(&[2], &[f32::NAN, 1.0]);
    let m = f(&[2], &[5.0, f32::NAN]);
    for op in [BinaryOp::Max, BinaryOp::Min] {
        let y = eval(Op::Binary(op), &[&n, &m]).to_f32_vec();
        assert!(y[0].is_nan() && y[1].is_nan(), "{op:?}: {y:?}");
    }
}

#[test]
fn binary_ops_on_ints_and_bools() {
    let a = i(&[4], &[7, -7, 7, -7]);
    let c = i(&[4], &[2, 2, -2, -2]);
    let run = |op| eval(Op::Binary(op), &[&a, &c]);
    assert_eq!(run(BinaryOp::Div).as_i64().unwrap(), &[3, -3, -3, 3]); // truncates
    assert_eq!(run(BinaryOp::Add).as_i64().unwrap(), &[9, -5, 5, -9]);
    assert_eq!(run(BinaryOp::Sub).as_i64().unwrap(), &[5, -9, 9, -5]);
    assert_eq!(run(BinaryOp::Mul).as_i64().unwrap(), &[14, -14, -14, 14]);
    assert_eq!(run(BinaryOp::Max).as_i64().unwrap(), &[7, 2, 7, -2]);
    assert_eq!(run(BinaryOp::Min).as_i64().unwrap(), &[2, -7, -2, -7]);
    assert_eq!(run(BinaryOp::Lt).data(), &HostData::Bool(vec![false, true, false, true]));
    assert_eq!(eval_err(Op::Binary(BinaryOp::Div), &[&a, &i(&[4], &[1, 0, 1, 1])]), "div: integer division by zero");
    let p = b(&[4], &[true, true, false, false]);
    let q = b(&[4], &[true, false, true, false]);
    assert_eq!(eval(Op::Binary(BinaryOp::And), &[&p, &q]).data(), &HostData::Bool(vec![true, false, false, false]));
    assert_eq!(eval(Op::Binary(BinaryOp::Eq), &[&p, &q]).data(), &HostData::Bool(vec![true, false, false, true]));
    assert_eq!(eval_err(Op::Binary(BinaryOp::Add), &[&a, &f(&[4], &[0.0; 4])]), "add: dtypes differ: i64 vs f32");
    assert_eq!(
        eval_err(Op::Binary(BinaryOp::Add), &[&f(&[2], &[0.0; 2]), &f(&[3], &[0.0; 3])]),
        "add: shapes differ: [2] vs [3]"
    );
}

#[test]
fn select_picks_by_condition() {
    let c = b(&[2, 2], &[true, false, false, true]);
    let y = eval(Op::Select, &[&c, &f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]), &f(&[2, 2], &[-1.0, -2.0, -3.0, -4.0])]);
    assert_f32(&y, &[2, 2], &[1.0, -2.0, -3.0, 4.0]);
    let y = eval(Op::Select, &[&c, &i(&[2, 2], &[1, 2, 3, 4]), &i(&[2, 2], &[0; 4])]);
    assert_eq!(y.as_i64().unwrap(), &[1, 0, 0, 4]);
    let e = eval_err(Op::Select, &[&f(&[1], &[1.0]), &f(&[1], &[1.0]), &f(&[1], &[1.0])]);
    assert_eq!(e, "select: condition must be bool, got f32");
}

// ---- reductions ----------------------------------------------------------------------------

fn reduce(op: ReduceOp, axes: &[usize], keep_dims: bool) -> Op {
    Op::Reduce { op, axes: axes.iter().copied().collect(), keep_dims }
}

#[test]
fn reductions_over_axes_with_and_without_keep_dims() {
    // [2, 2, 3]: x[a][b][c] = 6a + 3b + c
    let x = f(&[2, 2, 3], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
    assert_f32(&eval(reduce(ReduceOp::Sum, &[2], false), &[&x]), &[2, 2], &[3.0, 12.0, 21.0, 30.0]);
    assert_f32(&eval(reduce(ReduceOp::Sum, &[2], true), &[&x]), &[2, 2, 1], &[3.0, 12.0, 21.0, 30.0]);
    assert_f32(&eval(reduce(ReduceOp::Mean, &[1], true), &[&x]), &[2, 1, 3], &[1.5, 2.5, 3.5, 7.5, 8.5, 9.5]);
    assert_f32(&eval(reduce(ReduceOp::Max, &[0], false), &[&x]), &[2, 3], &[6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    // Non-adjacent axes.
    assert_f32(&eval(reduce(ReduceOp::Sum, &[0, 2], false), &[&x]), &[2], &[24.0, 42.0]);
    assert_f32(&eval(reduce(ReduceOp::Mean, &[2, 0], true), &[&x]), &[1, 2, 1], &[4.0, 7.0]);
    assert_f32(&eval(reduce(ReduceOp::Max, &[0, 1, 2], false), &[&x]), &[], &[11.0]);
    let nan = f(&[3], &[1.0, f32::NAN, 2.0]);
    assert!(eval(reduce(ReduceOp::Max, &[0], false), &[&nan]).to_f32_vec()[0].is_nan());
    let xi = i(&[2, 3], &[1, 2, 4, -1, -2, -4]);
    assert_eq!(eval(reduce(ReduceOp::Sum, &[1], false), &[&xi]).as_i64().unwrap(), &[7, -7]);
    assert_eq!(eval(reduce(ReduceOp::Mean, &[1], false), &[&xi]).as_i64().unwrap(), &[2, -2]);
    assert_eq!(eval(reduce(ReduceOp::Max, &[0], false), &[&xi]).as_i64().unwrap(), &[1, 2, 4]);
    // bf16: the mean is computed in f32 then rounded.
    let xb = f(&[3], &[1.0, 1.0, 1.0078125]).cast(DType::BF16);
    assert_eq!(eval(reduce(ReduceOp::Mean, &[0], false), &[&xb]).to_f32_vec(), vec![1.0]);
}

#[test]
fn argmax_takes_the_first_maximum() {
    let x = f(&[2, 4], &[1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0]);
    assert_eq!(eval(Op::ArgMax { axis: 1 }, &[&x]).as_i64().unwrap(), &[1, 0]);
    assert_eq!(eval(Op::ArgMax { axis: 0 }, &[&x]).as_i64().unwrap(), &[1, 1, 1, 0]);
    assert_eq!(eval(Op::ArgMax { axis: 0 }, &[&i(&[3], &[-1, 9, 9])]).as_i64().unwrap(), &[1]);
}

#[test]
fn topk_sorts_descending_with_ties_by_index() {
    let x = f(&[5], &[1.0, 3.0, 2.0, 3.0, 0.0]);
    let out = Op::TopK { k: 3, axis: 0 }.eval(&[&x], &Bindings::new()).unwrap();
    assert_f32(&out[0], &[3], &[3.0, 3.0, 2.0]);
    assert_eq!(out[1].as_i64().unwrap(), &[1, 3, 2]);
    let out = Op::TopK { k: 5, axis: 0 }.eval(&[&x], &Bindings::new()).unwrap();
    assert_eq!(out[1].as_i64().unwrap(), &[1, 3, 2, 0, 4]);
    // Along axis 0 of [3, 2].
    let x = f(&[3, 2], &[1.0, 6.0, 4.0, 5.0, 4.0, 7.0]);
    let out = Op::TopK { k: 2, axis: 0 }.eval(&[&x], &Bindings::new()).unwrap();
    assert_f32(&out[0], &[2, 2], &[4.0, 7.0, 4.0, 6.0]);
    assert_eq!(out[1].as_i64().unwrap(), &[1, 2, 2, 0]);
    let e = Op::TopK { k: 4, axis: 0 }.eval(&[&x], &Bindings::new()).unwrap_err();
    assert_eq!(e.to_string(), "topk: k = 4 must be in 1..=3 (axis 0 of [3, 2])");
}

// ---- movement ------------------------------------------------------------------------------

#[test]
fn reshape_to_symbolic_shape() {
    let x = f(&[6], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let op = Op::Reshape(Shape::new([Dim::sym("seq"), Dim::fixed(2)]));
    let y = eval_with(op.clone(), &[&x], &syms(&[("seq", 3)]));
    assert_f32(&y, &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let e = op.eval(&[&x], &syms(&[("seq", 4)])).unwrap_err();
    assert_eq!(e.to_string(), "reshape: cannot reshape [6] (6 elements) to [4, 2] (8 elements)");
    let e = op.eval(&[&x], &Bindings::new()).unwrap_err();
    assert_eq!(e.to_string(), "reshape: symbol `seq` has no value");
}

#[test]
fn permute_moves_axes() {
    let x = f(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_f32(&eval(Op::Permute([1, 0].into_iter().collect()), &[&x]), &[3, 2], &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    // [2, 2, 3] -> perm [2, 0, 1]: y[c][a][b] = x[a][b][c] = 6a + 3b + c
    let x = f(&[2, 2, 3], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
    let y = eval(Op::Permute([2, 0, 1].into_iter().collect()), &[&x]);
    let want: Vec<f32> =
        (0..3).flat_map(|c| (0..2).flat_map(move |a| (0..2).map(move |b| (6 * a + 3 * b + c) as f32))).collect();
    assert_f32(&y, &[3, 2, 2], &want);
    let e = eval_err(Op::Permute([0, 0].into_iter().collect()), &[&f(&[1, 1], &[0.0])]);
    assert_eq!(e, "permute: [0, 0] is not a permutation of 0..2");
}

#[test]
fn slice_with_symbolic_bounds() {
    // [2, 5]: x[r][c] = 10r + c
    let x = f(&[2, 5], &[0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0, 14.0]);
    let past = Dim::sym("past");
    let end = &past + &Dim::sym("seq");
    let op = Op::Slice { axis: 1, start: past, end };
    let y = eval_with(op.clone(), &[&x], &syms(&[("past", 1), ("seq", 3)]));
    assert_f32(&y, &[2, 3], &[1.0, 2.0, 3.0, 11.0, 12.0, 13.0]);
    let y = eval_with(op.clone(), &[&x], &syms(&[("past", 2), ("seq", 0)]));
    assert_eq!(y.shape(), &[2, 0]);
    let e = op.eval(&[&x], &syms(&[("past", 3), ("seq", 3)])).unwrap_err();
    assert_eq!(e.to_string(), "slice: range 3..6 (`past..past + seq`) is invalid for axis 1 of size 5");
    let y = eval(Op::Slice { axis: 0, start: Dim::fixed(1), end: Dim::fixed(2) }, &[&x]);
    assert_f32(&y, &[1, 5], &[10.0, 11.0, 12.0, 13.0, 14.0]);
}

#[test]
fn concat_including_empty_parts() {
    let a = f(&[2, 1], &[1.0, 2.0]);
    let c = f(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    assert_f32(&eval(Op::Concat { axis: 1 }, &[&a, &c]), &[2, 3], &[1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
    assert_f32(&eval(Op::Concat { axis: 0 }, &[&c, &c]), &[4, 2], &[3.0, 4.0, 5.0, 6.0, 3.0, 4.0, 5.0, 6.0]);
    // An empty KV cache (`past = 0`) followed by the new keys.
    let empty = f(&[1, 0, 2], &[]);
    let new = f(&[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_f32(&eval(Op::Concat { axis: 1 }, &[&empty, &new]), &[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(eval(Op::Concat { axis: 1 }, &[&empty, &empty]).shape(), &[1, 0, 2]);
    let e = eval_err(Op::Concat { axis: 1 }, &[&a, &f(&[3, 1], &[0.0; 3])]);
    assert_eq!(e, "concat: shapes differ: [2, 1] vs [3, 1]");
}

#[test]
fn expand_broadcasts() {
    let x = f(&[3], &[1.0, 2.0, 3.0]);
    assert_f32(&eval(Op::Expand(Shape::fixed(&[2, 3])), &[&x]), &[2, 3], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let col = f(&[2, 1], &[1.0, 2.0]);
    assert_f32(&eval(Op::Expand(Shape::fixed(&[2, 3])), &[&col]), &[2, 3], &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    let s = f(&[], &[7.0]);
    let op = Op::Expand(Shape::new([Dim::sym("seq"), Dim::fixed(2)]));
    assert_f32(&eval_with(op, &[&s], &syms(&[("seq", 2)])), &[2, 2], &[7.0; 4]);
    let mid = f(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = eval(Op::Expand(Shape::fixed(&[2, 2, 2])), &[&mid]);
    assert_f32(&y, &[2, 2, 2], &[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
    let e = eval_err(Op::Expand(Shape::fixed(&[4])), &[&x]);
    assert_eq!(e, "expand: cannot expand [3] to [4]: dim 0 is 3");
}

#[test]
fn gather_rows_and_checks_indices() {
    let table = f(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let ids = i(&[2, 2], &[2, 0, 1, 2]);
    let y = eval(Op::Gather { axis: 0 }, &[&table, &ids]);
    assert_f32(&y, &[2, 2, 2], &[20.0, 21.0, 0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let y = eval(Op::Gather { axis: 1 }, &[&table, &HostTensor::from_vec(&[3], vec![1i32, 1, 0])]);
    assert_f32(&y, &[3, 3], &[1.0, 1.0, 0.0, 11.0, 11.0, 10.0, 21.0, 21.0, 20.0]);
    let e = eval_err(Op::Gather { axis: 0 }, &[&table, &i(&[1], &[3])]);
    assert_eq!(e, "gather: index 3 out of range for axis 0 of size 3");
    let e = eval_err(Op::Gather { axis: 0 }, &[&table, &i(&[1], &[-1])]);
    assert_eq!(e, "gather: index -1 out of range for axis 0 of size 3");
}

// ---- sources -------------------------------------------------------------------------------

#[test]
fn constants_and_arange() {
    let ty = TensorType::new(DType::BF16, Shape::fixed(&[2]));
    let c = Op::Constant {
        ty,
        values: ConstValues::Float(vec![F32Bits::new(1.0 + 3.0 * 2f32.powi(-8)), F32Bits::new(2.0)]),
    };
    let y = eval(c, &[]);
    assert_eq!(y.to_f32_vec(), vec![1.015625, 2.0]);
    assert_eq!(y.dtype(), DType::BF16);
    let ty = TensorType::new(DType::F32, Shape::fixed(&[2, 2]));
    assert_f32(
        &eval(Op::Constant { ty, values: ConstValues::Float(vec![F32Bits::new(0.5)]) }, &[]),
        &[2, 2],
        &[0.5; 4],
    );
    let ty = TensorType::new(DType::I32, Shape::fixed(&[3]));
    assert_eq!(
        eval(Op::Constant { ty, values: ConstValues::Int(vec![1, -2, 3]) }, &[]).data(),
        &HostData::I32(vec![1, -2, 3])
    );
    let ty = TensorType::new(DType::Bool, Shape::fixed(&[2]));
    assert_eq!(
        eval(Op::Constant { ty, values: ConstValues::Int(vec![0, 5]) }, &[]).data(),
        &HostData::Bool(vec![false, true])
    );
    let op = Op::Arange { start: Dim::sym("past"), len: Dim::sym("seq") };
    let y = eval_with(op, &[], &syms(&[("past", 4), ("seq", 3)]));
    assert_eq!((y.shape(), y.as_i64().unwrap()), (&[3usize][..], &[4i64, 5, 6][..]));
    let err = Op::Input { name: "x".into(), ty: TensorType::new(DType::F32, Shape::fixed(&[1])) }
        .eval(&[], &Bindings::new())
        .unwrap_err();
    assert_eq!(err.to_string(), "input: input `x` takes its value from the feeds");
}

// ---- matmul --------------------------------------------------------------------------------

fn transpose2(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    (0..c).flat_map(|j| (0..r).map(move |i| x[i * c + j])).collect()
}

#[test]
fn matmul_every_transpose_combination() {
    // A [2, 3], B [3, 2]; A·B = [[4, 5], [10, 11]] ... computed by hand below.
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let bm = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    // row 0: [1+3, 2+3] = [4, 5]; row 1: [4+6, 5+6] = [10, 11]
    let want = [4.0, 5.0, 10.0, 11.0];
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let at = if ta { f(&[3, 2], &transpose2(&a, 2, 3)) } else { f(&[2, 3], &a) };
        let bt = if tb { f(&[2, 3], &transpose2(&bm, 3, 2)) } else { f(&[3, 2], &bm) };
        let y = eval(Op::MatMul { transpose_a: ta, transpose_b: tb }, &[&at, &bt]);
        assert_f32(&y, &[2, 2], &want);
    }
    let e = eval_err(Op::MatMul { transpose_a: false, transpose_b: false }, &[&f(&[2, 3], &a), &f(&[2, 3], &a)]);
    assert_eq!(e, "matmul: contraction dims differ: 3 vs 2 ([2, 3], [2, 3])");
}

#[test]
fn matmul_batched_with_shared_and_batched_b() {
    // a [2, 1, 2]: batch 0 = [1, 2], batch 1 = [3, 4]
    let a = f(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    // shared b [2, 2] = [[1, 10], [100, 1000]]
    let w = f(&[2, 2], &[1.0, 10.0, 100.0, 1000.0]);
    let y = eval(Op::MatMul { transpose_a: false, transpose_b: false }, &[&a, &w]);
    assert_f32(&y, &[2, 1, 2], &[201.0, 2010.0, 403.0, 4030.0]);
    // batched b [2, 2, 1]: batch 0 = [1, 1]^T, batch 1 = [1, -1]^T
    let bb = f(&[2, 2, 1], &[1.0, 1.0, 1.0, -1.0]);
    let y = eval(Op::MatMul { transpose_a: false, transpose_b: false }, &[&a, &bb]);
    assert_f32(&y, &[2, 1, 1], &[3.0, -1.0]);
    // k = 0 gives zeros; bf16 results are rounded.
    let y = eval(Op::MatMul { transpose_a: false, transpose_b: false }, &[&f(&[2, 0], &[]), &f(&[0, 3], &[])]);
    assert_f32(&y, &[2, 3], &[0.0; 6]);
    let xb = f(&[1, 2], &[1.0, 1.0]).cast(DType::BF16);
    let wb = f(&[2, 1], &[1.0, 0.0078125]).cast(DType::BF16);
    let y = eval(Op::MatMul { transpose_a: false, transpose_b: false }, &[&xb, &wb]);
    assert_eq!(y.data(), &HostData::BF16(vec![bf16::from_f32(1.0078125)]));
    let y = eval(
        Op::MatMul { transpose_a: false, transpose_b: false },
        &[&xb, &f(&[2, 1], &[1.0, 0.00390625]).cast(DType::BF16)],
    );
    assert_eq!(y.to_f32_vec(), vec![1.0]); // 1 + 2^-8 rounds to even
}

// ---- attention -----------------------------------------------------------------------------

/// Straightforward attention: explicit loops, exp without max subtraction, f64.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, s, h, d): (usize, usize, usize, usize),
    (t, kh, dv): (usize, usize, usize),
    mask: Mask,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; b * s * h * dv];
    for bi in 0..b {
        for i in 0..s {
            for hi in 0..h {
                let kvh = hi / (h / kh);
                let pos = t - s + i;
                let allowed = |j: usize| match mask {
                    Mask::None => true,
                    Mask::Causal => j <= pos,
                    Mask::SlidingWindow(w) => j <= pos && pos - j < w as usize,
                };
                let mut w = vec![0f64; t];
                let mut total = 0f64;
                for (j, wj) in w.iter_mut().enumerate() {
                    if allowed(j) {
                        let mut dot = 0f64;
                        for x in 0..d {
                            dot +=
                                q[((bi * s + i) * h + hi) * d + x] as f64 * k[((bi * t + j) * kh + kvh) * d + x] as f64;
                        }
                        *wj = (dot * scale as f64).exp();
                        total += *wj;
                    }
                }
                for x in 0..dv {
                    let mut acc = 0f64;
                    for (j, wj) in w.iter().enumerate() {
                        acc += wj / total * v[((bi * t + j) * kh + kvh) * dv + x] as f64;
                    }
                    out[((bi * s + i) * h + hi) * dv + x] = acc as f32;
                }
            }
        }
    }
    out
}

fn pseudo(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn attention(mask: Mask, scale: f32) -> Op {
    Op::Attention(AttentionAttrs { mask, scale: F32Bits::new(scale) })
}

#[test]
fn attention_by_hand() {
    // One query at position 1 over two keys, d = 1: scores [0, ln 2] -> weights [1/3, 2/3].
    let q = f(&[1, 1, 1, 1], &[1.0]);
    let k = f(&[1, 2, 1, 1], &[0.0, std::f32::consts::LN_2]);
    let v = f(&[1, 2, 1, 1], &[3.0, 6.0]);
    assert_f32(&eval(attention(Mask::Causal, 1.0), &[&q, &k, &v]), &[1, 1, 1, 1], &[5.0]);
    // A window of 1 sees only its own key.
    assert_f32(&eval(attention(Mask::SlidingWindow(1), 1.0), &[&q, &k, &v]), &[1, 1, 1, 1], &[6.0]);
    // Two queries, causal, no past: query 0 sees key 0 only.
    let q2 = f(&[1, 2, 1, 1], &[1.0, 1.0]);
    assert_f32(&eval(attention(Mask::Causal, 1.0), &[&q2, &k, &v]), &[1, 2, 1, 1], &[3.0, 5.0]);
    let e = eval_err(attention(Mask::Causal, 1.0), &[&f(&[1, 3, 1, 1], &[0.0; 3]), &k, &v]);
    assert_eq!(e, "attention: 2 keys are fewer than 3 queries");
}

#[test]
fn attention_matches_naive_reference() {
    // (b, s, h, d), (t, kh, dv), mask: causal with past, sliding window, GQA, MQA, none.
    let cases = [
        ((2, 3, 4, 8), (5, 2, 6), Mask::Causal),
        ((1, 4, 6, 4), (7, 3, 4), Mask::SlidingWindow(3)),
        ((1, 1, 4, 8), (9, 1, 8), Mask::Causal),
        ((2, 5, 2, 4), (5, 2, 3), Mask::None),
        ((1, 6, 3, 4), (6, 3, 4), Mask::SlidingWindow(2)),
        ((1, 64, 8, 32), (96, 2, 32), Mask::Causal), // big enough to run in parallel
    ];
    for (n, ((b, s, h, d), (t, kh, dv), mask)) in cases.into_iter().enumerate() {
        let q = pseudo(b * s * h * d, 3 * n as u32 + 1);
        let k = pseudo(b * t * kh * d, 3 * n as u32 + 2);
        let v = pseudo(b * t * kh * dv, 3 * n as u32 + 3);
        let scale = 1.0 / (d as f32).sqrt();
        let want = naive_attention(&q, &k, &v, (b, s, h, d), (t, kh, dv), mask, scale);
        let y = eval(attention(mask, scale), &[&f(&[b, s, h, d], &q), &f(&[b, t, kh, d], &k), &f(&[b, t, kh, dv], &v)]);
        assert_eq!(y.shape(), &[b, s, h, dv], "case {n}");
        assert_close(y.as_f32().unwrap(), &want, 1e-5);
    }
}
