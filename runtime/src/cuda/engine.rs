//! The device-resident generation engine: weights, KV cache, activations and sampling all
//! stay on the GPU; a decode step is captured once as a CUDA graph and replayed.
//!
//! How the model graph (the contract of [`crate::generate`]) is lowered:
//! * every `past.X` cache input and its `present.X = concat(past.X, new, axis 1)` output
//!   share one device buffer `[max_batch, max_context, …]`: the concat becomes an
//!   in-place **append** of the new rows at row `past` (read from the device symbol
//!   table), and attention reads the cache through a batch stride;
//! * intermediates live in one arena laid out by [`kiln_passes::memory::plan`] (reshapes
//!   are views of their operand's buffer);
//! * the symbols (`batch`, `past`, `seq`) live in a device table (`syms`); kernels that
//!   depend on `past` read it there, and the step-end kernel advances it on the device;
//! * greedy sampling (argmax) writes the next input ids in place, so a decode step needs
//!   nothing from the host: [`CudaEngine::decode_step`] replays the captured graph.
//!
//! Prefill runs each prompt on its own (batch 1) into its cache slot, eagerly; decode
//! steps run all sequences together (they must share one length, since `past` is one
//! symbol).

use super::blas::Gemm;
use super::executor::{compile_and_load, fused_args, launch, launch_node, live_nodes, Args, Lane};
use super::{driver_err, host_bytes, CompileStats, CudaError, DeviceInfo};
use crate::error::RuntimeError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use indexmap::IndexMap;
use kiln_codegen::kernels::{self, NodeLowering};
use kiln_codegen::{decode, prefill};
use kiln_codegen::{ArgValue, Kernel, Role};
use kiln_graph::{Graph, NodeId, Value};
use kiln_ops::{Bindings, DType, Dim, HostTensor, Op, Sym};
use kiln_passes::memory::{self, MemoryPlan, PlanOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Sequences decoded together, at most.
    pub max_batch: usize,
    /// Positions per sequence (prompt plus generated), at most: the KV cache's capacity.
    pub max_context: usize,
    /// Capture the decode step as a CUDA graph and replay it.
    pub cuda_graphs: bool,
    /// Kernel cache folder; `None` uses the default.
    pub cache_dir: Option<PathBuf>,
    /// Launch each kernel with programmatic dependent launch (Hopper and later; on by
    /// default, off with `KILN_PDL=0` in the environment), so it
    /// may start while the previous kernel drains and waits for it (`kiln_grid_wait`)
    /// before touching its data; GEMVs prefetch their weights before that wait. Every
    /// kernel must wait ([`kiln_codegen::Kernel::waits_for_previous`]; the engine
    /// refuses to build otherwise): a fused KV append that did not made decode diverge
    /// (found and fixed 2026-12-03).
    pub pdl: bool,
    /// Kernel binaries by cache key (from an executable plan, see
    /// [`CudaEngine::kernel_binaries`]): a kernel found here is neither compiled nor read
    /// from the disk cache.
    pub prebuilt: Option<Arc<HashMap<String, Vec<u8>>>>,
    /// Launch runs of independent fused elementwise kernels and cache appends (a
    /// layer's RoPE of q and its k / v appends) as one kernel each
    /// ([`kiln_codegen::horizontal`]); on by default, off with `KILN_HFUSE=0` in the
    /// environment.
    pub horizontal: bool,
    /// Let a GEMV compute its matrix-vector group's epilogue where the rule of
    /// `EpiRun` takes it (one row of x, one wave of blocks); off (`false`, or
    /// `KILN_EPILOGUE_GEMV=0` in the environment), the GEMV writes y and the epilogue's
    /// own kernel follows: a same-run A/B of the epilogue GEMV.
    pub epilogue_gemv: bool,
    /// Let a GEMV compute a matrix-vector group's prologue when it factors as x = A · S
    /// (an RMSNorm, with the residual add before it: `kiln_codegen::gemv_scaled`) for one
    /// row of x: one kernel instead of the prologue's kernel and the GEMV (see
    /// `ScaledRun`). Off (`false`, or `KILN_SCALED_GEMV=0` in the environment), the
    /// prologue's kernel writes x and the GEMV reads it: a same-run A/B.
    pub scaled_gemv: bool,
    /// In the captured decode step, let decode attention read the key count and issue
    /// the copies of the cache rows of earlier steps before it waits for the previous
    /// kernel (`flash_decode.cu`: those rows were written by earlier graph replays);
    /// eager launches always wait first. Off (`false`, or `KILN_ATTN_EARLY=0` in the
    /// environment): a same-run A/B. Measured on an H200 (2026-12-04, batch 1 / 8):
    /// SmolLM2 1,724 → 1,845 / 6,401 → 6,644 tok/s, the Llama-3.2-1B shape 1,056 →
    /// 1,045 / 3,101 → 3,156.
    pub attention_early: bool,
    /// Let decode attention compute its operands' producers itself where
    /// `kiln_codegen::decode::attention_producers` allows it (a layer's RoPE of q and its
    /// K / V cache appends: `attention_decode_fused`), so their launch is skipped
    /// whenever the split-K kernel runs (decode, short prompts). Off (`false`, or
    /// `KILN_ATTN_FUSED=0` in the environment): the producers' own launch: a same-run A/B.
    /// Measured on an H200 (2026-12-04, batch 1, two rounds): SmolLM2 1,858 → 1,896 tok/s
    /// (188 → 158 launches per step), the Llama-3.2-1B shape 1,040 → 1,039 (120 → 104).
    pub attention_fused: bool,
    /// Compile every kernel with timeline tracing (`kiln.cuh`: block 0 records the global
    /// timer when it starts and when its wait for the previous kernel returns) for
    /// [`CudaEngine::timeline`]; off by default (a diagnostic: it adds an atomic and two
    /// stores per launch and changes every kernel's source).
    pub trace: bool,
    /// Run one-row weight products over short rows as the streaming GEMV
    /// (`kiln_codegen::decode::gemv_stream`, `gemv_stream_scaled`: persistent blocks, a
    /// `cp.async` ring of weight items per warp, x staged once per block) instead of the
    /// tiled GEMV, where `decode::gemv_stream_pays` (see there for the measurements). On
    /// by default; off (`false`, or `KILN_STREAM_GEMV=0` in the environment, or `kiln
    /// bench --no-stream-gemv`) for a same-run A/B.
    pub stream_gemv: bool,
    /// Keys (past + new positions) above which decode attention takes whole GQA groups
    /// per block rather than one query head per block
    /// ([`decode::ATTENTION_DECODE_LONG_KEYS`] by default). A decode step is captured as
    /// one CUDA graph per batch size and side of this bound.
    pub attention_long_keys: usize,
    /// Chain the one-row GEMV that consumes a per-warp epilogue GEMV's output into its
    /// launch (the down projection into gate_up + SwiGLU; see `ChainRun`). On by default;
    /// `KILN_MLP_CHAIN=0` in the environment turns it off, `=1` on. Measured on an H200
    /// (2026-12-05, Llama-3.2-1B shape, batch 1, same run, three rounds): 1,192.2 →
    /// 1,228.0–1,229.4 tok/s. Measured and dropped in the same run: an L2 prefetch of each
    /// warp's first down row before the spin, 1,153.8; chaining o_proj before it, 1,193;
    /// the next layer's qkv after it, 1,174; both, 1,109 (their code was removed).
    pub mlp_chain: bool,
    /// At batch 1 the LM head's GEMV samples greedily itself (see `ScaledRun::argmax`),
    /// and the decode step leaves the logits' cast to f32 to [`CudaEngine::logits`]. On
    /// by default; `KILN_GREEDY_FOLD=0` in the environment turns it off. Measured on an
    /// H200 (2026-12-05, 1B shape, batch 1, same run): 1,192.1 → 1,202.0 / 1,200.1 tok/s.
    pub greedy_fold: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: 0,
            max_batch: 1,
            max_context: 4096,
            cuda_graphs: true,
            pdl: true,
            cache_dir: None,
            prebuilt: None,
            horizontal: true,
            epilogue_gemv: true,
            scaled_gemv: true,
            attention_early: true,
            attention_fused: true,
            trace: false,
            stream_gemv: true,
            attention_long_keys: decode::ATTENTION_DECODE_LONG_KEYS,
            mlp_chain: true,
            greedy_fold: true,
        }
    }
}

/// Device memory held by an engine, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub weights: usize,
    pub kv_cache: usize,
    /// The activation arena (its current size: the largest plan run so far).
    pub arena: usize,
    /// Everything else: ids, logits, history, symbol table, cuBLAS workspace.
    pub workspace: usize,
}

impl MemoryReport {
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.arena + self.workspace
    }
}

/// Where a value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    Weight(usize),
    Const(usize),
    /// `input_ids`: the prompt buffer in prefill, the decode ids buffer in decode.
    Ids,
    /// Resident KV cache buffer `i` (the `past.X` input and its `present.X` append).
    Cache(usize),
    /// An intermediate: its offset comes from the memory plan of the run.
    Arena,
    /// A graph output other than the caches (the logits): its own buffer.
    Output(usize),
}

enum Run {
    /// Nothing to launch (sources, views, cache inputs).
    Nothing,
    /// The node's kernel from `kiln_codegen::lower_node`.
    Kernel(usize),
    /// The cache append replacing `present = concat(past, new)`.
    Append { kernel: usize, cache: usize },
    /// A fused group ending in the cache append: it computes the new rows and writes
    /// them into the cache in place (`kiln_codegen::fused_append_kernel`).
    FusedAppend { kernel: usize, cache: usize },
    /// `arange` with a symbolic start read from the device table.
    Arange(usize),
    /// cuBLAS, or the GEMV kernel (`gemv`, with its work split) when the product has few
    /// rows.
    /// `stream`: the streaming GEMV (`decode::gemv_stream`) for one row of x, when
    /// [`EngineOptions::stream_gemv`] is on and `decode::gemv_stream_pays` for the rows.
    MatMul { gemv: Option<[(usize, decode::GemvConfig); 2]>, stream: Option<usize> },
    /// A matrix-vector group (`FusedKind::MatVec`): for one row of x, the scaled GEMV
    /// (`scaled`, see [`ScaledRun`]) when its prologue factors; else, with
    /// `KILN_MATVEC=fused` in the environment (see [`matvec_fused_gemv`]), a group
    /// without an epilogue and few rows
    /// of x whose whole rows fit the GEMV staging, one GEMV that computes x itself
    /// (`fused`, with its split); otherwise the prologue's kernel (`prologue`, the nodes
    /// before the matmul: `pro_op`) writes x, and the product runs like `MatMul` (`gemv`
    /// or cuBLAS), followed by the `epilogue` if the group has one (see [`EpiRun`]).
    /// `x`: the output that is x.
    MatVec {
        scaled: Option<Box<ScaledRun>>,
        fused: Option<(usize, decode::GemvConfig)>,
        prologue: usize,
        pro_op: Box<Op>,
        gemv: Option<[(usize, decode::GemvConfig); 2]>,
        x: usize,
        epilogue: Option<Box<EpiRun>>,
    },
    /// Attention over a resident cache (keys from the symbol table, the cache read
    /// through batch strides): the split-K kernel for up to [`PREFILL_ROWS`] query rows
    /// (decode), the tensor-core prefill kernel (when the dtype and head dim allow it)
    /// for more. `single`: the split-K kernel with query tiles of one head, when the
    /// default tile is larger (picked per launch by `decode::attention_decode_pick_tile`).
    /// `fused`: the kernels that also compute q and the new K/V rows (see
    /// [`FusedAttention`]), used whenever the split-K kernel runs.
    Attention { kernel: usize, single: Option<usize>, prefill: Option<usize>, fused: Option<Box<FusedAttention>> },
}

/// Decode attention that computes its operands' producers itself
/// (`kiln_codegen::decode::attention_decode_fused`): `kernel` / `single` as for
/// `Run::Attention`, `producers` the q group and the K / V appends, whose steps are
/// skipped (see [`Step::absorbed`]) whenever this attention runs the split-K kernel.
struct FusedAttention {
    kernel: usize,
    single: Option<usize>,
    producers: decode::AttentionProducers,
}

/// The epilogue of a matrix-vector group (`kiln_ops::Epilogue`): for one row of x, when
/// its blocks fit in one wave, the GEMV that computes it from the y values it holds
/// (`kiln_codegen::gemv_epilogue`); otherwise the product, then the epilogue's own
/// elementwise kernel (`kernel`, running `op`) over y. Measured on an H200 (2026-12-04,
/// batch 1, epilogue GEMV against GEMV + kernel): SmolLM2 (gate_up 3,072 rows, 192
/// blocks, one wave) 1,553 → 1,580 tok/s; the Llama-3.2-1B shape (16,384 rows, 1,024
/// blocks, four waves of two blocks per multiprocessor) 1,010 → 996: each block ends with
/// a barrier and the epilogue, a tail paid once per wave, against one launch saved. For
/// several rows the epilogue GEMV (one weight row per warp) was slower than the GEMV
/// with two (2,757 against 3,104 tok/s at batch 8 on the 1B shape).
struct EpiRun {
    gemv: Option<(usize, decode::GemvConfig)>,
    kernel: usize,
    op: Op,
    form: kiln_ops::Epilogue,
    /// Outputs of the prologue (the group's first outputs); the epilogue's follow.
    n_pro: usize,
    /// Whether the epilogue GEMV's blocks fit in one wave (set once the kernels load).
    one_wave: bool,
}

/// The scaled GEMV of a matrix-vector group whose prologue factors as x = A · S
/// (`kiln_codegen::gemv_scaled`: an RMSNorm, with the residual add before it), for one
/// row of x whose whole row fits the staging: every block computes A from the group's
/// inputs, reduces in the same pass and scales its dot products by S, so the prologue's
/// own kernel (a launch and a dependent round trip through memory) is gone. x itself is
/// not written (the engine takes the form only when nothing reads it); block 0 writes
/// the prologue's other outputs (the residual sum). `plain` writes y (the epilogue's
/// kernel follows, if the group has one); `epi` also computes the epilogue, used where
/// its blocks fit in one wave (as for `EpiRun`).
struct ScaledRun {
    plain: (usize, decode::GemvConfig),
    epi: Option<(usize, decode::GemvConfig)>,
    /// Whether `epi`'s blocks fit in one wave (set once the kernels load).
    epi_one_wave: bool,
    /// Blocks of one wave of `plain` (set once the kernels load from its occupancy): its
    /// launch, whose blocks loop over the row tiles (`GV_SCALE_LOOP` in `gemv.cu`), so A
    /// and S are computed once per block rather than once per 16 rows. Measured on an
    /// H200 (2026-12-04 17:35, same-run A/B, two rounds): the Llama-3.2-1B shape
    /// 1,152.4–1,153.3 → 1,169.5 tok/s at batch 1 (gate_up 337 → 314 µs per step in the
    /// timeline), batch 8 and SmolLM2 (whose scaled products mostly stream) unchanged.
    plain_wave: usize,
    /// The streaming form (`kiln_codegen::gemv_stream_scaled`), used instead of `plain`
    /// for one row when [`EngineOptions::stream_gemv`] is on and
    /// `decode::gemv_stream_pays` for the weight's rows.
    stream: Option<usize>,
    /// The form that computes the epilogue per warp (`kiln_codegen::gemv_scaled_epi_warp`,
    /// a warp owns a column and computes its rows in every slice: SwiGLU's gate and up),
    /// its blocks one looping wave like `plain`'s: used instead of `plain` and the
    /// epilogue's kernel where `epi` does not fit in one wave (the Llama-3.2-1B shape's
    /// gate_up), unless [`EngineOptions::epilogue_gemv`] is off or `KILN_EPI_WARP=0`. The
    /// same bits as `plain` + the epilogue's kernel, one launch fewer per layer. Measured
    /// on an H200 (2026-12-04 20:55, same-run A/B, two rounds, `KILN_EPI_WARP=0` against
    /// the default): the Llama-3.2-1B shape 1,174.4–1,175.4 → 1,195.2–1,196.0 tok/s at
    /// batch 1 (gate_up + SwiGLU 19.5 + 2.1 → 18.4–19.0 µs per layer in the timeline).
    /// `.2`: blocks of one wave (set once the kernels load).
    epi_warp: Option<(usize, decode::GemvConfig, usize)>,
    /// (`EngineOptions::greedy_fold`), the LM head's only: `plain` that also samples
    /// greedily (`kiln_codegen::gemv_scaled_argmax`, its key into
    /// `CudaEngine::greedy_keys`), launched by a folding decode step (see
    /// [`CudaEngine::folds`]).
    argmax: Option<usize>,
    /// (`EngineOptions::mlp_chain`, on by default): the per-warp epilogue form with the one-row product
    /// that consumes its output chained into the same launch (see [`ChainRun`]).
    chain: Option<ChainRun>,
}

/// `EngineOptions::mlp_chain` (`kiln_codegen::gemv_scaled_epi_warp_chain`): a matrix-
/// vector group's per-warp epilogue GEMV (SwiGLU) that also computes the next step, a
/// one-row GEMV over the epilogue's output (the down projection), in the same launch:
/// its blocks count themselves as they finish their tiles and spin until all have, so the
/// launch takes at most one wave (`wave`, from the kernel's occupancy). Step `down` then
/// launches nothing. `ctr`: the launch's 128 counters in `CudaEngine::chain_counters`
/// (u32 offset; `gemv.cu` uses [0] blocks done, [32] blocks out; the kernel leaves them zero).
#[derive(Clone, Copy)]
struct ChainRun {
    kernel: usize,
    wave: usize,
    down: usize,
    ctr: usize,
}

/// A chained launch's arguments beyond the group's: the next step's weight, its y and
/// its rows.
struct ChainArgs {
    run: ChainRun,
    w2: u64,
    y2: u64,
    n2: usize,
}

