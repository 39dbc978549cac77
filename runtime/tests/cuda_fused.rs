//! Fused groups on the GPU against the CPU reference: each test traces a small graph,
//! wraps all its compute nodes into ONE fused node (`Op::Fused`, as the fusion pass
//! does), runs that one-node graph with `CudaExecutor` (poisoned buffers, so an element
//! the kernel forgets shows up as NaN) at several symbol bindings, and compares every
//! output with `CpuExecutor` on the same graph (which also matches the unfused graph
//! bit for bit). Each test starts with [`gpu`], which prints `skipping: <reason>` and
//! returns when no GPU and CUDA libraries are usable, so `cargo test` passes anywhere.
//!
//! Tolerances (per output): bodies of exactly rounded ops (add, mul, neg, slices,
//! concat, integer ops) match exactly — the kernels round every float op's result to its
//! dtype as the CPU does; bodies with reductions (summation order) or transcendentals
//! (the GPU's `expf`) allow 1e-5 relative for f32 and about one unit in the last place
//! for bf16 (2^-7 relative) and f16 (2^-10 relative).
//!
//! Lines starting with `kiln-check` are collected by `tools/gpu/run.sh`.

use indexmap::IndexMap;
use kiln_graph::ops::{Bindings, DType, Dim, FusedBody, FusedNode, FusedRef, HostTensor, Op};
use kiln_graph::{Graph, TensorExt, Tracer, Value};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::cuda::{CudaExecutor, CudaOptions, DeviceInfo};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

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

type Map = IndexMap<String, HostTensor>;

/// A traced graph with every non-source node wrapped into ONE fused node: the sources
/// (inputs, params, constants) stay and become the group's inputs.
fn fuse_all(g: &Graph) -> Graph {
    let mut ng = Graph::new();
    let mut body = FusedBody { inputs: vec![], nodes: vec![], outputs: vec![] };
    let mut refs: HashMap<Value, FusedRef> = HashMap::new();
    let mut operands = Vec::new();
    for n in g.topo_order() {
        let node = g.node(n);
        if node.op.is_source() {
            let nn = match &node.op {
                Op::Input { name, ty } => ng.add_input(name, ty.clone()).unwrap(),
                Op::Param { name, ty } => ng.add_param(name, ty.clone(), &node.scope).unwrap(),
                op => ng.add(op.clone(), &[], "").unwrap(),
            };
            refs.insert(Value::new(n, 0), FusedRef::Input(body.inputs.len() as u16));
            body.inputs.push(node.outputs[0].clone());
            operands.push(Value::new(nn, 0));
        } else {
            let ops = g.operands(n).iter().map(|v| refs[v]).collect();
            for k in 0..node.outputs.len() {
                refs.insert(Value::new(n, k as u8), FusedRef::Node { node: body.nodes.len() as u16, output: k as u8 });
            }
            body.nodes.push(FusedNode { op: node.op.clone(), operands: ops, outputs: node.outputs.clone() });
        }
    }
    body.outputs = g.outputs().values().map(|v| refs[v]).collect();
    body.kind().unwrap_or_else(|e| panic!("the test body must fit a kernel form: {e}"));
    let f = ng.add(Op::Fused(Box::new(body)), &operands, "").unwrap();
    for (k, name) in g.outputs().keys().enumerate() {
        ng.set_output(name, Value::new(f, k as u8)).unwrap();
    }
    ng.verify().unwrap();
    ng
}

fn seq() -> Dim {
    Dim::sym("seq")
}

