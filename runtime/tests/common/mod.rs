//! Harness shared by the GPU kernel tests (`mod common;`): the test GPU ([`gpu`], which
//! prints `skipping: <reason>` and returns `None` without a usable GPU and CUDA
//! libraries), kernel loading and launching by role, poisoned buffers, float
//! encodings, a seeded RNG, the relative L2 error, and the f64 attention reference.
//! Not every test file uses every item.
#![allow(dead_code)]

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use kiln_codegen::{ArgValue, Compiler, Kernel, Role};
use kiln_ops::{DType, Mask};
use kiln_runtime::cuda::{CudaExecutor, DeviceInfo};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::{Arc, Mutex, MutexGuard};

pub struct Gpu {
    pub info: DeviceInfo,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub compiler: Compiler,
    /// Held for the whole test (dropped last): the GPU tests of one file run one at a
    /// time, so the timings they print are not shared with other tests.
    _serial: MutexGuard<'static, ()>,
}

static GPU_SERIAL: Mutex<()> = Mutex::new(());

/// The GPU to test on, or `None` after printing why the test is skipped.
pub fn gpu() -> Option<Gpu> {
    let info = match CudaExecutor::available() {
        Ok(info) => info,
        Err(reason) => {
            println!("skipping: {reason}");
            return None;
        }
    };
    println!("device: {info}");
    let serial = GPU_SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let ctx = CudaContext::new(info.ordinal).expect("CUDA context");
    // SAFETY: one stream, no buffer is shared with another stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().expect("stream");
    let compiler = Compiler::new(info.compute_capability, Some(kiln_codegen::nvrtc::default_cache_dir())).unwrap();
    Some(Gpu { info, ctx, stream, compiler, _serial: serial })
}

/// Role → value pairs of one launch.
pub type Args = Vec<(Role, ArgValue)>;

impl Gpu {
    pub fn load(&self, k: &Kernel) -> CudaFunction {
        let (cubins, _) = self.compiler.compile_all(&[k]).unwrap_or_else(|e| panic!("{e}"));
        let cubin = cubins.into_iter().next().unwrap();
        let module = self.ctx.load_module(Ptx::from_binary(cubin)).expect("load module");
        let f = module.load_function(&k.sig.name).expect("load function");
        kiln_runtime::cuda::allow_dynamic_smem(k, &f).expect("dynamic shared memory");
        f
    }
    pub fn upload(&self, bytes: &[u8]) -> CudaSlice<u8> {
        if bytes.is_empty() {
            return self.stream.alloc_zeros::<u8>(1).unwrap();
        }
        self.stream.clone_htod(bytes).expect("upload")
    }
    /// `bytes` of device memory filled with 0xff (NaN in every float format).
    pub fn poisoned(&self, bytes: usize) -> CudaSlice<u8> {
        let s = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.expect("alloc");
        self.poison(&s, bytes);
        s
    }
    /// Fills the first `bytes` of `s` with 0xff.
    pub fn poison(&self, s: &CudaSlice<u8>, bytes: usize) {
        // SAFETY: the range lies inside the buffer (callers pass at most its size).
        unsafe { cudarc::driver::result::memset_d8_async(self.ptr(s), 0xff, bytes.max(1), self.stream.cu_stream()) }
            .expect("memset");
    }
    pub fn ptr(&self, s: &CudaSlice<u8>) -> u64 {
        s.device_ptr(&self.stream).0
    }
    pub fn arg(&self, s: &CudaSlice<u8>) -> ArgValue {
        ArgValue::Ptr(self.ptr(s))
    }
    pub fn download(&self, s: &CudaSlice<u8>, bytes: usize) -> Vec<u8> {
        let mut v = self.stream.clone_dtoh(s).expect("download");
        v.truncate(bytes);
        v
    }
    pub fn write(&self, s: &mut CudaSlice<u8>, bytes: &[u8]) {
        self.stream.memcpy_htod(bytes, s).expect("upload");
    }
    pub fn sync(&self) {
        self.stream.synchronize().expect("synchronize");
    }
    /// Launches `k` over `items` work items (`k.grid.dims`), arguments packed by role.
    pub fn launch(&self, k: &Kernel, f: &CudaFunction, items: usize, args: &Args) {
        assert!(items > 0, "{}: no work items", k.sig.name);
        let get = |r: Role| args.iter().rev().find(|(role, _)| *role == r).map(|(_, v)| *v);
        let mut values = k.sig.pack(get).unwrap_or_else(|e| panic!("{e}"));
        let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| v.as_kernel_param()).collect();
        let (grid, block) = k.grid.dims(items);
        // SAFETY: one value per parameter, of its C type (checked by `pack`); the device
        // buffers are live and sized for the sizes passed.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (grid, 1, 1),
                (block, 1, 1),
                k.dynamic_smem,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .unwrap_or_else(|e| panic!("launch {}: {e:?}", k.sig.name));
    }
    pub fn event(&self) -> cudarc::driver::CudaEvent {
        self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).expect("event")
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `v` rounded to `d` and stored little-endian: (device bytes, the stored values as f64).
pub fn encode(d: DType, v: &[f32]) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    let mut vals = Vec::with_capacity(v.len());
    for &x in v {
        match d {
            DType::F32 => {
                bytes.extend_from_slice(&x.to_le_bytes());
                vals.push(x as f64);
            }
            DType::BF16 => {
                let h = half::bf16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                vals.push(h.to_f64());
            }
            DType::F16 => {
                let h = half::f16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                vals.push(h.to_f64());
            }
            other => panic!("no float encoding for {other}"),
        }
    }
    (bytes, vals)
}