/// Whether the chains run (see [`ChainRun`]): `KILN_MLP_CHAIN=0` in the environment turns
/// them off, `1` on; otherwise `default` (the option).
fn mlp_chain_by_env(default: bool) -> bool {
    match std::env::var("KILN_MLP_CHAIN").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => default,
    }
}

/// `KILN_GEMV_CFG="NxK=w16r1u8,..."` in the environment: the one-row GEMV split (warps,
/// rows per warp, 16-byte loads in flight per lane and row) for weights `[N, K]`, in
/// place of `GemvConfig::for_shape`'s, for the plain and the scaled GEMV (not the
/// epilogue forms): a measurement knob for same-run A/Bs of splits.
fn gemv_cfg_override(w: &kiln_ops::TensorType) -> Option<decode::GemvConfig> {
    static CFG: std::sync::OnceLock<Vec<(String, decode::GemvConfig)>> = std::sync::OnceLock::new();
    let table = CFG.get_or_init(|| std::env::var("KILN_GEMV_CFG").map(|v| parse_gemv_cfgs(&v)).unwrap_or_default());
    let d = w.shape.dims();
    let key = format!("{}x{}", d.first()?.as_fixed()?, d.get(1)?.as_fixed()?);
    table.iter().find(|(k, _)| *k == key).map(|(_, c)| *c)
}

/// The entries of a `KILN_GEMV_CFG` value, `NxK=wWrRuU` separated by commas (malformed
/// entries are skipped): the weight shape and the one-row split.
fn parse_gemv_cfgs(v: &str) -> Vec<(String, decode::GemvConfig)> {
    let num = |t: &str, a: char, b: char| -> Option<usize> { t.split_once(a)?.1.split(b).next()?.parse().ok() };
    v.split(',')
        .filter_map(|e| {
            let (shape, t) = e.split_once('=')?;
            let cfg = decode::GemvConfig {
                warps: num(t, 'w', 'r')?,
                rows_per_warp: num(t, 'r', 'u')?,
                unroll: num(t, 'u', '\0')?,
                ksplit: 1,
                max_rows: 1,
            };
            Some((shape.trim().to_string(), cfg))
        })
        .collect()
}

/// WIP (wip/residency): `KILN_GEMV_MAXREG="NxK=R,..."`, a register cap for the one-row
/// GEMV of weights `[N, K]`.
fn gemv_maxreg_override(w: &kiln_ops::TensorType) -> Option<usize> {
    let v = std::env::var("KILN_GEMV_MAXREG").ok()?;
    let d = w.shape.dims();
    let key = format!("{}x{}", d.first()?.as_fixed()?, d.get(1)?.as_fixed()?);
    v.split(',').find_map(|e| {
        let (shape, r) = e.split_once('=')?;
        (shape.trim() == key).then(|| r.trim().parse().ok()).flatten()
    })
}

/// `KILN_EPI_WARP=0` in the environment: no per-warp epilogue GEMV (see
/// [`ScaledRun::epi_warp`]), for same-run A/Bs.
fn epi_warp_off_by_env() -> bool {
    std::env::var("KILN_EPI_WARP").is_ok_and(|v| v == "0")
}

struct Step {
    node: NodeId,
    run: Run,
    /// Part `.1` of horizontal group `.0` (see [`HGroup`]), if the step is in one.
    group: Option<(usize, usize)>,
    /// The attention step that computes this step's output itself when it runs the
    /// split-K kernel (see [`FusedAttention`]): then this step launches nothing.
    absorbed: Option<usize>,
}

/// Consecutive steps (fused elementwise kernels and fused cache appends, none reading
/// another's output) launched as one kernel: `kernel` runs the steps' own kernels as
/// its parts ([`kiln_codegen::horizontal`]). At run time the parts are launched one by
/// one instead if any part would write memory another part touches.
struct HGroup {
    kernel: usize,
    parts: usize,
}

/// A grouped step's launch, held until the group's last step.
struct PendingPart {
    kernel: usize,
    args: Args,
    items: usize,
    /// Device byte ranges it reads and writes.
    reads: Vec<(u64, usize)>,
    writes: Vec<(u64, usize)>,
}

struct Cache {
    buf: CudaSlice<u8>,
    dtype: DType,
    /// Elements per position (`kv_heads · head_dim`).
    row: usize,
}

struct Output {
    buf: Option<CudaSlice<u8>>,
    bytes: usize,
}

/// A model graph compiled for device-resident generation. See the [module docs](self).
pub struct CudaEngine {
    graph: Graph,
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    opts: EngineOptions,
    weights: Vec<CudaSlice<u8>>,
    weight_bytes: usize,
    consts: Vec<CudaSlice<u8>>,
    caches: Vec<Cache>,
    outputs: Vec<Output>,
    locs: HashMap<Value, Loc>,
    kernels: Vec<(Kernel, CudaFunction)>,
    /// Every kernel binary under its cache key, and how they were obtained.
    binaries: Vec<(String, Vec<u8>)>,
    compile_stats: CompileStats,
    steps: Vec<Step>,
    /// Symbols in device-table order, and which are `batch`, `past`, `seq`.
    syms: Vec<Sym>,
    batch_sym: Option<Sym>,
    past_sym: Sym,
    seq_sym: Sym,
    syms_dev: CudaSlice<i64>,
    ids_prefill: CudaSlice<i64>,
    ids_decode: CudaSlice<i64>,
    history: CudaSlice<i64>,
    counter: CudaSlice<i64>,
    greedy: usize,
    step_end: usize,
    /// WIP knob `KILN_GREEDY_KEY=1`: the decode step's sampling without a merge
    /// (`decode::greedy_key`, keys in `greedy_keys`) and its step end
    /// (`resident::step_end_key`); prefill and profiling keep `greedy`.
    greedy_key: Option<(usize, usize)>,
    greedy_keys: CudaSlice<u64>,
    /// The LM head's step when it has the sampling GEMV (`ScaledRun::argmax`).
    lm_head_argmax: Option<usize>,
    /// While a folding decode step records (see [`CudaEngine::folds`]).
    fold_now: std::cell::Cell<bool>,
    /// The logits' cast step, which a folding decode step skips (nothing in the step
    /// reads the f32 logits): [`CudaEngine::logits`] runs it when `logits_stale`.
    logits_cast: Option<usize>,
    /// Whether the last decode step skipped the logits' cast.
    logits_stale: bool,
    logits: Value,
    vocab: usize,
    arena: Option<CudaSlice<u8>>,
    arena_bytes: usize,
    plans: HashMap<Vec<usize>, Arc<MemoryPlan>>,
    _blas_workspace: CudaSlice<u8>,
    /// f32 partial results of split-K decode attention (shared by every layer).
    attn_ws: CudaSlice<u8>,
    /// Its completion counters (zero between launches).
    attn_counters: CudaSlice<u32>,
    /// The chained GEMVs' counters, 128 per launch (see [`ChainRun`]; zero between launches).
    chain_counters: CudaSlice<u32>,
    /// The timeline buffer of [`EngineOptions::trace`] (two event counters, then a ring
    /// of [`TRACE_SLOTS`] timestamps per event kind).
    trace: Option<CudaSlice<u64>>,
    /// The read-ahead table of the WIP knob `KILN_GEMV_RA` (see [`readahead_entries`]).
    _ra_table: Option<CudaSlice<u64>>,
    /// While [`CudaEngine::timeline`] records its labels: every launch's kernel name.
    launch_log: Option<std::cell::RefCell<Vec<String>>>,
    /// Greedy sampling's per-block best logits and indices (`[max_batch, splits]`, f32
    /// then i64) and its per-row completion counters (zero between launches).
    greedy_ws: CudaSlice<u8>,
    greedy_counters: CudaSlice<u32>,
    /// Horizontal groups of steps (see [`HGroup`]).
    hgroups: Vec<HGroup>,
    /// Per batch size: the captured decode step.
    graphs: HashMap<(usize, bool), CudaGraph>,
    /// Why the decode step cannot be captured, if it cannot.
    not_capturable: Option<String>,
    launches_per_step: usize,
    /// The running batch: its size, cached positions, first tokens (from the prefill).
    batch: usize,
    past: usize,
    first: Vec<u32>,
}

const BLAS_WORKSPACE: usize = 32 << 20;

/// Timestamps per event kind in the trace buffer (`KILN_TRACE_N` in `kiln.cuh`).
const TRACE_SLOTS: usize = 1 << 16;
/// Block entries in the trace buffer with `KILN_TRACE_BLOCKS` (`KILN_TRACE_B`).
const TRACE_BLOCK_SLOTS: usize = 1 << 20;

/// `KILN_TRACE_BLOCKS=1` in the environment (with [`EngineOptions::trace`]): every block
/// of every kernel records its start, its wait's return and its multiprocessor
/// (`kiln.cuh`), and [`CudaEngine::timeline`] logs each launch's residency (see
/// [`block_residency`]). A diagnostic: an atomic per block.
fn trace_blocks_by_env() -> bool {
    std::env::var("KILN_TRACE_BLOCKS").is_ok_and(|v| v == "1")
}

/// The residency rows as a table: per kernel and module (means over its launches in the
/// step, in first-launch order), then the step's first launches one by one.
pub fn residency_table(labels: &[String], rows: &[BlockResidency]) -> String {
    use std::fmt::Write as _;
    let mut by: IndexMap<&str, (usize, BlockResidency)> = IndexMap::new();
    for (l, r) in labels.iter().zip(rows) {
        let e = by.entry(l.as_str()).or_default();
        e.0 += 1;
        e.1.grid += r.grid;
        e.1.recorded += r.recorded;
        e.1.early += r.early;
        e.1.last_start_us += r.last_start_us;
        e.1.sms += r.sms;
    }
    let head = format!("{:>8} {:>9} {:>8} {:>11} {:>6}", "grid", "recorded", "early", "last µs", "SMs");
    let line = |r: &BlockResidency, n: f64| {
        format!(
            "{:>8.0} {:>9.1} {:>8.1} {:>11.2} {:>6.1}",
            r.grid / n,
            r.recorded / n,
            r.early / n,
            r.last_start_us / n,
            r.sms / n
        )
    };
    let mut s = format!("{head} {:>9}  kernel @module\n", "launches");
    for (l, (n, r)) in &by {
        let _ = writeln!(s, "{} {n:>9}  {l}", line(r, *n as f64));
    }
    let _ = writeln!(s, "the first launches one by one:\n{head}  kernel @module");
    for (l, r) in labels.iter().zip(rows).take(24) {
        let _ = writeln!(s, "{}  {l}", line(r, 1.0));
    }
    s
}

/// The step of the matrix-vector group whose y is the logits, or whose y only a cast to
/// f32 (exact from f32, bf16, f16) turns into the logits: the LM head, for
/// `KILN_GREEDY_FOLD`.
fn lm_head_step(graph: &Graph, steps: &[Step], logits: Value) -> Option<usize> {
    let p = logits.node;
    let y = match &graph.node(p).op {
        Op::Fused(body)
            if body.nodes.len() == 1
                && matches!(body.nodes[0].op, Op::Cast(DType::F32))
                && graph.operands(p).len() == 1
                && matches!(graph.value_type(graph.operands(p)[0]).dtype, DType::F32 | DType::BF16 | DType::F16) =>
        {
            graph.operands(p)[0]
        }
        _ => logits,
    };
    let i = steps.iter().position(|s| s.node == y.node)?;
    let last = graph.node(y.node).outputs.len() - 1;
    (matches!(steps[i].run, Run::MatVec { .. }) && y.output as usize == last).then_some(i)
}

/// A GEMV's weight for the read-ahead table (WIP knob `KILN_GEMV_RA`): its device
/// address, bytes per row, and the (first row, rows) slices its first tiles read (an
/// epilogue's slices, such as SwiGLU's gate and up halves; else the whole weight).
struct RaWeight {
    ptr: u64,
    row_bytes: usize,
    slices: Vec<(usize, usize)>,
}

/// The read-ahead table (`gv_readahead` in `gemv.cu`): per GEMV of the step, in order, its
/// weight and two (address, bytes) ranges of the next one's (the last's next is the
/// first: the next step's): the heads of its first two slices after `skip` bytes of each,
/// `budget` bytes split between them (a slice shorter than its share gives the rest up;
/// no second slice: 0).
fn readahead_entries(gemvs: &[RaWeight], budget: usize, skip: usize) -> Vec<[u64; 5]> {
    (0..gemvs.len())
        .map(|i| {
            let next = &gemvs[(i + 1) % gemvs.len()];
            let mut e = [gemvs[i].ptr, 0, 0, 0, 0];
            let sl = &next.slices[..next.slices.len().min(2)];
            for (s, &(row, rows)) in sl.iter().enumerate() {
                let skip = skip.min(rows * next.row_bytes);
                let bytes = (budget / sl.len()).min(rows * next.row_bytes - skip);
                e[1 + 2 * s] = next.ptr + (row * next.row_bytes + skip) as u64;
                e[2 + 2 * s] = bytes as u64;
            }
            e
        })
        .collect()
}

/// Points the module globals of a read-ahead GEMV (`kiln_ra_tab`, `kiln_ra_n` in
/// `gemv.cu`) at the table.
fn set_readahead_globals(f: &CudaFunction, table: u64, n: i32) -> Result<(), CudaError> {
    let fail = |what: &str, e: sys::CUresult| CudaError::Driver(format!("read-ahead globals: {what}: {e:?}"));
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: f is a loaded function; m receives its module.
    let r = unsafe { sys::cuFuncGetModule(&mut m, f.cu_function()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(fail("module", r));
    }
    let tb = table.to_le_bytes();
    let nb = n.to_le_bytes();
    for (name, bytes) in [(c"kiln_ra_tab", &tb[..]), (c"kiln_ra_n", &nb[..])] {
        let (mut p, mut size) = (0u64, 0usize);
        // SAFETY: m is a loaded module; the name is NUL-terminated.
        let r = unsafe { sys::cuModuleGetGlobal_v2(&mut p, &mut size, m, name.as_ptr()) };
        if r != sys::CUresult::CUDA_SUCCESS || size != bytes.len() {
            return Err(fail(&format!("{name:?} ({size} bytes)"), r));
        }
        // SAFETY: p is the global's device address, `size` bytes.
        let r = unsafe { sys::cuMemcpyHtoD_v2(p, bytes.as_ptr().cast(), bytes.len()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("write", r));
        }
    }
    Ok(())
}

/// How one launch's blocks became resident, means over the traced steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockResidency {
    /// Blocks of the grid.
    pub grid: f64,
    /// Blocks that recorded their wait (blocks that return before waiting do not).
    pub recorded: f64,
    /// Blocks that started before the previous kernel completed (before block 0's wait
    /// returned): resident early, under programmatic dependent launch.
    pub early: f64,
    /// µs from the previous kernel's completion to the start of the launch's last block
    /// (negative: every block was resident before it).
    pub last_start_us: f64,
    /// Multiprocessors the launch's blocks ran on.
    pub sms: f64,
}

/// The launches' residency from the block entries of a trace (`(start, wait, smid << 48
/// | blocks << 24 | block)`, ns of the global timer) of `steps` steps of `per_step`
/// launches: block 0's entries, in wait order, are the launches, and their waits the
/// completions of the kernels before them; every other entry belongs to the last launch
/// whose completion mark is at or before its wait and whose grid matches (a block's wait
/// cannot return before the previous kernel completes). Returns the `per_step` launches
/// of a step, means over the steps, or None when the entries do not hold `steps ·
/// per_step` launches (a wrapped or foreign ring).
pub fn block_residency(entries: &[(u64, u64, u64)], steps: usize, per_step: usize) -> Option<Vec<BlockResidency>> {
    let grid = |m: u64| (m >> 24) & 0xff_ffff;
    let mut launches: Vec<(u64, u64)> =
        entries.iter().filter(|e| e.2 & 0xff_ffff == 0).map(|e| (e.1, grid(e.2))).collect();
    launches.sort_unstable();
    if launches.len() != steps * per_step || per_step == 0 {
        return None;
    }
    // Per launch: recorded, early, latest start, SMs seen.
    let mut acc: Vec<(usize, usize, u64, std::collections::BTreeSet<u64>)> =
        (0..launches.len()).map(|_| (0, 0, 0, Default::default())).collect();
    for &(t0, t1, meta) in entries {
        if t0 == 0 || t1 < t0 {
            continue;
        }
        let after = launches.partition_point(|l| l.0 <= t1);
        // The launch by time, else the next one when its block 0 waited just after this
        // block (block 0 started later than the block).
        let next = (after < launches.len() && launches[after].0 - t1 < 2_000).then_some(after);
        let cands = after.checked_sub(1).into_iter().chain(next);
        let Some(i) = cands.into_iter().find(|&i| launches[i].1 == grid(meta)) else { continue };
        let a = &mut acc[i];
        a.0 += 1;
        a.1 += usize::from(t0 < launches[i].0);
        a.2 = a.2.max(t0);
        a.3.insert(meta >> 48);
    }
    let mut out = vec![BlockResidency::default(); per_step];
    for (i, (a, l)) in acc.iter().zip(&launches).enumerate() {
        let o = &mut out[i % per_step];
        o.grid += l.1 as f64;
        o.recorded += a.0 as f64;
        o.early += a.1 as f64;
        o.last_start_us += (a.2 as f64 - l.0 as f64) / 1e3;
        o.sms += a.3.len() as f64;
    }
    for o in &mut out {
        let s = steps as f64;
        *o = BlockResidency {
            grid: o.grid / s,
            recorded: o.recorded / s,
            early: o.early / s,
            last_start_us: o.last_start_us / s,
            sms: o.sms / s,
        };
    }
    Some(out)
}

/// Attention over more query rows than this runs the tensor-core prefill kernel (when
/// there is one for the dtype and head dim); up to this many, the split-K kernel.
pub const PREFILL_ROWS: usize = 16;

