//! Compute-bound prefill attention: a tiled tensor-core ("FlashAttention-2") kernel for
//! many query rows over a device-resident KV cache, `kernels/flash_prefill.cu`.
//!
//! * [`attention_prefill`]: `Op::Attention` with the semantics and parameter roles of
//!   [`crate::decode::attention_decode`]'s where they apply (q, the K/V
//!   caches and their batch strides, the key count from the device symbol table, masks,
//!   GQA, scale), writing `out` directly in the storage dtype: no splits, no workspace,
//!   one launch. bf16 and f16, head dims that are multiples of 16 up to
//!   [`PREFILL_MAX_HEAD_DIM`] (`dv == d`). Launch: [`attention_prefill_items`]; host
//!   checks: [`attention_prefill_check`].
//!
//! Measured on an H200 (2026-12-03, NVRTC 13.0, default build, median of 20 launches
//! after 3 warm-ups, each timed alone between two events): b=1, s=t=2048, h=32, kh=8,
//! causal, bf16: d=64 0.149 ms (115 TFLOP/s; the split-K decode kernels took 7.94 ms),
//! d=128 0.256 ms (134 TFLOP/s); s=t=8192: d=64 1.86 ms (148), d=128 3.47 ms (158).

use crate::kernels::{render, CodegenError, Grid, Kernel};
use crate::params::KernelSig;
use crate::symbols::{dim_to_c, stable_hash_hex};
use crate::table;
use kiln_ops::{DType, Dim, Sym};

const FLASH_PREFILL: &str = include_str!("kernels/flash_prefill.cu");

/// Query rows of one (batch, head) that one block owns.
pub const PREFILL_QUERY_TILE: usize = 64;
/// Keys per shared-memory tile.
pub const PREFILL_KEY_TILE: usize = 64;
/// Largest head dim [`attention_prefill`] takes (the K and V tiles live in 48 KiB of
/// static shared memory, the Q fragments and the output accumulator in registers).
pub const PREFILL_MAX_HEAD_DIM: usize = 128;
/// Warps of one block by default (16 query rows each).
const PREFILL_WARPS: usize = 4;

fn storage(d: DType) -> Result<&'static str, CodegenError> {
    match d {
        DType::F16 | DType::BF16 => Ok(table::storage_type(d).expect("float dtypes have storage")),
        other => Err(CodegenError(format!(
            "attention_prefill: dtype {other} is not supported (bf16 or f16: the tensor-core kernel has no {other} \
             path; use attention_decode)"
        ))),
    }
}

fn check_head_dim(name: &str, v: usize) -> Result<(), CodegenError> {
    if v == 0 || v > PREFILL_MAX_HEAD_DIM || !v.is_multiple_of(16) {
        return Err(CodegenError(format!(
            "attention_prefill: {name} {v} is not a multiple of 16 in 16..={PREFILL_MAX_HEAD_DIM}"
        )));
    }
    Ok(())
}

/// Prefill attention on q/k/v of dtype `d` (bf16 or f16) with head dim `head_dim` (a
/// multiple of 16, at most [`PREFILL_MAX_HEAD_DIM`]; the kernel is specialised to it),
/// `t` (the key count) given by `keys` over the device symbol table `syms` (rendered with
/// [`dim_to_c`], so it is not a kernel argument and a captured CUDA graph stays valid).
///
/// Semantics are those of `Op::Attention` as in [`crate::decode::attention_decode`]:
/// q `[b, s, h, d]` contiguous, `h % kh == 0`, query `i` at position `t - s + i`, masks
/// none / causal / sliding window of `window` keys, `softmax(scale · q·kᵀ) v`; K and V
/// are read from caches whose entry `bi` starts `bi · k_batch_stride` (`v_batch_stride`)
/// elements in and holds position `j` of kv head `g` at row `(j · kh + g) · d`; positions
/// `>= t` are never read. `out [b, s, h, d]` is written in `d`'s dtype, rounded once;
/// a row with no visible key is zeros (like the CPU reference).
///
/// Numerics: q·k and P·V on tensor cores (`mma.m16n8k16`) with f32 accumulation; the
/// softmax runs online in f32 in base 2 (`scale · log2(e)` folded into the scores); the
/// probabilities are rounded to `d`'s dtype as the operand of P·V, the normalising sum
/// is kept in f32.
///
/// Parameters: `out`, `in0` (q), `in1` (k cache), `in2` (v cache), `syms`, `batch`,
/// `seq`, `heads`, `kv_heads`, `head_dim`, `value_dim`, `k_batch_stride`,
/// `v_batch_stride` (i64), `scale` (f32), `mask_kind` (i32: 0 none, 1 causal, 2 sliding
/// window), `window` (i64). Launch `grid.dims(attention_prefill_items(b, s, h, kh))`.
/// A kernel launched with sizes [`attention_prefill_check`] rejects (or another head
/// dim than it was made for) writes nothing.
pub fn attention_prefill(d: DType, head_dim: usize, keys: &Dim, syms: &[Sym]) -> Result<Kernel, CodegenError> {
    attention_prefill_variant(d, head_dim, PrefillTuning::default(), keys, syms)
}