pub fn decode_values(d: DType, bytes: &[u8]) -> Vec<f64> {
    match d {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DType::BF16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64()).collect()
        }
        DType::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64()).collect()
        }
        other => panic!("no float decoding for {other}"),
    }
}

pub fn round_to(d: DType, x: f64) -> f64 {
    encode(d, &[x as f32]).1[0]
}

pub fn uniform(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// ‖got − want‖ / ‖want‖; panics naming the first element that is NaN (never written).
#[track_caller]
pub fn rel_l2(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().position(|x| x.is_nan()) {
        panic!("{what}: element {i} was not written (still the 0xff poison)");
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// An attention problem: q `[b, s, h, d]`, caches `[b, cap, kh, d]` (`[.., dv]` for v)
/// of which positions `< t` are used.
#[derive(Clone, Copy, Debug)]
pub struct AttnCase {
    pub b: usize,
    pub s: usize,
    pub h: usize,
    pub kh: usize,
    pub d: usize,
    pub dv: usize,
    pub t: usize,
    pub cap: usize,
    pub mask: Mask,
    pub scale: f32,
}

/// Op::Attention in f64 over caches `[b, cap, kh, d]` (positions `< t` used).
pub fn attention_ref(c: &AttnCase, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (s, h, kh, d, dv, t, cap) = (c.s, c.h, c.kh, c.d, c.dv, c.t, c.cap);
    let group = h / kh;
    let rows: Vec<Vec<f64>> = (0..c.b * s * h)
        .into_par_iter()
        .map(|row| {
            let (bi, i, hi) = (row / (s * h), row / h % s, row % h);
            let kvh = hi / group;
            let pos = t - s + i;
            let (lo, hi_k) = match c.mask {
                Mask::None => (0, t),
                Mask::Causal => (0, pos + 1),
                Mask::SlidingWindow(w) => ((pos + 1).saturating_sub(w as usize), pos + 1),
            };
            let mut out = vec![0f64; dv];
            if lo >= hi_k {
                return out;
            }
            let qrow = &q[row * d..(row + 1) * d];
            let scores: Vec<f64> = (lo..hi_k)
                .map(|j| {
                    let kr = &k[((bi * cap + j) * kh + kvh) * d..][..d];
                    qrow.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() * c.scale as f64
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ps: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = ps.iter().sum();
            for (j, p) in (lo..hi_k).zip(&ps) {
                let vr = &v[((bi * cap + j) * kh + kvh) * dv..][..dv];
                for (o, x) in out.iter_mut().zip(vr) {
                    *o += p / z * x;
                }
            }
            out
        })
        .collect();
    rows.concat()
}

/// (mask_kind, window) launch arguments of a mask.
pub fn mask_args(m: Mask) -> (i32, i64) {
    match m {
        Mask::None => (0, 0),
        Mask::Causal => (1, 0),
        Mask::SlidingWindow(w) => (2, w as i64),
    }
}
