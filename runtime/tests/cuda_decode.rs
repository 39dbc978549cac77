//! The bandwidth-bound decode kernels of `kiln_codegen::decode` (GEMV, split-K decode
//! attention, sampling) launched directly on the GPU — compiled with
//! `kiln_codegen::Compiler`, loaded with cudarc, launched with `launch_kernel` on the
//! arguments `KernelSig::pack` orders — against f64 CPU references computed here.
//! Every GPU test starts with `gpu()` (the shared harness in `common/`), which prints `skipping: <reason>` and returns when
//! no GPU and CUDA libraries are usable, so `cargo test` passes anywhere.
//!
//! Lines starting with `kiln-check` / `kiln-info` are collected by `tools/gpu/run.sh`.

mod common;

use common::*;
use cudarc::driver::{CudaFunction, CudaSlice};
use kiln_codegen::decode;
use kiln_codegen::{ArgValue, Compiler, Kernel, Role};
use kiln_ops::{AttentionAttrs, Bindings, DType, Dim, F32Bits, HostTensor, Mask, Op, Sym};
use kiln_runtime::cuda::CudaExecutor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

// ---- GEMV ---------------------------------------------------------------------------------------

/// `y = x·wᵀ (+ r)` in f64; with `r`, the product is rounded to `yd` first (the fused
/// residual's contract).
fn gemv_ref(x: &[f64], w: &[f64], r: Option<&[f64]>, yd: DType, m: usize, n: usize, k: usize) -> Vec<f64> {
    (0..m * n)
        .into_par_iter()
        .map(|o| {
            let (i, j) = (o / n, o % n);
            let s: f64 = x[i * k..(i + 1) * k].iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
            match r {
                Some(r) => round_to(yd, s) + r[o],
                None => s,
            }
        })
        .collect()
}

