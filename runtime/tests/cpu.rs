//! The CPU executor on traced graphs: values against hand-computed numbers and written-out
//! formulas, the exact text of its errors, and matmul through gemm against a naive loop.

use indexmap::IndexMap;
use kiln_graph::ops::{DType, Dim, HostData, HostTensor, Mask};
use kiln_graph::{Graph, TensorExt, Tracer};
use kiln_runtime::cpu::CpuExecutor;
use proptest::prelude::*;

fn f(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(shape, v.to_vec())
}

fn map(items: Vec<(&str, HostTensor)>) -> IndexMap<String, HostTensor> {
    items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "element {k}: got {g}, want {w}\n{got:?}\n{want:?}");
    }
}

fn seq() -> Dim {
    Dim::sym("seq")
}

/// `y = softmax(silu(rms_norm(x, w) · Wᵀ))` on `x [seq, 4]`, `W [3, 4]`.
fn mlp_graph() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [seq(), Dim::fixed(4)]).unwrap();
    let y = tr
        .scope("model", || {
            let w = tr.scope("norm", || tr.param("weight", DType::F32, [4usize]))?;
            let h = x.rms_norm(w, 1e-5)?;
            let proj = tr.scope("proj", || tr.param("weight", DType::F32, [3usize, 4]))?;
            h.linear(proj, None)?.silu()?.softmax(-1)
        })
        .unwrap();
    tr.output("y", y).unwrap();
    tr.finish().unwrap()
}

fn mlp_weights() -> IndexMap<String, HostTensor> {
    map(vec![
        ("model.norm.weight", f(&[4], &[1.0, 0.5, 2.0, 1.0])),
        ("model.proj.weight", f(&[3, 4], &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.5, 0.5, 0.5, 0.5])),
    ])
}

#[test]
fn traced_norm_linear_silu_softmax() {
    let exec = CpuExecutor::new(mlp_graph(), mlp_weights()).unwrap();
    let x = [1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0];
    let out = exec.run(&map(vec![("x", f(&[2, 4], &x))])).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["y"]);
    let y = &out["y"];
    assert_eq!(y.shape(), &[2, 3]);
    // Written out: rms = sqrt(mean(x²) + eps); row 0 mean(x²) = 30/4, row 1 = 6/4.
    let w = [1.0, 0.5, 2.0, 1.0];
    let proj = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]];
    let mut want = Vec::new();
    for (r, ms) in [(0, 7.5f64), (1, 1.5)] {
        let h: Vec<f64> = (0..4).map(|c| x[r * 4 + c] as f64 / (ms + 1e-5).sqrt() * w[c]).collect();
        let z: Vec<f64> = proj
            .iter()
            .map(|p| p.iter().zip(&h).map(|(a, b)| a * b).sum::<f64>())
            .map(|v| v / (1.0 + (-v).exp()))
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert_close(y.as_f32().unwrap(), &want, 1e-5);
    // The same executor with another sequence length.
    let out = exec.run(&map(vec![("x", f(&[1, 4], &x[..4]))])).unwrap();
    assert_close(out["y"].as_f32().unwrap(), &want[..3], 1e-5);
}

#[test]
fn gelu_variants_and_layer_norm_by_hand() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [4usize]).unwrap();
    let w = tr.param("w", DType::F32, [4usize]).unwrap();
    let bias = tr.param("b", DType::F32, [4usize]).unwrap();
    tr.output("erf", x.gelu_erf().unwrap()).unwrap();
    tr.output("tanh", x.gelu_tanh().unwrap()).unwrap();
    tr.output("ln", x.layer_norm(w, Some(bias), 0.0).unwrap()).unwrap();
    let g = tr.finish().unwrap();
    let exec =
        CpuExecutor::new(g, map(vec![("w", f(&[4], &[1.0, 1.0, 2.0, 2.0])), ("b", f(&[4], &[0.0, 1.0, 0.0, 1.0]))]))
            .unwrap();
    let out = exec.run(&map(vec![("x", f(&[4], &[1.0, -1.0, 2.0, 0.0]))])).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["erf", "tanh", "ln"]);
    // gelu(x) = x·Φ(x): Φ(1) = 0.841344746, Φ(-1) = 0.158655254, Φ(2) = 0.977249868.
    assert_close(out["erf"].as_f32().unwrap(), &[0.841344746, -0.158655254, 1.954499736, 0.0], 1e-6);
    assert_close(out["tanh"].as_f32().unwrap(), &[0.841191991, -0.158808009, 1.954597694, 0.0], 1e-6);
    // mean 0.5, var = (0.25 + 2.25 + 2.25 + 0.25)/4 = 1.25.
    let sd = 1.25f64.sqrt();
    assert_close(
        out["ln"].as_f32().unwrap(),
        &[0.5 / sd, -1.5 / sd + 1.0, 2.0 * 1.5 / sd, 2.0 * -0.5 / sd + 1.0],
        1e-6,
    );
}

