//! Bandwidth-bound decode kernels: GEMV, split-K ("flash-decoding") attention and token
//! sampling, for the batch-1 (few rows) decode step. Like [`crate::kernels`], each is a
//! `.cu` template under `kernels/` with its signature rendered from one [`KernelSig`]
//! and launched over `kernel.grid.dims(items)` for the item counts given here.
//!
//! * [`gemv`] / [`gemv_residual`]: `y [m, n] = x [m, k] · w [n, k]ᵀ (+ r)` for
//!   `1 <= m <=` [`GEMV_MAX_M`], f32 accumulation; the weight rows are streamed once
//!   with 16-byte loads. Parameters: `out` (y), `in0` (x), `in1` (w), [`in2` (r),]
//!   `m`, `n`, `k` (i64). Launch: [`gemv_items`].
//! * [`attention_decode`]: `Op::Attention` for few query rows over a device-resident KV
//!   cache, as one kernel over `splits` key chunks per (batch, kv head) whose last block
//!   per query tile merges the chunks. The key count is a [`Dim`] read from the device symbol table
//!   ([`Role::Syms`]), so a captured CUDA graph stays valid while the cache grows.
//!   Workspace: [`attention_decode_workspace`] and [`attention_decode_counters`];
//!   launches: [`attention_decode_items`];
//!   host checks: [`attention_decode_check`]; a split count: [`attention_decode_splits`].
//!   [`attention_decode_fused`] also computes q and the new K/V rows from their producers
//!   (RoPE, the cache appends: [`attention_producers`] says when it applies).
//! * [`sample`]: greedy / temperature / top-k / top-p sampling of each row of logits
//!   with a counter-based RNG driven by a device step counter. Launch: [`sample_items`].
//!
//! Exact kernel semantics (ties, rounding, filter order) are documented on each function
//! and at the top of its `.cu` file.

use crate::kernels::{render, CodegenError, Grid, Kernel, MAX_HEAD_DIM};
use crate::params::{KernelSig, ParamTy, Role};
use crate::symbols::{dim_to_c, stable_hash_hex};
use crate::table;
use kiln_ops::{DType, Dim, Sym};

pub(crate) const GEMV: &str = include_str!("kernels/gemv.cu");
const FLASH_DECODE: &str = include_str!("kernels/flash_decode.cu");

/// WIP knob: `KILN_ATTN_MIN_CHUNK=K` (a multiple of 16, at least 16) in the environment
/// replaces [`ATTENTION_DECODE_MIN_CHUNK`] in the decode attention kernels (the chunk is
/// computed in the kernel only, so the host needs no change): more splits for a short
/// context (200 keys: 4 splits of 64 instead of 1), each block streaming fewer keys,
/// against the split merge's extra round trip.
fn attention_min_chunk() -> usize {
    std::env::var("KILN_ATTN_MIN_CHUNK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&c| c >= 16 && c % 16 == 0)
        .unwrap_or(ATTENTION_DECODE_MIN_CHUNK)
}

/// A measurement knob: `KILN_ATTN_STAGE_KIB=K` (48 to 96, a multiple of 16; below 48 the
/// two-pass scratch of a whole GQA group may not fit a stage) in the environment replaces
/// [`ATTENTION_DECODE_STAGE_BYTES`] (e.g. 48, the size before 2026-12-05).
fn attention_stage_bytes() -> usize {
    std::env::var("KILN_ATTN_STAGE_KIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&k| (48..=96).contains(&k) && k % 16 == 0)
        .map_or(ATTENTION_DECODE_STAGE_BYTES, |k| k << 10)
}

/// A measurement knob: `KILN_ATTN_WARPS=W` (4, 8 or 16) in the environment: the warps of
/// a decode attention block with query tiles of one head (8 by default).
fn attention_tile1_warps() -> Option<usize> {
    crate::fused::env_usize("KILN_ATTN_WARPS").filter(|w| [4, 8, 16].contains(w))
}

/// A measurement knob: `KILN_ATTN_UNROLL=U` (1..=8) in the environment: the unroll factor
/// of decode attention's two-pass loops over the keys (`AD_UNROLL`; unset by default).
fn attention_unroll() -> Option<usize> {
    crate::fused::env_usize("KILN_ATTN_UNROLL").filter(|u| (1..=8).contains(u))
}

/// A measurement knob: `KILN_ATTN_PVW=1` in the environment: decode attention's two-pass
/// p·v with one value vector per warp over all the keys (`AD_PVW` in `flash_decode.cu`).
fn attention_pv_warps() -> bool {
    crate::fused::env_flag("KILN_ATTN_PVW")
}

/// Helpers of the attention kernels over a resident cache (key ranges, cp.async),
/// prepended to `flash_decode.cu` here and to `flash_prefill.cu` in `crate::prefill`.
pub(crate) const CACHE_ATTENTION: &str = include_str!("kernels/cache_attention.cuh");
const SAMPLE: &str = include_str!("kernels/sample.cu");
const GREEDY: &str = include_str!("kernels/greedy.cu");

/// Device helpers shared by the GEMV and attention templates (prepended to them): 16-byte
/// vector types, a streaming 16-byte load and its unpacking into f32 per storage type.
pub(crate) const VECTOR_HELPERS: &str = r#"// ---- decode vector helpers ----
struct alignas(16) kiln_u4 { unsigned x, y, z, w; };
struct alignas(16) kiln_f4 { float x, y, z, w; };
// 16 bytes of read-once data (weights) through the read-only path, not kept in L1.
// Volatile: issued where written (e.g. before a barrier, to overlap it).
// (A plain load where the source is compiled for a host: the tests' emulation.)
__device__ __forceinline__ kiln_u4 kiln_ld16(const void* p) {
    kiln_u4 v;
#if defined(__CUDA_ARCH__)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
    v = *(const kiln_u4*)p;
#endif
    return v;
}
// 16 bytes written earlier in the same launch by another block (the chained GEMV's x):
// cached in L2 only, never through the non-coherent read-only path.
__device__ __forceinline__ kiln_u4 kiln_ld16_cg(const void* p) {
    kiln_u4 v;
#if defined(__CUDA_ARCH__)
    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
    v = *(const kiln_u4*)p;
#endif
    return v;
}
// A counter other blocks of the launch add to, read with acquire semantics (what the
// adders stored before their fence and add is visible after it), and a short sleep
// between two reads of a spin (a yield in the host emulation).
__device__ __forceinline__ unsigned kiln_ld_acquire(const unsigned* p) {
#if defined(__CUDA_ARCH__)
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#else
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}
__device__ __forceinline__ void kiln_spin_pause() {
#if defined(__CUDA_ARCH__)
    asm volatile("nanosleep.u32 64;");
#else
    std::this_thread::yield();
#endif
}
// Spins until *p >= target (acquire). A spin that outlasts 2^24 pauses (about a second
// on the GPU) traps: the launch fails with an error instead of hanging, e.g. when not
// every block of a launch could be resident at once (another process on the device).
__device__ __forceinline__ void kiln_spin_until(const unsigned* p, unsigned target) {
    unsigned spins = 0;
    while (kiln_ld_acquire(p) < target) {
        kiln_spin_pause();
        if (++spins == (1u << 24)) {
#if defined(__CUDA_ARCH__)
            __trap();
#else
            std::abort();
#endif
        }
    }
}
// 16 bytes as f32: 8 bf16, 8 f16 or 4 f32, element 0 in the low bytes. The pointer
// argument only picks the storage format.
__device__ __forceinline__ void kiln_unpack(const kiln_u4& r, float* f, const kiln_bf16*) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void kiln_unpack(const kiln_u4& r, float* f, const kiln_f16*) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        kiln_f16 lo, hi;
        lo.bits = (unsigned short)(w[i] & 0xffffu);
        hi.bits = (unsigned short)(w[i] >> 16);
        f[2 * i] = kiln_f16_to_f32(lo);
        f[2 * i + 1] = kiln_f16_to_f32(hi);
    }
}
__device__ __forceinline__ void kiln_unpack(const kiln_u4& r, float* f, const float*) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
}
"#;