/// Runs one GEMV (optionally with the residual) on random inputs; returns the relative
/// L2 error against the f64 reference.
#[allow(clippy::too_many_arguments)]
fn gemv_case(
    g: &Gpu,
    kern: &(Kernel, CudaFunction),
    cfg: decode::GemvConfig,
    (xd, wd, yd): (DType, DType, DType),
    residual: bool,
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> f64 {
    let mut r = rng(seed);
    let (xb, xv) = encode(xd, &uniform(&mut r, m * k, -1.0, 1.0));
    let (wb, wv) = encode(wd, &uniform(&mut r, n * k, -1.0, 1.0));
    let (rb, rv) = encode(yd, &uniform(&mut r, m * n, -1.0, 1.0));
    let (x, w, res) = (g.upload(&xb), g.upload(&wb), g.upload(&rb));
    let ybytes = m * n * yd.bytes_for(1);
    let y = g.poisoned(ybytes);
    let args: Args = vec![
        (Role::Out(0), g.arg(&y)),
        (Role::In(0), g.arg(&x)),
        (Role::In(1), g.arg(&w)),
        (Role::In(2), g.arg(&res)),
        (Role::MatM, ArgValue::I64(m as i64)),
        (Role::MatN, ArgValue::I64(n as i64)),
        (Role::MatK, ArgValue::I64(k as i64)),
    ];
    g.launch(&kern.0, &kern.1, decode::gemv_items_with(n, cfg), &args);
    let got = decode_values(yd, &g.download(&y, ybytes));
    let want = gemv_ref(&xv, &wv, residual.then_some(&rv[..]), yd, m, n, k);
    let e = rel_l2(&format!("{} m={m} n={n} k={k}", kern.0.sig.name), &got, &want);
    println!(
        "kiln-check\tdecode_gemv\t{}\t{yd}\t[{m}, {n}, {k}]\trel_l2={e:.3e}\ttol={:.0e}",
        kern.0.sig.name,
        gemv_tol(yd)
    );
    e
}

fn gemv_tol(yd: DType) -> f64 {
    match yd {
        DType::F32 => 1e-5,
        _ => 5e-3,
    }
}

/// Work splits the tests cover: the default and those `GemvConfig::for_rows` picks,
/// plus a few more for the bandwidth table.
const GEMV_CONFIGS: [decode::GemvConfig; 12] = [
    decode::GemvConfig { warps: 16, rows_per_warp: 1, unroll: 8, ksplit: 1, max_rows: 1 },
    decode::GemvConfig { warps: 16, rows_per_warp: 1, unroll: 4, ksplit: 1, max_rows: 1 },
    decode::GemvConfig { warps: 8, rows_per_warp: 1, unroll: 4, ksplit: 1, max_rows: 1 },
    decode::GemvConfig { warps: 8, rows_per_warp: 2, unroll: 4, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 1, unroll: 4, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 1, unroll: 8, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 4, rows_per_warp: 1, unroll: 8, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 2, unroll: 8, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 16, rows_per_warp: 1, unroll: 4, ksplit: 1, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 1, unroll: 4, ksplit: 2, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 1, unroll: 4, ksplit: 4, max_rows: 8 },
    decode::GemvConfig { warps: 8, rows_per_warp: 2, unroll: 4, ksplit: 8, max_rows: 8 },
];

const GEMV_SHAPES: [(usize, usize); 5] = [(2048, 2048), (8192, 2048), (2048, 8192), (129, 100), (576, 1536)];

#[test]
fn gemv_matches_f64_reference() {
    let Some(g) = gpu() else { return };
    for dt in [DType::F32, DType::BF16] {
        for cfg in GEMV_CONFIGS {
            let k = decode::gemv_with(dt, dt, dt, cfg).unwrap();
            let kern = (k.clone(), g.load(&k));
            for (si, &(n, kk)) in GEMV_SHAPES.iter().chain(&[(37, 1001), (1, 8)]).enumerate() {
                for m in [1, 2, 5, 8].into_iter().filter(|&m| m <= cfg.max_rows) {
                    let e = gemv_case(&g, &kern, cfg, (dt, dt, dt), false, m, n, kk, 100 + si as u64 * 10 + m as u64);
                    assert!(e < gemv_tol(dt), "gemv {dt} {cfg:?} m={m} n={n} k={kk}: relative L2 error {e}");
                }
            }
        }
    }
}

#[test]
fn gemv_mixed_dtypes_and_fused_residual() {
    let Some(g) = gpu() else { return };
    // Activations in f32 against bf16 weights, f32 out; and f16 throughout.
    for dts in [(DType::F32, DType::BF16, DType::F32), (DType::F16, DType::F16, DType::F16)] {
        let k = decode::gemv(dts.0, dts.1, dts.2).unwrap();
        let kern = (k.clone(), g.load(&k));
        for (m, n, kk) in [(1, 576, 1536), (3, 129, 100), (8, 2048, 2048)] {
            let e = gemv_case(&g, &kern, decode::GemvConfig::default(), dts, false, m, n, kk, 7);
            assert!(e < gemv_tol(dts.2), "{} m={m} n={n} k={kk}: relative L2 error {e}", k.sig.name);
        }
    }
    for dt in [DType::F32, DType::BF16] {
        let k = decode::gemv_residual(dt, dt, dt).unwrap();
        let kern = (k.clone(), g.load(&k));
        for (m, n, kk) in [(1, 2048, 2048), (5, 129, 100), (8, 576, 1536)] {
            let e = gemv_case(&g, &kern, decode::GemvConfig::default(), (dt, dt, dt), true, m, n, kk, 9);
            assert!(e < gemv_tol(dt), "{} m={m} n={n} k={kk}: relative L2 error {e}", k.sig.name);
        }
    }
    // Mixed dtypes with split-K.
    let dts = (DType::F32, DType::BF16, DType::F32);
    let cfg = decode::GemvConfig { ksplit: 4, max_rows: decode::GEMV_MAX_M, ..decode::GemvConfig::for_rows(1) };
    let k = decode::gemv_with(dts.0, dts.1, dts.2, cfg).unwrap();
    let kern = (k.clone(), g.load(&k));
    for (m, n, kk) in [(1, 2048, 2048), (1, 129, 1000), (3, 37, 4104)] {
        let e = gemv_case(&g, &kern, cfg, dts, false, m, n, kk, 11);
        assert!(e < gemv_tol(dts.2), "{} m={m} n={n} k={kk}: relative L2 error {e}", k.sig.name);
    }
}

/// Weight bandwidth of the GEMV per work split on the weight shapes of Llama-3.2-1B and
/// SmolLM2-135M (batch 1), each launch reading a different copy of the weight (together
/// far larger than L2, as in a decode step). Prints one line per shape: µs and GB/s per
/// split, and the split `GemvConfig::for_rows` picks. Informational: nothing is timed
/// against a threshold.
#[test]
#[ignore = "a measurement, not a check: run with --include-ignored on a GPU"]
fn gemv_bandwidth() {
    let Some(g) = gpu() else { return };
    let dt = DType::BF16;
    // Every split, in its form for any m and its one-row form.
    let mut configs: Vec<decode::GemvConfig> = GEMV_CONFIGS.to_vec();
    for c in GEMV_CONFIGS {
        let one = decode::GemvConfig { max_rows: 1, ..c };
        if !configs.contains(&one) {
            configs.push(one);
        }
    }
    let kernels: Vec<(decode::GemvConfig, Kernel, CudaFunction)> = configs
        .iter()
        .map(|&c| {
            let k = decode::gemv_with(dt, dt, dt, c).unwrap();
            let f = g.load(&k);
            (c, k, f)
        })
        .collect();
    let mut r = rng(5);
    let shapes = [
        (1, 3072, 2048),
        (1, 2048, 2048),
        (1, 16384, 2048),
        (1, 2048, 8192),
        (1, 128256, 2048),
        (1, 960, 576),
        (1, 576, 576),
        (1, 3072, 576),
        (1, 576, 1536),
        (1, 49152, 576),
        (8, 8192, 2048),
    ];
    for (m, n, kk) in shapes {
        let wbytes = n * kk * 2;
        let copies = (512usize << 20).div_ceil(wbytes).clamp(2, 1024);
        let (wb, _) = encode(dt, &uniform(&mut r, n * kk, -1.0, 1.0));
        let ws: Vec<CudaSlice<u8>> = (0..copies).map(|_| g.upload(&wb)).collect();
        let (xb, _) = encode(dt, &uniform(&mut r, m * kk, -1.0, 1.0));
        let x = g.upload(&xb);
        let y = g.poisoned(m * n * 2);
        let args = |i: usize| -> Args {
            vec![
                (Role::Out(0), g.arg(&y)),
                (Role::In(0), g.arg(&x)),
                (Role::In(1), g.arg(&ws[i % copies])),
                (Role::MatM, ArgValue::I64(m as i64)),
                (Role::MatN, ArgValue::I64(n as i64)),
                (Role::MatK, ArgValue::I64(kk as i64)),
            ]
        };
        let mut line = format!("kiln-info\tgemv_bandwidth\tm={m}\tn={n}\tk={kk}");
        for (c, k, f) in kernels.iter().filter(|(c, _, _)| m <= c.max_rows) {
            let items = decode::gemv_items_with(n, *c);
            for i in 0..10 {
                g.launch(k, f, items, &args(i));
            }
            let launches = 200;
            let start = g.event();
            for i in 0..launches {
                g.launch(k, f, items, &args(i));
            }
            let end = g.event();
            g.sync();
            let us = start.elapsed_ms(&end).expect("elapsed") as f64 * 1e3 / launches as f64;
            let gbs = wbytes as f64 / (us * 1e-6) / 1e9;
            line.push_str(&format!("\t{}={us:.1}us/{gbs:.0}", c.tag()));
            assert!(us > 0.0);
        }
        let pick = decode::GemvConfig::for_rows(m);
        line.push_str(&format!("\tpick={}", pick.tag()));
        // The streaming GEMV (one row of x): persistent blocks, one per multiprocessor.
        if m == 1 && decode::gemv_stream_fits(dt, kk) {
            let k = decode::gemv_stream(dt, dt, dt, kk).unwrap();
            let f = g.load(&k);
            let items = decode::gemv_stream_items(n, g.info.multiprocessors as usize);
            for i in 0..10 {
                g.launch(&k, &f, items, &args(i));
            }
            let start = g.event();
            for i in 0..200 {
                g.launch(&k, &f, items, &args(i));
            }
            let end = g.event();
            g.sync();
            let us = start.elapsed_ms(&end).expect("elapsed") as f64 * 1e3 / 200.0;
            line.push_str(&format!("\tstream={us:.1}us/{:.0}", wbytes as f64 / (us * 1e-6) / 1e9));
        }
        println!("{line}");
    }
}

/// The streaming GEMV against the f64 reference on random data, every decode shape of
/// the Llama-3.2-1B and SmolLM2 presets and a few odd ones (k not a multiple of an item,
/// n not of the warps), f32 and bf16, with a poisoned y: every row is written once.
#[test]
fn the_streaming_gemv_matches_the_reference() {
    let Some(g) = gpu() else { return };
    let mut r = rng(11);
    for dt in [DType::F32, DType::BF16] {
        for (n, kk) in [(3072, 2048), (2048, 8192), (960, 576), (576, 1536), (5, 8), (1000, 1032), (1, 16)] {
            let k = decode::gemv_stream(dt, dt, dt, kk).unwrap();
            let f = g.load(&k);
            let w = uniform(&mut r, n * kk, -1.0, 1.0);
            let x = uniform(&mut r, kk, -1.0, 1.0);
            let (wb, wq) = encode(dt, &w);
            let (xb, xq) = encode(dt, &x);
            let (wd, xd) = (g.upload(&wb), g.upload(&xb));
            let ybytes = dt.bytes_for(n);
            let y = g.poisoned(ybytes);
            let args: Args = vec![
                (Role::Out(0), g.arg(&y)),
                (Role::In(0), g.arg(&xd)),
                (Role::In(1), g.arg(&wd)),
                (Role::MatM, ArgValue::I64(1)),
                (Role::MatN, ArgValue::I64(n as i64)),
                (Role::MatK, ArgValue::I64(kk as i64)),
            ];
            g.launch(&k, &f, decode::gemv_stream_items(n, g.info.multiprocessors as usize), &args);
            g.sync();
            let got = decode_values(dt, &g.download(&y, ybytes));
            for row in 0..n {
                let want: f64 = (0..kk).map(|j| wq[row * kk + j] * xq[j]).sum();
                let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 } * (1.0 + want.abs());
                assert!((got[row] - want).abs() <= tol, "{dt} n={n} k={kk} row {row}: {} vs {want}", got[row]);
            }
        }
    }
}

