//! The CUDA executor against the CPU reference executor: every op on random inputs,
//! a traced transformer block with a KV cache (prefill, then decode), and the kernel
//! disk cache. Each test starts with [`gpu`], which prints `skipping: <reason>` and
//! returns when no GPU and CUDA libraries are usable, so `cargo test` passes anywhere.
//!
//! Lines starting with `kiln-check` / `kiln-time` are collected by `tools/gpu/run.sh`.

use indexmap::IndexMap;
use kiln_codegen::kernels;
use kiln_graph::ops::{BinaryOp, DType, Dim, HostTensor, Mask, Op, ReduceOp, Shape, UnaryOp};
use kiln_graph::{Graph, Tensor, TensorExt, Tracer};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::cuda::{CudaExecutor, CudaOptions, DeviceInfo};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU to test on, or `None` after printing why the test is skipped.
fn gpu() -> Option<DeviceInfo> {
    match CudaExecutor::available() {
        Ok(info) => {
            println!("device: {info}");
            Some(info)
        }
        Err(reason) => {
            println!("skipping: {reason}");
            None
        }
    }
}

fn opts() -> CudaOptions {
    CudaOptions { poison: true, ..CudaOptions::default() }
}

type Map = IndexMap<String, HostTensor>;

fn map(items: Vec<(&str, HostTensor)>) -> Map {
    items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Random values of `dtype`: floats uniform in `[lo, hi)`, integers in their range
/// (i64/i32 in ±1000 so products do not overflow silly), bools fair.
fn rand_tensor(r: &mut ChaCha8Rng, dtype: DType, shape: &[usize], lo: f32, hi: f32) -> HostTensor {
    let n: usize = shape.iter().product();
    match dtype {
        d if d.is_float() => HostTensor::from_f32_as(d, shape, (0..n).map(|_| r.random_range(lo..hi)).collect()),
        DType::I64 => HostTensor::from_i64(shape, (0..n).map(|_| r.random_range(-1000..1000)).collect()),
        DType::I32 => HostTensor::from_vec(shape, (0..n).map(|_| r.random_range(-1000i32..1000)).collect()),
        DType::I8 => HostTensor::from_vec(shape, (0..n).map(|_| r.random_range(-128i32..128) as i8).collect()),
        DType::U8 => HostTensor::from_vec(shape, (0..n).map(|_| r.random_range(0u32..256) as u8).collect()),
        DType::Bool => HostTensor::from_bool(shape, (0..n).map(|_| r.random_bool(0.5)).collect()),
        d => panic!("no random {d}"),
    }
}

/// Elementwise tolerance: `|got - want| <= atol + rtol·|want|`, NaN only where NaN.
#[derive(Clone, Copy, Debug)]
struct Tol {
    rtol: f64,
    atol: f64,
}

const EXACT: Tol = Tol { rtol: 0.0, atol: 0.0 };
const F32: Tol = Tol { rtol: 1e-5, atol: 1e-6 };
const BF16: Tol = Tol { rtol: 8e-3, atol: 1e-5 };
const F16: Tol = Tol { rtol: 1e-3, atol: 1e-5 };

fn float_tol(d: DType) -> Tol {
    match d {
        DType::F32 => F32,
        DType::BF16 => BF16,
        DType::F16 => F16,
        _ => EXACT,
    }
}

/// Compares one output; prints a `kiln-check` line; panics with the first bad element.
#[track_caller]
fn compare(test: &str, name: &str, got: &HostTensor, want: &HostTensor, tol: Tol) {
    assert_eq!(got.dtype(), want.dtype(), "{test}/{name}: dtype");
    assert_eq!(got.shape(), want.shape(), "{test}/{name}: shape");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if a.is_nan() || b.is_nan() {
            assert!(a.is_nan() && b.is_nan(), "{test}/{name}: element {i}: got {a}, want {b}");
            continue;
        }
        if a == b {
            continue;
        }
        let d = (a as f64 - b as f64).abs();
        max_abs = max_abs.max(d);
        max_rel = max_rel.max(d / (b as f64).abs().max(1e-30));
        assert!(
            d <= tol.atol + tol.rtol * (b as f64).abs(),
            "{test}/{name} ({}{:?}): element {i}: got {a}, want {b} (tol {tol:?})",
            got.dtype(),
            got.shape()
        );
    }
    println!(
        "kiln-check\t{test}\t{name}\t{}\t{:?}\tmax_abs={max_abs:.3e}\tmax_rel={max_rel:.3e}\trtol={:.0e}\tatol={:.0e}",
        got.dtype(),
        got.shape(),
        tol.rtol,
        tol.atol
    );
}