/// Largest number of rows `m` a [`gemv`] takes.
pub const GEMV_MAX_M: usize = 8;
/// Rows of `w` (output columns) one GEMV block of the default [`GemvConfig`] computes:
/// [`GEMV_WARPS`] warps × 2 rows.
pub const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Warps of one GEMV block.
pub const GEMV_WARPS: usize = 8;

/// The work split of a [`gemv`] kernel: a block's `warps` warps form row groups of
/// `ksplit` warps; each group streams `rows_per_warp` rows of `w`, its warps taking
/// interleaved shares of the columns (split-K), each lane keeping `unroll` 16-byte loads
/// per row in flight. More rows or loads per warp hide more latency per warp; fewer rows
/// per warp, or more warps per row, put more warps on a short `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvConfig {
    pub warps: usize,
    pub rows_per_warp: usize,
    pub unroll: usize,
    /// Warps per row (a power of two dividing `warps`). The engine keeps 1: split-K
    /// over 2–8 warps per row measured slower on every Llama-3.2-1B and SmolLM2 weight
    /// shape (H200, 2026-12-03, `gemv_bandwidth`; 2048×2048: 6.5 µs at 1, 7.3 / 8.5 /
    /// 10.4 µs at 2 / 4 / 8) and made the 1B decode step slower (814 → 749 tok/s): each
    /// block also stages x and adds its warps' sums through shared memory.
    pub ksplit: usize,
    /// Rows of x (`m`) the kernel takes, at most (1..=[`GEMV_MAX_M`]; a launch with more
    /// writes nothing). The accumulators are sized by it at compile time: a kernel for
    /// one row keeps 1 instead of 8 per weight row, 63 → 40 registers for `w8r1u4` in
    /// bf16 (sm_90), so 6 instead of 4 blocks fit a multiprocessor and more weight loads
    /// are in flight.
    pub max_rows: usize,
}

impl Default for GemvConfig {
    fn default() -> Self {
        GemvConfig {
            warps: GEMV_WARPS,
            rows_per_warp: GEMV_ROWS_PER_BLOCK / GEMV_WARPS,
            unroll: 4,
            ksplit: 1,
            max_rows: GEMV_MAX_M,
        }
    }
}

impl GemvConfig {
    /// Output columns (rows of `w`) per block.
    pub fn rows_per_block(&self) -> usize {
        self.warps / self.ksplit * self.rows_per_warp
    }

    /// A short name of the split, e.g. `w8r2u4`, `w8r1u4k4` (with `ksplit` > 1) or
    /// `w16r1u8m1` (a kernel for one row of x).
    pub fn tag(&self) -> String {
        let k = if self.ksplit > 1 { format!("k{}", self.ksplit) } else { String::new() };
        let m = if self.max_rows != GEMV_MAX_M { format!("m{}", self.max_rows) } else { String::new() };
        format!("w{}r{}u{}{k}{m}", self.warps, self.rows_per_warp, self.unroll)
    }

    /// The split for `m` rows of activations. For `m = 1`: one row of `w` per warp, 16
    /// warps per block, 8 loads in flight per lane (a whole 2,048-wide bf16 row, issued
    /// before the kernel waits for the previous one), a kernel for one row of x
    /// (`max_rows` 1). Measured on an H200 (2026-12-04), first `gemv_bandwidth` (bf16,
    /// µs, back to back): `w16r1u4m1` took qkv 3072×2048 6.6, o_proj 2048×2048 5.9,
    /// gate_up 16384×2048 18.1, down 2048×8192 13.2, LM head 128256×2048 116.9 (4.5
    /// TB/s), SmolLM2's LM head 49152×576 19.0; the same split compiled for up to 8 rows
    /// took 11.1, 7.2, 35.8, 15.8, 243.2 and 57.5 (its 8-row accumulators cost
    /// registers, and so resident blocks). Then the decode step (tok/s at batch 1,
    /// 1B / SmolLM2): `w16r1u8m1` 1,009.5 / 1,541, `w16r1u4m1` 999.3 / 1,522, `w8r1u8m1`
    /// 1,011.5 / 1,455, `w8r1u4m1` 936.7 / 1,531, `w16r2u4m1` 969.1 / 1,462,
    /// `w16r1u2m1` 954.1 / 1,390; 16-byte staging of x in the one-row kernel (70 instead
    /// of 40 registers) 817.9 / 1,409. Otherwise the default (two rows per warp, which
    /// reuses each weight load for more activation rows): 28.3 µs for 8 rows of
    /// 8192×2048, against 35.9 with one row per warp.
    pub fn for_rows(m: usize) -> GemvConfig {
        let d = GemvConfig::default();
        if m <= 1 {
            GemvConfig { warps: 16, rows_per_warp: 1, unroll: 8, max_rows: 1, ..d }
        } else {
            d
        }
    }

    /// The split for `m` rows of activations over weight rows of `row_bytes` bytes
    /// (`None` where unknown): [`GemvConfig::for_rows`], except that one row of x over
    /// rows of at most [`GEMV_SHORT_ROW_BYTES`] takes two weight rows per warp, 8 warps
    /// and 4 loads in flight per lane (`w8r2u4m1`): the 16 warps × 8 loads of the
    /// default request 4 KiB per warp, several times such a row, and leave most lanes
    /// idle. Measured on an H200 (2026-12-04, `gemv_bandwidth`, bf16, µs back to back,
    /// `w16r1u8m1` against `w8r2u4m1`): SmolLM2's LM head 49152×576 26.8 → 17.3, qkv
    /// 960×576 3.7 → 3.5, o_proj 576×576 3.8 → 3.7, gate_up 3072×576 4.5 → 4.4; its down
    /// projection (576×1536, 3 KiB rows) 4.0 against 4.4, so it keeps the default. In the
    /// decode step (CUDA graph with PDL, which hides most of the LM head's difference):
    /// SmolLM2 1,580.0 → 1,587.4 tok/s at batch 1 (two rounds, same run); the Llama-3.2-1B
    /// shape has no short rows.
    pub fn for_shape(m: usize, row_bytes: Option<usize>) -> GemvConfig {
        match row_bytes {
            Some(b) if m <= 1 && b <= GEMV_SHORT_ROW_BYTES => {
                GemvConfig { warps: 8, rows_per_warp: 2, unroll: 4, max_rows: 1, ..GemvConfig::default() }
            }
            _ => GemvConfig::for_rows(m),
        }
    }

    /// The split of a fused GEMV ([`crate::gemv_prologue`]): its blocks are one wave
    /// that loops over the row tiles (see [`gemv_prologue_items`]), so each warp keeps
    /// four rows' loads in flight (four times a plain GEMV's at one row) to make up for
    /// the fewer resident warps.
    pub fn for_prologue() -> GemvConfig {
        GemvConfig { rows_per_warp: 4, ..GemvConfig::default() }
    }
}

/// Weight rows of at most this many bytes are "short" for the one-row GEMV
/// ([`GemvConfig::for_shape`]).
pub const GEMV_SHORT_ROW_BYTES: usize = 2048;

/// Bytes of one row of a rank-2 weight `[n, k]` of fixed `k` (what
/// [`GemvConfig::for_shape`] picks the one-row GEMV by); `None` for other weights.
pub fn weight_row_bytes(w: &kiln_ops::TensorType) -> Option<usize> {
    let dims = w.shape.dims();
    (dims.len() == 2).then(|| dims[1].as_fixed()).flatten().map(|k| w.dtype.bytes_for(k))
}

/// Warps of one attention block (twice that for query tiles of up to 4).
const ATTENTION_DECODE_WARPS: usize = 4;
/// Query (row, head) pairs of one kv head that one attention block handles, at most; the
/// tile of a kernel is [`attention_decode_query_tile`] of its GQA group.
pub const ATTENTION_DECODE_QUERY_TILE: usize = 8;
/// Keys of one split, at least: a context of up to this many keys is one block per
/// (batch, kv head, query tile), which writes the output itself (no partial results,
/// fence or merge: the short-context latency of a decode step).
pub const ATTENTION_DECODE_MIN_CHUNK: usize = 256;
/// Bytes of one of the two K/V stages of an [`attention_decode`] block (dynamic shared
/// memory, 128 KiB per block in all, which sm_80 and later allow): 256 keys of head dim
/// 64 in bf16, so a context of up to 256 keys is loaded in one round trip and takes the
/// two-pass path (at 48 KiB, 192 keys, half of the bench's decode steps missed it). The
/// warp merge reuses the stages: warps · query tile · 256 f32 (32 KiB at most) must fit
/// in them. Measured on an H200 (2026-12-05, Llama-3.2-1B shape, batch 1, same run, 48
/// against 64 KiB): 1,192.1 / 1,190.8 → 1,199.0 / 1,198.2 tok/s alone.
pub const ATTENTION_DECODE_STAGE_BYTES: usize = 64 << 10;
/// Threads of one sampling block (one block per row).
pub const SAMPLE_THREADS: u32 = 512;