#[test]
fn rope_rotates_halves() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::fixed(1), seq(), Dim::fixed(1), Dim::fixed(4)]).unwrap();
    let cos = tr.input("cos", DType::F32, [seq(), Dim::fixed(4)]).unwrap();
    let sin = tr.input("sin", DType::F32, [seq(), Dim::fixed(4)]).unwrap();
    tr.output("y", x.rope(cos, sin).unwrap()).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    // Position 0: angle 0 (identity); position 1: angles [π/2, 0] repeated.
    let (c, s) =
        (f(&[2, 4], &[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]), f(&[2, 4], &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]));
    let x = f(&[1, 2, 1, 4], &[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    let out = exec.run(&map(vec![("x", x), ("cos", c), ("sin", s)])).unwrap();
    // rotate_half([1, 2, 3, 4]) = [-3, -4, 1, 2]; position 1: [1·0 + -3·1, 2, 3·0 + 1·1, 4].
    assert_close(out["y"].as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0, -3.0, 2.0, 1.0, 4.0], 0.0);
}

/// Causal attention over a KV cache: `k = concat(k_cache, k_new)` along the sequence.
fn decoder_graph() -> Graph {
    let tr = Tracer::new();
    let (one, past) = (Dim::fixed(1), Dim::sym("past"));
    let q = tr.input("q", DType::F32, [one.clone(), seq(), Dim::fixed(4), Dim::fixed(2)]).unwrap();
    let kn = tr.input("k", DType::F32, [one.clone(), seq(), Dim::fixed(2), Dim::fixed(2)]).unwrap();
    let vn = tr.input("v", DType::F32, [one.clone(), seq(), Dim::fixed(2), Dim::fixed(2)]).unwrap();
    let kc = tr.input("k_cache", DType::F32, [one.clone(), past.clone(), Dim::fixed(2), Dim::fixed(2)]).unwrap();
    let vc = tr.input("v_cache", DType::F32, [one, past, Dim::fixed(2), Dim::fixed(2)]).unwrap();
    let k = kc.concat(&[kn], 1).unwrap();
    let v = vc.concat(&[vn], 1).unwrap();
    tr.output("out", q.attention(k, v, Mask::Causal, 0.7).unwrap()).unwrap();
    tr.output("k_cache", k).unwrap();
    tr.output("v_cache", v).unwrap();
    tr.finish().unwrap()
}

fn ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

#[test]
fn kv_cache_decode_matches_full_prefill() {
    let exec = CpuExecutor::new(decoder_graph(), IndexMap::new()).unwrap();
    let (q, k, v) = (ramp(4 * 8, 0.1), ramp(4 * 4, 0.2), ramp(4 * 4, 0.3));
    let empty = || f(&[1, 0, 2, 2], &[]);
    // Prefill of all 4 tokens with an empty cache (past = 0).
    let full = exec
        .run(&map(vec![
            ("q", f(&[1, 4, 4, 2], &q)),
            ("k", f(&[1, 4, 2, 2], &k)),
            ("v", f(&[1, 4, 2, 2], &v)),
            ("k_cache", empty()),
            ("v_cache", empty()),
        ]))
        .unwrap();
    assert_eq!(full.keys().collect::<Vec<_>>(), ["out", "k_cache", "v_cache"]);
    assert_eq!(full["k_cache"].to_f32_vec(), k);
    // Prefill 3, then decode the 4th against the returned cache.
    let pre = exec
        .run(&map(vec![
            ("q", f(&[1, 3, 4, 2], &q[..24])),
            ("k", f(&[1, 3, 2, 2], &k[..12])),
            ("v", f(&[1, 3, 2, 2], &v[..12])),
            ("k_cache", empty()),
            ("v_cache", empty()),
        ]))
        .unwrap();
    assert_eq!(pre["out"].to_f32_vec(), full["out"].to_f32_vec()[..24]);
    let step = exec
        .run(&map(vec![
            ("q", f(&[1, 1, 4, 2], &q[24..])),
            ("k", f(&[1, 1, 2, 2], &k[12..])),
            ("v", f(&[1, 1, 2, 2], &v[12..])),
            ("k_cache", pre["k_cache"].clone()),
            ("v_cache", pre["v_cache"].clone()),
        ]))
        .unwrap();
    assert_close(
        step["out"].as_f32().unwrap(),
        &full["out"].to_f32_vec()[24..].iter().map(|&x| x as f64).collect::<Vec<_>>(),
        1e-6,
    );
    // The first query attends to key 0 only: its output is v[0] of its kv head.
    let o = full["out"].to_f32_vec();
    assert_eq!(&o[..4], &[v[0], v[1], v[0], v[1]]);
    assert_eq!(&o[4..8], &[v[2], v[3], v[2], v[3]]);
}