// ---- decode attention ---------------------------------------------------------------------------

/// The launch arguments of `decode::attention_decode` for case `c` (caches of capacity
/// `c.cap`): buffers out, partial outputs, (max, sum) pairs, counters, q, k, v, syms;
/// `early`: the kernel reads the rows before the launch's own before it waits (what the
/// engine's captured decode step does; without a programmatic launch the wait is a no-op,
/// so the results must be the same bits).
fn attention_args(g: &Gpu, bufs: [&CudaSlice<u8>; 8], c: &AttnCase, splits: usize, early: bool) -> Args {
    let [out, po, pml, counters, q, k, v, syms] = bufs;
    let (mk, win) = mask_args(c.mask);
    let i = |x: usize| ArgValue::I64(x as i64);
    vec![
        (Role::Out(0), g.arg(out)),
        (Role::Out(1), g.arg(po)),
        (Role::Out(2), g.arg(pml)),
        (Role::Counters, g.arg(counters)),
        (Role::In(0), g.arg(q)),
        (Role::In(1), g.arg(k)),
        (Role::In(2), g.arg(v)),
        (Role::Syms, g.arg(syms)),
        (Role::Batch, i(c.b)),
        (Role::Seq, i(c.s)),
        (Role::Heads, i(c.h)),
        (Role::KvHeads, i(c.kh)),
        (Role::HeadDim, i(c.d)),
        (Role::ValueDim, i(c.dv)),
        (Role::KBatchStride, i(c.cap * c.kh * c.d)),
        (Role::VBatchStride, i(c.cap * c.kh * c.dv)),
        (Role::Splits, i(splits)),
        (Role::Early, ArgValue::I64(i64::from(early))),
        (Role::Scale, ArgValue::F32(c.scale)),
        (Role::MaskKind, ArgValue::I32(mk)),
        (Role::Window, ArgValue::I64(win)),
    ]
}

/// The f64 reference above agrees with `Op::Attention`'s CPU semantics (no GPU needed).
#[test]
fn attention_reference_matches_op_eval() {
    let (b, s, h, kh, d, t) = (2, 2, 4, 2, 8, 9);
    let mut r = rng(3);
    let q = uniform(&mut r, b * s * h * d, -1.0, 1.0);
    let k = uniform(&mut r, b * t * kh * d, -1.0, 1.0);
    let v = uniform(&mut r, b * t * kh * d, -1.0, 1.0);
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    for mask in [Mask::None, Mask::Causal, Mask::SlidingWindow(3)] {
        let c = AttnCase { b, s, h, kh, d, dv: d, t, cap: t, mask, scale: 0.3 };
        let want = attention_ref(&c, &f64s(&q), &f64s(&k), &f64s(&v));
        let op = Op::Attention(AttentionAttrs { mask, scale: F32Bits::new(0.3) });
        let ins = [
            HostTensor::from_f32(&[b, s, h, d], q.clone()),
            HostTensor::from_f32(&[b, t, kh, d], k.clone()),
            HostTensor::from_f32(&[b, t, kh, d], v.clone()),
        ];
        let got = op.eval(&[&ins[0], &ins[1], &ins[2]], &Bindings::new()).unwrap();
        let e = rel_l2("attention reference", &f64s(&got[0].to_f32_vec()), &want);
        assert!(e < 1e-6, "{mask:?}: reference and Op::eval differ by {e}");
    }
}