pub(crate) fn float_storage(d: DType, what: &str) -> Result<&'static str, CodegenError> {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => Ok(table::storage_type(d).expect("float dtypes have storage")),
        other => Err(CodegenError(format!("{what}: dtype {other} is not supported (f32, f16 or bf16)"))),
    }
}

/// Elements of `d` in 16 bytes.
pub(crate) fn vec_elems(d: DType) -> usize {
    16 / (d.bits() / 8)
}

/// Checks a GEMV work split.
pub(crate) fn gemv_check(cfg: GemvConfig) -> Result<(), CodegenError> {
    if !(1..=32).contains(&cfg.warps)
        || !(1..=4).contains(&cfg.rows_per_warp)
        || !(1..=8).contains(&cfg.unroll)
        || !cfg.ksplit.is_power_of_two()
        || !cfg.warps.is_multiple_of(cfg.ksplit)
        || !(1..=GEMV_MAX_M).contains(&cfg.max_rows)
    {
        return Err(CodegenError(format!(
            "gemv: unsupported split {cfg:?} (1..=32 warps, 1..=4 rows, 1..=8 loads, warps per row a power of two \
             dividing the warps, 1..={GEMV_MAX_M} rows of x)"
        )));
    }
    Ok(())
}

/// The parameters of a plain GEMV (storage types `xs`, `ws`, `ys`): `out` (y), `in0` (x),
/// `in1` (w), with `residual` `in2` (r, y's type), then `m`, `n`, `k`. The tiled and the
/// streaming GEMV take the same list.
fn gemv_params((xs, ws, ys): (&str, &str, &str), residual: bool) -> Vec<(Role, ParamTy)> {
    let mut params = vec![
        (Role::Out(0), ParamTy::ptr(ys)),
        (Role::In(0), ParamTy::const_ptr(xs)),
        (Role::In(1), ParamTy::const_ptr(ws)),
    ];
    if residual {
        params.push((Role::In(2), ParamTy::const_ptr(ys)));
    }
    params.extend([(Role::MatM, ParamTy::I64), (Role::MatN, ParamTy::I64), (Role::MatK, ParamTy::I64)]);
    params
}

fn gemv_kernel(x: DType, w: DType, out: DType, residual: bool, cfg: GemvConfig) -> Result<Kernel, CodegenError> {
    gemv_check(cfg)?;
    let what = if residual { "gemv_residual" } else { "gemv" };
    let (xs, ws, ys) = (
        float_storage(x, &format!("{what} input x"))?,
        float_storage(w, &format!("{what} weight w"))?,
        float_storage(out, &format!("{what} output y"))?,
    );
    let params = gemv_params((xs, ws, ys), residual);
    let mut name =
        format!("kiln_{}_{}_{}_{}", if residual { "gemv_res" } else { "gemv" }, x.name(), w.name(), out.name());
    if cfg != GemvConfig::default() {
        name.push_str(&format!("_{}", cfg.tag()));
    }
    let sig = KernelSig::new(name, params);
    let template = format!("{VECTOR_HELPERS}{GEMV}")
        .replace("KILN_PROLOGUE", "")
        .replace("KILN_WARP_EPILOGUE", "")
        .replace("KILN_EPILOGUE", "");
    let mut defines = gemv_defines(xs, ws, ys, vec_elems(w), cfg);
    defines.extend([
        ("KILN_RESIDUAL", u8::from(residual).to_string()),
        ("GV_PROLOGUE", "0".to_string()),
        ("GV_X", "in0".to_string()),
        ("GV_W", "in1".to_string()),
        ("GV_Y", "out".to_string()),
        ("GV_RES", if residual { "in2" } else { "(const KILN_Y*)0" }.to_string()),
    ]);
    Ok(render(sig, &template, &defines, Grid::BlockPerItem { threads: 32 * cfg.warps as u32 }))
}

/// The defines of the GEMV template for storage types x, w, y, `vec` weight elements per
/// 16 bytes and the split `cfg` (shared with the fused form, `crate::gemv_prologue`).
pub(crate) fn gemv_defines(xs: &str, ws: &str, ys: &str, vec: usize, cfg: GemvConfig) -> Vec<(&'static str, String)> {
    vec![
        ("KILN_X", xs.to_string()),
        ("KILN_W", ws.to_string()),
        ("KILN_Y", ys.to_string()),
        ("KILN_VEC", vec.to_string()),
        ("GV_WARPS", cfg.warps.to_string()),
        ("GV_R", cfg.rows_per_warp.to_string()),
        ("GV_U", cfg.unroll.to_string()),
        ("GV_KS", cfg.ksplit.to_string()),
        ("GV_XS", GEMV_STAGED_FLOATS.to_string()),
        ("GV_MAX_M", cfg.max_rows.to_string()),
        ("GV_XVEC", u8::from(cfg.max_rows > 1).to_string()),
        ("GV_RA", gemv_readahead_mode().to_string()),
        ("GV_RA_BULK", u8::from(gemv_readahead_bulk()).to_string()),
    ]
}

/// `KILN_GEMV_RA=KiB` in the environment (a measurement knob, 0 by default): the bytes
/// of the next weight product's first rows that a GEMV's warps prefetch into L2 as they
/// finish (`GV_RA` in `gemv.cu`; the engine writes the table of next weights).
pub fn gemv_readahead_bytes() -> usize {
    static RA: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *RA.get_or_init(|| {
        std::env::var("KILN_GEMV_RA").ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0) << 10
    })
}

/// The `GV_RA` define of the GEMV template: 0 (no read-ahead), 1 (`KILN_GEMV_RA`: as the
/// warps finish) or 2 (`KILN_GEMV_RA_EARLY=1` too: a plain GEMV's blocks read ahead before
/// their wait for the previous kernel, right after issuing their first weight loads, so
/// the prefetches fill the memory system while a latency-bound kernel before them, decode
/// attention before o_proj, runs; the prologue forms then read nothing ahead).
pub fn gemv_readahead_mode() -> u8 {
    match gemv_readahead_bytes() {
        0 => 0,
        _ if crate::fused::env_flag("KILN_GEMV_RA_EARLY") => 2,
        _ => 1,
    }
}

/// The `GV_RA_BULK` define of the GEMV template: with read-ahead on and
/// `KILN_GEMV_RA_BULK=1` in the environment, each warp prefetches its share of a range in
/// one bulk prefetch (sm_90's copy engine) instead of its lanes prefetching line by line.
pub fn gemv_readahead_bulk() -> bool {
    gemv_readahead_mode() > 0 && crate::fused::env_flag("KILN_GEMV_RA_BULK")
}

/// `KILN_GEMV_RA_SKIP=KiB` in the environment (with `KILN_GEMV_RA`; 0 by default): the
/// bytes at the head of each slice of the next weight that the read-ahead skips (e.g.
/// what the next kernel's blocks load themselves before their wait).
pub fn gemv_readahead_skip() -> usize {
    static SKIP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| {
        std::env::var("KILN_GEMV_RA_SKIP").ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0) << 10
    })
}

pub(crate) const GEMV_STREAM: &str = include_str!("kernels/gemv_stream.cu");

/// Warps of a [`gemv_stream`] block.
pub const GEMV_STREAM_WARPS: usize = 8;
/// Items each warp of a [`gemv_stream`] keeps in flight (its ring's slots).
pub const GEMV_STREAM_STAGES: usize = 6;
/// 16-byte weight vectors per item of a [`gemv_stream`] (4 per lane: 2 KiB per warp).
pub const GEMV_STREAM_VECTORS: usize = 128;
/// Longest weight row (elements) a [`gemv_stream`] takes: x is staged whole, as f32.
pub const GEMV_STREAM_MAX_K: usize = 16384;