/// Residual add + RMSNorm: outputs `residual = x + h`, `normed`.
fn rmsnorm(dtype: DType, hidden: usize) -> Graph {
    let tr = Tracer::new();
    let shape = [Dim::fixed(2), seq(), Dim::fixed(hidden)];
    let x = tr.input("x", dtype, shape.clone()).unwrap();
    let h = tr.input("h", dtype, shape).unwrap();
    let w = tr.param("w", dtype, [hidden]).unwrap();
    let r = x.add(h).unwrap();
    tr.output("residual", r).unwrap();
    tr.output("normed", r.rms_norm(w, 1e-6).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// RoPE (rotate-half) on `x [2, seq, 3, 64]` with `cos`/`sin [seq, 64]`.
fn rope(dtype: DType) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", dtype, [Dim::fixed(2), seq(), Dim::fixed(3), Dim::fixed(64)]).unwrap();
    let cos = tr.input("cos", dtype, [seq(), Dim::fixed(64)]).unwrap();
    let sin = tr.input("sin", dtype, [seq(), Dim::fixed(64)]).unwrap();
    tr.output("y", x.rope(cos, sin).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// SiLU(gate) · up from the two halves of `gate_up [2, seq, 2·inter]`.
fn silu_up(dtype: DType, inter: usize) -> Graph {
    let tr = Tracer::new();
    let gu = tr.input("gate_up", dtype, [Dim::fixed(2), seq(), Dim::fixed(2 * inter)]).unwrap();
    let gate = gu.slice(-1, 0, inter).unwrap();
    let up = gu.slice(-1, inter, 2 * inter).unwrap();
    tr.output("y", gate.silu().unwrap().mul(up).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// Softmax over the last axis of `x [4, seq, keys]`.
fn softmax(dtype: DType) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", dtype, [Dim::fixed(4), seq(), Dim::sym("keys")]).unwrap();
    tr.output("p", x.softmax(-1).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// LayerNorm (two dependent reductions) plus a row-shaped output.
fn layer_norm(hidden: usize) -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq(), Dim::fixed(hidden)]).unwrap();
    let w = tr.param("w", DType::F32, [hidden]).unwrap();
    let b = tr.param("b", DType::F32, [hidden]).unwrap();
    tr.output("y", x.layer_norm(w, Some(b), 1e-5).unwrap()).unwrap();
    tr.output("mean", x.mean(&[-1], false).unwrap()).unwrap();
    tr.finish().unwrap()
}

/// Permute + reshape merging a symbolic dim, a three-way concat with symbolic offsets,
/// and 8-bit integer wrap-around with select and casts.
fn movement_and_ints() -> Vec<(&'static str, Graph)> {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq(), Dim::fixed(4), Dim::fixed(8)]).unwrap();
    let z = tr.input("z", DType::F32, [Dim::fixed(4), &seq() * &Dim::fixed(8)]).unwrap();
    let y = x.permute(&[1, 0, 2]).unwrap().reshape([Dim::fixed(4), &seq() * &Dim::fixed(8)]).unwrap();
    tr.output("y", y.mul(z).unwrap()).unwrap();
    let permute = tr.finish().unwrap();

    let tr = Tracer::new();
    let a = tr.input("a", DType::BF16, [Dim::sym("past"), Dim::fixed(8)]).unwrap();
    let b = tr.input("b", DType::BF16, [seq(), Dim::fixed(8)]).unwrap();
    tr.output("y", a.concat(&[b, a], 0).unwrap().neg().unwrap()).unwrap();
    let concat = tr.finish().unwrap();

    let tr = Tracer::new();
    let a = tr.input("a", DType::I8, [seq(), Dim::fixed(7)]).unwrap();
    let b = tr.input("b", DType::I8, [seq(), Dim::fixed(7)]).unwrap();
    let s = a.add(b).unwrap();
    tr.output("sel", s.lt(a).unwrap().select(s, b).unwrap()).unwrap();
    tr.output("prod", s.cast(DType::I32).unwrap().mul(b.cast(DType::I32).unwrap()).unwrap()).unwrap();
    tr.output("lt", s.lt(b).unwrap()).unwrap();
    let ints = tr.finish().unwrap();
    vec![("permute_reshape", permute), ("concat3", concat), ("int_ops", ints)]
}

/// Random values of `dtype`: floats uniform in `[-3, 3)`, integers over their range.
fn rand_tensor(r: &mut ChaCha8Rng, dtype: DType, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    match dtype {
        d if d.is_float() => HostTensor::from_f32_as(d, shape, (0..n).map(|_| r.random_range(-3.0f32..3.0)).collect()),
        DType::I8 => HostTensor::from_vec(shape, (0..n).map(|_| r.random_range(-128i32..128) as i8).collect()),
        DType::I32 => HostTensor::from_vec(shape, (0..n).map(|_| r.random_range(-1000i32..1000)).collect()),
        DType::I64 => HostTensor::from_i64(shape, (0..n).map(|_| r.random_range(-1000..1000)).collect()),
        d => panic!("no random {d}"),
    }
}

/// Random feeds for every graph input, at the symbol values `b`.
fn feeds(r: &mut ChaCha8Rng, g: &Graph, b: &Bindings) -> Map {
    g.inputs()
        .iter()
        .map(|(name, &n)| {
            let ty = &g.node(n).outputs[0];
            (name.clone(), rand_tensor(r, ty.dtype, &ty.shape.eval(b).unwrap()))
        })
        .collect()
}

/// Random weights for every param.
fn weights(r: &mut ChaCha8Rng, g: &Graph) -> Map {
    g.params()
        .iter()
        .map(|(name, &n)| {
            let ty = &g.node(n).outputs[0];
            (name.clone(), rand_tensor(r, ty.dtype, &ty.shape.as_fixed().unwrap()))
        })
        .collect()
}

/// Elementwise tolerance: `|got - want| <= atol + rtol·|want|`, NaN only where NaN.
#[derive(Clone, Copy, Debug)]
struct Tol {
    rtol: f64,
    atol: f64,
}

const EXACT: Tol = Tol { rtol: 0.0, atol: 0.0 };
const F32: Tol = Tol { rtol: 1e-5, atol: 1e-6 };
/// Two bf16 / f16 units in the last place: after a reduction summed in another order,
/// two rounded ops (the cast of the normalized value, then the weight multiply) can each
/// land one unit away.
const BF16_ULP: Tol = Tol { rtol: 2.0 / 128.0, atol: 1e-6 };
const F16_ULP: Tol = Tol { rtol: 2.0 / 1024.0, atol: 1e-6 };

/// Rounded like the CPU, but reductions sum in another order / another `expf`.
fn near(d: DType) -> Tol {
    match d {
        DType::F32 => F32,
        DType::BF16 => BF16_ULP,
        DType::F16 => F16_ULP,
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
            assert!(a.is_nan() && b.is_nan(), "{test}/{name}: element {i}: got {a}, want {b} (unwritten?)");
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
    if !got.dtype().is_float() {
        assert_eq!(got.to_i64_vec(), want.to_i64_vec(), "{test}/{name}");
    }
    println!(
        "kiln-check\t{test}\t{name}\t{}\t{:?}\tmax_abs={max_abs:.3e}\tmax_rel={max_rel:.3e}\trtol={:.0e}\tatol={:.0e}",
        got.dtype(),
        got.shape(),
        tol.rtol,
        tol.atol
    );
}

/// The CPU side of a check: the fused graph, its weights, and per binding the feeds and
/// the CPU reference outputs of the fused graph (asserted equal, bit for bit, to the
/// unfused graph's). Also asserts that codegen lowers the fused node to one kernel.
fn reference(test: &str, g: &Graph, bindings: &[Bindings]) -> (Graph, Map, Vec<(Map, Map)>) {
    let fused = fuse_all(g);
    let node = fused.topo_order().into_iter().find(|&n| matches!(fused.node(n).op, Op::Fused(_))).unwrap();
    match kiln_codegen::lower_node(&fused, node) {
        Ok(kiln_codegen::NodeLowering::Kernel(k)) => assert!(k.sig.name.starts_with("kiln_fused_")),
        other => panic!("{test}: the fused node lowers to {other:?}"),
    }
    let mut r = ChaCha8Rng::seed_from_u64(0x5eed ^ test.len() as u64);
    let w = weights(&mut r, &fused);
    let cpu = CpuExecutor::new(fused.clone(), w.clone()).unwrap();
    let unfused = CpuExecutor::new(g.clone(), w.clone()).unwrap();
    let runs = bindings
        .iter()
        .map(|b| {
            let f = feeds(&mut r, g, b);
            let want = cpu.run(&f).unwrap_or_else(|e| panic!("{test} {b:?}: {e}"));
            assert_eq!(want, unfused.run(&f).unwrap(), "{test} {b:?}: the fused CPU reference differs from the graph");
            (f, want)
        })
        .collect();
    (fused, w, runs)
}

/// Runs the fused graph of `g` on the GPU at each binding (one executor, so one
/// compiled kernel serves every binding) and compares every output with the CPU
/// reference. Checks that the fused graph runs exactly one generated kernel.
fn check(test: &str, g: &Graph, bindings: &[Bindings], tol: impl Fn(DType) -> Tol) {
    let (fused, w, runs) = reference(test, g, bindings);
    let opts = CudaOptions { poison: true, ..CudaOptions::default() };
    let gpu = CudaExecutor::with_options(fused, w, opts).unwrap_or_else(|e| panic!("{test}: {e}"));
    let kernels: Vec<&str> = gpu.kernels().map(|k| k.sig.name.as_str()).collect();
    assert_eq!(kernels.len(), 1, "{test}: one kernel, got {kernels:?}");
    assert!(kernels[0].starts_with("kiln_fused_"), "{test}: {kernels:?}");
    for (b, (f, want)) in bindings.iter().zip(&runs) {
        let got = gpu.run(f).unwrap_or_else(|e| panic!("{test} {b:?}: {e}"));
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        let tag: Vec<String> = b.iter().map(|(s, v)| format!("{s}={v}")).collect();
        for (name, wt) in want {
            compare(&format!("{test}[{}]", tag.join(",")), name, &got[name], wt, tol(wt.dtype()));
        }
    }
}

fn seqs(values: &[usize]) -> Vec<Bindings> {
    values.iter().map(|&s| [(kiln_graph::ops::Sym::new("seq"), s)].into_iter().collect()).collect()
}

fn sym_bindings(pairs: &[(&str, usize)]) -> Bindings {
    pairs.iter().map(|&(s, v)| (kiln_graph::ops::Sym::new(s), v)).collect()
}

/// A named case: graph, bindings, tolerance per output dtype.
type Case = (String, Graph, Vec<Bindings>, fn(DType) -> Tol);

fn rmsnorm_cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    for hidden in [576, 2048] {
        v.push((format!("fused_rmsnorm_bf16_{hidden}"), rmsnorm(DType::BF16, hidden), seqs(&[1, 5, 33]), near));
    }
    // Wide rows (512 threads per block), up to 16K columns.
    for hidden in [4096, 16384] {
        v.push((format!("fused_rmsnorm_bf16_{hidden}"), rmsnorm(DType::BF16, hidden), seqs(&[1, 3]), near));
    }
    v.push(("fused_rmsnorm_f32_576".into(), rmsnorm(DType::F32, 576), seqs(&[1, 5]), near));
    v.push(("fused_rmsnorm_f16_576".into(), rmsnorm(DType::F16, 576), seqs(&[1, 5]), near));
    v
}

fn rope_cases() -> Vec<Case> {
    [DType::BF16, DType::F16, DType::F32]
        .into_iter()
        .map(|dt| -> Case { (format!("fused_rope_{dt}"), rope(dt), seqs(&[1, 5, 33]), |_| EXACT) })
        .collect()
}

fn silu_up_cases() -> Vec<Case> {
    [DType::BF16, DType::F16, DType::F32]
        .into_iter()
        .map(|dt| -> Case { (format!("fused_silu_up_{dt}"), silu_up(dt, 1536), seqs(&[1, 5, 33]), near) })
        .collect()
}

fn softmax_cases() -> Vec<Case> {
    let b = |s: usize, k: usize| sym_bindings(&[("seq", s), ("keys", k)]);
    let bindings = vec![b(1, 1), b(1, 576), b(5, 40), b(33, 2048), b(2, 16384)];
    [DType::F32, DType::BF16]
        .into_iter()
        .map(|dt| -> Case { (format!("fused_softmax_{dt}"), softmax(dt), bindings.clone(), near) })
        .collect()
}

fn layer_norm_cases() -> Vec<Case> {
    vec![("fused_layer_norm_f32".into(), layer_norm(576), seqs(&[1, 5, 33]), |_| Tol { rtol: 1e-5, atol: 1e-5 })]
}

fn movement_cases() -> Vec<Case> {
    movement_and_ints()
        .into_iter()
        .map(|(name, g)| -> Case {
            let bindings =
                [(0, 1), (5, 1), (4, 9), (0, 33)]
                    .iter()
                    .map(|&(p, s)| {
                        if name == "concat3" {
                            sym_bindings(&[("past", p), ("seq", s)])
                        } else {
                            seqs(&[s]).remove(0)
                        }
                    })
                    .collect();
            (format!("fused_{name}"), g, bindings, |_| EXACT)
        })
        .collect()
}

fn run_cases(cases: Vec<Case>) {
    for (name, g, bindings, tol) in cases {
        check(&name, &g, &bindings, tol);
    }
}

#[test]
fn fused_rmsnorm_matches_cpu() {
    let Some(_) = gpu() else { return };
    run_cases(rmsnorm_cases());
}

#[test]
fn fused_rope_matches_cpu_exactly() {
    let Some(_) = gpu() else { return };
    run_cases(rope_cases());
}

#[test]
fn fused_silu_up_matches_cpu() {
    let Some(_) = gpu() else { return };
    run_cases(silu_up_cases());
}

#[test]
fn fused_softmax_matches_cpu() {
    let Some(_) = gpu() else { return };
    run_cases(softmax_cases());
}

#[test]
fn fused_layer_norm_matches_cpu() {
    let Some(_) = gpu() else { return };
    run_cases(layer_norm_cases());
}

#[test]
fn fused_movement_and_integer_bodies_match_cpu_exactly() {
    let Some(_) = gpu() else { return };
    run_cases(movement_cases());
}

/// Runs everywhere: the CPU side of every case above (fusing, feeds, the fused CPU
/// reference against the unfused graph, lowering to one kernel), so a GPU run can only
/// fail on the GPU side.
#[test]
fn cases_are_sound_on_the_cpu() {
    let all = [rmsnorm_cases(), rope_cases(), silu_up_cases(), softmax_cases(), layer_norm_cases(), movement_cases()];
    for (name, g, bindings, _) in all.into_iter().flatten() {
        let (_, _, runs) = reference(&name, &g, &bindings);
        assert_eq!(runs.len(), bindings.len());
    }
}