/// `KILN_EPILOGUE_GEMV=0` in the environment: no epilogue GEMV, whatever
/// [`EngineOptions::epilogue_gemv`] says.
pub fn epilogue_gemv_off_by_env() -> bool {
    std::env::var("KILN_EPILOGUE_GEMV").is_ok_and(|v| v == "0")
}

/// `KILN_SCALED_GEMV=0` in the environment: no scaled GEMV, whatever
/// [`EngineOptions::scaled_gemv`] says.
pub fn scaled_gemv_off_by_env() -> bool {
    std::env::var("KILN_SCALED_GEMV").is_ok_and(|v| v == "0")
}

/// `KILN_STREAM_GEMV=0` in the environment: no streaming GEMV, whatever
/// [`EngineOptions::stream_gemv`] says.
pub fn stream_gemv_off_by_env() -> bool {
    std::env::var("KILN_STREAM_GEMV").is_ok_and(|v| v == "0")
}

/// `KILN_ATTN_EARLY=0` in the environment: decode attention waits for the previous
/// kernel first, whatever [`EngineOptions::attention_early`] says.
pub fn attention_early_off_by_env() -> bool {
    std::env::var("KILN_ATTN_EARLY").is_ok_and(|v| v == "0")
}

/// `KILN_ATTN_FUSED=0` in the environment: decode attention reads q and the caches
/// from memory, written by their producers' own launch, whatever
/// [`EngineOptions::attention_fused`] says.
pub fn attention_fused_off_by_env() -> bool {
    std::env::var("KILN_ATTN_FUSED").is_ok_and(|v| v == "0")
}

/// `KILN_HFUSE=0` in the environment: no horizontal fusion, whatever
/// [`EngineOptions::horizontal`] says.
pub fn horizontal_off_by_env() -> bool {
    std::env::var("KILN_HFUSE").is_ok_and(|v| v == "0")
}

/// `KILN_MATVEC=fused` in the environment: run a matrix-vector group with few rows as
/// one GEMV that computes its x (`kiln_codegen::gemv_prologue`) instead of the
/// prologue's kernel and a plain GEMV. Off by default: on an H200 (2026-12-03, Llama-3.2-1B
/// shape, batch 1) the fused form decoded 565 tok/s against 728 for the two kernels; its
/// one wave of blocks keeps too few weight loads in flight, and each block computes
/// SwiGLU over 8,192 columns before it can use them.
pub fn matvec_fused_gemv() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| std::env::var("KILN_MATVEC").is_ok_and(|v| v == "fused"))
}

/// The [`ScaledRun`] of matrix-vector group node `n` (body `body`), when
/// `kiln_codegen::scaled_prologue_in` allows the scaled GEMV and its kernels render;
/// `None` otherwise (the group runs as its prologue's kernel and a GEMV).
fn scaled_run(
    graph: &Graph,
    n: NodeId,
    body: &kiln_ops::FusedBody,
    syms: &[kiln_ops::Sym],
    stream: bool,
    add_kernel: &mut impl FnMut(kiln_codegen::Kernel) -> usize,
) -> Option<Box<ScaledRun>> {
    kiln_codegen::scaled_prologue_in(graph, n).ok()?;
    let (plain, cfg) = match body.inputs.last().and_then(gemv_cfg_override) {
        Some(c) => (kiln_codegen::gemv_scaled(body, syms, c, false).ok()?, c),
        None => kiln_codegen::gemv_scaled_one_row(body, syms).ok()?,
    };
    let ecfg = decode::GemvConfig::for_rows(1);
    let epi = match body.kind() {
        Ok(kiln_ops::FusedKind::MatVec { epilogue: Some(_), .. }) => {
            kiln_codegen::gemv_scaled(body, syms, ecfg, true).ok().map(|k| (add_kernel(k), ecfg))
        }
        _ => None,
    };
    let stream = if stream { kiln_codegen::gemv_stream_scaled_if_pays(body, syms).map(&mut *add_kernel) } else { None };
    let epi_warp = match epi {
        Some(_) => kiln_codegen::gemv_scaled_epi_warp(body, syms).ok().map(|(k, c)| (add_kernel(k), c, 0)),
        None => None,
    };
    let plain = (add_kernel(plain), cfg);
    Some(Box::new(ScaledRun {
        plain,
        epi,
        epi_one_wave: false,
        plain_wave: 0,
        stream,
        epi_warp,
        argmax: None,
        chain: None,
    }))
}

/// The [`FusedAttention`] of attention node `n` (GQA groups of `group` query heads), when
/// `kiln_codegen::decode::attention_producers` allows it and its kernels render; `None`
/// otherwise (the producers launch, attention reads memory).
fn fused_attention(
    graph: &Graph,
    n: NodeId,
    group: usize,
    syms: &[kiln_ops::Sym],
    add_kernel: &mut impl FnMut(kiln_codegen::Kernel) -> usize,
) -> Option<Box<FusedAttention>> {
    let (kernel, producers) = decode::attention_decode_fused_in(graph, n, None, syms).ok()?;
    let single = if decode::attention_decode_query_tile(group) > 1 {
        Some(decode::attention_decode_fused_in(graph, n, Some(1), syms).ok()?.0)
    } else {
        None
    };
    Some(Box::new(FusedAttention { kernel: add_kernel(kernel), single: single.map(&mut *add_kernel), producers }))
}

/// Whether attention over `rows` query rows runs the split-K kernel (and so, with a
/// [`FusedAttention`], computes its producers): always without a prefill kernel, else
/// up to [`PREFILL_ROWS`] rows. The one rule for the attention step and the steps it
/// absorbs.
fn runs_split_k(prefill: Option<usize>, rows: usize) -> bool {
    prefill.is_none() || rows <= PREFILL_ROWS
}

/// A generated kernel's name without its source hash (`kiln_fused_0123…` → `kiln_fused`).
fn short_kernel_name(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((head, tail)) if tail.len() == 16 && tail.bytes().all(|c| c.is_ascii_hexdigit()) => head,
        _ => name,
    }
}

/// A module path with its layer numbers replaced by `*` (`model.layers.3.mlp` →
/// `model.layers.*.mlp`), so a timeline sums the layers.
fn generic_scope(scope: &str) -> String {
    scope
        .split('.')
        .map(|c| if c.chars().all(|x| x.is_ascii_digit()) && !c.is_empty() { "*" } else { c })
        .collect::<Vec<_>>()
        .join(".")
}

fn contract(msg: String) -> CudaError {
    CudaError::Runtime(RuntimeError::Backend { backend: "cuda", msg: format!("engine: {msg}") })
}

fn dev(p: &CudaSlice<impl cudarc::driver::DeviceRepr>, s: &CudaStream) -> u64 {
    let (p, _sync) = p.device_ptr(s);
    p
}

impl CudaEngine {
    /// Checks the graph against the model contract, uploads the weights, allocates the
    /// KV cache for `max_batch × max_context` positions and compiles every kernel.
    pub fn new(
        graph: Graph,
        weights: IndexMap<String, HostTensor>,
        opts: EngineOptions,
    ) -> Result<CudaEngine, CudaError> {
        graph.verify().map_err(RuntimeError::from)?;
        crate::feeds::check_weights(&graph, &weights)?;
        if opts.max_batch == 0 || opts.max_context < 2 {
            return Err(contract(format!(
                "max_batch ({}) must be >= 1 and max_context ({}) >= 2",
                opts.max_batch, opts.max_context
            )));
        }
        let info = super::device_info(opts.device).map_err(CudaError::Unavailable)?;
        let stream_gemv = opts.stream_gemv && !stream_gemv_off_by_env();
        let ctx = CudaContext::new(opts.device).map_err(driver_err("context"))?;
        // SAFETY: every buffer of this engine is used on its one stream only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Driver(format!("cuBLAS handle: {e:?}")))?;
        // A fixed cuBLAS workspace, so cuBLAS allocates nothing while a graph is captured.
        let blas_ws = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(driver_err("alloc"))?;
        // SAFETY: the workspace outlives the handle's use (both are fields of the engine).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), dev(&blas_ws, &stream) as *mut _, BLAS_WORKSPACE)
        }
        .result()
        .map_err(|e| CudaError::Driver(format!("cublasSetWorkspace: {e:?}")))?;

        // ---- the contract -------------------------------------------------------------
        let ids = *graph.inputs().get("input_ids").ok_or_else(|| contract("no input `input_ids`".into()))?;
        let ids_ty = graph.node(ids).outputs[0].clone();
        if ids_ty.dtype != DType::I64 || ids_ty.rank() != 2 {
            return Err(contract(format!("`input_ids` must be i64[batch, seq], is {ids_ty}")));
        }
        let sym_of = |d: &Dim, what: &str| -> Result<Sym, CudaError> {
            match d.symbols().as_slice() {
                [s] if *d == Dim::from(*s) => Ok(*s),
                _ => Err(contract(format!("{what} must be a plain symbol, is `{d}`"))),
            }
        };
        let batch_sym = sym_of(&ids_ty.shape.dims()[0], "the batch dim of `input_ids`").ok();
        let seq_sym = sym_of(&ids_ty.shape.dims()[1], "the sequence dim of `input_ids`")?;
        let logits = *graph.outputs().get("logits").ok_or_else(|| contract("no output `logits`".into()))?;
        let lt = graph.value_type(logits).clone();
        let vocab = lt.shape.dims().last().and_then(|d| d.as_fixed()).filter(|_| lt.rank() == 3);
        let vocab = match (vocab, lt.shape.dims().get(1).map(|d| d.as_fixed())) {
            (Some(v), Some(Some(1))) if lt.dtype == DType::F32 => v,
            _ => return Err(contract(format!("`logits` must be f32[batch, 1, vocab] (last_token_only), is {lt}"))),
        };

        let mut locs: HashMap<Value, Loc> = HashMap::new();
        locs.insert(Value::from(ids), Loc::Ids);
        let mut caches = Vec::new();
        let mut past_sym = None;
        let mut cache_of_present: HashMap<NodeId, usize> = HashMap::new();
        for (name, &n) in graph.inputs() {
            if name == "input_ids" {
                continue;
            }
            let rest = name
                .strip_prefix("past.")
                .ok_or_else(|| contract(format!("unexpected input `{name}` (only `input_ids` and `past.*`)")))?;
            let present_name = format!("present.{rest}");
            let present = *graph
                .outputs()
                .get(&present_name)
                .ok_or_else(|| contract(format!("cache input `{name}` has no output `{present_name}`")))?;
            let pn = graph.node(present.node);
            let pops = graph.operands(present.node);
            let is_append = match &pn.op {
                Op::Concat { axis: 1 } => pops.len() == 2 && pops[0] == Value::from(n),
                // A fused group ending in the append (the new rows computed in it).
                Op::Fused(body) => {
                    kiln_codegen::fused_append(body).is_some_and(|a| pops[a.past_input] == Value::from(n))
                }
                _ => false,
            };
            if !is_append {
                return Err(contract(format!(
                    "`{present_name}` must be concat(`{name}`, new, axis 1) for a device-resident cache"
                )));
            }
            if graph.users(n).len() != 1 {
                return Err(contract(format!("cache input `{name}` may only be read by its append")));
            }
            for (user, _) in graph.users(present.node) {
                if !matches!(graph.node(user).op, Op::Attention(_)) {
                    return Err(contract(format!(
                        "`{present_name}` is read by `{}`; only attention may read the resident cache",
                        graph.node(user).op.name()
                    )));
                }
            }
            let ty = &graph.node(n).outputs[0];
            let d = ty.shape.dims();
            if d.len() < 2 {
                return Err(contract(format!("cache input `{name}` must be [batch, past, …], is {ty}")));
            }
            let p = sym_of(&d[1], &format!("the length dim of `{name}`"))?;
            if *past_sym.get_or_insert(p) != p {
                return Err(contract(format!("cache input `{name}` uses a different length symbol `{p}`")));
            }
            let row: usize = d[2..]
                .iter()
                .map(|x| x.as_fixed())
                .product::<Option<usize>>()
                .ok_or_else(|| contract(format!("cache input `{name}` has symbolic dims after [batch, past]")))?;
            let bytes = ty.dtype.bytes_for(opts.max_batch * opts.max_context * row);
            let buf = stream.alloc_zeros::<u8>(bytes.max(1)).map_err(driver_err("alloc KV cache"))?;
            locs.insert(Value::from(n), Loc::Cache(caches.len()));
            locs.insert(present, Loc::Cache(caches.len()));
            cache_of_present.insert(present.node, caches.len());
            caches.push(Cache { buf, dtype: ty.dtype, row });
        }
        let past_sym = past_sym.ok_or_else(|| contract("the graph has no `past.*` cache inputs".into()))?;
        let syms = kiln_codegen::symbols::graph_symbols(&graph);

        // ---- weights and constants ----------------------------------------------------
        let upload = |t: &HostTensor| -> Result<CudaSlice<u8>, CudaError> {
            let bytes = host_bytes(t);
            let mut slice = stream.alloc_zeros::<u8>(bytes.len().max(1)).map_err(driver_err("alloc"))?;
            if !bytes.is_empty() {
                stream.memcpy_htod(&bytes, &mut slice).map_err(driver_err("upload"))?;
            }
            Ok(slice)
        };
        let mut weight_bufs = Vec::with_capacity(graph.params().len());
        let mut weight_bytes = 0;
        for (i, (name, &n)) in graph.params().iter().enumerate() {
            let t = &weights[name];
            weight_bytes += t.dtype().bytes_for(t.shape().iter().product());
            weight_bufs.push(upload(t)?);
            locs.insert(Value::from(n), Loc::Weight(i));
        }
        drop(weights);