/// Whether [`gemv_stream`] takes rows of `k` elements of `w`: 16-byte vectors of whole
/// elements, at most [`GEMV_STREAM_MAX_K`]. (The weight must also be 16-byte aligned,
/// which the engine's allocations are.)
pub fn gemv_stream_fits(w: DType, k: usize) -> bool {
    k > 0
        && k <= GEMV_STREAM_MAX_K
        && matches!(w, DType::F32 | DType::F16 | DType::BF16)
        && k.is_multiple_of(vec_elems(w))
}

/// Whether the engine runs a one-row product over rows of `k` elements of `w` as the
/// streaming GEMV rather than the tiled one: short rows (at most
/// [`GEMV_SHORT_ROW_BYTES`]) that [`gemv_stream_fits`]. A tiled GEMV gives each warp
/// whole rows, so a short row leaves most of its lanes' loads unused, and its blocks
/// reach the DRAM only after they are scheduled; the streaming warps keep six 2 KiB items
/// in flight each across row boundaries, the first issued before the previous kernel
/// ends. Measured on an H200 (2026-12-04, batch-1 decode, same-run A/Bs, bf16):
/// SmolLM2-135M (rows of 576 elements: qkv, o_proj, gate_up, LM head) 1,946 → 2,058
/// tok/s with the short rows streamed; streaming every product was slower on the
/// Llama-3.2-1B shape (rows of 2,048 and 8,192: 1,154 → 1,054 tok/s; long rows only:
/// 1,084–1,134 by ring size), where the tiled GEMV's first loads already cover a 4 KiB
/// row and the persistent blocks' shared memory keeps the next kernel's blocks from
/// starting early.
pub fn gemv_stream_pays(w: DType, k: usize) -> bool {
    gemv_stream_fits(w, k) && w.bytes_for(k) <= GEMV_SHORT_ROW_BYTES
}

/// A streaming GEMV for one row of x over weight rows of `k` elements (`gemv_stream.cu`):
/// persistent blocks of [`GEMV_STREAM_WARPS`] warps, each warp keeping
/// [`GEMV_STREAM_STAGES`] items of [`GEMV_STREAM_VECTORS`] weight vectors in flight
/// through a `cp.async` ring in shared memory, the first issued before the kernel waits
/// for its predecessor; x is staged once per block. Same parameters and semantics as
/// [`gemv`] for `m = 1` (`out`, `in0` x, `in1` w, `m`, `n`, `k`); a launch with another
/// `m` or `k` writes nothing. Launch over [`gemv_stream_items`] blocks with the kernel's
/// dynamic shared memory. Requires [`gemv_stream_fits`].
pub fn gemv_stream(x: DType, w: DType, out: DType, k: usize) -> Result<Kernel, CodegenError> {
    let (xs, ws, ys) = (
        float_storage(x, "gemv_stream input x")?,
        float_storage(w, "gemv_stream weight w")?,
        float_storage(out, "gemv_stream output y")?,
    );
    if !gemv_stream_fits(w, k) {
        return Err(CodegenError(format!(
            "gemv_stream: weight rows of {k} elements of {w} (whole 16-byte vectors, at most {GEMV_STREAM_MAX_K})"
        )));
    }
    let params = gemv_params((xs, ws, ys), false);
    let name = format!("kiln_gemv_stream_{}_{}_{}_k{k}", x.name(), w.name(), out.name());
    let (template, mut defines, grid, smem) = gemv_stream_parts((xs, ws, ys), w, k, "");
    defines.extend([("GS_X", "in0".to_string()), ("GS_W", "in1".to_string()), ("GS_Y", "out".to_string())]);
    let mut kernel = render(KernelSig::new(name, params), &template, &defines, grid);
    kernel.dynamic_smem = smem;
    Ok(kernel)
}

/// [`gemv_stream`] where the engine runs it for one row of x of `x · wᵀ` (`w` a rank-2
/// weight of fixed row length): the rows are short ([`gemv_stream_pays`]) and the kernel
/// renders; `None` otherwise (the tiled GEMV runs). The engine and the plan's launch list
/// both ask here.
pub fn gemv_stream_if_pays(x: DType, w: &kiln_ops::TensorType, y: DType) -> Option<Kernel> {
    let k = (w.rank() == 2).then(|| w.shape.dims()[1].as_fixed()).flatten()?;
    gemv_stream_pays(w.dtype, k).then(|| gemv_stream(x, w.dtype, y, k).ok()).flatten()
}

