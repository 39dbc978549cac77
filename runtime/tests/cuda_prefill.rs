//! The tensor-core prefill attention kernel of `kiln_codegen::prefill` launched directly
//! on the GPU (compiled with `kiln_codegen::Compiler`, launched on the arguments
//! `KernelSig::pack` orders) against the f64 reference `common::attention_ref`. Every
//! GPU test starts with `common::gpu`, which prints `skipping: <reason>` and returns
//! when no GPU and CUDA libraries are usable, so `cargo test` passes anywhere.
//!
//! Tolerances (relative L2 error of the whole output against f64): bf16 1e-2, f16 2e-3.
//! The kernel rounds q·k inputs exactly as stored, rounds the softmax probabilities to the
//! storage type for P·V and the output once; that costs a few 1e-3 in bf16 (8-bit
//! mantissa) and a few 1e-4 in f16. Caches hold NaN at positions `>= t` (never to be
//! read) and the output is poisoned with NaN before each launch (every element must be
//! written).
//!
//! Lines starting with `kiln-check` / `kiln-info` are collected by `tools/gpu/run.sh`.

mod common;

use common::{decode_values, encode, gpu, mask_args, rel_l2, rng, uniform, Args, AttnCase, Gpu};
use cudarc::driver::{CudaFunction, CudaSlice};
use kiln_codegen::prefill::PrefillTuning;
use kiln_codegen::{decode, prefill, ArgValue, Compiler, Kernel, Role};
use kiln_ops::{DType, Dim, Mask, Sym};
use kiln_runtime::cuda::CudaExecutor;
use rand_chacha::ChaCha8Rng;

/// The symbol table of these tests: `past`, `seq`; the key count is `past + seq`.
fn table() -> [Sym; 2] {
    [Sym::new("past"), Sym::new("seq")]
}

fn keys() -> Dim {
    &Dim::sym("past") + &Dim::sym("seq")
}

fn tol(dt: DType) -> f64 {
    if dt == DType::F16 {
        2e-3
    } else {
        1e-2
    }
}

/// Random values that bf16 and f16 both store exactly (bf16-rounded, no f16 subnormals),
/// so one f64 reference serves both dtypes.
fn shared_values(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    uniform(r, n, lo, hi)
        .into_iter()
        .map(|x| {
            let y = half::bf16::from_f32(x).to_f32();
            if y.abs() < 1.0 / 16384.0 {
                0.0
            } else {
                y
            }
        })
        .collect()
}

/// A cache `[b, cap, kh, d]` of random values with NaN at positions `>= t`.
fn cache(r: &mut ChaCha8Rng, b: usize, cap: usize, kh: usize, d: usize, t: usize) -> Vec<f32> {
    let mut v = shared_values(r, b * cap * kh * d, -1.0, 1.0);
    for bi in 0..b {
        for j in t..cap {
            let at = (bi * cap + j) * kh * d;
            v[at..at + kh * d].fill(f32::NAN);
        }
    }
    v
}

/// Device buffers of one problem; `offset` elements of padding before each (an offset
/// of 1 breaks 16-byte alignment: the kernel's plain-load path).
struct Bufs {
    q: CudaSlice<u8>,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    out: CudaSlice<u8>,
    syms: CudaSlice<u8>,
    offset: usize,
}

impl Bufs {
    fn new(g: &Gpu, dt: DType, q: &[f32], k: &[f32], v: &[f32], out_elems: usize, offset: usize) -> Bufs {
        let pad = |x: &[f32]| -> Vec<u8> {
            let mut e = vec![0u8; offset * 2];
            e.extend(encode(dt, x).0);
            e
        };
        Bufs {
            q: g.upload(&pad(q)),
            k: g.upload(&pad(k)),
            v: g.upload(&pad(v)),
            out: g.poisoned((out_elems + offset) * 2),
            syms: g.upload(&[0u8; 16]),
            offset,
        }
    }
    fn at(&self, g: &Gpu, s: &CudaSlice<u8>) -> ArgValue {
        ArgValue::Ptr(g.ptr(s) + 2 * self.offset as u64)
    }
}