        // ---- steps and kernels --------------------------------------------------------
        let mut kernel_ids: HashMap<String, usize> = HashMap::new();
        let mut kernel_list: Vec<Kernel> = Vec::new();
        let mut add_kernel = |k: Kernel| -> usize {
            *kernel_ids.entry(k.sig.name.clone()).or_insert_with(|| {
                kernel_list.push(k);
                kernel_list.len() - 1
            })
        };
        let mut consts = Vec::new();
        let mut outputs: Vec<Output> = Vec::new();
        for (name, &v) in graph.outputs() {
            if let std::collections::hash_map::Entry::Vacant(e) = locs.entry(v) {
                if !name.starts_with("present.") && v != logits && matches!(graph.node(v.node).op, Op::Reshape(_)) {
                    return Err(contract(format!("output `{name}` is a view; outputs must own their buffers")));
                }
                e.insert(Loc::Output(outputs.len()));
                outputs.push(Output { buf: None, bytes: 0 });
            }
        }
        let live = live_nodes(&graph);
        let mut steps = Vec::new();
        for n in graph.topo_order() {
            if !live.contains(&n) {
                continue;
            }
            let node = graph.node(n);
            let unsupported = |reason: String| CudaError::Unsupported {
                node: n.index(),
                op: node.op.name().into(),
                scope: node.scope.clone(),
                reason,
            };
            let run = if let (Some(&cache), Op::Fused(body)) = (cache_of_present.get(&n), &node.op) {
                let k = kiln_codegen::fused_append_kernel(body, &syms).map_err(|e| unsupported(e.0))?;
                Run::FusedAppend { kernel: add_kernel(k), cache }
            } else if let Some(&cache) = cache_of_present.get(&n) {
                let at = graph.value_type(graph.operands(n)[0]).shape.dims()[1].clone();
                let k =
                    kiln_codegen::resident::kv_append(caches[cache].dtype, &at, &syms).map_err(|e| unsupported(e.0))?;
                Run::Append { kernel: add_kernel(k), cache }
            } else {
                match &node.op {
                    Op::Input { .. } | Op::Param { .. } => Run::Nothing,
                    Op::Constant { .. } => {
                        let v = node
                            .op
                            .eval(&[], &Bindings::new())
                            .map_err(|e| unsupported(format!("cannot evaluate the constant: {e}")))?;
                        locs.insert(Value::from(n), Loc::Const(consts.len()));
                        consts.push(upload(&v[0])?);
                        Run::Nothing
                    }
                    Op::Reshape(_) => {
                        let root = memory::view_root(&graph, Value::from(n));
                        let loc = locs.get(&root).copied().unwrap_or(Loc::Arena);
                        if let Some(&own) = locs.get(&Value::from(n)) {
                            if own != loc {
                                return Err(unsupported(
                                    "a graph output that is a view of another buffer is not supported".into(),
                                ));
                            }
                        }
                        locs.insert(Value::from(n), loc);
                        Run::Nothing
                    }
                    Op::Arange { start, .. } if !start.is_fixed() => Run::Arange(add_kernel(
                        kiln_codegen::resident::arange_syms(start, &syms).map_err(|e| unsupported(e.0))?,
                    )),
                    Op::Fused(body) if matches!(body.kind(), Ok(kiln_ops::FusedKind::MatVec { .. })) => {
                        let Ok(kiln_ops::FusedKind::MatVec { x, epilogue: form, .. }) = body.kind() else {
                            unreachable!()
                        };
                        let pro = body.prologue().expect("a matrix-vector body has a prologue");
                        let x_out = body.outputs.iter().position(|&r| r == x).expect("x is an output");
                        let (xt, wt) = (body.ty(x).expect("checked").dtype, body.inputs.last().expect("weight").dtype);
                        let yt = node.outputs.last().expect("y").dtype;
                        let row_bytes = decode::weight_row_bytes(body.inputs.last().expect("weight"));
                        let (one, more) =
                            (decode::GemvConfig::for_shape(1, row_bytes), decode::GemvConfig::for_shape(2, row_bytes));
                        let pcfg = decode::GemvConfig::for_prologue();
                        let fused = match form {
                            None => Some((
                                add_kernel(
                                    kiln_codegen::gemv_prologue(body, &syms, pcfg).map_err(|e| unsupported(e.0))?,
                                ),
                                pcfg,
                            )),
                            Some(_) => None,
                        };
                        let n_pro = pro.outputs.len();
                        let scaled = if opts.scaled_gemv && !scaled_gemv_off_by_env() {
                            scaled_run(&graph, n, body, &syms, stream_gemv, &mut add_kernel)
                        } else {
                            None
                        };
                        let pk = kiln_codegen::fused_kernel(&pro, &syms).map_err(|e| unsupported(e.0))?;
                        let gemv = match (decode::gemv_with(xt, wt, yt, one), decode::gemv_with(xt, wt, yt, more)) {
                            (Ok(k1), Ok(k2)) => Some([(add_kernel(k1), one), (add_kernel(k2), more)]),
                            _ => None,
                        };
                        let epilogue = match form {
                            None => None,
                            Some(form) => {
                                let epi = body.epilogue().expect("a body with an epilogue form has one");
                                let ek = kiln_codegen::fused_kernel(&epi, &syms).map_err(|e| unsupported(e.0))?;
                                // One weight row per warp: the columns the epilogue reads.
                                let ecfg = decode::GemvConfig::for_rows(1);
                                let gemv =
                                    kiln_codegen::gemv_epilogue(body, &syms, ecfg).ok().map(|k| (add_kernel(k), ecfg));
                                Some(Box::new(EpiRun {
                                    gemv,
                                    kernel: add_kernel(ek),
                                    op: Op::Fused(Box::new(epi)),
                                    form,
                                    n_pro,
                                    one_wave: false,
                                }))
                            }
                        };
                        Run::MatVec {
                            scaled,
                            fused,
                            prologue: add_kernel(pk),
                            pro_op: Box::new(Op::Fused(Box::new(pro))),
                            gemv,
                            x: x_out,
                            epilogue,
                        }
                    }
                    Op::MatMul { transpose_a, transpose_b } => {
                        let ops = graph.operands(n);
                        let (a, w) = (graph.value_type(ops[0]), graph.value_type(ops[1]));
                        // Two GEMV splits: one row of activations, and 2..=GEMV_MAX_M.
                        let mut gemv = None;
                        if !transpose_a && *transpose_b && w.rank() == 2 {
                            let row_bytes = decode::weight_row_bytes(w);
                            let (one, more) = (
                                gemv_cfg_override(w).unwrap_or_else(|| decode::GemvConfig::for_shape(1, row_bytes)),
                                decode::GemvConfig::for_shape(2, row_bytes),
                            );
                            let y = node.outputs[0].dtype;
                            if let (Ok(mut k1), Ok(k2)) = (
                                decode::gemv_with(a.dtype, w.dtype, y, one),
                                decode::gemv_with(a.dtype, w.dtype, y, more),
                            ) {
                                // WIP knob (wip/residency): KILN_GEMV_MAXREG="NxK=R" caps
                                // that one-row GEMV's registers (its blocks fit beside
                                // the kernel before it).
                                if let Some(r) = gemv_maxreg_override(w) {
                                    let name = format!("{}_r{r}", k1.sig.name);
                                    let capped = format!("__maxnreg__({r}) {name}(");
                                    k1.source = k1.source.replacen(&format!("{}(", k1.sig.name), &capped, 1);
                                    k1.sig.name = name;
                                }
                                gemv = Some([(add_kernel(k1), one), (add_kernel(k2), more)]);
                            }
                        }
                        // The streaming GEMV for one row, over short weight rows.
                        let stream = gemv
                            .filter(|_| stream_gemv)
                            .and_then(|_| decode::gemv_stream_if_pays(a.dtype, w, node.outputs[0].dtype))
                            .map(&mut add_kernel);
                        Run::MatMul { gemv, stream }
                    }
                    Op::Attention(_) => {
                        let ops = graph.operands(n);
                        let reads_cache = ops[1..].iter().any(|v| cache_of_present.contains_key(&v.node));
                        if reads_cache {
                            if !ops[1..].iter().all(|v| cache_of_present.contains_key(&v.node)) {
                                return Err(unsupported("attention must read both k and v from the cache".into()));
                            }
                            let kt = graph.value_type(ops[1]);
                            let keys = kt.shape.dims()[1].clone();
                            let (qt, vt) = (graph.value_type(ops[0]), graph.value_type(ops[2]));
                            let dim = |t: &kiln_ops::TensorType, i: usize| t.shape.dims()[i].as_fixed().unwrap_or(0);
                            let (h, kh, d, dv) = (dim(qt, 2), dim(kt, 2), dim(qt, 3), dim(vt, 3));
                            let group = h.checked_div(kh).unwrap_or(0);
                            let k = decode::attention_decode(kt.dtype, group, &keys, &syms)
                                .map_err(|e| unsupported(e.0))?;
                            let single = if decode::attention_decode_query_tile(group) > 1 {
                                let k1 = decode::attention_decode_tiled(kt.dtype, group, 1, &keys, &syms)
                                    .map_err(|e| unsupported(e.0))?;
                                Some(add_kernel(k1))
                            } else {
                                None
                            };
                            let prefill = prefill::attention_prefill_check(kt.dtype, h, kh, d, dv)
                                .and_then(|_| prefill::attention_prefill(kt.dtype, d, &keys, &syms))
                                .ok();
                            let fused = if opts.attention_fused && !attention_fused_off_by_env() {
                                fused_attention(&graph, n, group, &syms, &mut add_kernel)
                            } else {
                                None
                            };
                            Run::Attention {
                                kernel: add_kernel(k),
                                single,
                                prefill: prefill.map(&mut add_kernel),
                                fused,
                            }
                        } else {
                            match kernels::lower_node(&graph, n).map_err(|e| unsupported(e.0))? {
                                NodeLowering::Kernel(k) => Run::Kernel(add_kernel(k)),
                                other => return Err(unsupported(format!("unexpected lowering {other:?}"))),
                            }
                        }
                    }
                    _ => match kernels::lower_node(&graph, n).map_err(|e| unsupported(e.0))? {
                        NodeLowering::Kernel(k) => Run::Kernel(add_kernel(k)),
                        other => return Err(unsupported(format!("unexpected lowering {other:?}"))),
                    },
                }
            };
            for i in 0..node.outputs.len() {
                locs.entry(Value::new(n, i as u8)).or_insert(Loc::Arena);
            }
            steps.push(Step { node: n, run, group: None, absorbed: None });
        }
        // The producers that fused decode attention computes itself.
        let at: HashMap<NodeId, usize> = steps.iter().enumerate().map(|(i, s)| (s.node, i)).collect();
        for a in 0..steps.len() {
            if let Run::Attention { fused: Some(f), .. } = &steps[a].run {
                let p = f.producers;
                for n in [p.q, p.k, p.v] {
                    if let Some(&j) = at.get(&n) {
                        steps[j].absorbed = Some(a);
                    }
                }
            }
        }
        let greedy = add_kernel(decode::greedy().map_err(|e| contract(e.0))?);