/// What both streaming GEMV forms ([`gemv_stream`], `crate::gemv_stream_scaled`) share:
/// the template (`gemv_stream.cu` with `staging` in place of `KILN_PROLOGUE`), the
/// storage and split defines for x, w, y `st` and rows of `k` elements of `w`, the grid
/// and the dynamic shared memory (the rings, then x as f32).
pub(crate) fn gemv_stream_parts(
    (xs, ws, ys): (&str, &str, &str),
    w: DType,
    k: usize,
    staging: &str,
) -> (String, Vec<(&'static str, String)>, Grid, u32) {
    let template = format!("{VECTOR_HELPERS}{CACHE_ATTENTION}{GEMV_STREAM}").replace("KILN_PROLOGUE", staging);
    let defines = vec![
        ("KILN_X", xs.to_string()),
        ("KILN_W", ws.to_string()),
        ("KILN_Y", ys.to_string()),
        ("KILN_VEC", vec_elems(w).to_string()),
        ("GS_K", k.to_string()),
        ("GS_WARPS", GEMV_STREAM_WARPS.to_string()),
        ("GS_S", GEMV_STREAM_STAGES.to_string()),
        ("GS_CH", GEMV_STREAM_VECTORS.to_string()),
    ];
    let grid = Grid::BlockPerItem { threads: 32 * GEMV_STREAM_WARPS as u32 };
    let smem = (GEMV_STREAM_WARPS * GEMV_STREAM_STAGES * GEMV_STREAM_VECTORS * 16 + 4 * k) as u32;
    (template, defines, grid, smem)
}

/// Blocks of a [`gemv_stream`] launch over `n` weight rows on `sms` multiprocessors:
/// one per multiprocessor, fewer when `n` leaves warps without a row.
pub fn gemv_stream_items(n: usize, sms: usize) -> usize {
    n.div_ceil(GEMV_STREAM_WARPS).clamp(1, sms.max(1))
}

/// Floats of x one GEMV block stages in shared memory (`GV_XS` in `gemv.cu`).
pub const GEMV_STAGED_FLOATS: usize = 8192;

/// Blocks of a fused GEMV ([`crate::gemv_prologue`]) launch over `n` rows of w on a
/// device of `sms` multiprocessors: at most one per multiprocessor (its registers at the
/// [`GemvConfig::for_prologue`] split leave room for one), each looping over its share of
/// the row tiles, so the prologue runs once per block, in one wave.
pub fn gemv_prologue_items(n: usize, cfg: GemvConfig, sms: usize) -> usize {
    gemv_items_with(n, cfg).min(sms.max(1))
}

/// Whether a fused GEMV ([`crate::gemv_prologue`]) can stage whole rows of x: `m` rows
/// (1..=[`GEMV_MAX_M`]) of `k` elements.
pub fn gemv_prologue_fits(m: usize, k: usize) -> bool {
    (1..=GEMV_MAX_M).contains(&m) && ((GEMV_STAGED_FLOATS / m) & !255) >= k
}

/// GEMV `y[i, j] = Σ_l x[i, l] · w[j, l]` (`x [m, k]`, `w [n, k]` row-major — the
/// `linear` layout, i.e. matmul with transposed b — `y [m, n]`), for
/// `1 <= m <=` [`GEMV_MAX_M`] and any `n`, `k`. Each of x, w, y may be f32, f16 or bf16;
/// products accumulate in f32 and `y` is rounded once.
///
/// Parameters: `out` (y), `in0` (x), `in1` (w), `m`, `n`, `k` (i64, roles
/// [`Role::MatM`], [`Role::MatN`], [`Role::MatK`]). Launch `grid.dims(gemv_items(m, n))`.
/// Rows of `w` are read with 16-byte loads when `k` is a multiple of 16 bytes' worth of
/// elements and `w` is 16-byte aligned, elementwise otherwise. A kernel launched with
/// `m` outside `1..=GEMV_MAX_M` writes nothing: the caller checks `m`.
pub fn gemv(x: DType, w: DType, out: DType) -> Result<Kernel, CodegenError> {
    gemv_kernel(x, w, out, false, GemvConfig::default())
}

/// [`gemv`] with the work split `cfg` (launch with [`gemv_items_with`]).
pub fn gemv_with(x: DType, w: DType, out: DType, cfg: GemvConfig) -> Result<Kernel, CodegenError> {
    gemv_kernel(x, w, out, false, cfg)
}

/// Work items (blocks) of a [`gemv_with`] launch with `n` output columns.
pub fn gemv_items_with(n: usize, cfg: GemvConfig) -> usize {
    n.div_ceil(cfg.rows_per_block())
}

/// [`gemv`] with a fused residual add: `y = round(round(x·wᵀ) + r)` with `r [m, n]` of
/// y's dtype — the matmul result rounded to the output dtype, then the add rounded again,
/// like the CPU reference of `matmul` followed by `add`. Parameters: `out`, `in0` (x),
/// `in1` (w), `in2` (r), `m`, `n`, `k`.
pub fn gemv_residual(x: DType, w: DType, out: DType) -> Result<Kernel, CodegenError> {
    gemv_kernel(x, w, out, true, GemvConfig::default())
}

/// Work items (blocks of [`Grid::BlockPerItem`]) of a [`gemv`] / [`gemv_residual`]
/// launch with `n` output columns: one per [`GEMV_ROWS_PER_BLOCK`] columns. `m` does not
/// change the launch.
pub fn gemv_items(m: usize, n: usize) -> usize {
    debug_assert!((1..=GEMV_MAX_M).contains(&m), "gemv takes 1..={GEMV_MAX_M} rows, got {m}");
    gemv_items_with(n, GemvConfig::default())
}

/// Split-K decode attention on q/k/v of the float dtype `d`, with `t` (the key count)
/// given by `keys` over the device symbol table `syms` (rendered with [`dim_to_c`], so it
/// is not a kernel argument): one kernel, whose last block per query tile merges the
/// splits.
///
/// Semantics are those of `Op::Attention` (q `[b, s, h, dk]`, out `[b, s, h, dv]`,
/// `h % kh == 0`, query `i` at position `t - s + i`, masks none / causal / sliding
/// window, `softmax(scale · q·kᵀ) v`), except that K and V are read from caches: entry
/// `bi` of K starts `bi · k_batch_stride` elements into `in1` and holds positions as
/// contiguous rows of `kh · dk` elements (V likewise with `v_batch_stride`, `dv`), so a
/// cache `[b, capacity, kh, dk]` has `k_batch_stride = capacity · kh · dk`. Head dims
/// up to 256.
///
/// The kernel is generated for GQA groups of `group` query heads per kv head (`heads /
/// kv_heads` of the launch must equal it; launched otherwise it writes nothing).
/// Each block takes one chunk of `max(ceil(len / splits),` [`ATTENTION_DECODE_MIN_CHUNK`]`)`
/// of the keys any query row may see for the [`attention_decode_query_tile`] query (row,
/// head) pairs of its tile; blocks whose chunk is past the keys return at once. With one
/// chunk (short contexts) the block writes `out` itself. Otherwise each block reads its
/// chunk's K/V rows once and writes, per `(b, s, h, split)`, f32 `out1 [.., dv]` =
/// `Σ_j 2^(s_j - max) v_j` and `out2 [.., 2]` = `(max, Σ_j 2^(s_j - max))` with
/// `s_j = scale · log2(e) · q·k_j` (`(-1e30, 0)` and zeros for a query without a visible
/// key in the chunk); the last block of a tile to finish (counted on `counters`) merges
/// the chunks into `out` (dtype `d`, rounded once; zeros for a row with no visible key,
/// like the CPU reference) and resets its counter.
///
/// Parameters: `out` (`[b, s, h, dv]` of `d`), `out1` (f32 partial outputs), `out2`
/// (f32 (max, sum)), `counters` (`unsigned int`, [`attention_decode_counters`] of them,
/// zero before the first launch and left zero by every launch), `in0` (q), `in1` (k
/// cache), `in2` (v cache), `syms`, `batch`, `seq`, `heads`, `kv_heads`, `head_dim`,
/// `value_dim`, `k_batch_stride`, `v_batch_stride`, `splits` (i64), `scale` (f32),
/// `mask_kind` (i32: 0 none, 1 causal, 2 sliding window), `window` (i64).
/// Launch with `grid.dims(attention_decode_items(..))`.
/// Kernels launched with sizes [`attention_decode_check`] rejects write nothing.
pub fn attention_decode(d: DType, group: usize, keys: &Dim, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    attention_decode_tiled(d, group, attention_decode_query_tile(group), keys, syms)
}

/// [`attention_decode`] with query tiles of `tile` (row, head) pairs, a divisor of
/// `group` (1 always is): launch it with the `_tiled` item and counter counts of the
/// same tile. [`attention_decode_pick_tile`] says when a tile of 1 is worth a kernel.
pub fn attention_decode_tiled(
    d: DType,
    group: usize,
    tile: usize,
    keys: &Dim,
    syms: &[Sym],
) -> Result<Kernel, CodegenError> {
    attention_decode_render(d, group, tile, keys, syms, None)
}

/// The producers of a decode attention's operands that [`attention_decode_fused`]
/// computes itself (see [`attention_producers`]): q's fused elementwise group (RoPE)
/// and the fused groups appending the new K and V rows to the caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionProducers {
    pub q: kiln_graph::NodeId,
    pub k: kiln_graph::NodeId,
    pub v: kiln_graph::NodeId,
}

impl AttentionProducers {
    /// What the fused kernel of attention node `n` reads beyond its operands: the
    /// producers' inputs, each paired with `n` — the memory plan must keep them live
    /// through `n` (`kiln_passes::memory::plan_with_reads`), or it may give the
    /// attention's output their bytes while the kernel still reads them.
    pub fn reads(&self, g: &kiln_graph::Graph, n: kiln_graph::NodeId) -> Vec<(kiln_graph::Value, kiln_graph::NodeId)> {
        [self.q, self.k, self.v].into_iter().flat_map(|p| g.operands(p)).map(|v| (v, n)).collect()
    }
}

/// Whether attention node `n` of `g` can compute its operands' producers itself
/// ([`attention_decode_fused`]), and which they are: q must be the only output of a
/// fused elementwise group that nothing else reads (no graph output either), k and v
/// the outputs of fused cache appends ([`crate::fused_append`], elementwise new rows)
/// that only this attention reads; q `[b, s, h, d]` and the new rows `[b, s, kh, d]`
/// of the attention's dtype. The one rule for the CUDA engine, the plan's launch list
/// and the viewer. Errors say which condition fails.
pub fn attention_producers(g: &kiln_graph::Graph, n: kiln_graph::NodeId) -> Result<AttentionProducers, CodegenError> {
    use kiln_ops::{FusedKind, Op};
    fn bad<T>(m: String) -> Result<T, CodegenError> {
        Err(CodegenError(format!("attention_producers: {m}")))
    }
    if !matches!(g.node(n).op, Op::Attention(_)) {
        return bad("not an attention node".into());
    }
    let ops = g.operands(n);
    let [q, k, v] = ops[..] else { return bad("attention takes q, k, v".into()) };
    let dtype = g.value_type(q).dtype;
    let only_this = |x: kiln_graph::Value, what: &str| -> Result<(), CodegenError> {
        if g.users(x.node).iter().any(|&(u, _)| u != n) {
            return bad(format!("{what} (%{}) is read by another node", x.node.index()));
        }
        Ok(())
    };
    // q: a fused elementwise group of one output, read by this attention only.
    let Op::Fused(qb) = &g.node(q.node).op else { return bad("q is not computed by a fused group".into()) };
    if qb.outputs.len() != 1 || !matches!(qb.kind(), Ok(FusedKind::Elementwise { .. })) {
        return bad("q's group is not elementwise with one output".into());
    }
    only_this(q, "q")?;
    if g.outputs().values().any(|o| *o == q) {
        return bad("q is a graph output".into());
    }
    // k, v: fused appends whose new rows are elementwise, read by this attention only.
    for (x, what) in [(k, "k"), (v, "v")] {
        let Op::Fused(b) = &g.node(x.node).op else { return bad(format!("{what} is not a fused cache append")) };
        let Some(app) = crate::fused::fused_append(b) else {
            return bad(format!("{what} is not a fused cache append"));
        };
        if !matches!(app.rows_body(b).kind(), Ok(FusedKind::Elementwise { .. })) {
            return bad(format!("{what}'s new rows are not elementwise"));
        }
        let t = b.ty(app.new).expect("a checked body");
        if t.shape.rank() != 4 || t.dtype != dtype {
            return bad(format!("{what}'s new rows are {t}, not [batch, seq, kv_heads, dim] of {dtype}"));
        }
        only_this(x, what)?;
    }
    let qt = g.value_type(q);
    if qt.shape.rank() != 4 {
        return bad(format!("q is {qt}, not [batch, seq, heads, dim]"));
    }
    Ok(AttentionProducers { q: q.node, k: k.node, v: v.node })
}