/// ‖got − want‖ / ‖want‖ over all elements.
fn rel_l2(got: &HostTensor, want: &HostTensor) -> f64 {
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let num: f64 = g.iter().zip(&w).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Runs `graph` on both executors and compares every output with `tol(output dtype)`.
fn check(test: &str, graph: Graph, weights: Map, feeds: &Map, tol: impl Fn(&str, DType) -> Tol) -> Map {
    let cpu = CpuExecutor::new(graph.clone(), weights.clone()).unwrap();
    let gpu = CudaExecutor::with_options(graph, weights, opts()).unwrap_or_else(|e| panic!("{test}: {e}"));
    let want = cpu.run(feeds).unwrap();
    let got = gpu.run(feeds).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, w) in &want {
        compare(test, name, &got[name], w, tol(name, w.dtype()));
    }
    got
}

// ---- elementwise ------------------------------------------------------------------------------

#[test]
fn unary_ops_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(1);
    let shape = [7usize, 33];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let tr = Tracer::new();
        let x = tr.input("x", dt, Shape::fixed(&shape)).unwrap();
        let pos = tr.input("pos", dt, Shape::fixed(&shape)).unwrap();
        for u in UnaryOp::ALL {
            if u == UnaryOp::Not {
                continue;
            }
            let src = if matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip) { pos } else { x };
            tr.output(u.name(), src.unary(u).unwrap()).unwrap();
        }
        let feeds = map(vec![
            ("x", rand_tensor(&mut r, dt, &shape, -3.0, 3.0)),
            ("pos", rand_tensor(&mut r, dt, &shape, 0.05, 4.0)),
        ]);
        check(&format!("unary_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, d| float_tol(d));
    }
    for dt in [DType::I64, DType::I32, DType::I8] {
        let tr = Tracer::new();
        let x = tr.input("x", dt, Shape::fixed(&shape)).unwrap();
        tr.output("neg", x.neg().unwrap()).unwrap();
        tr.output("abs", x.unary(UnaryOp::Abs).unwrap()).unwrap();
        let feeds = map(vec![("x", rand_tensor(&mut r, dt, &shape, 0.0, 0.0))]);
        check(&format!("unary_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
    }
    let tr = Tracer::new();
    let x = tr.input("x", DType::Bool, Shape::fixed(&shape)).unwrap();
    tr.output("not", x.unary(UnaryOp::Not).unwrap()).unwrap();
    let feeds = map(vec![("x", rand_tensor(&mut r, DType::Bool, &shape, 0.0, 0.0))]);
    check("unary_bool", tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
}

#[test]
fn binary_ops_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(2);
    let shape = [5usize, 3, 29];
    for dt in [DType::F32, DType::BF16, DType::F16, DType::I64, DType::I32, DType::I8, DType::U8, DType::Bool] {
        let tr = Tracer::new();
        let a = tr.input("a", dt, Shape::fixed(&shape)).unwrap();
        let b = tr.input("b", dt, Shape::fixed(&shape)).unwrap();
        let nz = tr.input("nonzero", dt, Shape::fixed(&shape)).unwrap();
        let mut any = false;
        for op in BinaryOp::ALL {
            if kiln_codegen::table::binary_expr(op, dt).is_none() {
                continue;
            }
            let rhs = if op == BinaryOp::Div || op == BinaryOp::Pow { nz } else { b };
            let lhs = if op == BinaryOp::Pow { nz } else { a };
            tr.output(op.name(), lhs.binary(op, rhs).unwrap()).unwrap();
            any = true;
        }
        assert!(any);
        let nonzero = match dt {
            d if d.is_float() => rand_tensor(&mut r, dt, &shape, 0.1, 3.0),
            DType::Bool => rand_tensor(&mut r, dt, &shape, 0.0, 0.0),
            _ => {
                let t = rand_tensor(&mut r, dt, &shape, 0.0, 0.0);
                let v: Vec<f32> = t.to_f32_vec().into_iter().map(|x| if x == 0.0 { 3.0 } else { x }).collect();
                HostTensor::from_f32(&shape, v).cast(dt)
            }
        };
        let mut a_vals = rand_tensor(&mut r, dt, &shape, -3.0, 3.0);
        let b_vals = rand_tensor(&mut r, dt, &shape, -3.0, 3.0);
        if dt.is_float() {
            // Some equal pairs, so `eq`, `max` and `min` see ties.
            let mut av = a_vals.to_f32_vec();
            let bv = b_vals.to_f32_vec();
            for i in (0..av.len()).step_by(7) {
                av[i] = bv[i];
            }
            a_vals = HostTensor::from_f32_as(dt, &shape, av);
        }
        let feeds = map(vec![("a", a_vals), ("b", b_vals), ("nonzero", nonzero)]);
        check(&format!("binary_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, d| float_tol(d));
    }
}

#[test]
fn select_and_cast_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(3);
    let shape = [4usize, 40];
    for dt in [DType::F32, DType::BF16, DType::I64, DType::U8, DType::Bool] {
        let tr = Tracer::new();
        let c = tr.input("c", DType::Bool, Shape::fixed(&shape)).unwrap();
        let a = tr.input("a", dt, Shape::fixed(&shape)).unwrap();
        let b = tr.input("b", dt, Shape::fixed(&shape)).unwrap();
        tr.output("select", c.select(a, b).unwrap()).unwrap();
        let feeds = map(vec![
            ("c", rand_tensor(&mut r, DType::Bool, &shape, 0.0, 0.0)),
            ("a", rand_tensor(&mut r, dt, &shape, -3.0, 3.0)),
            ("b", rand_tensor(&mut r, dt, &shape, -3.0, 3.0)),
        ]);
        check(&format!("select_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
    }
    // Every cast pair, from inputs with saturating, fractional and special values.
    let all = [DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I8, DType::U8, DType::Bool];
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 1e10, -1e10, 300.0];
    for from in all {
        let tr = Tracer::new();
        let x = tr.input("x", from, Shape::fixed(&shape)).unwrap();
        for to in all {
            if to != from {
                tr.output(&format!("to_{to}"), x.cast(to).unwrap()).unwrap();
            }
        }
        let x = if from.is_float() {
            let mut v = rand_tensor(&mut r, DType::F32, &shape, -400.0, 400.0).to_f32_vec();
            v[..specials.len()].copy_from_slice(&specials);
            HostTensor::from_f32_as(from, &shape, v)
        } else {
            rand_tensor(&mut r, from, &shape, 0.0, 0.0)
        };
        check(&format!("cast_from_{from}"), tr.finish().unwrap(), Map::new(), &map(vec![("x", x)]), |_, _| EXACT);
    }
}

// ---- reductions -------------------------------------------------------------------------------

#[test]
fn reductions_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(4);
    let shape = [4usize, 5, 37];
    let axes_sets: [&[isize]; 5] = [&[2], &[1], &[0, 2], &[0, 1, 2], &[2, 0]];
    for dt in [DType::F32, DType::BF16, DType::I64, DType::I32, DType::I8] {
        let tr = Tracer::new();
        let x = tr.input("x", dt, Shape::fixed(&shape)).unwrap();
        for op in ReduceOp::ALL {
            for axes in axes_sets {
                for keep in [false, true] {
                    let name = format!("{}{axes:?}{}", op.name(), if keep { "_keep" } else { "" });
                    tr.output(&name, x.reduce(op, axes, keep).unwrap()).unwrap();
                }
            }
        }
        let feeds = map(vec![("x", rand_tensor(&mut r, dt, &shape, -2.0, 2.0))]);
        let tol = match dt {
            DType::F32 => Tol { rtol: 1e-5, atol: 2e-5 },
            DType::BF16 => Tol { rtol: 1e-2, atol: 2e-2 },
            _ => EXACT,
        };
        check(&format!("reduce_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, _| tol);
    }
    // Long rows (a vocabulary-sized softmax): max, sum and mean over 5000 elements.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("rows"), Dim::fixed(5000)]).unwrap();
    tr.output("max", x.max(&[-1], true).unwrap()).unwrap();
    tr.output("sum", x.sum(&[-1], false).unwrap()).unwrap();
    tr.output("softmax", x.softmax(-1).unwrap()).unwrap();
    let feeds = map(vec![("x", rand_tensor(&mut r, DType::F32, &[3, 5000], -5.0, 5.0))]);
    check("reduce_long_rows", tr.finish().unwrap(), Map::new(), &feeds, |_, _| Tol { rtol: 1e-4, atol: 1e-6 });
}

#[test]
fn argmax_and_topk_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(5);
    for dt in [DType::F32, DType::BF16, DType::I64, DType::I32] {
        let shape = [6usize, 50];
        let tr = Tracer::new();
        let x = tr.input("x", dt, Shape::fixed(&shape)).unwrap();
        tr.output("argmax1", x.argmax(1).unwrap()).unwrap();
        tr.output("argmax0", x.argmax(0).unwrap()).unwrap();
        for (k, axis) in [(1usize, 1isize), (5, 1), (50, 1), (3, 0)] {
            let (v, i) = x.top_k(k, axis).unwrap();
            tr.output(&format!("top{k}_axis{axis}_values"), v).unwrap();
            tr.output(&format!("top{k}_axis{axis}_indices"), i).unwrap();
        }
        // Coarse values so ties are common: the lower index must win.
        let mut v: Vec<f32> = (0..300).map(|_| (r.random_range(-10i32..10)) as f32 * 0.5).collect();
        if dt.is_float() {
            v[7] = f32::NAN;
            v[60] = f32::NAN;
            v[61] = f32::NAN;
        }
        let x = HostTensor::from_f32(&shape, v).cast(dt);
        check(&format!("argmax_topk_{dt}"), tr.finish().unwrap(), Map::new(), &map(vec![("x", x)]), |_, _| EXACT);
    }
    // A long row (sampling over a vocabulary).
    let tr = Tracer::new();
    let x = tr.input("logits", DType::F32, [Dim::sym("batch"), Dim::fixed(32000)]).unwrap();
    let (v, i) = x.top_k(40, -1).unwrap();
    tr.output("values", v).unwrap();
    tr.output("indices", i).unwrap();
    tr.output("best", x.argmax(-1).unwrap()).unwrap();
    let feeds = map(vec![("logits", rand_tensor(&mut r, DType::F32, &[2, 32000], -8.0, 8.0))]);
    check("topk_vocab", tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
}

// ---- movement ---------------------------------------------------------------------------------

#[test]
fn movement_ops_match_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(6);
    let (seq, past) = (Dim::sym("seq"), Dim::sym("past"));
    for dt in [DType::F32, DType::BF16, DType::I64, DType::Bool, DType::U8] {
        let tr = Tracer::new();
        let x = tr.input("x", dt, [seq.clone(), Dim::fixed(6), Dim::fixed(4)]).unwrap();
        let cache = tr.input("cache", dt, [past.clone(), Dim::fixed(6), Dim::fixed(4)]).unwrap();
        let row = tr.input("row", dt, [Dim::fixed(1), Dim::fixed(6), Dim::fixed(1)]).unwrap();
        let ids = tr.input("ids", DType::I64, [Dim::fixed(2), Dim::fixed(3)]).unwrap();
        let ids32 = tr.input("ids32", DType::I32, [Dim::fixed(5)]).unwrap();
        tr.output("reshape", x.reshape([seq.clone(), Dim::fixed(24)]).unwrap()).unwrap();
        tr.output("permute", x.permute(&[2, 0, 1]).unwrap()).unwrap();
        tr.output(
            "transpose_reshape",
            x.transpose(0, 1).unwrap().reshape([Dim::fixed(6), &seq * &Dim::fixed(4)]).unwrap(),
        )
        .unwrap();
        tr.output("slice", x.slice(1, 2, 5).unwrap()).unwrap();
        let all = cache.concat(&[x], 0).unwrap();
        tr.output("concat", all).unwrap();
        tr.output(
            "concat3",
            x.concat(&[x, x.slice(2, 1, 3).unwrap().concat(&[x.slice(2, 0, 2).unwrap()], 2).unwrap()], 1).unwrap(),
        )
        .unwrap();
        tr.output("slice_symbolic", all.slice(0, past.clone(), &past + &seq).unwrap()).unwrap();
        tr.output("expand", row.broadcast_to(&Shape::new([Dim::fixed(3), Dim::fixed(6), Dim::fixed(5)])).unwrap())
            .unwrap();
        tr.output(
            "expand_rank",
            row.broadcast_to(&Shape::new([Dim::fixed(2), Dim::fixed(4), Dim::fixed(6), Dim::fixed(3)])).unwrap(),
        )
        .unwrap();
        tr.output("gather0", all.gather(ids, 0).unwrap()).unwrap();
        tr.output("gather1", x.gather(ids32, 1).unwrap()).unwrap();
        let ar = tr.apply(Op::Arange { start: past.clone(), len: seq.clone() }, &[]).unwrap()[0];
        tr.output("arange", ar).unwrap();
        tr.output("passthrough", x).unwrap();
        let feeds = map(vec![
            ("x", rand_tensor(&mut r, dt, &[3, 6, 4], -3.0, 3.0)),
            ("cache", rand_tensor(&mut r, dt, &[5, 6, 4], -3.0, 3.0)),
            ("row", rand_tensor(&mut r, dt, &[1, 6, 1], -3.0, 3.0)),
            ("ids", HostTensor::from_i64(&[2, 3], vec![0, 7, 3, 3, 1, 6])),
            ("ids32", HostTensor::from_vec(&[5], vec![5i32, 0, 2, 2, 4])),
        ]);
        check(&format!("movement_{dt}"), tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
    }
    // Empty KV cache (past = 0) and constants.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq.clone(), Dim::fixed(2)]).unwrap();
    let cache = tr.input("cache", DType::F32, [past.clone(), Dim::fixed(2)]).unwrap();
    tr.output("concat", cache.concat(&[x], 0).unwrap()).unwrap();
    tr.output("plus_const", x.add_scalar(2.5).unwrap().mul_scalar(-1.0).unwrap()).unwrap();
    let feeds = map(vec![
        ("x", rand_tensor(&mut r, DType::F32, &[4, 2], -3.0, 3.0)),
        ("cache", HostTensor::from_f32(&[0, 2], vec![])),
    ]);
    check("movement_empty_cache", tr.finish().unwrap(), Map::new(), &feeds, |_, _| EXACT);
}

// ---- matmul -----------------------------------------------------------------------------------

#[test]
fn matmul_matches_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(7);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for (batch, m, n, k) in [(3usize, 17usize, 23usize, 31usize), (1, 1, 300, 64), (2, 64, 1, 257), (2, 3, 4, 0)] {
            let tr = Tracer::new();
            let mut feeds = Map::new();
            for ta in [false, true] {
                for tb in [false, true] {
                    for shared in [false, true] {
                        let a_shape: Vec<usize> = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
                        let b_mat: Vec<usize> = if tb { vec![n, k] } else { vec![k, n] };
                        let b_shape: Vec<usize> =
                            if shared { b_mat } else { [batch].into_iter().chain(b_mat).collect() };
                        let tag = format!("{}{}{}", ta as u8, tb as u8, if shared { "s" } else { "b" });
                        let a = tr.input(&format!("a{tag}"), dt, Shape::fixed(&a_shape)).unwrap();
                        let b = tr.input(&format!("b{tag}"), dt, Shape::fixed(&b_shape)).unwrap();
                        tr.output(&format!("c{tag}"), a.matmul_t(b, ta, tb).unwrap()).unwrap();
                        feeds.insert(format!("a{tag}"), rand_tensor(&mut r, dt, &a_shape, -1.0, 1.0));
                        feeds.insert(format!("b{tag}"), rand_tensor(&mut r, dt, &b_shape, -1.0, 1.0));
                    }
                }
            }
            let tol = match dt {
                DType::F32 => Tol { rtol: 1e-4, atol: 1e-4 },
                _ => Tol { rtol: 1e-2, atol: 1e-2 },
            };
            check(&format!("matmul_{dt}_{batch}x{m}x{n}x{k}"), tr.finish().unwrap(), Map::new(), &feeds, |_, _| tol);
        }
    }
}

// ---- attention --------------------------------------------------------------------------------

#[test]
fn attention_matches_cpu() {
    let Some(_) = gpu() else { return };
    let mut r = rng(8);
    // (batch, queries, keys, heads, kv heads, head dim, value dim)
    let cases = [
        (2usize, 5usize, 9usize, 8usize, 2usize, 64usize, 64usize),
        (1, 7, 7, 4, 4, 40, 24),
        (3, 1, 33, 6, 1, 128, 128),
    ];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for &(b, s, t, h, kh, d, dv) in &cases {
            let tr = Tracer::new();
            let q = tr.input("q", dt, Shape::fixed(&[b, s, h, d])).unwrap();
            let k = tr.input("k", dt, Shape::fixed(&[b, t, kh, d])).unwrap();
            let v = tr.input("v", dt, Shape::fixed(&[b, t, kh, dv])).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            for (name, mask) in [("none", Mask::None), ("causal", Mask::Causal), ("window3", Mask::SlidingWindow(3))] {
                tr.output(name, q.attention(k, v, mask, scale).unwrap()).unwrap();
            }
            let feeds = map(vec![
                ("q", rand_tensor(&mut r, dt, &[b, s, h, d], -2.0, 2.0)),
                ("k", rand_tensor(&mut r, dt, &[b, t, kh, d], -2.0, 2.0)),
                ("v", rand_tensor(&mut r, dt, &[b, t, kh, dv], -2.0, 2.0)),
            ]);
            let tol = match dt {
                DType::F32 => Tol { rtol: 1e-5, atol: 1e-5 },
                DType::BF16 => Tol { rtol: 1e-2, atol: 1e-2 },
                _ => Tol { rtol: 2e-3, atol: 2e-3 },
            };
            check(
                &format!("attention_{dt}_{b}x{s}x{t}x{h}x{kh}x{d}x{dv}"),
                tr.finish().unwrap(),
                Map::new(),
                &feeds,
                |_, _| tol,
            );
        }
    }
}

// ---- a traced transformer block with a KV cache ----------------------------------------------

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 96;
const VOCAB: usize = 50;
const LAYERS: usize = 2;

fn split_heads<'t>(t: Tensor<'t>, s: &Dim, n: usize) -> Tensor<'t> {
    t.reshape([Dim::fixed(1), s.clone(), Dim::fixed(n), Dim::fixed(HEAD_DIM)]).unwrap()
}