/// Launch arguments of a prefill (or decode partial) launch for case `c` with a K cache
/// of capacity `c.cap` and a V cache of capacity `vcap`.
fn args(g: &Gpu, bufs: &Bufs, c: &AttnCase, vcap: usize) -> Args {
    let (mk, win) = mask_args(c.mask);
    vec![
        (Role::Out(0), bufs.at(g, &bufs.out)),
        (Role::In(0), bufs.at(g, &bufs.q)),
        (Role::In(1), bufs.at(g, &bufs.k)),
        (Role::In(2), bufs.at(g, &bufs.v)),
        (Role::Syms, g.arg(&bufs.syms)),
        (Role::Batch, ArgValue::I64(c.b as i64)),
        (Role::Seq, ArgValue::I64(c.s as i64)),
        (Role::Heads, ArgValue::I64(c.h as i64)),
        (Role::KvHeads, ArgValue::I64(c.kh as i64)),
        (Role::HeadDim, ArgValue::I64(c.d as i64)),
        (Role::ValueDim, ArgValue::I64(c.dv as i64)),
        (Role::KBatchStride, ArgValue::I64((c.cap * c.kh * c.d) as i64)),
        (Role::VBatchStride, ArgValue::I64((vcap * c.kh * c.dv) as i64)),
        (Role::Scale, ArgValue::F32(c.scale)),
        (Role::MaskKind, ArgValue::I32(mk)),
        (Role::Window, ArgValue::I64(win)),
    ]
}

/// Sets the symbol table to `past = t - s`, `seq = s`.
fn set_keys(g: &Gpu, bufs: &mut Bufs, s: usize, t: usize) {
    let mut syms = Vec::new();
    syms.extend_from_slice(&((t - s) as i64).to_le_bytes());
    syms.extend_from_slice(&(s as i64).to_le_bytes());
    g.write(&mut bufs.syms, &syms);
}

/// Poisons the output, launches, and returns the output's values.
fn run(g: &Gpu, k: &(Kernel, CudaFunction), bufs: &Bufs, c: &AttnCase, vcap: usize, dt: DType) -> Vec<f64> {
    let elems = c.b * c.s * c.h * c.dv;
    let bytes = (elems + bufs.offset) * 2;
    g.poison(&bufs.out, bytes);
    prefill::attention_prefill_check(dt, c.h, c.kh, c.d, c.dv).unwrap();
    g.launch(&k.0, &k.1, prefill::attention_prefill_items(c.b, c.s, c.h, c.kh), &args(g, bufs, c, vcap));
    let all = g.download(&bufs.out, bytes);
    decode_values(dt, &all[bufs.offset * 2..])
}

const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

/// The default build and the tuned variants measured by `prefill_attention_timing`.
/// Checks one case: every output element written, relative L2 error under `tol`. A
/// failure is printed and counted (so every failing case is listed before the test
/// fails); returns the error when the output was fully written.
fn judge(what: &str, got: &[f64], want: &[f64], tol: f64, failures: &mut usize) -> Option<f64> {
    let unwritten = got.iter().filter(|x| x.is_nan()).count();
    if unwritten > 0 {
        println!("FAIL {what}: {unwritten} elements not written");
        *failures += 1;
        return None;
    }
    let e = rel_l2(what, got, want);
    if e >= tol {
        println!("FAIL {what}: relative L2 error {e:.3e}");
        *failures += 1;
    }
    Some(e)
}

fn tunings(d: usize) -> Vec<PrefillTuning> {
    let mut v = vec![PrefillTuning::default(), PrefillTuning { min_blocks: 4, ..Default::default() }];
    if d <= 64 {
        v.push(PrefillTuning { min_blocks: 5, ..Default::default() });
        v.push(PrefillTuning { min_blocks: 4, stages: 2, ..Default::default() });
        v.push(PrefillTuning { min_blocks: 5, stages: 2, ..Default::default() });
    }
    v
}