/// [`attention_decode_fused`] for attention node `n` of `g` with query tiles of `tile`
/// pairs (`None`: [`attention_decode_query_tile`] of its GQA group), its dtype, group,
/// key count and producer bodies read from the graph, when [`attention_producers`]
/// allows it; also the producers. The one renderer for the engine, the plan's launch
/// list and the viewer.
pub fn attention_decode_fused_in(
    g: &kiln_graph::Graph,
    n: kiln_graph::NodeId,
    tile: Option<usize>,
    syms: &[Sym],
) -> Result<(Kernel, AttentionProducers), CodegenError> {
    let p = attention_producers(g, n)?;
    let body = |m: kiln_graph::NodeId| match &g.node(m).op {
        kiln_ops::Op::Fused(b) => b.as_ref(),
        _ => unreachable!("attention_producers checked the producers are fused"),
    };
    let ops = g.operands(n);
    let (qt, kt) = (g.value_type(ops[0]), g.value_type(ops[1]));
    let heads = |t: &kiln_ops::TensorType| t.shape.dims()[2].as_fixed().unwrap_or(0);
    let group = heads(qt).checked_div(heads(kt)).unwrap_or(0);
    let tile = tile.unwrap_or_else(|| attention_decode_query_tile(group));
    let keys = &kt.shape.dims()[1];
    let k = attention_decode_fused(kt.dtype, group, tile, keys, syms, body(p.q), body(p.k), body(p.v))?;
    Ok((k, p))
}

/// [`attention_decode_tiled`] that computes its operands' producers itself (see
/// [`attention_producers`]): `q` (q's fused elementwise group), `k` and `v` (the fused
/// cache appends). Every block computes its tile's q and the launch's own K/V rows
/// (positions `t - seq ..`) of its chunk from the producers' inputs, exactly as their
/// kernels would (roundings included), instead of reading them from memory; the
/// blocks of query tile 0 also write those rows into the caches, so the producers'
/// launches are not needed (the engine skips them).
///
/// Parameters: those of [`attention_decode`], with `in0 …` the inputs of `q`'s body,
/// then `k`'s, then `v`'s (the appends' `past` inputs are the caches, read and written
/// through `k_batch_stride` / `v_batch_stride` as in [`attention_decode`]) in place of
/// q and the two caches. Launch as [`attention_decode_tiled`] of the same tile.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_fused(
    d: DType,
    group: usize,
    tile: usize,
    keys: &Dim,
    syms: &[Sym],
    q: &kiln_ops::FusedBody,
    k: &kiln_ops::FusedBody,
    v: &kiln_ops::FusedBody,
) -> Result<Kernel, CodegenError> {
    let bad = |m: String| Err(CodegenError(format!("attention_decode_fused: {m}")));
    let (Some(ka), Some(va)) = (crate::fused::fused_append(k), crate::fused::fused_append(v)) else {
        return bad("k and v must be fused cache appends".into());
    };
    let [qr] = q.outputs[..] else { return bad("q's group must have one output".into()) };
    let (nq, nk, nv) = (q.inputs.len(), k.inputs.len(), v.inputs.len());
    if nq + nk + nv > u8::MAX as usize {
        return bad(format!("{} producer inputs (at most 255)", nq + nk + nv));
    }
    let mut inputs = Vec::new();
    for (b, base) in [(q, 0), (k, nq), (v, nq + nk)] {
        for (i, t) in b.inputs.iter().enumerate() {
            let st = table::storage_type(t.dtype)
                .ok_or_else(|| CodegenError(format!("attention_decode_fused: input dtype {} unsupported", t.dtype)))?;
            inputs.push((Role::In((base + i) as u8), ParamTy::const_ptr(st)));
        }
    }
    let coord = ["fq0", "fq1", "fq2", "fq3"];
    let code = [
        crate::fused::value_block(q, qr, &coord, syms, 0, "fv")?,
        crate::fused::value_block(k, ka.new, &coord, syms, nq as u8, "fv")?,
        crate::fused::value_block(v, va.new, &coord, syms, (nq + nk) as u8, "fv")?,
    ];
    let fused = FusedParts {
        inputs,
        k_cache: Role::In((nq + ka.past_input) as u8).c_name(),
        v_cache: Role::In((nq + nk + va.past_input) as u8).c_name(),
        code,
    };
    attention_decode_render(d, group, tile, keys, syms, Some(fused))
}

/// What [`attention_decode_fused`] adds to the kernel: the producers' input parameters,
/// the cache parameters' names and the value blocks of q, the new K and V rows.
struct FusedParts {
    inputs: Vec<(Role, ParamTy)>,
    k_cache: String,
    v_cache: String,
    code: [String; 3],
}

fn attention_decode_render(
    d: DType,
    group: usize,
    tile: usize,
    keys: &Dim,
    syms: &[Sym],
    fused: Option<FusedParts>,
) -> Result<Kernel, CodegenError> {
    let s = float_storage(d, "attention_decode")?;
    if group == 0 {
        return Err(CodegenError("attention_decode: a GQA group of 0 query heads per kv head".into()));
    }
    if tile == 0 || !group.is_multiple_of(tile) || tile > ATTENTION_DECODE_QUERY_TILE {
        return Err(CodegenError(format!(
            "attention_decode: a query tile of {tile} does not divide the GQA group of {group} (or exceeds \
             {ATTENTION_DECODE_QUERY_TILE})"
        )));
    }
    let keys_c = dim_to_c(keys, syms)?;
    let vec = vec_elems(d);
    // Small tiles (GQA groups up to 4) take twice the vectors per lane (fewer shuffle
    // levels per key) and twice the warps (more keys in flight): register use and the
    // warp-merge buffer (warps · tile · 256 floats = 32 KiB) stay the same.
    let small = tile <= 4;
    let nvl = (MAX_HEAD_DIM / (32 * vec)).max(1) * if small { 2 } else { 1 };
    let warps = match attention_tile1_warps() {
        Some(w) if tile == 1 => w,
        _ if small => 2 * ATTENTION_DECODE_WARPS,
        _ => ATTENTION_DECODE_WARPS,
    };
    let mut params = cache_attention_params(s, true);
    let mut template = format!("{VECTOR_HELPERS}{CACHE_ATTENTION}{}", FLASH_DECODE);
    let mut defines = vec![
        ("KILN_T", s.to_string()),
        ("KILN_VEC", vec.to_string()),
        ("AD_NVL", nvl.to_string()),
        ("AD_WARPS", warps.to_string()),
        ("AD_QT", tile.to_string()),
        ("AD_MIN_CHUNK", attention_min_chunk().to_string()),
        ("AD_STAGE", attention_stage_bytes().to_string()),
        ("KILN_KEYS", keys_c.clone()),
    ];
    defines.push(("AD_PVW", u8::from(attention_pv_warps()).to_string()));
    if let Some(u) = attention_unroll() {
        defines.push(("AD_UNROLL", u.to_string()));
    }
    let name = match fused {
        None => format!("kiln_attn_decode_{}_q{tile}_{}", d.name(), stable_hash_hex(&keys_c)),
        Some(f) => {
            // The producers' inputs replace q and the caches.
            let at = params.iter().position(|(r, _)| *r == Role::In(0)).expect("attention params take q");
            params.splice(at..at + 3, f.inputs);
            defines.extend([("AD_FUSED", "1".to_string()), ("AD_KC", f.k_cache), ("AD_VC", f.v_cache)]);
            let indent = |c: &str, n: usize| c.replace('\n', &format!("\n{}", " ".repeat(n)));
            template = template
                .replace("KILN_FUSED_Q", &indent(&f.code[0], 12))
                .replace("KILN_FUSED_K", &indent(&f.code[1], 16))
                .replace("KILN_FUSED_V", &indent(&f.code[2], 16));
            let code = f.code.join("\n");
            format!("kiln_attn_decode_fused_{}_q{tile}_{}", d.name(), stable_hash_hex(&format!("{keys_c}\n{code}")))
        }
    };
    let sig = KernelSig::new(name, params);
    let mut k = render(sig, &template, &defines, Grid::BlockPerItem { threads: 32 * warps as u32 });
    k.dynamic_smem = 2 * attention_stage_bytes() as u32;
    Ok(k)
}