/// A tiny Llama: embedding, `LAYERS` blocks (rms_norm, q/k/v projections, rope, KV cache
/// concat, causal GQA attention, o_proj, residual, rms_norm, silu-gated MLP, residual),
/// final norm, tied lm_head, then argmax and top-k over the last position's logits.
fn llama_graph(dt: DType) -> (Graph, Vec<(String, Vec<usize>)>) {
    let tr = Tracer::new();
    let (one, s, past) = (Dim::fixed(1), Dim::sym("seq"), Dim::sym("past"));
    let ids = tr.input("ids", DType::I64, [one.clone(), s.clone()]).unwrap();
    let cos = tr.input("cos", dt, [s.clone(), Dim::fixed(HEAD_DIM)]).unwrap();
    let sin = tr.input("sin", dt, [s.clone(), Dim::fixed(HEAD_DIM)]).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut param = |name: String, shape: Vec<usize>| {
        shapes.push((name.clone(), shape.clone()));
        tr.param(&name, dt, Shape::fixed(&shape)).unwrap()
    };
    let embed = param("embed".into(), vec![VOCAB, HIDDEN]);
    let mut x = embed.gather(ids, 0).unwrap();
    for l in 0..LAYERS {
        let p = |n: &str| format!("l{l}.{n}");
        let kv_shape = [one.clone(), past.clone(), Dim::fixed(KV_HEADS), Dim::fixed(HEAD_DIM)];
        let kc = tr.input(&p("k_cache"), dt, kv_shape.clone()).unwrap();
        let vc = tr.input(&p("v_cache"), dt, kv_shape).unwrap();
        let h = x.rms_norm(param(p("ln1"), vec![HIDDEN]), 1e-5).unwrap();
        let split = |t, n| split_heads(t, &s, n);
        let q = split(h.linear(param(p("q"), vec![HEADS * HEAD_DIM, HIDDEN]), None).unwrap(), HEADS)
            .rope(cos, sin)
            .unwrap();
        let k = split(h.linear(param(p("k"), vec![KV_HEADS * HEAD_DIM, HIDDEN]), None).unwrap(), KV_HEADS)
            .rope(cos, sin)
            .unwrap();
        let v = split(h.linear(param(p("v"), vec![KV_HEADS * HEAD_DIM, HIDDEN]), None).unwrap(), KV_HEADS);
        let k = kc.concat(&[k], 1).unwrap();
        let v = vc.concat(&[v], 1).unwrap();
        tr.output(&p("k_cache"), k).unwrap();
        tr.output(&p("v_cache"), v).unwrap();
        let a = q.attention(k, v, Mask::Causal, 1.0 / (HEAD_DIM as f32).sqrt()).unwrap();
        let a = a.reshape([one.clone(), s.clone(), Dim::fixed(HEADS * HEAD_DIM)]).unwrap();
        x = x.add(a.linear(param(p("o"), vec![HIDDEN, HEADS * HEAD_DIM]), None).unwrap()).unwrap();
        let h = x.rms_norm(param(p("ln2"), vec![HIDDEN]), 1e-5).unwrap();
        let g = h.linear(param(p("gate"), vec![INTER, HIDDEN]), None).unwrap().silu().unwrap();
        let u = h.linear(param(p("up"), vec![INTER, HIDDEN]), None).unwrap();
        x = x.add(g.mul(u).unwrap().linear(param(p("down"), vec![HIDDEN, INTER]), None).unwrap()).unwrap();
    }
    let x = x.rms_norm(param("norm".into(), vec![HIDDEN]), 1e-5).unwrap();
    let logits = x.linear(embed, None).unwrap();
    tr.output("logits", logits).unwrap();
    let last = logits.slice(1, &s - &one, s.clone()).unwrap().reshape([one.clone(), Dim::fixed(VOCAB)]).unwrap();
    let last = last.cast(DType::F32).unwrap();
    tr.output("next", last.argmax(-1).unwrap()).unwrap();
    let (vals, idx) = last.top_k(5, -1).unwrap();
    tr.output("top_values", vals).unwrap();
    tr.output("top_indices", idx).unwrap();
    (tr.finish().unwrap(), shapes)
}