#[test]
fn prefill_attention_matches_reference() {
    let Some(g) = gpu() else { return };
    let (table, keys) = (table(), keys());
    // The default kernel and the tuned variants the timing test compares, all on every case.
    let mut kernels = Vec::new();
    for dt in DTYPES {
        for d in [64, 128] {
            for tuning in tunings(d) {
                let k = prefill::attention_prefill_variant(dt, d, tuning, &keys, &table).unwrap();
                let f = g.load(&k);
                kernels.push(((dt, d), tuning, (k, f)));
            }
        }
    }
    let mut worst = [0f64; 2];
    let mut cases = 0usize;
    let mut failures = 0usize;
    let mut seed = 0u64;
    for b in [1, 2] {
        for (h, kh) in [(32, 8), (4, 4), (9, 3)] {
            for d in [64, 128] {
                for (s, t) in [(1, 1), (17, 17), (64, 64), (130, 130), (1000, 1000), (70, 200), (3, 129), (128, 1000)] {
                    seed += 1;
                    let mut r = rng(5000 + seed);
                    let cap = t + 5;
                    let q = shared_values(&mut r, b * s * h * d, -2.0, 2.0);
                    let kc = cache(&mut r, b, cap, kh, d, t);
                    let vc = cache(&mut r, b, cap, kh, d, t);
                    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                    let (qv, kv, vv) = (f64s(&q), f64s(&kc), f64s(&vc));
                    let mut bufs: Vec<(DType, Bufs)> =
                        DTYPES.iter().map(|&dt| (dt, Bufs::new(&g, dt, &q, &kc, &vc, b * s * h * d, 0))).collect();
                    for (_, bu) in bufs.iter_mut() {
                        set_keys(&g, bu, s, t);
                    }
                    for mask in [Mask::Causal, Mask::SlidingWindow(16), Mask::None] {
                        let c = AttnCase { b, s, h, kh, d, dv: d, t, cap, mask, scale: 1.0 / (d as f32).sqrt() };
                        let want = common::attention_ref(&c, &qv, &kv, &vv);
                        for (di, (dt, bu)) in bufs.iter().enumerate() {
                            for (_, tuning, k) in kernels.iter().filter(|(key, _, _)| *key == (*dt, d)) {
                                let got = run(&g, k, bu, &c, cap, *dt);
                                let what = format!("{dt} b={b} s={s} t={t} h={h} kh={kh} d={d} {mask:?} {tuning:?}");
                                cases += 1;
                                if let Some(e) = judge(&what, &got, &want, tol(*dt), &mut failures) {
                                    worst[di] = worst[di].max(e);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (di, dt) in DTYPES.iter().enumerate() {
        println!(
            "kiln-check\tprefill_attention\t{dt}\tlaunches={}\tworst_rel_l2={:.3e}\ttol={:.0e}",
            cases / 2,
            worst[di],
            tol(*dt)
        );
    }
    assert_eq!(failures, 0, "{failures} of {cases} launches failed (listed above)");
}

/// b, s, t, h, kh, d, mask, scale, pointer offset (elements), warps, min blocks (launch
/// bounds; 0: none), stages.
type OddCase = (usize, usize, usize, usize, usize, usize, Mask, f32, usize, usize, u32, usize);

/// Other head dims, sharp softmax (scale 1: scores of tens), unaligned pointers (the
/// plain-load path), K and V caches of different capacities, windows of 1 and of more
/// than t, the 2-warp, launch-bounded and 2-stage variants.
#[test]
fn prefill_attention_odd_cases() {
    let Some(g) = gpu() else { return };
    let (table, keys) = (table(), keys());
    #[rustfmt::skip]
    let cases: &[OddCase] = &[
        // b, s, t, h, kh, d, mask, scale, offset, warps, min blocks, stages
        (2, 100, 100, 4, 2, 64, Mask::Causal, 0.125, 1, 4, 0, 1),
        (1, 77, 300, 6, 2, 128, Mask::SlidingWindow(50), 0.09, 1, 4, 0, 1),
        (2, 200, 200, 4, 1, 64, Mask::Causal, 1.0, 0, 4, 0, 1),
        (1, 129, 129, 2, 2, 128, Mask::None, 1.0, 0, 4, 0, 1),
        (1, 65, 65, 4, 4, 32, Mask::Causal, 0.2, 0, 4, 0, 1),
        (2, 90, 150, 3, 1, 96, Mask::SlidingWindow(1), 0.1, 0, 4, 0, 1),
        (1, 50, 50, 2, 1, 16, Mask::SlidingWindow(500), 0.25, 0, 4, 0, 1),
        (1, 300, 300, 4, 2, 112, Mask::Causal, 0.1, 0, 4, 0, 1),
        (2, 257, 300, 8, 2, 64, Mask::Causal, 0.125, 0, 2, 0, 1),
        (1, 130, 130, 4, 4, 64, Mask::SlidingWindow(16), 0.125, 1, 2, 0, 1),
        (1, 64, 1000, 4, 4, 32, Mask::None, 0.18, 0, 2, 0, 1),
        (2, 1000, 1000, 9, 3, 64, Mask::Causal, 0.125, 0, 4, 5, 1),
        (1, 70, 200, 32, 8, 64, Mask::None, 0.125, 1, 4, 5, 1),
        (1, 130, 130, 4, 4, 64, Mask::SlidingWindow(16), 0.125, 0, 4, 5, 1),
        (2, 1000, 1000, 9, 3, 128, Mask::Causal, 0.09, 0, 4, 4, 1),
        (1, 70, 200, 32, 8, 128, Mask::None, 0.09, 1, 4, 4, 1),
        (2, 1000, 1000, 9, 3, 64, Mask::Causal, 0.125, 0, 4, 4, 2),
        (1, 70, 200, 32, 8, 64, Mask::None, 0.125, 1, 4, 4, 2),
        (1, 130, 130, 4, 4, 64, Mask::SlidingWindow(16), 0.125, 0, 4, 5, 2),
        (2, 300, 300, 4, 2, 80, Mask::Causal, 0.1, 0, 4, 0, 2),
        (1, 65, 1000, 6, 3, 32, Mask::None, 0.2, 1, 2, 0, 2),
        (1, 1, 1, 4, 4, 64, Mask::Causal, 0.125, 0, 4, 4, 2),
    ];
    let mut failures = 0usize;
    for (ci, &(b, s, t, h, kh, d, mask, scale, offset, warps, min_blocks, stages)) in cases.iter().enumerate() {
        let mut r = rng(900 + ci as u64);
        let (cap, vcap) = (t + 3, t + 11);
        let q = shared_values(&mut r, b * s * h * d, -2.0, 2.0);
        let kc = cache(&mut r, b, cap, kh, d, t);
        let vc = cache(&mut r, b, vcap, kh, d, t);
        // The reference reads V with K's capacity.
        let mut vref = vec![0f64; b * cap * kh * d];
        for bi in 0..b {
            for j in 0..t {
                for e in 0..kh * d {
                    vref[(bi * cap + j) * kh * d + e] = vc[(bi * vcap + j) * kh * d + e] as f64;
                }
            }
        }
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let c = AttnCase { b, s, h, kh, d, dv: d, t, cap, mask, scale };
        let want = common::attention_ref(&c, &f64s(&q), &f64s(&kc), &vref);
        for dt in DTYPES {
            let k =
                prefill::attention_prefill_variant(dt, d, PrefillTuning { warps, min_blocks, stages }, &keys, &table)
                    .unwrap();
            let f = g.load(&k);
            let mut bufs = Bufs::new(&g, dt, &q, &kc, &vc, b * s * h * d, offset);
            set_keys(&g, &mut bufs, s, t);
            let got = run(&g, &(k, f), &bufs, &c, vcap, dt);
            let what = format!(
                "{dt} b={b} s={s} t={t} h={h} kh={kh} d={d} {mask:?} scale={scale} offset={offset} warps={warps} min_blocks={min_blocks} stages={stages}"
            );
            if let Some(e) = judge(&what, &got, &want, tol(dt), &mut failures) {
                println!("kiln-check\tprefill_attention_odd\t{what}\trel_l2={e:.3e}\ttol={:.0e}", tol(dt));
            }
        }
    }
    assert_eq!(failures, 0, "{failures} odd cases failed (listed above)");
}

/// Every prefill kernel variant compiles with NVRTC (needs only NVRTC, not a GPU: the
/// architecture is the device's, or sm_90 without one).
#[test]
fn every_prefill_kernel_variant_compiles() {
    if !kiln_codegen::nvrtc::nvrtc_present() {
        println!("skipping: libnvrtc could not be loaded");
        return;
    }
    let cc = CudaExecutor::available().map(|i| i.compute_capability).unwrap_or((9, 0));
    let compiler = Compiler::new(cc, None).unwrap();
    let (table, keys) = (table(), keys());
    let mut ks = Vec::new();
    for dt in DTYPES {
        for d in (16..=prefill::PREFILL_MAX_HEAD_DIM).step_by(16) {
            ks.push(prefill::attention_prefill(dt, d, &keys, &table).unwrap());
            if d <= 64 {
                ks.push(
                    prefill::attention_prefill_variant(
                        dt,
                        d,
                        PrefillTuning { warps: 2, ..Default::default() },
                        &keys,
                        &table,
                    )
                    .unwrap(),
                );
            }
            if d <= 80 {
                let two = PrefillTuning { stages: 2, ..Default::default() };
                ks.push(prefill::attention_prefill_variant(dt, d, two, &keys, &table).unwrap());
            }
        }
    }
    let refs: Vec<&Kernel> = ks.iter().collect();
    let (cubins, stats) = compiler.compile_all(&refs).unwrap_or_else(|e| panic!("{e}"));
    assert!(cubins.iter().all(|c| !c.is_empty()));
    println!("kiln-time\tnvrtc_prefill_variants\tkernels={}\tseconds={:.3}", ks.len(), stats.seconds);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median time of `n` launches of `launch`, in ms: after about 200 ms of warm-up
/// launches (clocks up from idle), `n` launches queued back to back with a CUDA event
/// between each two, so launch overhead is hidden.
fn time_ms(g: &Gpu, n: usize, mut launch: impl FnMut()) -> f64 {
    let start = g.event();
    launch();
    let end = g.event();
    g.sync();
    let once = (start.elapsed_ms(&end).expect("elapsed") as f64).max(1e-3);
    for _ in 0..((200.0 / once) as usize).clamp(3, 5000) {
        launch();
    }
    let mut events = vec![g.event()];
    for _ in 0..n {
        launch();
        events.push(g.event());
    }
    g.sync();
    median(events.windows(2).map(|w| w[0].elapsed_ms(&w[1]).expect("elapsed") as f64).collect())
}

/// b, s = t, h, kh, d, mask, warps, min blocks (launch bounds; 0: none), stages.
type TimedShape = (usize, usize, usize, usize, usize, Mask, usize, u32, usize);

/// Prefill attention times (never asserted): the Llama-3.2-1B shape (b=1, s=t=2048,
/// h=32, kh=8, d=64, causal, bf16), the same with d=128, and a few more; the old
/// split-K decode kernels on the Llama shape for comparison. FLOPs: 4·b·h·s·t·d, halved
/// for causal s = t.
#[test]
#[ignore]
fn prefill_attention_timing() {
    let Some(g) = gpu() else { return };
    let (table, keys) = (table(), keys());
    let dt = DType::BF16;
    #[rustfmt::skip]
    let shapes: &[TimedShape] = &[
        // b, s=t, h, kh, d, mask, warps, min blocks (0: no launch bounds), stages
        (1, 2048, 32, 8, 64, Mask::Causal, 4, 0, 1),
        (1, 2048, 32, 8, 64, Mask::Causal, 4, 5, 1),
        (1, 2048, 32, 8, 64, Mask::Causal, 4, 4, 2),
        (1, 2048, 32, 8, 64, Mask::Causal, 4, 5, 2),
        (1, 2048, 32, 8, 64, Mask::Causal, 2, 0, 1),
        (1, 2048, 32, 8, 128, Mask::Causal, 4, 0, 1),
        (1, 2048, 32, 8, 128, Mask::Causal, 4, 4, 1),
        (1, 2048, 32, 8, 64, Mask::None, 4, 0, 1),
        (1, 2048, 32, 8, 64, Mask::None, 4, 4, 2),
        (4, 2048, 32, 8, 64, Mask::Causal, 4, 0, 1),
        (4, 2048, 32, 8, 64, Mask::Causal, 4, 5, 1),
        (4, 2048, 32, 8, 64, Mask::Causal, 4, 4, 2),
        (1, 8192, 32, 8, 128, Mask::Causal, 4, 0, 1),
        (1, 8192, 32, 8, 128, Mask::Causal, 4, 4, 1),
        (1, 8192, 32, 8, 64, Mask::Causal, 4, 0, 1),
        (1, 8192, 32, 8, 64, Mask::Causal, 4, 5, 1),
        (1, 8192, 32, 8, 64, Mask::Causal, 4, 4, 2),
    ];
    for &(b, s, h, kh, d, mask, warps, min_blocks, stages) in shapes {
        let t = s;
        let mut r = rng(42);
        let q = uniform(&mut r, b * s * h * d, -2.0, 2.0);
        let kc = uniform(&mut r, b * t * kh * d, -1.0, 1.0);
        let vc = uniform(&mut r, b * t * kh * d, -1.0, 1.0);
        let mut bufs = Bufs::new(&g, dt, &q, &kc, &vc, b * s * h * d, 0);
        set_keys(&g, &mut bufs, s, t);
        let c = AttnCase { b, s, h, kh, d, dv: d, t, cap: t, mask, scale: 1.0 / (d as f32).sqrt() };
        let k = prefill::attention_prefill_variant(dt, d, PrefillTuning { warps, min_blocks, stages }, &keys, &table)
            .unwrap();
        let f = g.load(&k);
        let a = args(&g, &bufs, &c, t);
        let items = prefill::attention_prefill_items(b, s, h, kh);
        let ms = time_ms(&g, 20, || g.launch(&k, &f, items, &a));
        let out = decode_values(dt, &g.download(&bufs.out, b * s * h * d * 2));
        assert!(out.iter().all(|x| x.is_finite()), "{}: an output element is not finite", k.sig.name);
        let causal = if mask == Mask::Causal { 0.5 } else { 1.0 };
        let flops = 4.0 * (b * h * s * t * d) as f64 * causal;
        println!(
            "kiln-info\tprefill_attention_time\t{}\t{dt}\tb={b}\ts=t={s}\th={h}\tkh={kh}\td={d}\t{mask:?}\twarps={warps}\tmin_blocks={min_blocks}\tstages={stages}\tms={ms:.4}\tTFLOP/s={:.1}",
            g.info.name,
            flops / (ms * 1e-3) / 1e12
        );
    }
    // The split-K decode kernels that prefill used before, on the Llama shape.
    let (b, s, h, kh, d) = (1, 2048, 32, 8, 64);
    let mut r = rng(43);
    let q = uniform(&mut r, b * s * h * d, -2.0, 2.0);
    let kc = uniform(&mut r, b * s * kh * d, -1.0, 1.0);
    let mut bufs = Bufs::new(&g, dt, &q, &kc, &kc, b * s * h * d, 0);
    set_keys(&g, &mut bufs, s, s);
    let pk = decode::attention_decode(dt, h / kh, &keys, &table).unwrap();
    let pf = g.load(&pk);
    let splits = decode::attention_decode_splits(b, s, h, kh, s, g.info.multiprocessors.max(1) as usize);
    let (wo, wml) = decode::attention_decode_workspace(b, s, h, d, splits);
    let (po, pml) = (g.poisoned(wo * 4), g.poisoned(wml * 4));
    let c = AttnCase { b, s, h, kh, d, dv: d, t: s, cap: s, mask: Mask::Causal, scale: 0.125 };
    let counters = g.upload(&vec![0u8; 4 * decode::attention_decode_counters(b, s, h, kh)]);
    let mut pa = args(&g, &bufs, &c, s);
    pa.extend([
        (Role::Out(1), g.arg(&po)),
        (Role::Out(2), g.arg(&pml)),
        (Role::Counters, g.arg(&counters)),
        (Role::Splits, ArgValue::I64(splits as i64)),
        (Role::Early, ArgValue::I64(0)),
    ]);
    let pi = decode::attention_decode_items(b, s, h, kh, splits);
    let ms = time_ms(&g, 5, || {
        g.launch(&pk, &pf, pi, &pa);
    });
    println!(
        "kiln-info\tprefill_attention_time\t{}\t{dt}\tb={b}\ts=t={s}\th={h}\tkh={kh}\td={d}\tCausal\tdecode_kernels(splits={splits})\tms={ms:.4}\tTFLOP/s={:.1}",
        g.info.name,
        2.0 * (b * h * s * s * d) as f64 / (ms * 1e-3) / 1e12
    );
}