/// The parameters of an attention kernel over a resident KV cache, in signature order:
/// `out` (storage type `s`), with `split_k` the f32 workspaces `out1`, `out2` and the
/// `counters`, then q/k/v, `syms`, the sizes and strides, with `split_k` the `splits`
/// and `early` (see `flash_decode.cu`), then `scale`, `mask_kind`, `window`. Shared by
/// [`attention_decode`] and [`crate::prefill::attention_prefill`], so both launch from
/// one argument list.
pub(crate) fn cache_attention_params(s: &str, split_k: bool) -> Vec<(Role, ParamTy)> {
    let mut p = vec![(Role::Out(0), ParamTy::ptr(s))];
    if split_k {
        p.extend([
            (Role::Out(1), ParamTy::ptr("float")),
            (Role::Out(2), ParamTy::ptr("float")),
            (Role::Counters, ParamTy::ptr("unsigned int")),
        ]);
    }
    p.extend([
        (Role::In(0), ParamTy::const_ptr(s)),
        (Role::In(1), ParamTy::const_ptr(s)),
        (Role::In(2), ParamTy::const_ptr(s)),
        (Role::Syms, ParamTy::const_ptr("i64")),
        (Role::Batch, ParamTy::I64),
        (Role::Seq, ParamTy::I64),
        (Role::Heads, ParamTy::I64),
        (Role::KvHeads, ParamTy::I64),
        (Role::HeadDim, ParamTy::I64),
        (Role::ValueDim, ParamTy::I64),
        (Role::KBatchStride, ParamTy::I64),
        (Role::VBatchStride, ParamTy::I64),
    ]);
    if split_k {
        p.extend([(Role::Splits, ParamTy::I64), (Role::Early, ParamTy::I64)]);
    }
    p.extend([(Role::Scale, ParamTy::F32), (Role::MaskKind, ParamTy::I32), (Role::Window, ParamTy::I64)]);
    p
}

/// Checks the sizes an [`attention_decode`] launch takes: `kv_heads > 0`,
/// `heads % kv_heads == 0`, `1 <= head_dim, value_dim <= 256`, `splits >= 1`.
pub fn attention_decode_check(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    value_dim: usize,
    splits: usize,
) -> Result<(), CodegenError> {
    let bad = |m: String| Err(CodegenError(format!("attention_decode: {m}")));
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return bad(format!("{heads} query heads are not a multiple of {kv_heads} kv heads"));
    }
    for (name, v) in [("head_dim", head_dim), ("value_dim", value_dim)] {
        if v == 0 || v > MAX_HEAD_DIM {
            return bad(format!("{name} {v} is outside 1..={MAX_HEAD_DIM}"));
        }
    }
    if splits == 0 {
        return bad("splits must be at least 1".to_string());
    }
    Ok(())
}

/// The two f32 workspaces of [`attention_decode`] in elements: partial outputs
/// `b·s·h·splits·dv` and (max, sum) pairs `b·s·h·splits·2`.
pub fn attention_decode_workspace(b: usize, s: usize, h: usize, dv: usize, splits: usize) -> (usize, usize) {
    let rows = b * s * h * splits;
    (rows * dv, rows * 2)
}

/// Keys above which decode attention takes whole GQA groups per block even where
/// [`attention_decode_pick_tile`] would take one query head per block: one-head tiles read
/// every K/V row once per query head, which long contexts pay for. Measured on an H200
/// (2026-12-04, `attention_decode_timing`, µs back to back, one head per block against
/// whole groups): the Llama-3.2-1B heads (32 over 8) 12.0 / 13.4 at 1,000 keys, 23.5 /
/// 14.6 at 4,000; SmolLM2's (9 over 3) 9.8 / 11.8 and 12.6 / 12.7. In the decode step at
/// context 4,040 (`kiln bench --decode-prompt 4000`, against `--attention-long-keys
/// 1000000`, two rounds): the 1B shape 765.7 → 895.7 tok/s, SmolLM2 1,234 → 1,223 (its
/// crossover lies higher; one bound for all shapes).
pub const ATTENTION_DECODE_LONG_KEYS: usize = 2048;

/// Query (row, head) pairs per block of an [`attention_decode`] kernel for a GQA group
/// of `group` query heads per kv head: the largest divisor of `group` up to
/// [`ATTENTION_DECODE_QUERY_TILE`], so every tile is full (the kernel's per-query loops
/// have no guards) and lies within one query row.
pub fn attention_decode_query_tile(group: usize) -> usize {
    (1..=ATTENTION_DECODE_QUERY_TILE.min(group.max(1))).rev().find(|t| group.is_multiple_of(*t)).unwrap_or(1)
}

/// Blocks per split below which a launch is better off with query tiles of 1 (one block
/// per query head) than with whole GQA groups: measured on an H200 (2026-12-04, batch 1
/// and 8): tile 1 decodes 3.8% faster at batch 1 on the Llama-3.2-1B shape (8 blocks of
/// 4 heads → 32) and 3.7% / 3.1% at batch 1 / 8 on SmolLM2 (3 / 24 blocks of 3 heads);
/// at 64 blocks (1B, batch 8) whole groups are 5% faster.
pub const ATTENTION_DECODE_MIN_BLOCKS: usize = 32;

/// The query tile for a launch over `b` sequences of `s` rows, `h` heads and `kh` kv
/// heads, given kernels for the default tile ([`attention_decode_query_tile`]) and for
/// tile 1: the default unless it leaves fewer than [`ATTENTION_DECODE_MIN_BLOCKS`]
/// blocks per split.
pub fn attention_decode_pick_tile(b: usize, s: usize, h: usize, kh: usize) -> usize {
    let group = h.checked_div(kh).unwrap_or(0);
    let tile = attention_decode_query_tile(group);
    if attention_decode_counters_tiled(b, s, h, kh, tile) < ATTENTION_DECODE_MIN_BLOCKS {
        1
    } else {
        tile
    }
}

/// Work items (blocks) of an [`attention_decode`] launch: one per (batch, kv head, tile
/// of [`attention_decode_query_tile`] query pairs, split).
pub fn attention_decode_items(b: usize, s: usize, h: usize, kh: usize, splits: usize) -> usize {
    attention_decode_counters(b, s, h, kh) * splits
}

/// [`attention_decode_items`] of a kernel with query tiles of `tile` pairs.
pub fn attention_decode_items_tiled(b: usize, s: usize, h: usize, kh: usize, splits: usize, tile: usize) -> usize {
    attention_decode_counters_tiled(b, s, h, kh, tile) * splits
}

/// Completion counters an [`attention_decode`] launch uses: one per (batch, kv head,
/// query tile).
pub fn attention_decode_counters(b: usize, s: usize, h: usize, kh: usize) -> usize {
    let group = h.checked_div(kh).unwrap_or(0);
    attention_decode_counters_tiled(b, s, h, kh, attention_decode_query_tile(group))
}