/// How an [`attention_prefill`] kernel is built; every variant has the same semantics
/// and launch items. For measurements.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillTuning {
    /// Warps sharing the [`PREFILL_QUERY_TILE`] rows of a block: 4 (16 rows each) or 2
    /// (32 rows each: K/V fragments reused over twice the rows, more registers; head
    /// dims up to 64).
    pub warps: usize,
    /// `__launch_bounds__(threads, min_blocks)` when > 0: fewer registers for more
    /// resident blocks, at the price of spills.
    pub min_blocks: u32,
    /// Shared-memory stages of the K and V tiles: 1 (K tile i+1 copied during P·V of
    /// tile i, V tile i during q·kᵀ; three barriers per tile) or 2 (head dims up to 80:
    /// tile i+1 copied during all of tile i, one barrier per tile).
    pub stages: usize,
}

impl Default for PrefillTuning {
    fn default() -> PrefillTuning {
        PrefillTuning { warps: PREFILL_WARPS, min_blocks: 0, stages: 1 }
    }
}

/// [`attention_prefill`] built with `tuning`.
#[doc(hidden)]
pub fn attention_prefill_variant(
    d: DType,
    head_dim: usize,
    tuning: PrefillTuning,
    keys: &Dim,
    syms: &[Sym],
) -> Result<Kernel, CodegenError> {
    let PrefillTuning { warps, min_blocks, stages } = tuning;
    let s = storage(d)?;
    check_head_dim("head_dim", head_dim)?;
    let mw = match warps {
        4 => 1,
        2 if head_dim <= 64 => 2,
        _ => {
            return Err(CodegenError(format!(
                "attention_prefill: {warps} warps per block with head_dim {head_dim} (4, or 2 up to head_dim 64)"
            )))
        }
    };
    if !(stages == 1 || stages == 2 && head_dim <= 80) {
        return Err(CodegenError(format!(
            "attention_prefill: {stages} stages with head_dim {head_dim} (1, or 2 up to head_dim 80)"
        )));
    }
    let keys_c = dim_to_c(keys, syms)?;
    let mut variant = if warps == PREFILL_WARPS { String::new() } else { format!("_w{warps}") };
    if min_blocks > 0 {
        variant.push_str(&format!("_b{min_blocks}"));
    }
    if stages > 1 {
        variant.push_str(&format!("_s{stages}"));
    }
    let sig = KernelSig::new(
        format!("kiln_attn_prefill_{}_d{head_dim}{variant}_{}", d.name(), stable_hash_hex(&keys_c)),
        crate::decode::cache_attention_params(s, false),
    );
    let threads = 32 * warps as u32;
    let template = format!("{}{FLASH_PREFILL}", crate::decode::CACHE_ATTENTION);
    let mut kernel = render(
        sig,
        &template,
        &[
            ("KILN_T", s.to_string()),
            ("PF_F16", u8::from(d == DType::F16).to_string()),
            ("PF_D", head_dim.to_string()),
            ("PF_WARPS", warps.to_string()),
            ("PF_MW", mw.to_string()),
            ("PF_STAGES", stages.to_string()),
            ("KILN_KEYS", keys_c),
        ],
        Grid::BlockPerItem { threads },
    );
    if min_blocks > 0 {
        // After rendering, so the signature stays the one `render` gives every kernel
        // (and the body still starts with `kiln_grid_entry()`).
        let plain = format!("__global__ void {}(", kernel.sig.name);
        let bounded = format!("__global__ void __launch_bounds__({threads}, {min_blocks}) {}(", kernel.sig.name);
        kernel.source = kernel.source.replacen(&plain, &bounded, 1);
    }
    Ok(kernel)
}

/// Checks what an [`attention_prefill`] launch takes: dtype bf16 or f16, `kv_heads > 0`,
/// `heads % kv_heads == 0`, `head_dim == value_dim`, a multiple of 16 in
/// `16..=`[`PREFILL_MAX_HEAD_DIM`]. (The kernel must also have been made for this
/// `head_dim`.)
pub fn attention_prefill_check(
    d: DType,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    value_dim: usize,
) -> Result<(), CodegenError> {
    storage(d)?;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(CodegenError(format!(
            "attention_prefill: {heads} query heads are not a multiple of {kv_heads} kv heads"
        )));
    }
    check_head_dim("head_dim", head_dim)?;
    check_head_dim("value_dim", value_dim)?;
    if head_dim != value_dim {
        return Err(CodegenError(format!("attention_prefill: head_dim {head_dim} != value_dim {value_dim}")));
    }
    Ok(())
}

/// Work items (blocks) of an [`attention_prefill`] launch: one per (batch, query head,
/// tile of [`PREFILL_QUERY_TILE`] query rows). `kh` does not change the launch (a block
/// per query head; the blocks of one GQA group read the same K/V rows, mostly from L2).
pub fn attention_prefill_items(b: usize, s: usize, h: usize, kh: usize) -> usize {
    debug_assert!(kh > 0 && h.is_multiple_of(kh), "{h} query heads over {kh} kv heads");
    b * h * s.div_ceil(PREFILL_QUERY_TILE)
}