        let step_end =
            add_kernel(kiln_codegen::resident::step_end(past_sym, seq_sym, &syms).map_err(|e| contract(e.0))?);
        // EngineOptions::greedy_fold (on by default; KILN_GREEDY_FOLD=0/1 overrides it):
        // at batch 1 the LM head's scaled GEMV samples itself and the step ends with
        // step_end_key. The WIP knob KILN_GREEDY_KEY=1 samples with the greedy_key kernel
        // instead (see `CudaEngine::greedy_key`).
        let greedy_fold = match std::env::var("KILN_GREEDY_FOLD").as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => opts.greedy_fold,
        };
        if greedy_fold {
            if let Some(i) = lm_head_step(&graph, &steps, logits) {
                let node = steps[i].node;
                if let (Run::MatVec { scaled: Some(sr), epilogue: None, .. }, Op::Fused(body)) =
                    (&mut steps[i].run, &graph.node(node).op)
                {
                    if let Ok((k, _)) = kiln_codegen::gemv_scaled_argmax(body, &syms) {
                        sr.argmax = Some(add_kernel(k));
                    }
                }
            }
        }
        let greedy_key = if greedy_fold || std::env::var("KILN_GREEDY_KEY").is_ok_and(|v| v == "1") {
            let gk = add_kernel(decode::greedy_key().map_err(|e| contract(e.0))?);
            let sek = kiln_codegen::resident::step_end_key(past_sym, seq_sym, &syms).map_err(|e| contract(e.0))?;
            Some((gk, add_kernel(sek)))
        } else {
            None
        };

        // EngineOptions::mlp_chain: a per-warp epilogue GEMV whose next launching step is
        // a one-row GEMV over its epilogue's only output runs both (see `ChainRun`).
        let mut n_chains = 0usize;
        if mlp_chain_by_env(opts.mlp_chain) {
            for i in 0..steps.len() {
                let Some(j) = (i + 1..steps.len()).find(|&j| !matches!(steps[j].run, Run::Nothing)) else { continue };
                let (ni, nj) = (steps[i].node, steps[j].node);
                let (Op::Fused(body), Op::MatMul { transpose_a: false, transpose_b: true }) =
                    (&graph.node(ni).op, &graph.node(nj).op)
                else {
                    continue;
                };
                let Run::MatVec { scaled: Some(sr), epilogue: Some(ep), .. } = &steps[i].run else { continue };
                if sr.epi_warp.is_none() || !matches!(steps[j].run, Run::MatMul { gemv: Some(_), .. }) {
                    continue;
                }
                let ops = graph.operands(nj);
                let w2 = graph.value_type(ops[1]);
                let fixed: Vec<usize> = w2.shape.dims().iter().filter_map(|d| d.as_fixed()).collect();
                let n_epi = graph.node(ni).outputs.len() - 1 - ep.n_pro;
                if ops[0] != Value::new(ni, ep.n_pro as u8) || n_epi != 1 || fixed.len() != 2 || w2.rank() != 2 {
                    continue;
                }
                if fixed[1] != ep.form.width || !matches!(locs.get(&ops[1]), Some(Loc::Weight(_))) {
                    continue;
                }
                let y2 = graph.node(nj).outputs[0].dtype;
                let made = kiln_codegen::gemv_scaled_epi_warp_chain(body, &syms, w2.dtype, y2);
                match made {
                    Ok((k, _)) => {
                        let kernel = add_kernel(k);
                        let ctr = 128 * n_chains;
                        n_chains += 1;
                        if let Run::MatVec { scaled: Some(sr), .. } = &mut steps[i].run {
                            sr.chain = Some(ChainRun { kernel, wave: 0, down: j, ctr });
                        }
                    }
                    Err(e) => tracing::info!(node = ni.index(), reason = %e.0, "no chained GEMV (KILN_MLP_CHAIN)"),
                }
            }
            tracing::info!(chains = n_chains, "chained GEMVs (KILN_MLP_CHAIN)");
        }

        // Horizontal fusion: runs of consecutive independent fused elementwise kernels
        // and fused appends (views between them are skipped) become one launch.
        let hfuse = opts.horizontal && !horizontal_off_by_env();
        let mut hgroups: Vec<HGroup> = Vec::new();
        let member = |s: &Step| -> Option<usize> {
            match &s.run {
                Run::Kernel(k)
                    if matches!(&graph.node(s.node).op,
                        Op::Fused(b) if matches!(b.kind(), Ok(kiln_ops::FusedKind::Elementwise { .. }))) =>
                {
                    Some(*k)
                }
                Run::FusedAppend { kernel, .. } => Some(*kernel),
                _ => None,
            }
        };
        let hsteps: Vec<(NodeId, kiln_codegen::horizontal::HStep)> = steps
            .iter()
            .map(|s| {
                let kind = match (&s.run, member(s)) {
                    (_, Some(_)) => kiln_codegen::horizontal::HStep::Part,
                    (Run::Nothing, None) => kiln_codegen::horizontal::HStep::View,
                    _ => kiln_codegen::horizontal::HStep::Barrier,
                };
                (s.node, kind)
            })
            .collect();
        let runs = if hfuse { kiln_codegen::horizontal::horizontal_runs(&graph, &hsteps) } else { Vec::new() };
        for run in runs {
            let merged = {
                let parts: Vec<&Kernel> =
                    run.iter().map(|&j| &kernel_list[member(&steps[j]).expect("a member")]).collect();
                kiln_codegen::horizontal::horizontal(&parts)
            };
            match merged {
                Ok(k) => {
                    // The layers' groups are alike: one kernel serves them all.
                    let kernel = match kernel_list.iter().position(|x| x.sig.name == k.sig.name) {
                        Some(at) => at,
                        None => {
                            kernel_list.push(k);
                            kernel_list.len() - 1
                        }
                    };
                    let g = hgroups.len();
                    hgroups.push(HGroup { kernel, parts: run.len() });
                    for (p, &j) in run.iter().enumerate() {
                        steps[j].group = Some((g, p));
                    }
                }
                Err(e) => tracing::debug!(reason = %e.0, "steps launched separately"),
            }
        }

        // Which steps keep host-side arguments that change with `past` (not capturable).
        let mut not_capturable = None;
        for s in &steps {
            let node = graph.node(s.node);
            let mentions_past = node
                .outputs
                .iter()
                .chain(graph.operands(s.node).iter().map(|v| graph.value_type(*v)))
                .any(|t| t.shape.dims().iter().any(|d| d.symbols().contains(&past_sym)));
            let safe = match &s.run {
                Run::Nothing | Run::Append { .. } | Run::FusedAppend { .. } | Run::Arange(_) => true,
                Run::Kernel(_) => !mentions_past || matches!(node.op, Op::Fused(_)),
                Run::MatMul { .. } | Run::MatVec { .. } => !mentions_past,
                Run::Attention { .. } => true,
            };
            if !safe && not_capturable.is_none() {
                not_capturable = Some(format!(
                    "node %{} ({} in `{}`) takes sizes that change with `{past_sym}` as launch arguments",
                    s.node.index(),
                    node.op.name(),
                    node.scope
                ));
            }
        }

        // ---- compile ------------------------------------------------------------------
        if opts.pdl {
            if let Some(k) = kernel_list.iter().find(|k| !k.waits_for_previous()) {
                return Err(contract(format!(
                    "kernel `{}` does not wait for the previous kernel (kiln_grid_entry): it cannot be launched \
                     with programmatic dependent launch",
                    k.sig.name
                )));
            }
        }
        let trace = if opts.trace {
            let blocks = trace_blocks_by_env();
            // Two event counters, the two rings, the phases' sums and counts, then with
            // KILN_TRACE_BLOCKS the block counter and ring (kiln.cuh).
            let len = 2 + 2 * TRACE_SLOTS + 16 + if blocks { 1 + 3 * TRACE_BLOCK_SLOTS } else { 0 };
            let buf = stream.alloc_zeros::<u64>(len).map_err(driver_err("alloc trace"))?;
            let at = dev(&buf, &stream);
            let blocks = if blocks { "#define KILN_TRACE_BLOCKS 1\n" } else { "" };
            for k in &mut kernel_list {
                k.source = format!("#define KILN_TRACE_AT 0x{at:x}ULL\n{blocks}{}", k.source);
            }
            Some(buf)
        } else {
            None
        };
        let cache_dir = opts.cache_dir.clone().unwrap_or_else(kiln_codegen::nvrtc::default_cache_dir);
        let (kernels, stats, binaries) =
            compile_and_load(&ctx, info.compute_capability, Some(cache_dir), kernel_list, opts.prebuilt.as_deref())?;

        // Decode attention workspace: the largest over batch sizes and attention shapes.
        let sms = info.multiprocessors.max(1) as usize;
        let mut ws_bytes = 0usize;
        let mut n_counters = 0usize;
        for s in &steps {
            if let Run::Attention { .. } = s.run {
                let ops = graph.operands(s.node);
                let (q, k, v) = (graph.value_type(ops[0]), graph.value_type(ops[1]), graph.value_type(ops[2]));
                let fixed = |t: &kiln_ops::TensorType, i: usize| t.shape.dims()[i].as_fixed().unwrap_or(0);
                let (h, kh, dv) = (fixed(q, 2), fixed(k, 2), fixed(v, 3));
                // Decode steps: one query row per sequence, up to max_batch sequences;
                // prefill: one sequence of up to max_context rows.
                let shapes = (1..=opts.max_batch).map(|b| (b, 1)).chain((1..opts.max_context).map(|s| (1, s)));
                // Either tile a launch may take (one head per block, or whole groups past
                // the long-context bound).
                let group_tile = decode::attention_decode_query_tile(h.checked_div(kh).unwrap_or(0));
                for (bsz, rows) in shapes {
                    let picked = decode::attention_decode_pick_tile(bsz, rows, h, kh);
                    for tile in [picked, group_tile] {
                        let splits =
                            decode::attention_decode_splits_tiled(bsz, rows, h, kh, opts.max_context, sms, tile);
                        let (o, ml) = decode::attention_decode_workspace(bsz, rows, h, dv, splits);
                        ws_bytes = ws_bytes.max(4 * (o + ml));
                        n_counters = n_counters.max(decode::attention_decode_counters_tiled(bsz, rows, h, kh, tile));
                    }
                }
            }
        }
        // Blocks of one wave of a loaded GEMV kernel of split `cfg`, from its occupancy:
        // whether the epilogue GEMVs fit in one (see `EpiRun`), and the looping scaled
        // GEMV's launch (see `ScaledRun::plain_wave`).
        let wave = |kg: usize, cfg: decode::GemvConfig| -> Result<usize, CudaError> {
            let smem = kernels[kg].0.dynamic_smem as usize;
            let per_sm = kernels[kg]
                .1
                .occupancy_max_active_blocks_per_multiprocessor(32 * cfg.warps as u32, smem, None)
                .map_err(driver_err("occupancy"))?;
            Ok(per_sm as usize * sms)
        };
        let one_wave = |kg: usize, cfg: decode::GemvConfig, form: &kiln_ops::Epilogue| -> Result<bool, CudaError> {
            Ok(kiln_codegen::gemv_epilogue_items(form, cfg) <= wave(kg, cfg)?)
        };
        let epilogue_gemv = opts.epilogue_gemv && !epilogue_gemv_off_by_env();
        for s in steps.iter_mut() {
            if let Run::MatVec { epilogue, scaled, .. } = &mut s.run {
                if let Some(sr) = scaled.as_mut() {
                    sr.plain_wave = wave(sr.plain.0, sr.plain.1)?.max(1);
                    if !epilogue_gemv || epi_warp_off_by_env() {
                        sr.epi_warp = None;
                    }
                    if let Some((kg, cfg, w)) = sr.epi_warp.as_mut() {
                        *w = wave(*kg, *cfg)?.max(1);
                        // WIP knob (wip/residency): KILN_EPI_WARP_PER_SM caps its blocks
                        // per multiprocessor, leaving room for the next kernel's.
                        if let Some(per_sm) = kiln_codegen::fused::env_usize("KILN_EPI_WARP_PER_SM") {
                            *w = (*w).min(per_sm.max(1) * sms);
                        }
                    }
                    // A chained launch is at most one wave of its own kernel (every block
                    // resident at once: they wait for each other).
                    match (sr.chain.as_mut(), sr.epi_warp) {
                        (Some(c), Some((_, cfg, w))) => c.wave = wave(c.kernel, cfg)?.min(w).max(1),
                        _ => sr.chain = None,
                    }
                }
                let Some(e) = epilogue.as_mut().filter(|_| epilogue_gemv) else { continue };
                if let Some((kg, cfg)) = e.gemv {
                    e.one_wave = one_wave(kg, cfg, &e.form)?;
                }
                if let Some((sr, (kg, cfg))) = scaled.as_mut().and_then(|sr| sr.epi.map(|k| (sr, k))) {
                    sr.epi_one_wave = one_wave(kg, cfg, &e.form)?;
                    if sr.epi_one_wave {
                        sr.chain = None; // the block-epilogue form runs: nothing to chain
                    }
                }
            }
        }
        // WIP knob KILN_GEMV_RA: the read-ahead table of every GEMV's next weight product
        // (`gv_readahead` in gemv.cu), written into the modules that take it.
        let ra_table = match decode::gemv_readahead_bytes() {
            0 => None,
            budget => {
                let mut gemvs = Vec::new();
                for s in &steps {
                    let ops = graph.operands(s.node);
                    let (w, slices) = match &s.run {
                        Run::MatMul { .. } => (ops[1], None),
                        Run::MatVec { epilogue, .. } => (ops[ops.len() - 1], epilogue.as_ref().map(|e| &e.form)),
                        _ => continue,
                    };
                    let Some(Loc::Weight(i)) = locs.get(&w).copied() else { continue };
                    let t = graph.value_type(w);
                    let d: Vec<usize> = t.shape.dims().iter().filter_map(|d| d.as_fixed()).collect();
                    let [n, k] = d[..] else { continue };
                    let slices = match slices {
                        Some(f) => f.offsets.iter().map(|&o| (o, f.width)).collect(),
                        None => vec![(0, n)],
                    };
                    gemvs.push(RaWeight {
                        ptr: dev(&weight_bufs[i], &stream),
                        row_bytes: t.dtype.bytes_for(k),
                        slices,
                    });
                }
                let entries = readahead_entries(&gemvs, budget, decode::gemv_readahead_skip());
                let flat: Vec<u64> = entries.iter().flatten().copied().collect();
                let buf = stream.clone_htod(&flat).map_err(driver_err("read-ahead table"))?;
                stream.synchronize().map_err(driver_err("read-ahead table"))?;
                let at = dev(&buf, &stream);
                for (k, f) in &kernels {
                    if k.source.contains("kiln_ra_tab") {
                        set_readahead_globals(f, at, entries.len() as i32)?;
                    }
                }
                tracing::info!(entries = entries.len(), budget, "GEMV read-ahead table (KILN_GEMV_RA)");
                Some(buf)
            }
        };
        let lm_head_argmax =
            steps.iter().position(|s| matches!(&s.run, Run::MatVec { scaled: Some(sr), .. } if sr.argmax.is_some()));
        // With the sampling LM head, the logits' own cast to f32 (a lone fused kernel after
        // it) waits for `logits()` (see `CudaEngine::logits_cast`).
        let logits_cast = lm_head_argmax.and_then(|h| {
            let c = steps.iter().position(|s| s.node == logits.node)?;
            (c > h
                && matches!(steps[c].run, Run::Kernel(_))
                && steps[c].group.is_none()
                && logits.node != steps[h].node)
                .then_some(c)
        });
        let attn_ws = stream.alloc_zeros::<u8>(ws_bytes.max(4)).map_err(driver_err("alloc"))?;
        let attn_counters = stream.alloc_zeros::<u32>(n_counters.max(1)).map_err(driver_err("alloc"))?;
        let chain_counters = stream.alloc_zeros::<u32>((128 * n_chains).max(1)).map_err(driver_err("alloc"))?;
        let greedy_pairs = opts.max_batch * decode::greedy_splits(vocab);
        let greedy_ws = stream.alloc_zeros::<u8>(12 * greedy_pairs + 8).map_err(driver_err("alloc"))?;
        let greedy_counters = stream.alloc_zeros::<u32>(opts.max_batch.max(1)).map_err(driver_err("alloc"))?;
        let greedy_keys = stream.alloc_zeros::<u64>(opts.max_batch.max(1)).map_err(driver_err("alloc"))?;
        let zeros = |n: usize| stream.alloc_zeros::<i64>(n.max(1)).map_err(driver_err("alloc"));
        let syms_dev = zeros(syms.len())?;
        let ids_prefill = zeros(opts.max_context)?;
        let ids_decode = zeros(opts.max_batch)?;
        let history = zeros(opts.max_batch * opts.max_context)?;
        let counter = zeros(1)?;
        stream.synchronize().map_err(driver_err("upload"))?;
        tracing::info!(
            device = %info,
            steps = steps.len(),
            kernels = kernels.len(),
            compiled = stats.compiled,
            cached = stats.cached,
            prebuilt = stats.prebuilt,
            capturable = not_capturable.is_none(),
            "CUDA engine ready"
        );
        if let Some(why) = &not_capturable {
            tracing::info!("decode steps run without CUDA graphs: {why}");
        }
        Ok(CudaEngine {
            graph,
            info,
            ctx,
            stream,
            blas,
            opts,
            weights: weight_bufs,
            weight_bytes,
            consts,
            caches,
            outputs,
            locs,
            kernels,
            binaries,
            compile_stats: stats,
            steps,
            syms,
            batch_sym,
            past_sym,
            seq_sym,
            syms_dev,
            ids_prefill,
            ids_decode,
            history,
            counter,
            greedy,
            step_end,
            greedy_key,
            greedy_keys,
            lm_head_argmax,
            logits_cast,
            logits_stale: false,
            fold_now: std::cell::Cell::new(false),
            logits,
            vocab,
            arena: None,
            arena_bytes: 0,
            plans: HashMap::new(),
            _blas_workspace: blas_ws,
            attn_ws,
            attn_counters,
            chain_counters,
            trace,
            _ra_table: ra_table,
            launch_log: None,
            greedy_ws,
            greedy_counters,
            hgroups,
            graphs: HashMap::new(),
            not_capturable,
            launches_per_step: 0,
            batch: 0,
            past: 0,
            first: Vec::new(),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The binary of every kernel the engine loaded, under its cache key
    /// ([`kiln_codegen::Compiler::key`]: source, architecture, options, NVRTC version), in
    /// load order: what an executable plan stores and hands back through
    /// [`EngineOptions::prebuilt`].
    pub fn kernel_binaries(&self) -> &[(String, Vec<u8>)] {
        &self.binaries
    }

    /// How the kernels were obtained: compiled, read from the disk cache, or prebuilt.
    pub fn compile_stats(&self) -> CompileStats {
        self.compile_stats
    }

    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// Why decode steps are not captured as a CUDA graph (`None` when they are, or
    /// would be once graphs are enabled).
    pub fn not_capturable(&self) -> Option<&str> {
        self.not_capturable.as_deref()
    }

    /// Kernel launches (generated kernels and cuBLAS calls) of the last decode step.
    pub fn launches_per_decode_step(&self) -> usize {
        self.launches_per_step
    }

    /// Decode steps captured as CUDA graphs so far (one per batch size and side of
    /// [`EngineOptions::attention_long_keys`]).
    pub fn decode_graphs(&self) -> usize {
        self.graphs.len()
    }

    pub fn memory(&self) -> MemoryReport {
        let kv_cache = self.caches.iter().map(|c| c.buf.len()).sum();
        let outs: usize = self.outputs.iter().map(|o| o.bytes).sum();
        let consts: usize = self.consts.iter().map(|c| c.len()).sum();
        let small =
            8 * (self.syms.len() + self.opts.max_context + self.opts.max_batch * (self.opts.max_context + 1) + 1);
        MemoryReport {
            weights: self.weight_bytes,
            kv_cache,
            arena: self.arena_bytes,
            workspace: outs + consts + small + BLAS_WORKSPACE + self.attn_ws.len(),
        }
    }

    fn bindings(&self, batch: usize, seq: usize, past: usize) -> Bindings {
        let mut b = Bindings::new();
        if let Some(s) = self.batch_sym {
            b.insert(s, batch);
        }
        b.insert(self.seq_sym, seq);
        b.insert(self.past_sym, past);
        b
    }

    /// The memory plan for these bindings (sized with `past` at the cache capacity),
    /// growing the arena and output buffers when needed.
    fn prepare(&mut self, b: &Bindings) -> Result<Arc<MemoryPlan>, CudaError> {
        let key: Vec<usize> = self.syms.iter().filter(|s| **s != self.past_sym).map(|s| b[s]).collect();
        if let Some(p) = self.plans.get(&key) {
            return Ok(p.clone());
        }
        let mut sizing = b.clone();
        sizing.insert(self.past_sym, self.opts.max_context);
        let plan = memory::plan_with_reads(&self.graph, &sizing, PlanOptions::default(), &self.extra_reads())
            .map_err(|e| contract(format!("memory plan: {e}")))?;
        if plan.arena_bytes > self.arena_bytes {
            self.graphs.clear();
            self.arena = None;
            self.arena = Some(self.stream.alloc_zeros::<u8>(plan.arena_bytes).map_err(driver_err("alloc arena"))?);
            self.arena_bytes = plan.arena_bytes;
        }
        for (name, &v) in self.graph.outputs() {
            if let Some(Loc::Output(i)) = self.locs.get(&v).copied() {
                let ty = self.graph.value_type(v);
                let n: usize =
                    ty.shape.eval(&sizing).map_err(|e| contract(format!("output `{name}`: {e}")))?.iter().product();
                let bytes = ty.dtype.bytes_for(n).max(1);
                if bytes > self.outputs[i].bytes {
                    self.graphs.clear();
                    self.outputs[i].buf = None;
                    self.outputs[i].buf = Some(self.stream.alloc_zeros::<u8>(bytes).map_err(driver_err("alloc"))?);
                    self.outputs[i].bytes = bytes;
                }
            }
        }
        let plan = Arc::new(plan);
        self.plans.insert(key, plan.clone());
        Ok(plan)
    }

    /// Where this engine's launches go (PDL only when asked for, on devices that have it,
    /// sm_90+, and unless the environment sets `KILN_PDL=0`).
    fn lane(&self) -> Lane<'_> {
        static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *ENV_OFF.get_or_init(|| std::env::var("KILN_PDL").is_ok_and(|v| v == "0"));
        Lane {
            stream: &self.stream,
            pdl: self.opts.pdl && !off && self.info.compute_capability.0 >= 9,
            log: self.launch_log.as_ref(),
        }
    }

    fn ptr(&self, v: Value, plan: &MemoryPlan, slot: usize, decode: bool) -> Result<u64, CudaError> {
        let s = &self.stream;
        Ok(match self.locs.get(&v).copied().unwrap_or(Loc::Arena) {
            Loc::Weight(i) => dev(&self.weights[i], s),
            Loc::Const(i) => dev(&self.consts[i], s),
            Loc::Ids if decode => dev(&self.ids_decode, s),
            Loc::Ids => dev(&self.ids_prefill, s),
            Loc::Cache(i) => {
                let c = &self.caches[i];
                dev(&c.buf, s) + c.dtype.bytes_for(slot * self.opts.max_context * c.row) as u64
            }
            Loc::Output(i) => dev(self.outputs[i].buf.as_ref().expect("prepared"), s),
            Loc::Arena => {
                let root = memory::view_root(&self.graph, v);
                let a = plan
                    .allocations
                    .get(&root)
                    .ok_or_else(|| contract(format!("%{} has no place in the memory plan", root.node.index())))?;
                dev(self.arena.as_ref().expect("prepared"), s) + a.offset as u64
            }
        })
    }

    /// What kernels read beyond their node's operands, for the memory plan: a fused
    /// decode attention reads its producers' inputs (see [`FusedAttention`]), which must
    /// stay live through it. Without this the plan may give the attention's output the
    /// bytes of the q/k/v projection it is still reading (a race that changed f32 logits
    /// from run to run with prompts of 89 and 120 tokens; `fused_attention_over_two_stages_computes_the_same_bits`).
    fn extra_reads(&self) -> Vec<(Value, NodeId)> {
        let mut reads = Vec::new();
        for s in &self.steps {
            if let Run::Attention { fused: Some(f), .. } = &s.run {
                reads.extend(f.producers.reads(&self.graph, s.node));
            }
        }
        reads
    }

    fn upload_syms(&self, b: &Bindings) -> Result<(), CudaError> {
        let vals: Vec<i64> = self.syms.iter().map(|s| b.get(s).map_or(0, |&v| v as i64)).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        // SAFETY: the table holds `syms.len()` i64s; the copy is staged before returning.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dev(&self.syms_dev, &self.stream),
                &bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(driver_err("upload symbols"))
    }

    /// Launches every step of the graph. Returns the number of launches. `early`: the
    /// launches are being captured into a decode graph, so decode attention may read
    /// the cache rows of earlier steps before it waits for the previous kernel (see
    /// `flash_decode.cu`).
    fn run_steps(
        &self,
        b: &Bindings,
        plan: &MemoryPlan,
        slot: usize,
        decode: bool,
        early: bool,
    ) -> Result<usize, CudaError> {
        self.run_steps_marked(b, plan, slot, decode, early, &mut |_, _, _| Ok(()))
    }

    /// [`Self::run_steps`], calling `mark(step, label, launches so far)` after each step's
    /// launches (not for steps a fused attention absorbs).
    fn run_steps_marked(
        &self,
        b: &Bindings,
        plan: &MemoryPlan,
        slot: usize,
        decode: bool,
        early: bool,
        mark: &mut dyn FnMut(&Step, &str, usize) -> Result<(), CudaError>,
    ) -> Result<usize, CudaError> {
        let st = &self.stream;
        let syms = dev(&self.syms_dev, st);
        let mut launches = 0;
        let mut pending: Vec<PendingPart> = Vec::new();
        // The step a chained GEMV computed (see `ChainRun`): the down projection.
        let mut chained: Option<usize> = None;
        for (si, step) in self.steps.iter().enumerate() {
            if chained == Some(si) || (self.fold_now.get() && self.logits_cast == Some(si)) {
                continue;
            }

            let node = self.graph.node(step.node);
            let err = |reason: String| CudaError::Unsupported {
                node: step.node.index(),
                op: node.op.name().into(),
                scope: node.scope.clone(),
                reason,
            };
            let fill = |e: CudaError| match e {
                CudaError::Unsupported { reason, .. } => err(reason),
                other => other,
            };
            if matches!(step.run, Run::Nothing) {
                continue;
            }
            if step.absorbed.is_some_and(|a| self.attention_fused_now(a, b)) {
                // Computed by the attention that reads it; a horizontal group launches
                // its other parts at its last.
                if let Some((g, p)) = step.group {
                    if p + 1 == self.hgroups[g].parts {
                        launches += self.flush_group(g, &pending).map_err(fill)?;
                        pending.clear();
                    }
                }
                continue;
            }
            let operands = self.graph.operands(step.node);
            let shapes: Vec<Vec<usize>> = operands
                .iter()
                .map(|v| self.graph.value_type(*v).shape.eval(b))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            let out_shapes: Vec<Vec<usize>> =
                node.outputs.iter().map(|t| t.shape.eval(b)).collect::<Result<_, _>>().map_err(err)?;
            let ins: Vec<(u64, &[usize])> = operands
                .iter()
                .zip(&shapes)
                .map(|(v, s)| Ok((self.ptr(*v, plan, slot, decode)?, s.as_slice())))
                .collect::<Result<_, CudaError>>()?;
            let outs: Vec<(u64, &[usize])> = out_shapes
                .iter()
                .enumerate()
                .map(|(i, s)| Ok((self.ptr(Value::new(step.node, i as u8), plan, slot, decode)?, s.as_slice())))
                .collect::<Result<_, CudaError>>()?;
            if let Some((g, p)) = step.group {
                // A part of a horizontal group: its launch waits for the group's last part.
                let (kernel, args, items) = match &step.run {
                    Run::Kernel(k) => {
                        let Op::Fused(body) = &node.op else { unreachable!("grouped steps are fused") };
                        let (a, items) = fused_args(body, &ins, &outs, b, syms).map_err(err)?;
                        (*k, a, items)
                    }
                    Run::FusedAppend { kernel, cache } => {
                        let (a, n) = self.fused_append_args(node, *cache, &ins, &outs, b, syms).map_err(fill)?;
                        (*kernel, a, n)
                    }
                    _ => unreachable!("only fused kernels and appends are grouped"),
                };
                let span = |v: Value, p: u64| {
                    let t = self.graph.value_type(v);
                    (p, t.shape.eval(b).map_or(0, |s| t.dtype.bytes_for(s.iter().product())))
                };
                let mut writes: Vec<(u64, usize)> =
                    outs.iter().enumerate().map(|(i, o)| span(Value::new(step.node, i as u8), o.0)).collect();
                if let Run::FusedAppend { cache, .. } = &step.run {
                    // The append writes rows anywhere in its cache.
                    let c = &self.caches[*cache].buf;
                    writes = vec![(dev(c, &self.stream), c.len())];
                }
                let reads = operands.iter().zip(&ins).map(|(v, i)| span(*v, i.0)).collect();
                pending.push(PendingPart { kernel, args, items, reads, writes });
                if p + 1 == self.hgroups[g].parts {
                    launches += self.flush_group(g, &pending).map_err(fill)?;
                    pending.clear();
                }
                mark(step, &self.label(step), launches)?;
                continue;
            }
            match &step.run {
                Run::Nothing => {}
                Run::Kernel(k) => {
                    launch_node(self.lane(), &self.kernels[*k], &node.op, &ins, &outs, b, syms).map_err(fill)?;
                }
                Run::Attention { kernel, single, prefill, fused } => {
                    let split_k = runs_split_k(*prefill, ins[0].1[1]);
                    let prefill = prefill.filter(|_| !split_k);
                    let fused = match fused.as_deref().filter(|_| split_k) {
                        Some(f) => {
                            let p = f.producers;
                            let mut ptrs = Vec::new();
                            for n in [p.q, p.k, p.v] {
                                for v in self.graph.operands(n) {
                                    ptrs.push(self.ptr(v, plan, slot, decode)?);
                                }
                            }
                            Some((f, ptrs))
                        }
                        None => None,
                    };
                    let kernels = (*kernel, *single);
                    self.attention(&node.op, kernels, prefill, fused, &ins, &outs, early).map_err(fill)?;
                }
                Run::Arange(k) => {
                    let n = out_shapes[0][0];
                    let mut a = Args::default();
                    a.set(Role::Out(0), ArgValue::Ptr(outs[0].0)).set(Role::Syms, ArgValue::Ptr(syms)).i64(Role::N, n);
                    launch(self.lane(), &self.kernels[*k], n, &a)?;
                }
                Run::Append { kernel, cache } => {
                    let new = &shapes[1];
                    let (bsz, seq) = (new[0], new[1]);
                    let row = self.caches[*cache].row;
                    let n = bsz * seq * row;
                    let mut a = Args::default();
                    a.set(Role::Out(0), ArgValue::Ptr(outs[0].0))
                        .set(Role::In(0), ArgValue::Ptr(ins[1].0))
                        .set(Role::Syms, ArgValue::Ptr(syms))
                        .i64(Role::N, n)
                        .i64(Role::Seq, seq)
                        .i64(Role::Inner, row)
                        .i64(Role::CacheBatchStride, self.opts.max_context * row);
                    launch(self.lane(), &self.kernels[*kernel], n, &a)?;
                }
                Run::FusedAppend { kernel, cache } => {
                    let (a, n) = self.fused_append_args(node, *cache, &ins, &outs, b, syms).map_err(fill)?;
                    launch(self.lane(), &self.kernels[*kernel], n, &a)?;
                }
                Run::MatMul { gemv, stream } => {
                    let one = ins[0].1[..ins[0].1.len() - 1].iter().product::<usize>() == 1;
                    match stream.filter(|_| one && ins[1].1.len() == 2) {
                        Some(ks) => {
                            let (n, k) = (ins[1].1[0], ins[1].1[1]);
                            let mut a = Args::default();
                            a.set(Role::Out(0), ArgValue::Ptr(outs[0].0))
                                .set(Role::In(0), ArgValue::Ptr(ins[0].0))
                                .set(Role::In(1), ArgValue::Ptr(ins[1].0))
                                .i64(Role::MatM, 1)
                                .i64(Role::MatN, n)
                                .i64(Role::MatK, k);
                            let sms = self.info.multiprocessors.max(1) as usize;
                            launch(self.lane(), &self.kernels[ks], decode::gemv_stream_items(n, sms), &a)?;
                        }
                        None => self.matmul(&node.op, *gemv, &ins, &outs, node.outputs[0].dtype).map_err(fill)?,
                    }
                }
                Run::MatVec { scaled, fused, prologue, pro_op, gemv, x, epilogue } => {
                    let (xs, ys) = (outs[*x].1, outs[outs.len() - 1].1);
                    let (k, n) = (xs[xs.len() - 1], ys[ys.len() - 1]);
                    let m: usize = xs[..xs.len() - 1].iter().product();
                    let scaled = scaled.as_ref().filter(|_| m == 1 && decode::gemv_prologue_fits(m, k));
                    if let Some(sr) = scaled {
                        let chain = match sr.chain {
                            Some(c) => {
                                let dn = self.steps[c.down].node;
                                let dops = self.graph.operands(dn);
                                let n2 = self.graph.value_type(dops[1]).shape.dims()[0].as_fixed().unwrap_or(0);
                                Some(ChainArgs {
                                    run: c,
                                    w2: self.ptr(dops[1], plan, slot, decode)?,
                                    y2: self.ptr(Value::new(dn, 0), plan, slot, decode)?,
                                    n2,
                                })
                            }
                            None => None,
                        };
                        let (extra, ran) = self
                            .scaled_matvec(sr, epilogue.as_deref(), &ins, &outs, (m, n, k), b, syms, chain)
                            .map_err(fill)?;
                        launches += extra;
                        if ran {
                            chained = sr.chain.map(|c| c.down);
                        }
                        launches += 1;
                        mark(step, &self.label(step), launches)?;
                        continue;
                    }
                    let one_kernel = fused.filter(|_| m > 0 && decode::gemv_prologue_fits(m, k) && matvec_fused_gemv());
                    if let Some((kg, cfg)) = one_kernel {
                        let mut a = Args::default();
                        for (i, (p, _)) in outs.iter().enumerate() {
                            a.set(Role::Out(i as u8), ArgValue::Ptr(*p));
                        }
                        for (i, (p, _)) in ins.iter().enumerate() {
                            a.set(Role::In(i as u8), ArgValue::Ptr(*p));
                        }
                        a.set(Role::Syms, ArgValue::Ptr(syms)).i64(Role::MatM, m).i64(Role::MatN, n).i64(Role::MatK, k);
                        let sms = self.info.multiprocessors.max(1) as usize;
                        launch(self.lane(), &self.kernels[kg], decode::gemv_prologue_items(n, cfg, sms), &a)?;
                    } else {
                        // The prologue writes x (and its other outputs), then the product.
                        let n_pro = epilogue.as_ref().map_or(outs.len() - 1, |e| e.n_pro);
                        let (pro_ins, pro_outs) = (&ins[..ins.len() - 1], &outs[..n_pro]);
                        launch_node(self.lane(), &self.kernels[*prologue], pro_op, pro_ins, pro_outs, b, syms)
                            .map_err(fill)?;
                        let y = node.outputs[node.outputs.len() - 1].dtype;
                        match epilogue {
                            None => {
                                let mm = Op::MatMul { transpose_a: false, transpose_b: true };
                                let xw = [outs[*x], ins[ins.len() - 1]];
                                self.matmul(&mm, *gemv, &xw, &outs[outs.len() - 1..], y).map_err(fill)?;
                            }
                            Some(e) => {
                                launches += self
                                    .matvec_epilogue(e, *gemv, &ins, &outs, outs[*x], (m, n, k), y, b, syms)
                                    .map_err(fill)?;
                            }
                        }
                        launches += 1;
                    }
                }
            }
            launches += 1;
            mark(step, &self.label(step), launches)?;
        }
        Ok(launches)
    }

    /// Attention over the resident cache (batch strides of the cache): the split-K
    /// kernel `split_k`, or the tensor-core kernel `prefill` when given. Both take the
    /// same sizes and attributes; the split-K kernel also its workspaces and counters.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        op: &Op,
        (split_k, single): (usize, Option<usize>),
        prefill: Option<usize>,
        fused: Option<(&FusedAttention, Vec<u64>)>,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        early: bool,
    ) -> Result<(), CudaError> {
        let Op::Attention(attrs) = op else { unreachable!("attention step") };
        let bad = |reason: String| CudaError::Unsupported { node: 0, op: String::new(), scope: String::new(), reason };
        let (q, k, v) = (ins[0].1, ins[1].1, ins[2].1);
        let (bsz, s, h, d) = (q[0], q[1], q[2], q[3]);
        let (kh, dv) = (k[2], v[3]);
        let (mask, window) = match attrs.mask {
            kiln_ops::Mask::None => (0, 0),
            kiln_ops::Mask::Causal => (1, 0),
            kiln_ops::Mask::SlidingWindow(w) => (2, w as usize),
        };
        let cap = self.opts.max_context;
        let mut a = Args::default();
        match &fused {
            // The producers' inputs in place of q and the caches.
            Some((_, ptrs)) => {
                for (i, p) in ptrs.iter().enumerate() {
                    a.set(Role::In(i as u8), ArgValue::Ptr(*p));
                }
            }
            None => {
                a.set(Role::In(0), ArgValue::Ptr(ins[0].0))
                    .set(Role::In(1), ArgValue::Ptr(ins[1].0))
                    .set(Role::In(2), ArgValue::Ptr(ins[2].0));
            }
        }
        a.set(Role::Out(0), ArgValue::Ptr(outs[0].0))
            .set(Role::Syms, ArgValue::Ptr(dev(&self.syms_dev, &self.stream)))
            .i64(Role::Batch, bsz)
            .i64(Role::Seq, s)
            .i64(Role::Heads, h)
            .i64(Role::KvHeads, kh)
            .i64(Role::HeadDim, d)
            .i64(Role::ValueDim, dv)
            .i64(Role::KBatchStride, cap * kh * d)
            .i64(Role::VBatchStride, cap * kh * dv)
            .set(Role::Scale, ArgValue::F32(attrs.scale.get()))
            .set(Role::MaskKind, ArgValue::I32(mask))
            .i64(Role::Window, window);
        if let Some(p) = prefill {
            return launch(self.lane(), &self.kernels[p], prefill::attention_prefill_items(bsz, s, h, kh), &a);
        }
        // Whole GQA groups per block, or one head per block when that leaves too few
        // blocks (and the kernel for it exists) and the context is not long.
        let keys = k[1];
        let (split_k, single) = match &fused {
            Some((f, _)) => (f.kernel, f.single),
            None => (split_k, single),
        };
        let (kernel, tile) = match single {
            Some(k1)
                if decode::attention_decode_pick_tile(bsz, s, h, kh) == 1 && keys <= self.opts.attention_long_keys =>
            {
                (k1, 1)
            }
            _ => (split_k, decode::attention_decode_query_tile(h.checked_div(kh).unwrap_or(0))),
        };
        let sms = self.info.multiprocessors.max(1) as usize;
        let mut splits = decode::attention_decode_splits_tiled(bsz, s, h, kh, self.opts.max_context, sms, tile);
        // WIP knob: KILN_ATTN_SPLITS=N caps the splits a launch takes (the blocks of splits
        // past the context's return at once; at 200 keys 256 of the 1B's 288 blocks).
        if let Some(cap) = kiln_codegen::fused::env_usize("KILN_ATTN_SPLITS") {
            splits = splits.min(cap.max(1));
        }
        decode::attention_decode_check(h, kh, d, dv, splits).map_err(|e| bad(e.0))?;
        let (wo, wml) = decode::attention_decode_workspace(bsz, s, h, dv, splits);
        if 4 * (wo + wml) > self.attn_ws.len() {
            return Err(bad(format!("decode attention workspace too small for batch {bsz}")));
        }
        if decode::attention_decode_counters_tiled(bsz, s, h, kh, tile) > self.attn_counters.len() {
            return Err(bad(format!("decode attention counters too few for batch {bsz}, {s} rows")));
        }
        let ws = dev(&self.attn_ws, &self.stream);
        a.set(Role::Out(1), ArgValue::Ptr(ws))
            .set(Role::Out(2), ArgValue::Ptr(ws + 4 * wo as u64))
            .set(Role::Counters, ArgValue::Ptr(dev(&self.attn_counters, &self.stream)))
            .i64(Role::Splits, splits)
            .i64(Role::Early, usize::from(early));
        launch(
            self.lane(),
            &self.kernels[kernel],
            decode::attention_decode_items_tiled(bsz, s, h, kh, splits, tile),
            &a,
        )
    }

    /// The arguments and item count of a fused append's launch.
    fn fused_append_args(
        &self,
        node: &kiln_graph::Node,
        cache: usize,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        b: &Bindings,
        syms: u64,
    ) -> Result<(Args, usize), CudaError> {
        let Op::Fused(body) = &node.op else { unreachable!("fused append step") };
        let n = kiln_codegen::fused_append_items(body, b).map_err(|e| CudaError::Unsupported {
            node: 0,
            op: String::new(),
            scope: String::new(),
            reason: e.0,
        })?;
        let mut a = Args::default();
        a.set(Role::Out(0), ArgValue::Ptr(outs[0].0))
            .set(Role::Syms, ArgValue::Ptr(syms))
            .i64(Role::N, n)
            .i64(Role::CacheBatchStride, self.opts.max_context * self.caches[cache].row);
        for (i, (p, _)) in ins.iter().enumerate() {
            a.set(Role::In(i as u8), ArgValue::Ptr(*p));
        }
        Ok((a, n))
    }

    /// Whether attention step `a` runs its fused split-K kernel under bindings `b` (it
    /// has one, and the launch's query rows do not take the prefill kernel): then the
    /// steps it absorbs launch nothing.
    fn attention_fused_now(&self, a: usize, b: &Bindings) -> bool {
        let step = &self.steps[a];
        let Run::Attention { prefill, fused: Some(_), .. } = &step.run else { return false };
        let q = self.graph.operands(step.node)[0];
        let rows = self.graph.value_type(q).shape.eval(b).map_or(0, |s| s.get(1).copied().unwrap_or(0));
        runs_split_k(*prefill, rows)
    }

    /// Launches the pending parts of horizontal group `g` at its last part: as the
    /// group's kernel when every part is pending, else one by one (parts computed by a
    /// fused attention are not). Returns the number of launches.
    fn flush_group(&self, g: usize, parts: &[PendingPart]) -> Result<usize, CudaError> {
        if parts.len() == self.hgroups[g].parts {
            return self.launch_group(g, parts);
        }
        for x in parts {
            launch(self.lane(), &self.kernels[x.kernel], x.items, &x.args)?;
        }
        Ok(parts.len())
    }

    /// Launches horizontal group `g` whose parts are `parts`: as its fused kernel, or
    /// part by part if a part writes memory another part reads or writes. Returns the
    /// number of launches.
    fn launch_group(&self, g: usize, parts: &[PendingPart]) -> Result<usize, CudaError> {
        let overlap =
            |&(a, n): &(u64, usize), &(c, m): &(u64, usize)| n > 0 && m > 0 && a < c + m as u64 && c < a + n as u64;
        let conflict = parts.iter().enumerate().any(|(i, x)| {
            x.writes.iter().any(|w| {
                parts.iter().enumerate().any(|(j, y)| j != i && y.reads.iter().chain(&y.writes).any(|r| overlap(w, r)))
            })
        });
        if conflict {
            for x in parts {
                launch(self.lane(), &self.kernels[x.kernel], x.items, &x.args)?;
            }
            return Ok(parts.len());
        }
        let merged = &self.kernels[self.hgroups[g].kernel];
        let kernels: Vec<&Kernel> = parts.iter().map(|x| &self.kernels[x.kernel].0).collect();
        let roles = kiln_codegen::horizontal::horizontal_roles(&kernels);
        let mut a = Args::default();
        for ((x, k), roles) in parts.iter().zip(&kernels).zip(&roles) {
            for (prm, &role) in k.sig.params.iter().zip(roles) {
                if let Some(v) = x.args.get(prm.role) {
                    a.set(role, v);
                }
            }
        }
        let kiln_codegen::Grid::BlockPerItem { threads } = merged.0.grid else {
            unreachable!("a horizontal kernel has a block per item")
        };
        let items: Vec<usize> = parts.iter().map(|x| x.items).collect();
        launch(self.lane(), merged, kiln_codegen::horizontal::horizontal_items(&items, threads), &a)?;
        Ok(1)
    }

    /// The product and epilogue of a matrix-vector group after its prologue: the
    /// epilogue GEMV for one row when its blocks fit in one wave, else the product and
    /// then the epilogue's kernel over y (see [`EpiRun`]). Returns the launches beyond
    /// the first.
    #[allow(clippy::too_many_arguments)]
    fn matvec_epilogue(
        &self,
        e: &EpiRun,
        gemv: Option<[(usize, decode::GemvConfig); 2]>,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        x: (u64, &[usize]),
        (m, n, k): (usize, usize, usize),
        y: DType,
        b: &Bindings,
        syms: u64,
    ) -> Result<usize, CudaError> {
        let (w, yo) = (ins[ins.len() - 1], outs[outs.len() - 1]);
        let nin = ins.len() - 1;
        if let Some((kg, cfg)) = e.gemv.filter(|_| m == 1 && e.one_wave) {
            let n_epi = outs.len() - 1 - e.n_pro;
            let mut a = Args::default();
            for i in 0..n_epi {
                a.set(Role::Out(i as u8), ArgValue::Ptr(outs[e.n_pro + i].0));
            }
            a.set(Role::Out(n_epi as u8), ArgValue::Ptr(yo.0));
            for (j, i) in ins[..nin].iter().enumerate() {
                a.set(Role::In((j + 1) as u8), ArgValue::Ptr(i.0));
            }
            a.set(Role::In((nin + 1) as u8), ArgValue::Ptr(x.0))
                .set(Role::In((nin + 2) as u8), ArgValue::Ptr(w.0))
                .set(Role::Syms, ArgValue::Ptr(syms))
                .i64(Role::MatM, m)
                .i64(Role::MatN, n)
                .i64(Role::MatK, k);
            launch(self.lane(), &self.kernels[kg], kiln_codegen::gemv_epilogue_items(&e.form, cfg), &a)?;
            return Ok(0);
        }
        let mm = Op::MatMul { transpose_a: false, transpose_b: true };
        self.matmul(&mm, gemv, &[x, w], &[yo], y)?;
        self.epilogue_kernel(e, ins, outs, b, syms)?;
        Ok(1)
    }

    /// A matrix-vector group's scaled GEMV (see [`ScaledRun`]), with the epilogue when
    /// its blocks fit in one wave, else with it per warp (`epi_warp`) for one row, else
    /// followed by the epilogue's kernel. Returns the launches beyond the first.
    /// With `chain` (see [`ChainRun`]), where the per-warp epilogue form runs, the
    /// chained kernel also computes the next step; the second value says whether it did.
    #[allow(clippy::too_many_arguments)]
    fn scaled_matvec(
        &self,
        sr: &ScaledRun,
        epilogue: Option<&EpiRun>,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        (m, n, k): (usize, usize, usize),
        b: &Bindings,
        syms: u64,
        chain: Option<ChainArgs>,
    ) -> Result<(usize, bool), CudaError> {
        let n_pro = epilogue.map_or(outs.len() - 1, |e| e.n_pro);
        let with_epi = epilogue.and(sr.epi).filter(|_| sr.epi_one_wave);
        // The per-warp epilogue where the block form does not fit in one wave.
        let warp = match (with_epi, epilogue, sr.epi_warp) {
            (None, Some(ep), Some((kg, cfg, w))) if m == 1 => {
                Some(((kg, cfg), kiln_codegen::gemv_epilogue_warp_items(&ep.form, cfg).min(w)))
            }
            _ => None,
        };
        let ((kg, cfg), e) = match (with_epi, warp) {
            (Some(kc), _) | (None, Some((kc, _))) => (kc, outs.len() - 1 - n_pro),
            (None, None) => (sr.plain, 0),
        };
        let mut a = Args::default();
        for i in 0..e {
            a.set(Role::Out(i as u8), ArgValue::Ptr(outs[n_pro + i].0));
        }
        a.set(Role::Out(e as u8), ArgValue::Ptr(outs[outs.len() - 1].0));
        for (j, o) in outs[..n_pro].iter().enumerate() {
            a.set(Role::Out((e + 1 + j) as u8), ArgValue::Ptr(o.0));
        }
        for (i, p) in ins.iter().enumerate() {
            a.set(Role::In((i + 1) as u8), ArgValue::Ptr(p.0));
        }
        a.set(Role::Syms, ArgValue::Ptr(syms)).i64(Role::MatM, m).i64(Role::MatN, n).i64(Role::MatK, k);
        let items = match (with_epi, epilogue, warp) {
            (Some(_), Some(ep), _) => kiln_codegen::gemv_epilogue_items(&ep.form, cfg),
            (_, _, Some((_, items))) => items,
            // The plain form loops over row tiles: one wave of blocks (see `ScaledRun`).
            _ => decode::gemv_items_with(n, cfg).min(sr.plain_wave),
        };
        // A folding decode step's LM head: the plain form that also samples (same split,
        // registers and wave), its key after the prologue's outputs.
        let fold = sr.argmax.filter(|_| self.fold_now.get() && epilogue.is_none() && m == 1);
        if let Some(ka) = fold {
            a.set(Role::Out((1 + n_pro) as u8), ArgValue::Ptr(dev(&self.greedy_keys, &self.stream)));
            launch(self.lane(), &self.kernels[ka], items, &a)?;
            return Ok((0, false));
        }
        if let (Some(c), Some(_)) = (chain.as_ref().filter(|c| c.n2 > 0), warp) {
            let ctr = dev(&self.chain_counters, &self.stream) + 4 * c.run.ctr as u64;
            a.set(Role::Part(1, 0), ArgValue::Ptr(c.w2))
                .set(Role::Part(1, 1), ArgValue::Ptr(c.y2))
                .i64(Role::Part(1, 2), c.n2)
                .set(Role::Counters, ArgValue::Ptr(ctr));
            launch(self.lane(), &self.kernels[c.run.kernel], items.min(c.run.wave), &a)?;
            return Ok((0, true));
        }
        match sr.stream.filter(|_| with_epi.is_none() && warp.is_none() && m == 1) {
            Some(ks) => {
                let sms = self.info.multiprocessors.max(1) as usize;
                launch(self.lane(), &self.kernels[ks], decode::gemv_stream_items(n, sms), &a)?;
            }
            None => launch(self.lane(), &self.kernels[kg], items, &a)?,
        }
        match epilogue {
            Some(ep) if with_epi.is_none() && warp.is_none() => {
                self.epilogue_kernel(ep, ins, outs, b, syms)?;
                Ok((1, false))
            }
            _ => Ok((0, false)),
        }
    }

    /// A matrix-vector group's epilogue kernel over y (the group's last output), its
    /// other inputs the group's but the weight; it writes the epilogue's outputs.
    fn epilogue_kernel(
        &self,
        e: &EpiRun,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        b: &Bindings,
        syms: u64,
    ) -> Result<(), CudaError> {
        let nin = ins.len() - 1;
        let mut epi_ins: Vec<(u64, &[usize])> = Vec::with_capacity(nin + 1);
        epi_ins.push(outs[outs.len() - 1]);
        epi_ins.extend_from_slice(&ins[..nin]);
        launch_node(self.lane(), &self.kernels[e.kernel], &e.op, &epi_ins, &outs[e.n_pro..outs.len() - 1], b, syms)
    }

    fn matmul(
        &self,
        op: &Op,
        gemv: Option<[(usize, decode::GemvConfig); 2]>,
        ins: &[(u64, &[usize])],
        outs: &[(u64, &[usize])],
        dtype: DType,
    ) -> Result<(), CudaError> {
        let Op::MatMul { transpose_a: ta, transpose_b: tb } = *op else { unreachable!("matmul step") };
        let (sa, sb) = (ins[0].1, ins[1].1);
        let (ra, rb) = (sa.len(), sb.len());
        let (m, k) = if ta { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
        let n = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let batch: usize = sa[..ra - 2].iter().product();
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            let bytes = dtype.bytes_for(batch * m * n);
            // SAFETY: the output holds batch·m·n elements of `dtype`.
            return unsafe { cudarc::driver::result::memset_d8_async(outs[0].0, 0, bytes, self.stream.cu_stream()) }
                .map_err(driver_err("memset"));
        }
        if let Some(kernels) = gemv.filter(|_| batch * m <= decode::GEMV_MAX_M && rb == 2) {
            // `[.., m, k] · [n, k]ᵀ` with few rows: a bandwidth-bound GEMV over the weight.
            let rows = batch * m;
            let (kg, cfg) = kernels[usize::from(rows > 1)];
            let mut a = Args::default();
            a.set(Role::Out(0), ArgValue::Ptr(outs[0].0))
                .set(Role::In(0), ArgValue::Ptr(ins[0].0))
                .set(Role::In(1), ArgValue::Ptr(ins[1].0))
                .i64(Role::MatM, rows)
                .i64(Role::MatN, n)
                .i64(Role::MatK, k);
            return launch(self.lane(), &self.kernels[kg], decode::gemv_items_with(n, cfg), &a);
        }
        let g = Gemm { dtype, batch, m, n, k, ta, tb, shared_b: rb == 2 };
        g.run(&self.blas, ins[0].0, ins[1].0, outs[0].0)
    }

    /// Greedy sampling of the logits of `rows` sequences into `ids` (device i64s).
    fn sample(&self, plan: &MemoryPlan, rows: usize, ids: u64) -> Result<(), CudaError> {
        let logits = self.ptr(self.logits, plan, 0, false)?;
        let splits = decode::greedy_splits(self.vocab);
        if rows > self.greedy_counters.len() {
            return Err(contract(format!(
                "greedy sampling of {rows} rows: workspace for {}",
                self.greedy_counters.len()
            )));
        }
        let ws = dev(&self.greedy_ws, &self.stream);
        let mut a = Args::default();
        a.set(Role::Out(0), ArgValue::Ptr(ids))
            .set(Role::Out(1), ArgValue::Ptr(ws))
            .set(Role::Out(2), ArgValue::Ptr(ws + (4 * rows * splits).next_multiple_of(8) as u64))
            .set(Role::Counters, ArgValue::Ptr(dev(&self.greedy_counters, &self.stream)))
            .set(Role::In(0), ArgValue::Ptr(logits))
            .i64(Role::N, rows)
            .i64(Role::Len, self.vocab)
            .i64(Role::Splits, splits);
        launch(self.lane(), &self.kernels[self.greedy], decode::greedy_items(rows, splits), &a)
    }

    /// Prefills `prompts` (all of one length, at most `max_batch` of them) from
    /// position 0, each into its own cache slot, and samples (greedy) each one's next
    /// token on the device; returns those tokens. Decode steps continue from here.
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<u32>, CudaError> {
        let bsz = prompts.len();
        if bsz == 0 || bsz > self.opts.max_batch {
            return Err(contract(format!("{bsz} prompts: the engine takes 1 to {} at once", self.opts.max_batch)));
        }
        let len = prompts[0].len();
        if len == 0 || prompts.iter().any(|p| p.len() != len) {
            return Err(contract("prompts must be non-empty and of one length".into()));
        }
        if len >= self.opts.max_context {
            return Err(contract(format!(
                "a prompt of {len} tokens leaves no room in the context of {} positions",
                self.opts.max_context
            )));
        }
        if let Some((i, id)) = prompts.iter().flatten().enumerate().find(|(_, &id)| id as usize >= self.vocab) {
            return Err(contract(format!("token id {id} (at {i}) is outside the vocabulary of {}", self.vocab)));
        }
        self.ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let b = self.bindings(1, len, 0);
        let plan = self.prepare(&b)?;
        self.upload_syms(&b)?;
        for (slot, p) in prompts.iter().enumerate() {
            let ids: Vec<u8> = p.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
            // SAFETY: `ids_prefill` holds max_context > len i64s; staged before return.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    dev(&self.ids_prefill, &self.stream),
                    &ids,
                    self.stream.cu_stream(),
                )
            }
            .map_err(driver_err("upload ids"))?;
            self.run_steps(&b, &plan, slot, false, false)?;
            self.sample(&plan, 1, dev(&self.ids_decode, &self.stream) + 8 * slot as u64)?;
        }
        let mut first = vec![0i64; bsz];
        self.stream.memcpy_dtoh(&self.ids_decode.slice(0..bsz), &mut first).map_err(driver_err("download tokens"))?;
        // Decode continues with every sequence at `len` cached positions.
        let next = self.bindings(bsz, 1, len);
        self.upload_syms(&next)?;
        // SAFETY: the counter is one i64.
        unsafe {
            cudarc::driver::result::memset_d8_async(dev(&self.counter, &self.stream), 0, 8, self.stream.cu_stream())
        }
        .map_err(driver_err("memset"))?;
        self.stream.synchronize().map_err(driver_err("prefill"))?;
        self.batch = bsz;
        self.past = len;
        self.logits_stale = false;
        self.first = first.iter().map(|&t| t as u32).collect();
        Ok(self.first.clone())
    }

    /// What a step launches, for profiles: the kernel (its generated hash dropped) or the
    /// library call, and the last component of the node's module path.
    fn label(&self, step: &Step) -> String {
        let node = self.graph.node(step.node);
        let what = match &step.run {
            Run::Nothing => "nothing".to_string(),
            Run::Kernel(k) | Run::Arange(k) | Run::Append { kernel: k, .. } | Run::FusedAppend { kernel: k, .. } => {
                short_kernel_name(&self.kernels[*k].0.sig.name).to_string()
            }
            Run::MatMul { .. } => "matmul".into(),
            Run::MatVec { .. } => "matvec (GEMV + prologue)".into(),
            Run::Attention { .. } => "attention (split-K)".into(),
        };
        let scope = node.scope.rsplit('.').next().unwrap_or("");
        if scope.is_empty() || scope.chars().all(|c| c.is_ascii_digit()) {
            what
        } else {
            format!("{what} @{scope}")
        }
    }

    /// Times every launch of one decode step on the device: the step is captured as a
    /// CUDA graph with an event after each launch, replayed once, and the GPU time
    /// between consecutive events is summed per label (kernel and module). Returns
    /// (label, launches, microseconds) sorted by time, the step's total last. Advances
    /// the running batch by one token like [`Self::decode_step`].
    pub fn profile_decode_step(&mut self) -> Result<Vec<(String, usize, f64)>, CudaError> {
        if self.batch == 0 {
            return Err(contract("profile before prefill".into()));
        }
        if let Some(why) = &self.not_capturable {
            return Err(contract(format!("the decode step cannot be captured: {why}")));
        }
        if self.past + 1 > self.opts.max_context {
            return Err(contract(format!("the context of {} positions is full", self.opts.max_context)));
        }
        self.ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let b = self.bindings(self.batch, 1, self.past);
        let plan = self.prepare(&b)?;
        let (ctx, stream) = (self.ctx.clone(), self.stream.clone());
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx.new_event(timing).map_err(driver_err("event"))?;
        let mut marks: Vec<(String, cudarc::driver::CudaEvent)> = Vec::new();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("begin capture"))?;
        // Inside a capture an event record becomes a graph node only when it is marked
        // external; a plain record would only order work within the capture.
        let record = |e: &cudarc::driver::CudaEvent| -> Result<(), CudaError> {
            // SAFETY: the event and the stream belong to this engine's context.
            unsafe {
                sys::cuEventRecordWithFlags(
                    e.cu_event(),
                    stream.cu_stream(),
                    sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
                )
            }
            .result()
            .map_err(driver_err("event record"))
        };
        let recorded = (|| -> Result<(), CudaError> {
            record(&start)?;
            let mut mark = |_: &Step, label: &str, _: usize| -> Result<(), CudaError> {
                let e = ctx.new_event(timing).map_err(driver_err("event"))?;
                record(&e)?;
                marks.push((label.to_string(), e));
                Ok(())
            };
            self.run_steps_marked(&b, &plan, 0, true, true, &mut mark)?;
            self.sample(&plan, self.batch, dev(&self.ids_decode, &self.stream))?;
            let e = ctx.new_event(timing).map_err(driver_err("event"))?;
            record(&e)?;
            marks.push(("greedy sampling (argmax)".into(), e));
            Ok(())
        })();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph.map_err(driver_err("end capture"))?.ok_or_else(|| contract("empty capture".into()))?;
        graph.launch().map_err(driver_err("graph launch"))?;
        self.synchronize()?;
        // The profiled step sampled into the ids but did not run the step end: do it now.
        self.launch_step_end()?;
        self.past += 1;
        let mut total: IndexMap<String, (usize, f64)> = IndexMap::new();
        let mut prev = &start;
        let mut sum = 0.0;
        for (label, e) in &marks {
            let us = prev.elapsed_ms(e).map_err(driver_err("event time"))? as f64 * 1e3;
            let t = total.entry(label.clone()).or_default();
            t.0 += 1;
            t.1 += us;
            sum += us;
            prev = e;
        }
        let mut rows: Vec<(String, usize, f64)> = total.into_iter().map(|(l, (n, us))| (l, n, us)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows.push(("total".into(), marks.len(), sum));
        Ok(rows)
    }

    /// The decode step's in-graph timeline over `steps` steps (needs
    /// [`EngineOptions::trace`]): every launch's time from the return of its wait for the
    /// previous kernel to the return of the next launch's wait, i.e. what it adds to the
    /// step's critical path, with PDL overlap and CUDA-graph replay as in production
    /// (unlike [`Self::profile_decode_step`], whose events serialize the launches).
    /// Returns every launch of the step but the step end, in launch order: (its kernel
    /// and module, µs on the critical path, µs from its start to its wait's return: how
    /// early it was resident), means over the steps. Their sum is the step's time from
    /// its first wait to its last (the step end's own time and the gap between graph
    /// launches are not in it). Advances the running batch by `steps` tokens.
    pub fn timeline(&mut self, steps: usize) -> Result<Vec<(String, f64, f64)>, CudaError> {
        if self.trace.is_none() {
            return Err(contract("a timeline needs an engine built with the trace option".into()));
        }
        if self.batch == 0 {
            return Err(contract("timeline before prefill".into()));
        }
        if steps < 2 || self.past + steps > self.opts.max_context {
            return Err(contract(format!("a timeline of {steps} steps (at least 2) does not fit the context")));
        }
        // Labels per launch, in launch order: the step recorded into a graph that is
        // never launched.
        self.ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let b = self.bindings(self.batch, 1, self.past);
        let plan = self.prepare(&b)?;
        let mut labels: Vec<String> = Vec::new();
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("begin capture"))?;
        let early = self.opts.cuda_graphs && self.opts.attention_early && !attention_early_off_by_env();
        self.launch_log = Some(Default::default());
        let folds = self.folds();
        self.fold_now.set(folds);
        let recorded = self.run_steps_marked(&b, &plan, 0, true, early, &mut |step, label, launches| {
            // Each launch: its kernel (the generated hash dropped) and the step's module.
            let names = self.launch_log.as_ref().expect("set").borrow();
            let at = self.graph.node(step.node).scope.clone();
            // A weight product's GEMV also names the bytes of its weight (WIP: to read
            // each one's bandwidth off the critical-path table).
            let ops = self.graph.operands(step.node);
            let weight = match &step.run {
                Run::MatMul { .. } => ops.get(1).copied(),
                Run::MatVec { .. } => ops.last().copied(),
                _ => None,
            }
            .filter(|w| matches!(self.locs.get(w), Some(Loc::Weight(_))))
            .map(|w| {
                let t = self.graph.value_type(w);
                t.dtype.bytes_for(t.shape.dims().iter().filter_map(|d| d.as_fixed()).product::<usize>())
            });
            for name in &names[labels.len().min(names.len())..launches.min(names.len())] {
                let mb = match weight {
                    Some(b) if name.contains("gemv") => format!(" [{:.1} MB]", b as f64 / 1e6),
                    _ => String::new(),
                };
                labels.push(format!("{} @{}{mb}", short_kernel_name(name), generic_scope(&at)));
            }
            labels.resize(launches, label.to_string());
            Ok(())
        });
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        self.launch_log = None;
        self.fold_now.set(false);
        let n = recorded?;
        drop(graph.map_err(driver_err("end capture"))?);
        labels.resize(n, "?".into());
        if !folds {
            labels.push("greedy sampling (argmax)".into());
        }
        labels.push("step end".into());
        let per_step = labels.len();
        if per_step * steps > TRACE_SLOTS {
            return Err(contract(format!("{steps} steps of {per_step} launches overflow the trace buffer")));
        }
        // Run the steps from a clean buffer, then read it.
        let buf = self.trace.as_mut().expect("checked");
        self.stream.memset_zeros(buf).map_err(driver_err("trace reset"))?;
        for _ in 0..steps {
            self.decode_step()?;
        }
        self.synchronize()?;
        let buf = self.trace.as_ref().expect("checked");
        let host = self.stream.clone_dtoh(buf).map_err(driver_err("trace read"))?;
        let (starts, waits) = (host[0] as usize, host[1] as usize);
        if starts != per_step * steps || waits != per_step * steps {
            return Err(contract(format!(
                "the trace holds {starts} starts and {waits} waits for {steps} steps of {per_step} launches"
            )));
        }
        let start = |i: usize| host[2 + i] as f64;
        let wait = |i: usize| host[2 + TRACE_SLOTS + i] as f64;
        // Phases a kernel marks inside itself (KILN_PHASE in kiln.cuh): a log line each.
        let phases = &host[2 + 2 * TRACE_SLOTS..2 + 2 * TRACE_SLOTS + 16];
        for k in 0..8 {
            if phases[8 + k] > 0 {
                let mean = phases[k] as f64 / phases[8 + k] as f64 / 1e3;
                tracing::info!(phase = k, samples = phases[8 + k], "kernel phase {k}: {mean:.2} µs after its wait");
            }
        }
        if trace_blocks_by_env() && host.len() > 2 + 2 * TRACE_SLOTS + 16 {
            let q = &host[2 + 2 * TRACE_SLOTS + 16..];
            let n = (q[0] as usize).min(TRACE_BLOCK_SLOTS);
            let entries: Vec<(u64, u64, u64)> = (0..n).map(|i| (q[1 + 3 * i], q[2 + 3 * i], q[3 + 3 * i])).collect();
            match block_residency(&entries, steps, per_step) {
                Some(rows) => tracing::info!("block residency per launch:\n{}", residency_table(&labels, &rows)),
                None => {
                    tracing::warn!(entries = q[0], "the block trace does not hold {steps} steps of {per_step} launches")
                }
            }
        }
        Ok((0..per_step - 1)
            .map(|j| {
                let (mut crit, mut lead) = (0.0, 0.0);
                for r in 0..steps {
                    let i = r * per_step + j;
                    crit += wait(i + 1) - wait(i);
                    lead += wait(i) - start(i);
                }
                (labels[j].clone(), crit / steps as f64 / 1e3, lead / steps as f64 / 1e3)
            })
            .collect())
    }

    /// The step-end kernel: records the sampled ids, advances `past` on the device.
    fn launch_step_end(&self) -> Result<(), CudaError> {
        let mut a = Args::default();
        a.set(Role::Out(0), ArgValue::Ptr(dev(&self.history, &self.stream)))
            .set(Role::Out(1), ArgValue::Ptr(dev(&self.counter, &self.stream)))
            .set(Role::In(0), ArgValue::Ptr(dev(&self.ids_decode, &self.stream)))
            .set(Role::Syms, ArgValue::Ptr(dev(&self.syms_dev, &self.stream)))
            .i64(Role::N, self.batch)
            .i64(Role::Len, self.opts.max_context);
        launch(self.lane(), &self.kernels[self.step_end], 1, &a)
    }

    /// The step end of `KILN_GREEDY_KEY` / `KILN_GREEDY_FOLD`: the keys in greedy_keys
    /// become the ids (`resident::step_end_key`), recorded, and are zeroed.
    fn launch_step_end_key(&self) -> Result<(), CudaError> {
        let Some((_, sek)) = self.greedy_key else { return Err(contract("no step_end_key kernel".into())) };
        let mut a = Args::default();
        a.set(Role::Out(0), ArgValue::Ptr(dev(&self.history, &self.stream)))
            .set(Role::Out(1), ArgValue::Ptr(dev(&self.counter, &self.stream)))
            .set(Role::Out(2), ArgValue::Ptr(dev(&self.ids_decode, &self.stream)))
            .set(Role::Out(3), ArgValue::Ptr(dev(&self.greedy_keys, &self.stream)))
            .set(Role::Syms, ArgValue::Ptr(dev(&self.syms_dev, &self.stream)))
            .i64(Role::N, self.batch)
            .i64(Role::Len, self.opts.max_context);
        launch(self.lane(), &self.kernels[sek], 1, &a)
    }

    /// Whether a decode step of the running batch folds greedy sampling into the LM head
    /// (`KILN_GREEDY_FOLD=1`, batch 1, an LM head with the sampling GEMV).
    fn folds(&self) -> bool {
        self.lm_head_argmax.is_some() && self.greedy_key.is_some() && self.batch == 1
    }

    /// The logits' cast that the last (folding) decode step skipped, launched now on its
    /// memory plan: the LM head's y is still in the arena (the cast is the step's last
    /// reader, and no launch since has written the arena).
    fn logits_cast(&mut self) -> Result<(), CudaError> {
        let Some(c) = self.logits_cast else { return Ok(()) };
        let b = self.bindings(self.batch, 1, self.past - 1);
        let plan = self.prepare(&b)?;
        let step = &self.steps[c];
        let Run::Kernel(k) = step.run else { unreachable!("the logits' cast is a kernel step") };
        let node = self.graph.node(step.node);
        let ins = self.graph.operands(step.node);
        let shape = |v: Value| self.graph.value_type(v).shape.eval(&b).map_err(contract);
        let ins: Vec<(u64, Vec<usize>)> =
            ins.iter().map(|&v| Ok((self.ptr(v, &plan, 0, true)?, shape(v)?))).collect::<Result<_, CudaError>>()?;
        let out = Value::new(step.node, 0);
        let outs = [(self.ptr(out, &plan, 0, true)?, shape(out)?)];
        let ins: Vec<(u64, &[usize])> = ins.iter().map(|(p, s)| (*p, s.as_slice())).collect();
        let outs: Vec<(u64, &[usize])> = outs.iter().map(|(p, s)| (*p, s.as_slice())).collect();
        let syms = dev(&self.syms_dev, &self.stream);
        launch_node(self.lane(), &self.kernels[k], &node.op, &ins, &outs, &b, syms)?;
        self.logits_stale = false;
        Ok(())
    }

    /// One decode step's launches: the graph, greedy sampling into the ids, step end.
    fn record_step(&self, b: &Bindings, plan: &MemoryPlan, captured: bool) -> Result<usize, CudaError> {
        let early = captured && self.opts.attention_early && !attention_early_off_by_env();
        if self.folds() {
            // The LM head samples (its key in greedy_keys); the step end decodes it.
            self.fold_now.set(true);
            let n = self.run_steps(b, plan, 0, true, early);
            self.fold_now.set(false);
            self.launch_step_end_key()?;
            return Ok(n? + 1);
        }
        let mut n = self.run_steps(b, plan, 0, true, early)?;
        match self.greedy_key {
            Some((gk, _)) => {
                let (rows, splits) = (self.batch, decode::greedy_splits(self.vocab));
                let keys = dev(&self.greedy_keys, &self.stream);
                let mut a = Args::default();
                a.set(Role::Out(0), ArgValue::Ptr(keys))
                    .set(Role::In(0), ArgValue::Ptr(self.ptr(self.logits, plan, 0, false)?))
                    .i64(Role::N, rows)
                    .i64(Role::Len, self.vocab)
                    .i64(Role::Splits, splits);
                launch(self.lane(), &self.kernels[gk], decode::greedy_items(rows, splits), &a)?;
                self.launch_step_end_key()?;
            }
            None => {
                self.sample(plan, self.batch, dev(&self.ids_decode, &self.stream))?;
                self.launch_step_end()?;
            }
        }
        n += 2;
        Ok(n)
    }

    /// Queues one decode step for every sequence of the running batch (their inputs are
    /// the tokens the previous step sampled, already on the device). Does not wait.
    pub fn decode_step(&mut self) -> Result<(), CudaError> {
        if self.batch == 0 {
            return Err(contract("decode_step before prefill".into()));
        }
        if self.past + 1 > self.opts.max_context {
            return Err(contract(format!("the context of {} positions is full", self.opts.max_context)));
        }
        self.ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        let b = self.bindings(self.batch, 1, self.past);
        let plan = self.prepare(&b)?;
        let capture = self.opts.cuda_graphs && self.not_capturable.is_none();
        // One graph per batch size and side of the long-context bound (the attention
        // kernel differs).
        let key = (self.batch, self.past + 1 > self.opts.attention_long_keys);
        if capture {
            if !self.graphs.contains_key(&key) {
                self.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(driver_err("begin capture"))?;
                let recorded = self.record_step(&b, &plan, true);
                let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
                let n = recorded?;
                let graph =
                    graph.map_err(driver_err("end capture"))?.ok_or_else(|| contract("empty capture".into()))?;
                self.launches_per_step = n;
                tracing::debug!(batch = self.batch, launches = n, "decode step captured as a CUDA graph");
                self.graphs.insert(key, graph);
            }
            self.graphs[&key].launch().map_err(driver_err("graph launch"))?;
        } else {
            self.launches_per_step = self.record_step(&b, &plan, false)?;
        }
        self.logits_stale = self.folds() && self.logits_cast.is_some();
        self.past += 1;
        Ok(())
    }

    /// Replaces the next decode step's input tokens (one per running sequence), for
    /// tokens sampled on the host.
    pub fn set_tokens(&mut self, tokens: &[u32]) -> Result<(), CudaError> {
        if tokens.len() != self.batch {
            return Err(contract(format!("{} tokens for a batch of {}", tokens.len(), self.batch)));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(contract(format!("token id {t} is outside the vocabulary of {}", self.vocab)));
        }
        let bytes: Vec<u8> = tokens.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
        // SAFETY: `ids_decode` holds max_batch >= batch i64s; staged before returning.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dev(&self.ids_decode, &self.stream),
                &bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(driver_err("upload tokens"))
    }

    /// Waits for the queued steps; returns every sequence's tokens since the prefill
    /// (the prefill's sampled token first).
    pub fn tokens(&mut self) -> Result<Vec<Vec<u32>>, CudaError> {
        self.synchronize()?;
        let mut count = [0i64];
        self.stream.memcpy_dtoh(&self.counter, &mut count).map_err(driver_err("download"))?;
        let cap = self.opts.max_context;
        let mut hist = vec![0i64; self.batch * cap];
        if !hist.is_empty() {
            self.stream
                .memcpy_dtoh(&self.history.slice(0..self.batch * cap), &mut hist)
                .map_err(driver_err("download"))?;
        }
        let count = (count[0].max(0) as usize).min(cap);
        Ok((0..self.batch)
            .map(|b| {
                std::iter::once(self.first[b]).chain(hist[b * cap..b * cap + count].iter().map(|&t| t as u32)).collect()
            })
            .collect())
    }

    /// Blocks until the device has finished everything queued.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }

    /// The logits `[batch, vocab]` of the last forward pass (prefill: of the last prompt
    /// only, in row 0), after waiting for the queue. For checks and debugging.
    pub fn logits(&mut self) -> Result<Vec<f32>, CudaError> {
        if self.logits_stale {
            self.logits_cast()?;
        }
        self.synchronize()?;
        let Some(Loc::Output(i)) = self.locs.get(&self.logits).copied() else {
            return Err(contract("the logits have no buffer".into()));
        };
        let buf = self.outputs[i].buf.as_ref().ok_or_else(|| contract("nothing has run yet".into()))?;
        let n = self.batch.max(1) * self.vocab * 4;
        let mut host = vec![0u8; n];
        self.stream.memcpy_dtoh(&buf.slice(0..n), &mut host).map_err(driver_err("download logits"))?;
        Ok(host.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gemv_split_overrides_parse_and_skip_malformed_entries() {
        let c = |warps, rows_per_warp, unroll| super::decode::GemvConfig {
            warps,
            rows_per_warp,
            unroll,
            ksplit: 1,
            max_rows: 1,
        };
        let got = super::parse_gemv_cfgs("2048x8192=w16r1u16, 3072x2048=w12r2u4,bad,1x2=w8,4x4=r1u2");
        assert_eq!(got, vec![("2048x8192".to_string(), c(16, 1, 16)), ("3072x2048".to_string(), c(12, 2, 4))]);
        assert!(super::parse_gemv_cfgs("").is_empty());
    }

    /// Block entries are assigned to launches by their wait and grid, and each launch's
    /// early blocks and last start are counted against its block 0's wait (hand-made
    /// trace: two steps of two launches, 3 and 2 blocks).
    #[test]
    fn block_residency_assigns_blocks_to_launches() {
        let m = |grid: u64, b: u64, sm: u64| sm << 48 | grid << 24 | b;
        let mut e = Vec::new();
        for off in [0u64, 10_000] {
            // Launch A (3 blocks): the kernel before it completes at 1,000.
            e.push((off + 500, off + 1_000, m(3, 0, 0)));
            e.push((off + 600, off + 1_000, m(3, 1, 1)));
            e.push((off + if off == 0 { 1_500 } else { 1_200 }, off + 1_500, m(3, 2, 0)));
            // Launch B (2 blocks): A completes at 3,000; block 1 waited 10 ns before
            // block 0 did (block 0 started later), so it belongs to B by its grid.
            e.push((off + 1_300, off + 3_000, m(2, 0, 2)));
            e.push((off + 1_250, off + 2_990, m(2, 1, 3)));
        }
        // A block that started after its wait is ignored, as is a never-started one.
        e.push((5_000, 4_000, m(2, 1, 3)));
        e.push((0, 4_000, m(2, 1, 3)));
        let r = super::block_residency(&e, 2, 2).expect("4 launches");
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].grid, r[0].recorded, r[0].early, r[0].sms), (3.0, 3.0, 2.0, 2.0));
        assert!((r[0].last_start_us - 0.35).abs() < 1e-9, "{:?}", r[0]);
        assert_eq!((r[1].grid, r[1].recorded, r[1].early, r[1].sms), (2.0, 2.0, 2.0, 2.0));
        assert!((r[1].last_start_us - (-1.7)).abs() < 1e-9, "{:?}", r[1]);
        // A ring that does not hold the launches asked for.
        assert!(super::block_residency(&e, 3, 2).is_none());
        let t = super::residency_table(&["a @x".into(), "b @y".into()], &r);
        assert!(t.contains("       3       3.0      2.0        0.35    2.0         1  a @x"), "{t}");
    }

    /// The read-ahead table: each GEMV's entry names the next one's first rows (both
    /// slices of an epilogue, the budget split), the last wraps to the first, a slice
    /// shorter than its share is read whole, and a skip moves every range past its head.
    #[test]
    fn readahead_entries_name_the_next_weights_heads() {
        use super::RaWeight;
        let qkv = RaWeight { ptr: 0x1000_0000, row_bytes: 4096, slices: vec![(0, 3072)] };
        let gate_up = RaWeight { ptr: 0x2000_0000, row_bytes: 4096, slices: vec![(0, 8192), (8192, 8192)] };
        let tiny = RaWeight { ptr: 0x3000_0000, row_bytes: 128, slices: vec![(0, 10)] };
        let all = [qkv, gate_up, tiny];
        let e = super::readahead_entries(&all, 1 << 20, 0);
        assert_eq!(e[0], [0x1000_0000, 0x2000_0000, 512 << 10, 0x2000_0000 + 8192 * 4096, 512 << 10]);
        assert_eq!(e[1], [0x2000_0000, 0x3000_0000, 1280, 0, 0]);
        assert_eq!(e[2], [0x3000_0000, 0x1000_0000, 1 << 20, 0, 0]);
        // Skipping 1 KiB of each slice's head (all of the tiny weight but 256 bytes).
        let e = super::readahead_entries(&all, 1 << 20, 1024);
        assert_eq!(e[0], [0x1000_0000, 0x2000_0400, 512 << 10, 0x2000_0400 + 8192 * 4096, 512 << 10]);
        assert_eq!(e[1], [0x2000_0000, 0x3000_0400, 256, 0, 0]);
        assert_eq!(e[2], [0x3000_0000, 0x1000_0400, 1 << 20, 0, 0]);
    }

    /// Timeline labels sum the layers: layer numbers become `*`, names stay.
    #[test]
    fn generic_scopes_replace_layer_numbers() {
        assert_eq!(super::generic_scope("model.layers.13.mlp.down_proj"), "model.layers.*.mlp.down_proj");
        assert_eq!(super::generic_scope("model.layers"), "model.layers");
        assert_eq!(super::generic_scope("h2.attn.0"), "h2.attn.*");
        assert_eq!(super::generic_scope(""), "");
    }
}