#[test]
fn bf16_graph_rounds_like_bf16_storage() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::BF16, [2usize]).unwrap();
    let w = tr.param("w", DType::BF16, [2usize]).unwrap();
    let y = x.mul(w).unwrap();
    tr.output("y", y).unwrap();
    tr.output("sum", y.sum(&[0], false).unwrap()).unwrap();
    tr.output("w", w).unwrap();
    let exec = CpuExecutor::new(
        tr.finish().unwrap(),
        map(vec![("w", HostTensor::from_f32_as(DType::BF16, &[2], vec![1.0, 3.0]))]),
    )
    .unwrap();
    let x = HostTensor::from_f32_as(DType::BF16, &[2], vec![1.0078125, 1.0078125]);
    let out = exec.run(&map(vec![("x", x)])).unwrap();
    // 3 · (1 + 2^-7) = 3.0234375 needs 8 mantissa bits: rounds to even, 3.03125.
    assert_eq!(out["y"].dtype(), DType::BF16);
    assert_eq!(out["y"].to_f32_vec(), vec![1.0078125, 3.03125]);
    // 1.0078125 + 3.03125 = 4.0390625 -> bf16 4.03125 (spacing 2^-5 at 4).
    assert_eq!(out["sum"].to_f32_vec(), vec![4.03125]);
    assert_eq!(out["w"].data(), &HostData::BF16(vec![half::bf16::from_f32(1.0), half::bf16::from_f32(3.0)]));
}

#[test]
fn sampling_ops_passthrough_and_repeated_outputs() {
    let tr = Tracer::new();
    let logits = tr.input("logits", DType::F32, [Dim::sym("batch"), Dim::fixed(5)]).unwrap();
    let (vals, idx) = logits.top_k(2, -1).unwrap();
    tr.output("idx", idx).unwrap();
    tr.output("best", logits.argmax(-1).unwrap()).unwrap();
    tr.output("vals", vals).unwrap();
    tr.output("again", vals).unwrap();
    tr.output("logits", logits).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let l = f(&[2, 5], &[0.1, 0.9, 0.3, 0.9, 0.2, 5.0, 4.0, 3.0, 2.0, 1.0]);
    let out = exec.run(&map(vec![("logits", l.clone())])).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["idx", "best", "vals", "again", "logits"]);
    assert_eq!(out["idx"].as_i64().unwrap(), &[1, 3, 0, 1]);
    assert_eq!(out["best"].as_i64().unwrap(), &[1, 0]);
    assert_eq!(out["vals"].as_f32().unwrap(), &[0.9, 0.9, 5.0, 4.0]);
    assert_eq!(out["again"], out["vals"]);
    assert_eq!(out["logits"], l);
}

// ---- errors --------------------------------------------------------------------------------

#[test]
fn weight_errors_list_every_problem() {
    let mut w = mlp_weights();
    w.shift_remove("model.norm.weight");
    w.insert("model.proj.weight".into(), f(&[4, 3], &[0.0; 12]));
    w.insert("model.extra".into(), f(&[1], &[0.0]));
    w.insert("lm_head.weight".into(), f(&[1], &[0.0]));
    let e = CpuExecutor::new(mlp_graph(), w).err().unwrap();
    assert_eq!(
        e.to_string(),
        "weights do not match the graph's params: missing `model.norm.weight`; unexpected `model.extra`, \
         `lm_head.weight`; mis-shaped `model.proj.weight` (expects f32[3, 4], got f32[4, 3])"
    );
    let mut w = mlp_weights();
    w.insert("model.norm.weight".into(), HostTensor::zeros(DType::BF16, &[4]));
    let e = CpuExecutor::new(mlp_graph(), w).err().unwrap();
    assert_eq!(
        e.to_string(),
        "weights do not match the graph's params: mis-shaped `model.norm.weight` (expects f32[4], got bf16[4])"
    );
}