/// [`attention_decode_counters`] of a kernel with query tiles of `tile` pairs.
pub fn attention_decode_counters_tiled(b: usize, s: usize, h: usize, kh: usize, tile: usize) -> usize {
    let group = h.checked_div(kh).unwrap_or(0);
    b * kh * (s * group).div_ceil(tile.max(1))
}

/// A split count for [`attention_decode`] fixed at plan time: enough partial blocks for
/// about two waves over `sms` multiprocessors, at least one key per split for up to
/// `max_keys` keys, at most 256.
pub fn attention_decode_splits(b: usize, s: usize, h: usize, kh: usize, max_keys: usize, sms: usize) -> usize {
    let group = h.checked_div(kh).unwrap_or(0);
    attention_decode_splits_tiled(b, s, h, kh, max_keys, sms, attention_decode_query_tile(group))
}

/// [`attention_decode_splits`] for a kernel with query tiles of `tile` pairs.
pub fn attention_decode_splits_tiled(
    b: usize,
    s: usize,
    h: usize,
    kh: usize,
    max_keys: usize,
    sms: usize,
    tile: usize,
) -> usize {
    let per_split = attention_decode_items_tiled(b, s, h, kh, 1, tile);
    let want = (2 * sms).div_ceil(per_split.max(1));
    want.clamp(1, 256).min(max_keys.max(1))
}

/// Samples one token per row of `logits [rows, vocab]` (f32, f16 or bf16, read as f32).
///
/// Parameters: `out` (i64 `[rows]`: the ids), `out1` (f32 `[rows]`: their
/// log-probabilities), `in0` (logits), `step` (`i64*`, the device draw counter), `n`
/// (rows), `len` (vocab), `temperature` (f32), `top_k` (i64), `top_p` (f32), `seed`
/// (i64, used as 64 raw bits). Launch `grid.dims(sample_items(rows))`: one block per row.
///
/// Semantics, with `x = logit · (1 / temperature)` in f32, `M = max x`,
/// `Z = Σ exp(x − M)`:
/// * `temperature <= 0`: greedy, the largest logit with ties to the lowest index and NaN
///   first (`kiln_before`); logprob = `log_softmax(logits)[id]` (temperature 1).
/// * A NaN or +inf logit (or an overflowing `x`): the greedy pick, logprob NaN. Every
///   logit −inf: id 0, logprob −inf.
/// * Otherwise top-k (`0 < top_k < vocab`; 0 = off) keeps `x >=` the k-th largest `x`,
///   ties included (Hugging Face semantics, so more than k tokens may stay); then top-p
///   (`top_p < 1`; 1 = off) keeps, among those, `x >= τ` for the largest `τ` whose kept
///   mass `Σ exp(x − M)` over `x >= τ` reaches `(top_p − 1e-6)` of theirs (the smallest
///   most-likely set reaching `top_p`, plus ties of its last member). The token is the
///   first kept index, in index order, where the running kept mass exceeds `u` times the
///   total kept mass. Logprob = `x_id − M − log Z`: under the temperature-scaled full
///   distribution (before filtering).
/// * `u = (h >> 40) / 2^24`, `h = mix(mix(mix(seed) ^ step_of_launch) ^ row)`, `mix` the
///   SplitMix64 step. Each block does one `atomicAdd(step, 1)`; `step_of_launch` = the
///   value before / `rows`, so every row of a launch draws with the same step and the
///   counter advances by `rows` per launch (by one per launch for one row): a replayed
///   CUDA graph draws fresh numbers, and the same seed and counter give the same tokens.
///   Keep `rows` fixed between launches that share a counter (start it at 0).
///
/// Thresholds come from at most 5 histogram passes over the row each, without sorting;
/// greedy and unfiltered sampling read the row once plus the pick (see `sample.cu`).
pub fn sample(logits: DType) -> Result<Kernel, CodegenError> {
    let l = float_storage(logits, "sample logits")?;
    let sig = KernelSig::new(
        format!("kiln_sample_{}", logits.name()),
        vec![
            (Role::Out(0), ParamTy::ptr("i64")),
            (Role::Out(1), ParamTy::ptr("float")),
            (Role::In(0), ParamTy::const_ptr(l)),
            (Role::Step, ParamTy::ptr("i64")),
            (Role::N, ParamTy::I64),
            (Role::Len, ParamTy::I64),
            (Role::Temperature, ParamTy::F32),
            (Role::TopK, ParamTy::I64),
            (Role::TopP, ParamTy::F32),
            (Role::Seed, ParamTy::I64),
        ],
    );
    Ok(render(
        sig,
        SAMPLE,
        &[("KILN_L", l.to_string()), ("KILN_THREADS", SAMPLE_THREADS.to_string())],
        Grid::BlockPerItem { threads: SAMPLE_THREADS },
    ))
}

/// Work items of a [`sample`] launch: one block per row.
pub fn sample_items(rows: usize) -> usize {
    rows
}

/// Threads of one [`greedy`] block.
pub const GREEDY_THREADS: u32 = 256;
/// Logits one [`greedy`] block scans, about (16 per thread: four 16-byte loads).
pub const GREEDY_CHUNK: usize = 4096;

/// Greedy sampling on the device: `out[r] = argmax(in0[r, :])` for f32 logits
/// `in0 [n, len]` (rows contiguous), the first maximum winning and NaN counting as the
/// largest value (the CPU `ArgMax`). One launch of `n · splits` blocks
/// ([`greedy_items`]; [`greedy_splits`] picks `splits`): each block scans a chunk of its
/// row and writes its best pair to the workspaces `out1` (f32) and `out2` (i64), both
/// `[n, splits]`; the last block of a row (counted on `counters[row]`, which must be zero
/// before the first launch and is reset by that block) merges them. With one split a
/// block writes `out` directly.
pub fn greedy() -> Result<Kernel, CodegenError> {
    let sig = KernelSig::new(
        "kiln_greedy_f32",
        vec![
            (Role::Out(0), ParamTy::ptr("i64")),
            (Role::Out(1), ParamTy::ptr("float")),
            (Role::Out(2), ParamTy::ptr("i64")),
            (Role::Counters, ParamTy::ptr("unsigned int")),
            (Role::In(0), ParamTy::const_ptr("float")),
            (Role::N, ParamTy::I64),
            (Role::Len, ParamTy::I64),
            (Role::Splits, ParamTy::I64),
        ],
    );
    Ok(render(sig, &format!("{VECTOR_HELPERS}{GREEDY}"), &[], Grid::BlockPerItem { threads: GREEDY_THREADS }))
}

/// WIP (`KILN_GREEDY_KEY`): [`greedy`] without the merge: each block takes atomicMax of
/// its best pair's 64-bit key (ordered like `kiln_before`) into `out` (u64 `[n]`, zero
/// before the launch); `resident::step_end_key` turns the keys into ids. Parameters:
/// out (keys), in0 (logits), n, len, splits; launch as [`greedy`].
pub fn greedy_key() -> Result<Kernel, CodegenError> {
    let sig = KernelSig::new(
        "kiln_greedy_key_f32",
        vec![
            (Role::Out(0), ParamTy::ptr("unsigned long long")),
            (Role::In(0), ParamTy::const_ptr("float")),
            (Role::N, ParamTy::I64),
            (Role::Len, ParamTy::I64),
            (Role::Splits, ParamTy::I64),
        ],
    );
    Ok(render(
        sig,
        &format!("{VECTOR_HELPERS}{GREEDY}"),
        &[("GR_KEY", "1".into())],
        Grid::BlockPerItem { threads: GREEDY_THREADS },
    ))
}

/// Blocks per row of a [`greedy`] launch over `len` logits: one per [`GREEDY_CHUNK`]
/// logits, at most 128.
pub fn greedy_splits(len: usize) -> usize {
    len.div_ceil(GREEDY_CHUNK).clamp(1, 128)
}

/// Work items (blocks) of a [`greedy`] launch.
pub fn greedy_items(rows: usize, splits: usize) -> usize {
    rows * splits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_widths() {
        assert_eq!(vec_elems(DType::BF16), 8);
        assert_eq!(vec_elems(DType::F16), 8);
        assert_eq!(vec_elems(DType::F32), 4);
        assert!(gemv(DType::I32, DType::F32, DType::F32).unwrap_err().0.contains("input x"));
    }
}