fn rope_tables(dt: DType, start: usize, len: usize) -> (HostTensor, HostTensor) {
    let ang = |p: usize, j: usize| p as f32 / 10000f32.powf((j % (HEAD_DIM / 2)) as f32 * 2.0 / HEAD_DIM as f32);
    let cos: Vec<f32> = (start..start + len).flat_map(|p| (0..HEAD_DIM).map(move |j| ang(p, j).cos())).collect();
    let sin: Vec<f32> = (start..start + len).flat_map(|p| (0..HEAD_DIM).map(move |j| ang(p, j).sin())).collect();
    (HostTensor::from_f32_as(dt, &[len, HEAD_DIM], cos), HostTensor::from_f32_as(dt, &[len, HEAD_DIM], sin))
}

fn block_feeds(dt: DType, tokens: &[i64], start: usize, caches: &Map) -> Map {
    let (cos, sin) = rope_tables(dt, start, tokens.len());
    let mut f = caches.clone();
    f.insert("ids".into(), HostTensor::from_i64(&[1, tokens.len()], tokens.to_vec()));
    f.insert("cos".into(), cos);
    f.insert("sin".into(), sin);
    f
}

#[test]
fn transformer_block_with_kv_cache_matches_cpu() {
    let Some(_) = gpu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let mut r = rng(9);
        let (graph, shapes) = llama_graph(dt);
        let weights: Map = shapes
            .iter()
            .map(|(n, sh)| {
                let t = if sh.len() == 1 {
                    rand_tensor(&mut r, dt, sh, 0.8, 1.2)
                } else {
                    rand_tensor(&mut r, dt, sh, -0.15, 0.15)
                };
                (n.clone(), t)
            })
            .collect();
        let cpu = CpuExecutor::new(graph.clone(), weights.clone()).unwrap();
        let gpu = CudaExecutor::with_options(graph, weights, opts()).unwrap();
        let empty: Map = (0..LAYERS)
            .flat_map(|l| {
                ["k_cache", "v_cache"]
                    .map(|c| (format!("l{l}.{c}"), HostTensor::zeros(dt, &[1, 0, KV_HEADS, HEAD_DIM])))
            })
            .collect();
        let prompt = [3i64, 17, 42, 8, 8, 1, 29];
        // Prefill, then three decode steps: each feeds back its own caches.
        let (mut cpu_cache, mut gpu_cache) = (empty.clone(), empty);
        let (mut cpu_tok, mut gpu_tok) = (prompt.to_vec(), prompt.to_vec());
        let mut pos = 0;
        for step in 0..4 {
            let want = cpu.run(&block_feeds(dt, &cpu_tok, pos, &cpu_cache)).unwrap();
            let got = gpu.run(&block_feeds(dt, &gpu_tok, pos, &gpu_cache)).unwrap();
            let test = format!("llama_{dt}_step{step}");
            for (name, w) in &want {
                let g = &got[name];
                if dt == DType::F32 {
                    let tol = if w.dtype() == DType::I64 { EXACT } else { Tol { rtol: 1e-4, atol: 1e-4 } };
                    compare(&test, name, g, w, tol);
                } else if w.dtype().is_float() {
                    let e = rel_l2(g, w);
                    println!("kiln-check\t{test}\t{name}\t{}\t{:?}\trel_l2={e:.3e}\ttol=2e-2", g.dtype(), g.shape());
                    assert!(e <= 2e-2, "{test}/{name}: relative L2 error {e}");
                }
            }
            pos += cpu_tok.len();
            cpu_tok = vec![want["next"].as_i64().unwrap()[0]];
            gpu_tok = vec![got["next"].as_i64().unwrap()[0]];
            if dt == DType::F32 {
                assert_eq!(cpu_tok, gpu_tok, "greedy tokens agree");
            } else {
                gpu_tok = cpu_tok.clone(); // keep the two runs on the same sequence
            }
            cpu_cache =
                want.iter().filter(|(k, _)| k.contains("_cache")).map(|(k, v)| (k.clone(), v.clone())).collect();
            gpu_cache = got.iter().filter(|(k, _)| k.contains("_cache")).map(|(k, v)| (k.clone(), v.clone())).collect();
        }
    }
}