#[test]
fn symbolic_params_are_rejected() {
    let tr = Tracer::new();
    let p = tr.param("table", DType::F32, [Dim::sym("vocab"), Dim::fixed(2)]).unwrap();
    tr.output("t", p).unwrap();
    let e = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).err().unwrap();
    assert_eq!(e.to_string(), "param `table` has the symbolic type f32[vocab, 2]; params need fixed shapes");
}

#[test]
fn feed_errors_list_every_problem() {
    let tr = Tracer::new();
    let a = tr.input("a", DType::F32, [seq(), Dim::fixed(2)]).unwrap();
    let ids = tr.input("ids", DType::I64, [seq()]).unwrap();
    let m = tr.input("m", DType::F32, [seq()]).unwrap();
    tr.output("a", a).unwrap();
    tr.output("ids", ids).unwrap();
    tr.output("m", m).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let e = exec
        .run(&map(vec![("a", f(&[3], &[0.0; 3])), ("ids", f(&[3], &[0.0; 3])), ("junk", f(&[1], &[0.0]))]))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "feeds do not match the graph's inputs: missing `m`; unexpected `junk`; mis-typed `a` (expects \
         f32[seq, 2], got f32[3]), `ids` (expects i64[seq], got f32[3])"
    );
}

#[test]
fn symbol_conflicts_and_dim_mismatches_name_input_axis_and_values() {
    let tr = Tracer::new();
    let (past, s) = (Dim::sym("past"), seq());
    let x = tr.input("x", DType::F32, [s.clone(), Dim::fixed(2)]).unwrap();
    let cache = tr.input("cache", DType::F32, [past.clone(), Dim::fixed(2)]).unwrap();
    let mask = tr.input("mask", DType::F32, [s.clone(), &past + &s]).unwrap();
    let ids = tr.input("ids", DType::I64, [s]).unwrap();
    tr.output("x", x).unwrap();
    tr.output("cache", cache).unwrap();
    tr.output("mask", mask).unwrap();
    tr.output("ids", ids).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let feeds = |xs: usize, past: usize, mask: [usize; 2], ids: usize| {
        map(vec![
            ("x", f(&[xs, 2], &vec![0.0; xs * 2])),
            ("cache", f(&[past, 2], &vec![0.0; past * 2])),
            ("mask", f(&mask, &vec![0.0; mask[0] * mask[1]])),
            ("ids", HostTensor::from_i64(&[ids], vec![0; ids])),
        ])
    };
    exec.run(&feeds(3, 2, [3, 5], 3)).unwrap();
    let e = exec.run(&feeds(3, 2, [4, 6], 3)).unwrap_err();
    assert_eq!(e.to_string(), "input `mask` axis 0: symbol `seq` is 4 here but 3 from input `x` axis 0");
    let e = exec.run(&feeds(3, 2, [3, 5], 2)).unwrap_err();
    assert_eq!(e.to_string(), "input `ids` axis 0: symbol `seq` is 2 here but 3 from input `x` axis 0");
    let e = exec.run(&feeds(3, 2, [3, 4], 3)).unwrap_err();
    assert_eq!(e.to_string(), "input `mask` axis 1: size 4 does not match `past + seq` = 5");
    let e = exec
        .run(
            &feeds(3, 2, [3, 5], 3)
                .into_iter()
                .map(|(k, v)| if k == "x" { (k, f(&[3, 3], &[0.0; 9])) } else { (k, v) })
                .collect(),
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "input `x` axis 1: size 3 does not match `2` = 2");
}

#[test]
fn unbound_symbols_and_eval_errors_name_the_place() {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [&Dim::sym("a") + &Dim::sym("b")]).unwrap();
    tr.output("x", x).unwrap();
    let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
    let e = exec.run(&map(vec![("x", f(&[2], &[0.0; 2]))])).unwrap_err();
    assert_eq!(e.to_string(), "input `x` axis 0: cannot evaluate `a + b`: symbol `a` has no value");

    let tr = Tracer::new();
    let ids = tr.input("ids", DType::I64, [seq()]).unwrap();
    let y = tr
        .scope("model", || {
            tr.scope("embed", || {
                let table = tr.param("weight", DType::F32, [3usize, 2])?;
                table.gather(ids, 0)
            })
        })
        .unwrap();
    tr.output("y", y).unwrap();
    let g = tr.finish().unwrap();
    let node = g.outputs()["y"].node.index();
    let exec = CpuExecutor::new(g, map(vec![("model.embed.weight", f(&[3, 2], &[0.0; 6]))])).unwrap();
    let ok = exec.run(&map(vec![("ids", HostTensor::from_i64(&[2], vec![2, 0]))])).unwrap();
    assert_eq!(ok["y"].shape(), &[2, 2]);
    let e = exec.run(&map(vec![("ids", HostTensor::from_i64(&[2], vec![1, 7]))])).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("node %{node} (gather in `model.embed`): gather: index 7 out of range for axis 0 of size 3")
    );
}