#[test]
fn attention_decode_matches_reference() {
    let Some(g) = gpu() else { return };
    let table = [Sym::new("past"), Sym::new("seq")];
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let sms = g.info.multiprocessors.max(1) as usize;
    let mut worst = [0f64; 2];
    for (di, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
        // Per GQA group: the kernel of its default query tile and the one-head tile the
        // engine switches to when the default leaves few blocks.
        let kernels: Vec<(usize, usize, Kernel, CudaFunction)> = [(4, 4), (4, 1), (3, 3), (3, 1), (1, 1)]
            .into_iter()
            .map(|(group, tile)| {
                assert!(tile == 1 || tile == decode::attention_decode_query_tile(group));
                let pk = decode::attention_decode_tiled(dt, group, tile, &keys, &table).unwrap();
                let pf = g.load(&pk);
                (group, tile, pk, pf)
            })
            .collect();
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        let mut syms_buf = g.upload(&[0u8; 16]);
        // Completion counters: zero before the first launch, and every launch leaves them
        // zero (checked below).
        let n_counters = decode::attention_decode_counters_tiled(3, 2, 32, 8, 1)
            .max(decode::attention_decode_counters_tiled(3, 2, 9, 3, 1));
        let counters = g.upload(&vec![0u8; 4 * n_counters]);
        let mut case_no = 0u64;
        for b in [1, 3] {
            for (h, kh) in [(32, 8), (9, 3), (4, 4)] {
                for (_, tile, pk, pf) in kernels.iter().filter(|k| k.0 == h / kh) {
                    let tile = *tile;
                    for d in [64, 128] {
                        for t in [1, 7, 200, 300, 4097] {
                            // Caches with room to spare; positions >= t hold NaN, which must
                            // never be read.
                            let cap = t + 3;
                            let mut r = rng(1000 + case_no);
                            case_no += 1;
                            let mut kvals = uniform(&mut r, b * cap * kh * d, -1.0, 1.0);
                            let mut vvals = uniform(&mut r, b * cap * kh * d, -1.0, 1.0);
                            for bi in 0..b {
                                for j in t..cap {
                                    let at = (bi * cap + j) * kh * d;
                                    kvals[at..at + kh * d].fill(f32::NAN);
                                    vvals[at..at + kh * d].fill(f32::NAN);
                                }
                            }
                            let (kb, kv) = encode(dt, &kvals);
                            let (vb, vv) = encode(dt, &vvals);
                            let (kbuf, vbuf) = (g.upload(&kb), g.upload(&vb));
                            for s in [1, 2] {
                                if t < s {
                                    continue;
                                }
                                let (qb, qv) = encode(dt, &uniform(&mut r, b * s * h * d, -2.0, 2.0));
                                let qbuf = g.upload(&qb);
                                let mut syms = Vec::new();
                                syms.extend_from_slice(&((t - s) as i64).to_le_bytes());
                                syms.extend_from_slice(&(s as i64).to_le_bytes());
                                g.write(&mut syms_buf, &syms);
                                let masks: &[Mask] = if d == 64 {
                                    &[Mask::Causal, Mask::SlidingWindow(16), Mask::None]
                                } else {
                                    &[Mask::Causal, Mask::SlidingWindow(16)]
                                };
                                for &mask in masks {
                                    let c = AttnCase {
                                        b,
                                        s,
                                        h,
                                        kh,
                                        d,
                                        dv: d,
                                        t,
                                        cap,
                                        mask,
                                        scale: 1.0 / (d as f32).sqrt(),
                                    };
                                    let want = attention_ref(&c, &qv, &kv, &vv);
                                    let suggested = decode::attention_decode_splits_tiled(b, s, h, kh, t, sms, tile);
                                    for splits in [suggested, 61] {
                                        decode::attention_decode_check(h, kh, d, d, splits).unwrap();
                                        let (wo, wml) = decode::attention_decode_workspace(b, s, h, d, splits);
                                        let (po, pml) = (g.poisoned(wo * 4), g.poisoned(wml * 4));
                                        let obytes = b * s * h * d * dt.bytes_for(1);
                                        let out = g.poisoned(obytes);
                                        let args = attention_args(
                                            &g,
                                            [&out, &po, &pml, &counters, &qbuf, &kbuf, &vbuf, &syms_buf],
                                            &c,
                                            splits,
                                            splits == 61,
                                        );
                                        let pi = decode::attention_decode_items_tiled(b, s, h, kh, splits, tile);
                                        g.launch(pk, pf, pi, &args);
                                        let what = format!(
                                        "{dt} b={b} s={s} h={h} kh={kh} tile={tile} d={d} t={t} {mask:?} splits={splits}"
                                    );
                                        let left = g.download(&counters, 4 * n_counters);
                                        assert!(
                                            left.iter().all(|&x| x == 0),
                                            "{what}: a completion counter was left set"
                                        );
                                        // The (max, sum) pairs written (splits with keys, when
                                        // there are several) are sums of weights <= 1 each, and a
                                        // zero sum comes with the -1e30 stand-in for -inf.
                                        let ml = decode_values(DType::F32, &g.download(&pml, wml * 4));
                                        for p in ml.chunks(2).filter(|p| !p[1].is_nan()) {
                                            assert!(
                                                p[1] >= 0.0 && (p[1] > 0.0 || p[0] <= -1e30) && p[1] <= t as f64,
                                                "{what}: {p:?}"
                                            );
                                        }
                                        let got = decode_values(dt, &g.download(&out, obytes));
                                        let e = rel_l2(&what, &got, &want);
                                        worst[di] = worst[di].max(e);
                                        assert!(e < tol, "{what}: relative L2 error {e}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        println!(
            "kiln-check\tdecode_attention\t{}\t{dt}\tcases={case_no}\tworst_rel_l2={:.3e}\ttol={tol:.0e}",
            kernels[0].2.sig.name, worst[di]
        );
    }
}

/// Head dims that are not multiples of 16 bytes (scalar staging), d != dv, and a batch
/// stride that breaks 16-byte alignment.
#[test]
fn attention_decode_odd_shapes() {
    let Some(g) = gpu() else { return };
    let table = [Sym::new("past"), Sym::new("seq")];
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    for dt in [DType::F32, DType::BF16] {
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        for (b, s, h, kh, d, dv, t, cap, mask) in [
            (2, 1, 4, 2, 100, 80, 333, 335, Mask::Causal),
            (1, 3, 8, 1, 256, 256, 1000, 1001, Mask::SlidingWindow(100)),
            (2, 2, 6, 3, 128, 64, 77, 79, Mask::None),
            (1, 1, 2, 2, 36, 36, 50, 53, Mask::Causal),
        ] {
            let pk = decode::attention_decode(dt, h / kh, &keys, &table).unwrap();
            let pf = g.load(&pk);
            let mut r = rng(77);
            let (qb, qv) = encode(dt, &uniform(&mut r, b * s * h * d, -1.0, 1.0));
            let (kb, kv) = encode(dt, &uniform(&mut r, b * cap * kh * d, -1.0, 1.0));
            let (vb, vv) = encode(dt, &uniform(&mut r, b * cap * kh * dv, -1.0, 1.0));
            let c = AttnCase { b, s, h, kh, d, dv, t, cap, mask, scale: 0.125 };
            let want = attention_ref(&c, &qv, &kv, &vv);
            let mut syms = Vec::new();
            syms.extend_from_slice(&((t - s) as i64).to_le_bytes());
            syms.extend_from_slice(&(s as i64).to_le_bytes());
            let (qbuf, kbuf, vbuf, sbuf) = (g.upload(&qb), g.upload(&kb), g.upload(&vb), g.upload(&syms));
            let splits = 7;
            let (wo, wml) = decode::attention_decode_workspace(b, s, h, dv, splits);
            let (po, pml) = (g.poisoned(wo * 4), g.poisoned(wml * 4));
            let obytes = b * s * h * dv * dt.bytes_for(1);
            let out = g.poisoned(obytes);
            let n_counters = decode::attention_decode_counters(b, s, h, kh);
            let counters = g.upload(&vec![0u8; 4 * n_counters]);
            let args = attention_args(&g, [&out, &po, &pml, &counters, &qbuf, &kbuf, &vbuf, &sbuf], &c, splits, false);
            let pi = decode::attention_decode_items(b, s, h, kh, splits);
            g.launch(&pk, &pf, pi, &args);
            assert!(g.download(&counters, 4 * n_counters).iter().all(|&x| x == 0), "a counter was left set");
            let got = decode_values(dt, &g.download(&out, obytes));
            let what = format!("{dt} b={b} s={s} h={h} kh={kh} d={d} dv={dv} t={t} cap={cap} {mask:?}");
            let e = rel_l2(&what, &got, &want);
            println!("kiln-check\tdecode_attention_odd\t{what}\trel_l2={e:.3e}\ttol={tol:.0e}");
            assert!(e < tol, "{what}: relative L2 error {e}");
        }
    }
}

/// Time per launch of decode attention (batch 1, one query row) on the Llama-3.2-1B and
/// SmolLM2-135M head shapes at a few context lengths: the engine's configuration (query
/// tile from `attention_decode_pick_tile`, its split count), and for comparison whole
/// GQA groups per block, one split (a grid of only the blocks with keys at short
/// lengths), 16 KiB stages instead of 48, and 16 warps per block. One key (`t=1`) shows
/// the kernel's fixed cost. Informational: nothing is timed against a threshold.
/// On an H200 (2026-12-04, µs back to back, SmolLM2 / 1B heads): the engine's kernel
/// 5.7 / 5.8 at one key, 7.6 / 7.7 at 200, 9.8 / 12.0 at 1,000, 12.6 / 23.5 at 4,000;
/// one split 5.0 / 5.1 at one key and 7.3 / 7.4 at 200 but 53 at 4,000; 16 KiB stages
/// and 16 warps slower from 200 keys on (the smallest GEMV, 576×576, takes 3.5).
#[test]
#[ignore = "a measurement, not a check: run with --include-ignored on a GPU"]
fn attention_decode_timing() {
    let Some(g) = gpu() else { return };
    let table = [Sym::new("past"), Sym::new("seq")];
    let keys = &Dim::sym("past") + &Dim::sym("seq");
    let dt = DType::BF16;
    let sms = g.info.multiprocessors.max(1) as usize;
    let mut r = rng(11);
    for (h, kh, d) in [(32, 8, 64), (9, 3, 64)] {
        let (b, s, cap) = (1, 1, 4096 + 16);
        let engine_tile = decode::attention_decode_pick_tile(b, s, h, kh);
        let group_tile = decode::attention_decode_query_tile(h / kh);
        // (what, tile, splits: None = the engine's for the tile, stage bytes, warps: 0 =
        // the kernel's own)
        let full = decode::ATTENTION_DECODE_STAGE_BYTES;
        let variants: [(&str, usize, Option<usize>, usize, u32); 5] = [
            ("engine", engine_tile, None, full, 0),
            ("group_tile", group_tile, None, full, 0),
            ("one_split", engine_tile, Some(1), full, 0),
            ("stage16k", engine_tile, None, 16 << 10, 0),
            ("warps16", engine_tile, None, full, 16),
        ];
        for (what, tile, fixed_splits, stage, warps) in variants {
            let mut pk = decode::attention_decode_tiled(dt, h / kh, tile, &keys, &table).unwrap();
            if warps > 0 {
                let kiln_codegen::Grid::BlockPerItem { threads } = pk.grid else { panic!("{:?}", pk.grid) };
                let from = format!("#define AD_WARPS {}", threads / 32);
                assert!(pk.source.contains(&from), "the warps define");
                pk.source = pk.source.replace(&from, &format!("#define AD_WARPS {warps}"));
                pk.grid = kiln_codegen::Grid::BlockPerItem { threads: 32 * warps };
            }
            if stage != decode::ATTENTION_DECODE_STAGE_BYTES {
                let from = format!("#define AD_STAGE {}", decode::ATTENTION_DECODE_STAGE_BYTES);
                assert!(pk.source.contains(&from), "the stage define");
                pk.source = pk.source.replace(&from, &format!("#define AD_STAGE {stage}"));
                pk.dynamic_smem = 2 * stage as u32;
            }
            let pf = g.load(&pk);
            for t in [1, 150, 200, 250, 300, 384, 1000, 4000] {
                let (kb, _) = encode(dt, &uniform(&mut r, b * cap * kh * d, -1.0, 1.0));
                let (vb, _) = encode(dt, &uniform(&mut r, b * cap * kh * d, -1.0, 1.0));
                let (qb, _) = encode(dt, &uniform(&mut r, b * s * h * d, -1.0, 1.0));
                let (kbuf, vbuf, qbuf) = (g.upload(&kb), g.upload(&vb), g.upload(&qb));
                let mut syms = Vec::new();
                syms.extend_from_slice(&((t - s) as i64).to_le_bytes());
                syms.extend_from_slice(&(s as i64).to_le_bytes());
                let sbuf = g.upload(&syms);
                let splits = fixed_splits
                    .unwrap_or_else(|| decode::attention_decode_splits_tiled(b, s, h, kh, 16384, sms, tile));
                let (wo, wml) = decode::attention_decode_workspace(b, s, h, d, splits);
                let (po, pml) = (g.poisoned(wo * 4), g.poisoned(wml * 4));
                let out = g.poisoned(b * s * h * d * 2);
                let counters = g.upload(&vec![0u8; 4 * decode::attention_decode_counters_tiled(b, s, h, kh, tile)]);
                let case = AttnCase { b, s, h, kh, d, dv: d, t, cap, mask: Mask::Causal, scale: 0.125 };
                let args =
                    attention_args(&g, [&out, &po, &pml, &counters, &qbuf, &kbuf, &vbuf, &sbuf], &case, splits, false);
                let items = decode::attention_decode_items_tiled(b, s, h, kh, splits, tile);
                for _ in 0..10 {
                    g.launch(&pk, &pf, items, &args);
                }
                let launches = 200;
                let start = g.event();
                for _ in 0..launches {
                    g.launch(&pk, &pf, items, &args);
                }
                let end = g.event();
                g.sync();
                let us = start.elapsed_ms(&end).expect("elapsed") as f64 * 1e3 / launches as f64;
                println!(
                    "kiln-info\tattention_decode_timing\t{what}\th={h}\tkh={kh}\td={d}\tt={t}\ttile={tile}\t\
                     splits={splits}\tstage={stage}\tblocks={items}\tus={us:.1}"
                );
                assert!(us > 0.0);
            }
        }
    }
}

// ---- sampling -----------------------------------------------------------------------------------

/// SplitMix64's finalizer of `z + golden`, as in `sample.cu`.
fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The documented sampling semantics, in f64 over the kernel's f32 scaled logits: the
/// token the kernel must pick for (seed, step, row).
fn sample_replica(l: &[f32], temperature: f32, top_k: usize, top_p: f32, seed: u64, step: u64, row: u64) -> usize {
    let inv = 1.0f32 / temperature;
    let x: Vec<f64> = l.iter().map(|&v| (v * inv + 0.0) as f64).collect();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sorted = x.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut tau = f64::NEG_INFINITY;
    if top_k > 0 && top_k < x.len() {
        tau = sorted[top_k - 1];
    }
    if top_p < 1.0 {
        let zk: f64 = x.iter().filter(|&&v| v >= tau).map(|v| (v - m).exp()).sum();
        let target = (top_p as f64 - 1e-6) * zk;
        let mut cum = 0.0;
        let mut i = 0;
        let mut t2 = tau;
        while i < sorted.len() && sorted[i] >= tau {
            let v = sorted[i];
            while i < sorted.len() && sorted[i] == v {
                cum += (v - m).exp();
                i += 1;
            }
            t2 = v;
            if cum >= target {
                break;
            }
        }
        tau = tau.max(t2);
    }
    let kept: f64 = x.iter().filter(|&&v| v >= tau).map(|v| (v - m).exp()).sum();
    let h = mix(mix(mix(seed) ^ step) ^ row);
    let u = (h >> 40) as f64 / 16777216.0;
    let target = u * kept;
    let mut run = 0.0;
    let mut last = 0;
    for (i, &v) in x.iter().enumerate() {
        if v >= tau {
            let e = (v - m).exp();
            if e > 0.0 {
                last = i;
            }
            run += e;
            if e > 0.0 && run > target {
                return i;
            }
        }
    }
    last
}

/// `log_softmax(logits / temperature)[i]` in f64.
fn log_softmax_scaled(l: &[f32], temperature: f32, i: usize) -> f64 {
    let x: Vec<f64> = l.iter().map(|&v| v as f64 / temperature as f64).collect();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x[i] - lse
}

struct Sampler {
    k: Kernel,
    f: CudaFunction,
    dt: DType,
    step: CudaSlice<u8>,
}

impl Sampler {
    fn new(g: &Gpu, dt: DType) -> Sampler {
        let k = decode::sample(dt).unwrap();
        let f = g.load(&k);
        let step = g.upload(&0i64.to_le_bytes());
        Sampler { k, f, dt, step }
    }
    fn set_step(&mut self, g: &Gpu, v: i64) {
        g.write(&mut self.step, &v.to_le_bytes());
    }
    fn step(&self, g: &Gpu) -> i64 {
        i64::from_le_bytes(g.download(&self.step, 8).try_into().unwrap())
    }
    /// Uploads `logits` (`[rows, vocab]`) in the sampler's dtype: (buffer, the stored values).
    fn logits(&self, g: &Gpu, logits: &[f32]) -> (CudaSlice<u8>, Vec<f32>) {
        let (b, v) = encode(self.dt, logits);
        (g.upload(&b), v.iter().map(|&x| x as f32).collect())
    }
    /// One launch: (ids, logprobs).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        g: &Gpu,
        logits: &CudaSlice<u8>,
        rows: usize,
        vocab: usize,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        seed: u64,
    ) -> (Vec<i64>, Vec<f32>) {
        let (ids, lps) = (g.poisoned(rows * 8), g.poisoned(rows * 4));
        let args: Args = vec![
            (Role::Out(0), g.arg(&ids)),
            (Role::Out(1), g.arg(&lps)),
            (Role::In(0), g.arg(logits)),
            (Role::Step, g.arg(&self.step)),
            (Role::N, ArgValue::I64(rows as i64)),
            (Role::Len, ArgValue::I64(vocab as i64)),
            (Role::Temperature, ArgValue::F32(temperature)),
            (Role::TopK, ArgValue::I64(top_k)),
            (Role::TopP, ArgValue::F32(top_p)),
            (Role::Seed, ArgValue::I64(seed as i64)),
        ];
        g.launch(&self.k, &self.f, decode::sample_items(rows), &args);
        let ids: Vec<i64> =
            g.download(&ids, rows * 8).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let lps: Vec<f32> =
            g.download(&lps, rows * 4).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        (ids, lps)
    }
}

fn repeat_rows(row: &[f32], rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|_| row.iter().copied()).collect()
}

fn normal_logits(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    // Sum of uniforms: close enough to a normal for logits.
    (0..n).map(|_| (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>() * scale).collect()
}

#[test]
fn greedy_sampling_is_argmax_with_ties_to_the_lowest_index() {
    let Some(g) = gpu() else { return };
    for dt in [DType::F32, DType::BF16] {
        let s = Sampler::new(&g, dt);
        for vocab in [1000, 128256] {
            let mut r = rng(vocab as u64);
            let rows = 4;
            let mut logits = normal_logits(&mut r, rows * vocab, 2.0);
            // Row 1: a tie at the maximum; row 2: every value equal; row 3: -inf padding.
            let mx = logits[vocab..2 * vocab].iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            logits[vocab + 917] = mx;
            logits[vocab + 17] = mx;
            logits[2 * vocab..3 * vocab].fill(0.5);
            logits[3 * vocab..3 * vocab + 100].fill(f32::NEG_INFINITY);
            let (buf, stored) = s.logits(&g, &logits);
            for (temperature, top_k) in [(0.0f32, 0i64), (0.7, 1), (1.0, 1), (2.5, 1)] {
                let (ids, lps) = s.run(&g, &buf, rows, vocab, temperature, top_k, 0.9, 42);
                for row in 0..rows {
                    let l = &stored[row * vocab..(row + 1) * vocab];
                    let want = kiln_runtime::sampling::argmax(l);
                    if row == 1 {
                        assert_eq!(want, 17);
                    }
                    let id = ids[row] as usize;
                    if top_k == 1 {
                        // Top-k keeps every tie of the k-th value (documented): any maximum.
                        assert_eq!(l[id], l[want], "{dt} vocab={vocab} row {row} T={temperature}: {id} is no maximum");
                    } else {
                        assert_eq!(id, want, "{dt} vocab={vocab} row {row}: greedy");
                    }
                    let t = if temperature > 0.0 { temperature } else { 1.0 };
                    let lp = log_softmax_scaled(l, t, id);
                    assert!((lps[row] as f64 - lp).abs() < 1e-4, "{dt} row {row}: logprob {} vs {lp}", lps[row]);
                }
            }
        }
    }
    // A NaN logit: the greedy rule (NaN first), logprob NaN.
    let s = Sampler::new(&g, DType::F32);
    let mut l = vec![0.0f32; 300];
    l[5] = 3.0;
    l[200] = f32::NAN;
    let (buf, _) = s.logits(&g, &l);
    let (ids, lps) = s.run(&g, &buf, 1, 300, 1.0, 0, 1.0, 1);
    assert_eq!(ids[0], 200);
    assert!(lps[0].is_nan());
}

/// The split greedy kernel (`decode::greedy`, what the engine samples with) against
/// `Op::ArgMax`'s CPU semantics: ties to the lowest index across and within blocks, NaN first, an
/// unaligned row length (scalar path), and two launches in a row (the last block of
/// each row resets its counter).
/// `Op::ArgMax`'s CPU semantics: the first NaN if there is one, else the first maximum.
fn argmax_nan_first(l: &[f32]) -> usize {
    l.iter().position(|v| v.is_nan()).unwrap_or_else(|| kiln_runtime::sampling::argmax(l))
}

#[test]
fn split_greedy_is_the_cpu_argmax() {
    let Some(g) = gpu() else { return };
    let k = decode::greedy().unwrap();
    let f = g.load(&k);
    for vocab in [7usize, 1000, 4097, 49152, 128256, 128257] {
        let splits = decode::greedy_splits(vocab);
        let rows = 5;
        let mut r = rng(vocab as u64 + 7);
        let mut logits = normal_logits(&mut r, rows * vocab, 2.0);
        // Row 1: the maximum twice (in different blocks for the long rows): the lower
        // index wins. Row 2: all equal. Row 3: NaN late in the row.
        // Row 4: -inf everywhere but one entry at the end.
        let mx = logits[vocab..2 * vocab].iter().cloned().fold(f32::MIN, f32::max) + 1.0;
        logits[vocab + vocab - 1] = mx;
        logits[vocab + vocab / 3] = mx;
        logits[2 * vocab..3 * vocab].fill(0.5);
        logits[3 * vocab + vocab - 2] = f32::NAN;
        logits[4 * vocab..5 * vocab].fill(f32::NEG_INFINITY);
        logits[5 * vocab - 1] = -3.0;
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let buf = g.upload(&bytes);
        let ids = g.poisoned(rows * 8);
        let ws = g.poisoned(12 * rows * splits + 8);
        let counters = g.upload(&vec![0u8; 4 * rows]);
        let p1 = g.ptr(&ws);
        let p2 = p1 + (4 * rows * splits).next_multiple_of(8) as u64;
        let args: Args = vec![
            (Role::Out(0), g.arg(&ids)),
            (Role::Out(1), ArgValue::Ptr(p1)),
            (Role::Out(2), ArgValue::Ptr(p2)),
            (Role::Counters, g.arg(&counters)),
            (Role::In(0), g.arg(&buf)),
            (Role::N, ArgValue::I64(rows as i64)),
            (Role::Len, ArgValue::I64(vocab as i64)),
            (Role::Splits, ArgValue::I64(splits as i64)),
        ];
        for launch in 0..2 {
            g.launch(&k, &f, decode::greedy_items(rows, splits), &args);
            let got: Vec<i64> =
                g.download(&ids, rows * 8).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            for row in 0..rows {
                let want = argmax_nan_first(&logits[row * vocab..(row + 1) * vocab]);
                assert_eq!(got[row] as usize, want, "vocab {vocab} ({splits} splits) row {row}, launch {launch}");
            }
            assert_eq!(got[1] as usize, vocab / 3);
            assert_eq!(got[2], 0);
            assert_eq!(got[3] as usize, vocab - 2);
            assert_eq!(got[4] as usize, vocab - 1);
            assert_eq!(g.download(&counters, 4 * rows), vec![0u8; 4 * rows], "counters reset");
        }
    }
}

#[test]
fn sampling_follows_the_documented_semantics() {
    let Some(g) = gpu() else { return };
    let seed = 0x5eed;
    for dt in [DType::F32, DType::BF16] {
        let mut s = Sampler::new(&g, dt);
        for (vocab, rows) in [(1000usize, 300usize), (50000, 64), (256000, 4)] {
            let mut r = rng(vocab as u64 + 1);
            let mut row = normal_logits(&mut r, vocab, 1.5);
            // Ties: a block of equal values around the top.
            let top = row.iter().cloned().fold(f32::MIN, f32::max);
            for i in (3..vocab).step_by(vocab / 7) {
                row[i] = top - 0.25;
            }
            let (buf, stored) = s.logits(&g, &repeat_rows(&row, rows));
            let l = &stored[..vocab];
            for (temperature, top_k, top_p) in
                [(1.0f32, 0i64, 1.0f32), (0.8, 50, 1.0), (1.2, 0, 0.9), (1.0, 40, 0.8), (0.5, 7, 0.3), (1.0, 3, 1.0)]
            {
                s.set_step(&g, 3 * rows as i64); // launch 3 of a counter that started at 0
                let (ids, lps) = s.run(&g, &buf, rows, vocab, temperature, top_k, top_p, seed);
                assert_eq!(s.step(&g), 4 * rows as i64, "the counter advances by one per row");
                let mut mismatches = 0;
                for (row_i, (&id, &lp)) in ids.iter().zip(&lps).enumerate() {
                    let want = sample_replica(l, temperature, top_k as usize, top_p, seed, 3, row_i as u64);
                    if id as usize != want {
                        mismatches += 1;
                        println!(
                            "{dt} vocab={vocab} T={temperature} k={top_k} p={top_p} row {row_i}: got {id}, want {want}"
                        );
                    }
                    let wlp = log_softmax_scaled(l, temperature, id as usize);
                    assert!((lp as f64 - wlp).abs() < 1e-4, "{dt} vocab={vocab}: logprob {lp} vs {wlp}");
                }
                println!(
                    "kiln-check\tdecode_sample\t{dt}\tvocab={vocab}\trows={rows}\tT={temperature}\ttop_k={top_k}\ttop_p={top_p}\tmismatches={mismatches}"
                );
                // Only a draw landing within rounding of a boundary may differ.
                assert!(
                    mismatches <= 1,
                    "{dt} vocab={vocab} T={temperature} k={top_k} p={top_p}: {mismatches} picks differ"
                );
            }
        }
    }
}

#[test]
fn sampling_histogram_matches_softmax() {
    let Some(g) = gpu() else { return };
    let mut s = Sampler::new(&g, DType::F32);
    let probs = [0.1f64, 0.2, 0.3, 0.4];
    let l: Vec<f32> = probs.iter().map(|p| (p.ln() as f32) * 0.7).collect(); // softmax(l / 0.7) = probs
    let rows = 1000;
    let (buf, _) = s.logits(&g, &repeat_rows(&l, rows));
    s.set_step(&g, 0);
    let mut counts = [0usize; 4];
    let launches = 20;
    for _ in 0..launches {
        let (ids, lps) = s.run(&g, &buf, rows, 4, 0.7, 0, 1.0, 99);
        for (&id, &lp) in ids.iter().zip(&lps) {
            counts[id as usize] += 1;
            assert!((lp as f64 - probs[id as usize].ln()).abs() < 1e-4, "logprob {lp} of {id}");
        }
    }
    assert_eq!(s.step(&g), (rows * launches) as i64);
    let n = (rows * launches) as f64;
    for (i, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
        let f = c as f64 / n;
        println!("kiln-check\tdecode_sample_histogram\ttoken {i}\tfreq={f:.4}\tprob={p}");
        assert!((f - p).abs() < 0.02, "token {i}: frequency {f} vs probability {p} ({counts:?})");
    }
    // A peaked distribution under top_p = 0.5 always gives its top token.
    let mut r = rng(8);
    let mut peaked: Vec<f32> = normal_logits(&mut r, 1000, 0.25);
    peaked[321] = 8.0;
    let p_top = {
        let z: f64 = peaked.iter().map(|&v| (v as f64 - 8.0).exp()).sum();
        1.0 / z
    };
    assert!(p_top > 0.5, "test distribution not peaked enough: {p_top}");
    let (buf, _) = s.logits(&g, &repeat_rows(&peaked, 256));
    for launch in 0..4 {
        let (ids, _) = s.run(&g, &buf, 256, 1000, 1.0, 0, 0.5, launch);
        assert!(ids.iter().all(|&i| i == 321), "top_p=0.5: {ids:?}");
    }
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let Some(g) = gpu() else { return };
    let mut s = Sampler::new(&g, DType::F32);
    let mut r = rng(4);
    let vocab = 1000;
    let l = normal_logits(&mut r, vocab, 0.5);
    let (buf, _) = s.logits(&g, &l);
    let run = |s: &mut Sampler, seed: u64| -> Vec<i64> {
        s.set_step(&g, 0);
        (0..50).map(|_| s.run(&g, &buf, 1, vocab, 1.0, 0, 1.0, seed).0[0]).collect()
    };
    let a = run(&mut s, 11);
    let b = run(&mut s, 11);
    let c = run(&mut s, 12);
    assert_eq!(a, b, "same seed and counter, same tokens");
    assert_ne!(a, c, "different seeds");
    // The counter makes consecutive launches draw fresh numbers.
    let distinct: std::collections::HashSet<i64> = a.iter().copied().collect();
    assert!(distinct.len() > 10, "50 draws over a flat distribution gave {} tokens", distinct.len());
}

#[test]
fn sampling_time() {
    let Some(g) = gpu() else { return };
    let s = Sampler::new(&g, DType::F32);
    let mut r = rng(6);
    let vocab = 128256;
    let (buf, _) = s.logits(&g, &normal_logits(&mut r, vocab, 2.0));
    for (name, temperature, top_k, top_p) in
        [("greedy", 0.0f32, 0i64, 1.0f32), ("temperature", 1.0, 0, 1.0), ("top_k50_top_p0.9", 1.0, 50, 0.9)]
    {
        s.run(&g, &buf, 1, vocab, temperature, top_k, top_p, 1);
        let start = g.event();
        let n = 20;
        for _ in 0..n {
            let (ids, lps) = (g.poisoned(8), g.poisoned(4));
            let args: Args = vec![
                (Role::Out(0), g.arg(&ids)),
                (Role::Out(1), g.arg(&lps)),
                (Role::In(0), g.arg(&buf)),
                (Role::Step, g.arg(&s.step)),
                (Role::N, ArgValue::I64(1)),
                (Role::Len, ArgValue::I64(vocab as i64)),
                (Role::Temperature, ArgValue::F32(temperature)),
                (Role::TopK, ArgValue::I64(top_k)),
                (Role::TopP, ArgValue::F32(top_p)),
                (Role::Seed, ArgValue::I64(1)),
            ];
            g.launch(&s.k, &s.f, 1, &args);
        }
        let end = g.event();
        g.sync();
        let us = start.elapsed_ms(&end).unwrap() as f64 * 1e3 / n as f64;
        println!("kiln-info\tsample_time\t{name}\tvocab={vocab}\trows=1\tus_per_launch={us:.1}");
    }
}

/// Every decode kernel variant compiles with NVRTC (needs only NVRTC, not a GPU: the
/// architecture is the device's, or sm_90 without one).
#[test]
fn every_decode_kernel_variant_compiles() {
    if !kiln_codegen::nvrtc::nvrtc_present() {
        println!("skipping: libnvrtc could not be loaded");
        return;
    }
    let cc = CudaExecutor::available().map(|i| i.compute_capability).unwrap_or((9, 0));
    let compiler = Compiler::new(cc, None).unwrap();
    let floats = [DType::F32, DType::F16, DType::BF16];
    let mut ks = Vec::new();
    for &x in &floats {
        for &w in &floats {
            ks.push(decode::gemv(x, w, x).unwrap());
            ks.push(decode::gemv_residual(x, w, x).unwrap());
            ks.push(
                decode::gemv_with(x, w, x, decode::GemvConfig { ksplit: 4, ..decode::GemvConfig::for_rows(1) })
                    .unwrap(),
            );
        }
        let keys = &Dim::sym("past") + &Dim::sym("seq");
        let p = decode::attention_decode(x, 4, &keys, &[Sym::new("past"), Sym::new("seq")]).unwrap();
        ks.extend([p, decode::sample(x).unwrap()]);
    }
    ks.push(decode::greedy().unwrap());
    let refs: Vec<&Kernel> = ks.iter().collect();
    let (cubins, stats) = compiler.compile_all(&refs).unwrap_or_else(|e| panic!("{e}"));
    assert!(cubins.iter().all(|c| !c.is_empty()));
    println!("kiln-time\tnvrtc_decode_variants\tkernels={}\tseconds={:.3}", ks.len(), stats.seconds);
}