// ---- kernel cache and compilation -------------------------------------------------------------

#[test]
fn disk_cache_makes_a_warm_start_compile_nothing() {
    let Some(_) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("kiln-kernel-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = CudaOptions { cache_dir: Some(dir.clone()), ..opts() };
    let (graph, shapes) = llama_graph(DType::BF16);
    let mut r = rng(10);
    let weights: Map =
        shapes.iter().map(|(n, sh)| (n.clone(), rand_tensor(&mut r, DType::BF16, sh, -0.1, 0.1))).collect();
    let t0 = std::time::Instant::now();
    let cold = CudaExecutor::with_options(graph.clone(), weights.clone(), o.clone()).unwrap();
    let cold_s = t0.elapsed().as_secs_f64();
    let c = cold.compile_stats();
    assert!(c.compiled > 0 && c.cached == 0, "cold start: {c:?}");
    let t0 = std::time::Instant::now();
    let warm = CudaExecutor::with_options(graph, weights, o).unwrap();
    let warm_s = t0.elapsed().as_secs_f64();
    let w = warm.compile_stats();
    assert_eq!((w.compiled, w.cached), (0, c.compiled), "warm start: {w:?}");
    let empty: Map = (0..LAYERS)
        .flat_map(|l| {
            ["k_cache", "v_cache"]
                .map(|c| (format!("l{l}.{c}"), HostTensor::zeros(DType::BF16, &[1, 0, KV_HEADS, HEAD_DIM])))
        })
        .collect();
    let feeds = block_feeds(DType::BF16, &[1, 2, 3], 0, &empty);
    assert_eq!(cold.run(&feeds).unwrap(), warm.run(&feeds).unwrap());
    println!(
        "kiln-time\tkernel_cache\tkernels={}\tcold_compile_s={:.3}\tcold_new_s={cold_s:.3}\twarm_load_s={:.3}\twarm_new_s={warm_s:.3}",
        c.compiled, c.seconds, w.seconds
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every kernel variant the codegen can emit compiles with NVRTC (needs only NVRTC, not
/// a GPU: the architecture is the device's, or sm_90 without one).
#[test]
fn every_kernel_variant_compiles() {
    if !kiln_codegen::nvrtc::nvrtc_present() {
        println!("skipping: libnvrtc could not be loaded");
        return;
    }
    let cc = CudaExecutor::available().map(|i| i.compute_capability).unwrap_or((9, 0));
    let compiler = kiln_codegen::Compiler::new(cc, None).unwrap();
    let dts = [DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I8, DType::U8, DType::Bool];
    let mut ks = Vec::new();
    for &d in &dts {
        for u in UnaryOp::ALL {
            if kiln_codegen::table::unary_expr(u, d).is_some() {
                ks.push(kernels::elementwise(&Op::Unary(u), &[d], d).unwrap());
            }
        }
        for b in BinaryOp::ALL {
            if kiln_codegen::table::binary_expr(b, d).is_some() {
                let out = if b.is_comparison() { DType::Bool } else { d };
                ks.push(kernels::elementwise(&Op::Binary(b), &[d, d], out).unwrap());
            }
        }
        ks.push(kernels::elementwise(&Op::Select, &[DType::Bool, d, d], d).unwrap());
        for &to in &dts {
            if to != d {
                ks.push(kernels::elementwise(&Op::Cast(to), &[d], to).unwrap());
            }
        }
        ks.push(kernels::strided_copy(d).unwrap());
        ks.push(kernels::gather(d, DType::I64).unwrap());
        ks.push(kernels::gather(d, DType::I32).unwrap());
        ks.push(kernels::argmax(d).unwrap());
        ks.push(kernels::topk(d).unwrap());
        if d != DType::Bool {
            for op in ReduceOp::ALL {
                ks.push(kernels::reduce(op, d).unwrap());
            }
        }
        if d.is_float() {
            ks.push(kernels::attention(d).unwrap());
        }
    }
    ks.push(kernels::arange());
    let mut seen = std::collections::HashSet::new();
    ks.retain(|k| seen.insert(k.sig.name.clone()));
    let refs: Vec<&kiln_codegen::Kernel> = ks.iter().collect();
    let (cubins, stats) = compiler.compile_all(&refs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cubins.len(), ks.len());
    assert!(cubins.iter().all(|c| !c.is_empty()));
    println!(
        "kiln-time\tnvrtc_all_variants\tkernels={}\tseconds={:.3}\tarch={}\tnvrtc={:?}",
        ks.len(),
        stats.seconds,
        compiler.arch,
        compiler.version()
    );
    match kiln_codegen::nvrtc::probe_builtin_headers(&compiler.arch) {
        Ok(()) => println!("kiln-info\tNVRTC resolves <cuda_fp16.h>/<cuda_bf16.h> without an include path"),
        Err(e) => println!(
            "kiln-info\tNVRTC does not resolve <cuda_fp16.h>/<cuda_bf16.h> on its own: {}",
            e.lines().take(3).collect::<Vec<_>>().join(" | ")
        ),
    }
}

#[test]
fn availability_is_reported_not_panicked() {
    match CudaExecutor::available() {
        Ok(info) => println!("available: {info}"),
        Err(reason) => {
            assert!(!reason.is_empty());
            println!("not available: {reason}");
        }
    }
}

#[test]
fn unsupported_dtypes_and_shape_errors_name_the_node() {
    let Some(_) = gpu() else { return };
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize]).unwrap();
    let y = tr.scope("quant", || x.cast(DType::F8E4M3)).unwrap();
    tr.output("y", y).unwrap();
    let e = CudaExecutor::new(tr.finish().unwrap(), Map::new()).err().unwrap().to_string();
    assert!(e.contains("(cast in `quant`)") && e.contains("f8e4m3"), "{e}");
    // Feed errors are the CPU executor's.
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(2)]).unwrap();
    tr.output("y", x.exp().unwrap()).unwrap();
    let exec = CudaExecutor::new(tr.finish().unwrap(), Map::new()).unwrap();
    let e = exec.run(&map(vec![("x", HostTensor::from_f32(&[3], vec![0.0; 3]))])).unwrap_err();
    assert_eq!(e.to_string(), "feeds do not match the graph's inputs: mis-typed `x` (expects f32[seq, 2], got f32[3])");
}