// ---- matmul through gemm vs a naive loop ---------------------------------------------------------

fn naive_matmul(
    a: &[f32],
    b: &[f32],
    (batch, m, n, k): (usize, usize, usize, usize),
    ta: bool,
    tb: bool,
    shared: bool,
) -> Vec<f64> {
    let mut out = vec![0f64; batch * m * n];
    for bi in 0..batch {
        let (ao, bo) = (bi * m * k, if shared { 0 } else { bi * k * n });
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for l in 0..k {
                    let av = if ta { a[ao + l * m + i] } else { a[ao + i * k + l] };
                    let bv = if tb { b[bo + j * k + l] } else { b[bo + l * n + j] };
                    acc += av as f64 * bv as f64;
                }
                out[(bi * m + i) * n + j] = acc;
            }
        }
    }
    out
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn matmul_through_gemm_equals_naive_loop(
        batch in 1usize..4, m in 1usize..40, n in 1usize..70, k in 0usize..90,
        ta: bool, tb: bool, shared: bool, seed: u64,
    ) {
        let tr = Tracer::new();
        let bdims: Vec<Dim> = if shared { vec![] } else { vec![Dim::fixed(batch)] };
        let a_shape: Vec<usize> = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
        let b_mat: Vec<usize> = if tb { vec![n, k] } else { vec![k, n] };
        let b_shape: Vec<usize> = bdims.iter().map(|_| batch).chain(b_mat.iter().copied()).collect();
        let a = tr.input("a", DType::F32, kiln_graph::ops::Shape::fixed(&a_shape)).unwrap();
        let b = tr.input("b", DType::F32, kiln_graph::ops::Shape::fixed(&b_shape)).unwrap();
        tr.output("c", a.matmul_t(b, ta, tb).unwrap()).unwrap();
        let exec = CpuExecutor::new(tr.finish().unwrap(), IndexMap::new()).unwrap();
        let av = values(batch * m * k, seed);
        let bv = values(b_shape.iter().product(), seed ^ 0x5eed);
        let out = exec.run(&map(vec![("a", f(&a_shape, &av)), ("b", f(&b_shape, &bv))])).unwrap();
        prop_assert_eq!(out["c"].shape(), &[batch, m, n][..]);
        let want = naive_matmul(&av, &bv, (batch, m, n, k), ta, tb, shared);
        for (g, w) in out["c"].as_f32().unwrap().iter().zip(&want) {
            prop_assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "got {} want {}", g, w);
        }
    }
}

// ---- a Llama-135M-sized decode step (ignored: run by hand in release to see the speed) -----

fn split_heads<'t>(t: kiln_graph::Tensor<'t>, s: &Dim, n: usize, hd: usize) -> kiln_graph::Tensor<'t> {
    t.reshape([Dim::fixed(1), s.clone(), Dim::fixed(n), Dim::fixed(hd)]).unwrap()
}

/// Builds a SmolLM-135M-shaped Llama decode graph (hidden 576, 30 layers, intermediate
/// 1536, vocab 49152, 9 heads / 3 kv heads) with pseudo-random weights and prints the
/// time per decode step. `cargo test --release -p kiln-runtime --test cpu -- --ignored --nocapture`
#[test]
#[ignore]
fn llama_135m_decode_speed() {
    let (hidden, layers, inter, vocab, heads, kv_heads, hd) = (576usize, 30usize, 1536usize, 49152usize, 9, 3, 64);
    let tr = Tracer::new();
    let (one, s, past) = (Dim::fixed(1), seq(), Dim::sym("past"));
    let ids = tr.input("ids", DType::I64, [one.clone(), s.clone()]).unwrap();
    let cos = tr.input("cos", DType::F32, [s.clone(), Dim::fixed(hd)]).unwrap();
    let sin = tr.input("sin", DType::F32, [s.clone(), Dim::fixed(hd)]).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut param = |name: String, shape: Vec<usize>| {
        shapes.push((name.clone(), shape.clone()));
        tr.param(&name, DType::F32, kiln_graph::ops::Shape::fixed(&shape)).unwrap()
    };
    let embed = param("embed".into(), vec![vocab, hidden]);
    let mut x = embed.gather(ids, 0).unwrap();
    for l in 0..layers {
        let p = |n: &str| format!("l{l}.{n}");
        let kc = tr.input(&p("k_cache"), DType::F32, [one.clone(), past.clone(), Dim::fixed(kv_heads), Dim::fixed(hd)]);
        let vc = tr.input(&p("v_cache"), DType::F32, [one.clone(), past.clone(), Dim::fixed(kv_heads), Dim::fixed(hd)]);
        let h = x.rms_norm(param(p("ln1"), vec![hidden]), 1e-5).unwrap();
        let split = |t, n| split_heads(t, &s, n, hd);
        let q = split(h.linear(param(p("q"), vec![heads * hd, hidden]), None).unwrap(), heads).rope(cos, sin).unwrap();
        let k = split(h.linear(param(p("k"), vec![kv_heads * hd, hidden]), None).unwrap(), kv_heads)
            .rope(cos, sin)
            .unwrap();
        let v = split(h.linear(param(p("v"), vec![kv_heads * hd, hidden]), None).unwrap(), kv_heads);
        let k = kc.unwrap().concat(&[k], 1).unwrap();
        let v = vc.unwrap().concat(&[v], 1).unwrap();
        tr.output(&p("k_cache"), k).unwrap();
        tr.output(&p("v_cache"), v).unwrap();
        let a = q.attention(k, v, Mask::Causal, 0.125).unwrap();
        let a = a.reshape([one.clone(), s.clone(), Dim::fixed(hidden)]).unwrap();
        x = x.add(a.linear(param(p("o"), vec![hidden, heads * hd]), None).unwrap()).unwrap();
        let h = x.rms_norm(param(p("ln2"), vec![hidden]), 1e-5).unwrap();
        let g = h.linear(param(p("gate"), vec![inter, hidden]), None).unwrap().silu().unwrap();
        let u = h.linear(param(p("up"), vec![inter, hidden]), None).unwrap();
        x = x.add(g.mul(u).unwrap().linear(param(p("down"), vec![hidden, inter]), None).unwrap()).unwrap();
    }
    let x = x.rms_norm(param("norm".into(), vec![hidden]), 1e-5).unwrap();
    tr.output("logits", x.linear(embed, None).unwrap()).unwrap();
    let g = tr.finish().unwrap();
    let weights: IndexMap<String, HostTensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (n, sh))| {
            let len: usize = sh.iter().product();
            let v =
                if sh.len() == 1 { vec![1.0; len] } else { values(len, i as u64).iter().map(|x| x * 0.05).collect() };
            (n.clone(), f(sh, &v))
        })
        .collect();
    let exec = CpuExecutor::new(g, weights).unwrap();
    let mut caches: IndexMap<String, HostTensor> = (0..layers)
        .flat_map(|l| ["k_cache", "v_cache"].map(|c| (format!("l{l}.{c}"), f(&[1, 0, kv_heads, hd], &[]))))
        .collect();
    let mut tok = 1i64;
    let mut times = Vec::new();
    for step in 0..40 {
        let mut feeds = caches.clone();
        feeds.insert("ids".into(), HostTensor::from_i64(&[1, 1], vec![tok]));
        let ang: Vec<f32> =
            (0..hd).map(|j| step as f32 / 10000f32.powf((j % (hd / 2)) as f32 * 2.0 / hd as f32)).collect();
        feeds.insert("cos".into(), f(&[1, hd], &ang.iter().map(|a| a.cos()).collect::<Vec<_>>()));
        feeds.insert("sin".into(), f(&[1, hd], &ang.iter().map(|a| a.sin()).collect::<Vec<_>>()));
        let t0 = std::time::Instant::now();
        let mut out = exec.run(&feeds).unwrap();
        times.push(t0.elapsed().as_secs_f64());
        let logits = out.shift_remove("logits").unwrap();
        tok = logits
            .as_f32()
            .unwrap()
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as i64;
        caches = out;
    }
    let steady = &times[5..];
    let mean = steady.iter().sum::<f64>() / steady.len() as f64;
    println!("decode step: mean {:.1} ms ({:.1} tok/s), first {:.1} ms", mean * 1e3, 1.0 / mean, times[0] * 1e3);
}
