//! `kiln bench`: prefill and decode throughput of a model on the GPU engine, with the
//! memory it uses, the kernels a decode step launches, the measured copy bandwidth and
//! the decode roofline that bandwidth implies.
//!
//! ```text
//! kiln bench --preset llama-3.2-1b | --model DIR|FILE.gguf | --plan PLAN [--dtype bf16] [--prefill 128,2048]
//!     [--batch 1,8,64] [--decode-steps 128] [--json OUT] [--no-cuda-graphs] [--seed S] [--gpu N]
//! ```
//!
//! What is measured, and how:
//! * **prefill** (batch 1, for each length): one warm-up, then the median of
//!   [`PREFILL_REPS`] timed `prefill` calls (each returns the sampled token, so it ends
//!   synchronized); tokens/s = length / time.
//! * **decode** (for each batch size): every sequence is prefilled with
//!   `--decode-prompt` tokens ([`DECODE_PROMPT`] by default), [`DECODE_WARMUP`] steps
//!   are run and synchronized, then
//!   `decode_steps` steps are queued and the device is synchronized once at the end;
//!   tokens/s = batch · steps / time, the median of [`DECODE_REPS`] such runs.
//! * **roofline**: a decode step must read every weight once (a tied embedding table,
//!   read whole by the `lm_head`, counts once; a table that is only gathered counts the
//!   gathered rows) and the KV cache of every sequence up to the current position. At
//!   the measured mean context that is [`StepBytes`]; `roofline tokens/s = batch ·
//!   bandwidth / bytes per step`, with the bandwidth of a device-to-device copy
//!   ([`kiln_runtime::cuda::bandwidth::copy_bandwidth`], read + write bytes).
//!
//! With `--plan PLAN` (from `kiln build`) the engine comes from the plan: no tracing,
//! passes or kernel compilation; its dtype, max batch, max context and CUDA-graph setting
//! are the plan's, and the report gives the load time of each part (read, parse,
//! weights, engine, of which kernels) and how many kernels were prebuilt.
//!
//! Without a GPU, [`run`] fails with "kiln bench needs a CUDA GPU: <reason>".

use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_models::ModelError;
use kiln_ops::{DType, HostTensor, Op};
use kiln_passes::PassError;
use kiln_runtime::cuda::{bandwidth, CompileStats, CudaError, DeviceInfo};
use kiln_runtime::plan::{ExecutablePlan, ModelSource, PlanError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Timed prefill calls per length (after one warm-up).
pub const PREFILL_REPS: usize = 5;
/// Timed decode runs per batch size.
pub const DECODE_REPS: usize = 3;
/// Prompt length of every sequence before a decode measurement.
pub const DECODE_PROMPT: usize = 128;
/// Decode steps run (and synchronized) before the timed steps.
pub const DECODE_WARMUP: usize = 8;
/// Size of the buffer copied to measure the bandwidth (far larger than any L2 cache).
pub const BANDWIDTH_BYTES: usize = 1 << 30;
/// Timed copies for the bandwidth (median).
pub const BANDWIDTH_ITERS: usize = 20;

/// Errors of `kiln bench`; each names the option, model or device at fault.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("kiln bench needs a CUDA GPU: {0}")]
    NoGpu(String),
    #[error("--{option}: {msg}")]
    Option { option: &'static str, msg: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Graph(#[from] kiln_graph::Error),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The engine did something the measurement cannot use (too few tokens, …).
    #[error("engine: {0}")]
    Engine(String),
    #[error("cannot write `{path}`: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

fn opt_err(option: &'static str, msg: impl Into<String>) -> BenchError {
    BenchError::Option { option, msg: msg.into() }
}

/// The command line of `kiln bench` (also usable as a library: see [`run`]).
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["preset", "model", "plan"])))]
pub struct BenchArgs {
    /// A model preset with random weights: llama-3.2-1b, llama-3-8b, smollm2-135m.
    #[arg(long)]
    pub preset: Option<String>,
    /// An HF checkpoint directory or a GGUF file (its real weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// An executable plan (`kiln build`): its engine, with its dtype and limits, loaded
    /// without tracing, passes or kernel compilation.
    #[arg(
        long,
        conflicts_with_all = [
            "dtype", "seed", "no_fusion", "no_cuda_graphs", "no_pdl", "no_hfuse", "no_epilogue_gemv",
            "no_scaled_gemv", "no_attention_early", "no_attention_fused", "attention_long_keys", "timeline"
        ]
    )]
    pub plan: Option<PathBuf>,
    /// Storage dtype of weights, activations and KV cache.
    #[arg(long, default_value = "bf16", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// Prefill lengths (batch 1), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 2048])]
    pub prefill: Vec<usize>,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    pub batch: Vec<usize>,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 128)]
    pub decode_steps: usize,
    /// Prompt length of every sequence before a decode measurement: the decode context
    /// starts here (transformers' baseline in `tools/bench_hf.py` keeps 128).
    #[arg(long, default_value_t = DECODE_PROMPT)]
    pub decode_prompt: usize,
    /// Keys above which decode attention takes whole GQA groups per block rather than
    /// one query head per block (default: the engine's, 2,048), for comparison.
    #[arg(long)]
    pub attention_long_keys: Option<usize>,
    /// Write every number as a JSON object to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Launch kernels one by one instead of replaying CUDA graphs.
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Launch kernels without programmatic dependent launch (by default each may start
    /// while the previous one drains, on Hopper and later), for comparison.
    #[arg(long)]
    pub no_pdl: bool,
    /// Launch every kernel separately: no horizontal fusion of independent kernels (a
    /// layer's RoPE of q and its KV appends are one launch by default), for comparison.
    /// `KILN_HFUSE=0` in the environment does the same.
    #[arg(long)]
    pub no_hfuse: bool,
    /// Never let a GEMV compute its group's epilogue (SwiGLU after gate_up): the GEMV
    /// writes y and the epilogue's own kernel follows, for comparison.
    /// `KILN_EPILOGUE_GEMV=0` in the environment does the same.
    #[arg(long)]
    pub no_epilogue_gemv: bool,
    /// Never let a GEMV compute a norm prologue as a scale after its products (the
    /// scaled GEMV): the norm's own kernel writes x and the GEMV reads it, for
    /// comparison. `KILN_SCALED_GEMV=0` in the environment does the same.
    #[arg(long)]
    pub no_scaled_gemv: bool,
    /// Decode attention waits for the previous kernel before it reads anything (by
    /// default, in the captured decode step, it issues the copies of earlier steps'
    /// cache rows first), for comparison. `KILN_ATTN_EARLY=0` in the environment does
    /// the same.
    #[arg(long)]
    pub no_attention_early: bool,
    /// Decode attention reads q and the caches from memory, written by the launch of
    /// their producers (a layer's RoPE and cache appends), instead of computing them
    /// itself, for comparison. `KILN_ATTN_FUSED=0` in the environment does the same.
    #[arg(long)]
    pub no_attention_fused: bool,
    /// Run every one-row weight product as the tiled GEMV, without the streaming GEMV
    /// that short rows take by default, for comparison. `KILN_STREAM_GEMV=0` in the
    /// environment does the same.
    #[arg(long)]
    pub no_stream_gemv: bool,
    /// Also time every launch of one batch-1 decode step (CUDA graph with an event after
    /// each launch) and print where the step's time goes, per kernel and module.
    #[arg(long)]
    pub profile: bool,
    /// Also trace the batch-1 decode step in place (every kernel compiled with timeline
    /// tracing: the engine's `trace` option) and print each launch's share of the step's
    /// critical path, with PDL and CUDA graphs as in production. A diagnostic: the
    /// tracing itself costs a little, so the run's other numbers are not the untraced
    /// build's.
    #[arg(long)]
    pub timeline: bool,
    /// Skip the fusion pass (canonicalization only): the "before" column of the
    /// pipeline's effect on kernels per step, memory and speed.
    #[arg(long)]
    pub no_fusion: bool,
    /// Seed of the random weights (presets).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

impl BenchArgs {
    /// Default options for preset `name`.
    pub fn preset(name: &str) -> BenchArgs {
        BenchArgs {
            preset: Some(name.into()),
            model: None,
            plan: None,
            dtype: "bf16".into(),
            prefill: vec![128, 2048],
            batch: vec![1, 8, 64],
            decode_steps: 128,
            decode_prompt: DECODE_PROMPT,
            attention_long_keys: None,
            json: None,
            no_cuda_graphs: false,
            no_pdl: false,
            no_hfuse: false,
            no_epilogue_gemv: false,
            no_scaled_gemv: false,
            no_attention_early: false,
            no_attention_fused: false,
            no_stream_gemv: false,
            no_fusion: false,
            profile: false,
            timeline: false,
            seed: 0,
            gpu: 0,
        }
    }

    fn dtype(&self) -> Result<DType, BenchError> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(opt_err("dtype", format!("`{other}` is not one of f32, f16, bf16"))),
        }
    }

    /// Checks the lists and sizes against each other and the model's context.
    fn check(&self, max_positions: usize) -> Result<(), BenchError> {
        if self.prefill.is_empty() {
            return Err(opt_err("prefill", "no lengths given"));
        }
        if let Some(&bad) = self.prefill.iter().find(|&&n| n == 0 || n >= max_positions) {
            return Err(opt_err(
                "prefill",
                format!("length {bad} must be in 1..{max_positions} (the model's max_position_embeddings)"),
            ));
        }
        if self.batch.is_empty() || self.batch.contains(&0) {
            return Err(opt_err("batch", "batch sizes must be positive"));
        }
        if self.decode_steps == 0 {
            return Err(opt_err("decode-steps", "must be positive"));
        }
        if self.decode_prompt == 0 {
            return Err(opt_err("decode-prompt", "must be positive"));
        }
        if decode_context_end(self.decode_prompt, self.decode_steps) >= max_positions {
            return Err(opt_err(
                "decode-steps",
                format!(
                    "{} prompt + {DECODE_WARMUP} warm-up + {} steps exceed the model's {max_positions} positions",
                    self.decode_prompt, self.decode_steps
                ),
            ));
        }
        Ok(())
    }
}

/// Positions used by a decode run: prompt, warm-up and timed steps.
fn decode_context_end(prompt: usize, steps: usize) -> usize {
    prompt + DECODE_WARMUP + steps
}

/// Mean number of positions a timed decode step attends to: step `j` (0-based) runs at
/// past = prompt + warm-up + j and attends to past + 1 positions.
pub fn mean_decode_context(prompt: usize, warmup: usize, steps: usize) -> f64 {
    (prompt + warmup) as f64 + (steps as f64 + 1.0) / 2.0
}

// ---- roofline arithmetic -------------------------------------------------------------

/// Bytes a decode step must move from device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StepBytes {
    /// Every parameter once; a table only gathered from counts the gathered rows.
    pub weights: usize,
    /// Keys and values of every layer and sequence at the given context.
    pub kv_cache: usize,
}

impl StepBytes {
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache
    }
}

/// Storage bytes of every parameter of `graph` (each once).
pub fn weight_bytes(graph: &Graph) -> usize {
    graph
        .params()
        .values()
        .map(|&n| {
            let ty = &graph.node(n).outputs[0];
            ty.dtype.bytes_for(ty.shape.as_fixed().map_or(0, |s| s.iter().product()))
        })
        .sum()
}

/// What one decode step of `graph` (the model contract of [`kiln_models::llama`]: KV
/// inputs `past.*` shaped `[batch, past, kv_heads, head_dim]`) reads at `batch`
/// sequences attending to `context` positions each.
pub fn decode_step_bytes(graph: &Graph, batch: usize, context: usize) -> Result<StepBytes, BenchError> {
    let mut weights = 0;
    for (name, &n) in graph.params() {
        let ty = &graph.node(n).outputs[0];
        let shape = ty
            .shape
            .as_fixed()
            .ok_or_else(|| BenchError::Engine(format!("parameter `{name}` has a symbolic shape {}", ty.shape)))?;
        let users = graph.users(n);
        let only_gathered = !users.is_empty()
            && users.iter().all(|&(u, slot)| slot == 0 && matches!(graph.node(u).op, Op::Gather { axis: 0 }));
        let elems = if only_gathered && !shape.is_empty() {
            // One row per sequence (a decode step embeds one token each).
            batch.min(shape[0]) * shape[1..].iter().product::<usize>()
        } else {
            shape.iter().product()
        };
        weights += ty.dtype.bytes_for(elems);
    }
    let mut kv_cache = 0;
    for (name, &n) in graph.inputs().iter().filter(|(name, _)| name.starts_with("past.")) {
        let ty = &graph.node(n).outputs[0];
        let dims = ty.shape.dims();
        let row: Option<usize> = dims.get(2..).and_then(|d| d.iter().map(|d| d.as_fixed()).product());
        let row = row.filter(|_| dims.len() >= 3).ok_or_else(|| {
            BenchError::Engine(format!(
                "KV input `{name}` is {}; expected [batch, past, kv_heads, head_dim] with fixed head dims",
                ty.shape
            ))
        })?;
        kv_cache += ty.dtype.bytes_for(batch * context * row);
    }
    Ok(StepBytes { weights, kv_cache })
}

/// The decode rate memory bandwidth allows: `batch · bandwidth / bytes per step`.
pub fn roofline_tokens_per_s(bandwidth: f64, batch: usize, bytes: StepBytes) -> f64 {
    batch as f64 * bandwidth / bytes.total() as f64
}

// ---- the report ----------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub gpu: String,
    pub gpu_index: usize,
    pub compute_capability: String,
    pub multiprocessors: i32,
    pub gpu_memory_bytes: usize,
    /// The NVIDIA driver version (`nvidia-smi`), or "unknown".
    pub driver: String,
    /// The CUDA version the driver supports (`cuDriverGetVersion`).
    pub cuda_driver_api: String,
    pub nvrtc: String,
    /// UTC, ISO 8601.
    pub date: String,
    pub kiln_commit: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The preset name or the checkpoint path.
    pub name: String,
    /// `random weights, seed S` (presets) or `checkpoint weights`.
    pub weights: String,
    pub dtype: String,
    pub parameters: usize,
    pub weight_bytes: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// The HF `config.json` (presets and checkpoint directories; null for GGUF).
    pub hf_config: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrefillResult {
    pub tokens: usize,
    pub batch: usize,
    pub median_ms: f64,
    pub tokens_per_s: f64,
    pub runs_ms: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub steps: usize,
    /// Mean positions attended per timed step.
    pub mean_context: f64,
    pub median_ms_per_step: f64,
    /// Generated tokens per second, all sequences together.
    pub tokens_per_s: f64,
    pub runs_ms: Vec<f64>,
    /// Kernel launches (kernels and cuBLAS calls) of one decode step at this batch.
    pub launches_per_step: usize,
    pub bytes_per_step: StepBytes,
    pub roofline_tokens_per_s: f64,
    /// `tokens_per_s / roofline_tokens_per_s`.
    pub roofline_fraction: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    pub weights: usize,
    pub kv_cache: usize,
    /// The activations arena.
    pub arena: usize,
    pub workspace: usize,
    pub total: usize,
    /// `total - free` of the whole device after the engine was built (other processes
    /// and the CUDA context included); 0 when unknown.
    pub device_used: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `--profile`: (label, launches, µs) of one batch-1 decode step, the total last.
    pub profile: Option<Vec<(String, usize, f64)>>,
    /// `--timeline`: every launch of the batch-1 decode step but the step end, in
    /// launch order: (kernel and module, µs on the critical path, µs resident before
    /// its wait returned).
    pub timeline: Option<Vec<(String, f64, f64)>>,
    pub machine: Machine,
    pub model: ModelInfo,
    pub cuda_graphs: bool,
    /// Whether kernels were launched with programmatic dependent launch (off with `--no-pdl`).
    pub pdl: bool,
    /// Whether the fusion pass ran (`--no-fusion` turns it off).
    pub fusion: bool,
    /// Whether independent kernels were launched together (horizontal fusion; off with
    /// `--no-hfuse` or `KILN_HFUSE=0`).
    pub horizontal: bool,
    /// Whether a GEMV could compute its group's epilogue (off with `--no-epilogue-gemv`
    /// or `KILN_EPILOGUE_GEMV=0`).
    pub epilogue_gemv: bool,
    /// Whether a GEMV could compute a norm prologue as a scale after its products (off
    /// with `--no-scaled-gemv` or `KILN_SCALED_GEMV=0`).
    pub scaled_gemv: bool,
    /// Whether decode attention read earlier steps' cache rows before its wait (off
    /// with `--no-attention-early` or `KILN_ATTN_EARLY=0`).
    pub attention_early: bool,
    /// Whether decode attention computed q and the new K/V rows itself (off with
    /// `--no-attention-fused` or `KILN_ATTN_FUSED=0`).
    pub attention_fused: bool,
    /// Whether one-row products over short weight rows ran as the streaming GEMV (off
    /// with `--no-stream-gemv` or `KILN_STREAM_GEMV=0`).
    #[serde(default)]
    pub stream_gemv: bool,
    /// Whether matrix-vector groups ran as one GEMV computing its x
    /// (`KILN_MATVEC=fused`) rather than the prologue's kernel and a GEMV.
    pub matvec_one_kernel: bool,
    pub engine_max_batch: usize,
    pub engine_max_context: usize,
    /// Device-to-device copy, read + written bytes per second.
    pub copy_bandwidth_bytes_per_s: f64,
    pub prefill: Vec<PrefillResult>,
    pub decode: Vec<DecodeResult>,
    /// Kernel launches of one decode step at batch 1 (else the first batch measured).
    pub launches_per_decode_step: usize,
    /// After every measurement (the arena is as large as the largest run needed).
    pub memory: MemoryUse,
    /// The batch-1 decode entry's roofline, when batch 1 was measured.
    pub roofline_batch1: Option<Roofline>,
    /// Seconds: random weights or checkpoint loading, passes, engine construction (with
    /// a plan: reading it, parsing its graph, weights, engine, of which kernels).
    pub setup_s: IndexMap<String, f64>,
    /// `--plan`: the plan and how its engine got its kernels.
    pub plan: Option<PlanUse>,
}

/// The plan a benchmark ran from.
#[derive(Clone, Debug, Serialize)]
pub struct PlanUse {
    pub path: String,
    pub key: String,
    pub bytes: usize,
    pub target: String,
    pub kernels: usize,
    pub prebuilt: usize,
    pub compiled: usize,
    pub cached: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Roofline {
    pub context: f64,
    pub bytes_per_step: usize,
    pub tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub percent: f64,
}

// ---- measurement, over any engine ----------------------------------------------------

/// What the measurement needs from an engine: the GPU engine implements it; the tests
/// use a fake.
pub(crate) trait Engine {
    fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<u32>, BenchError>;
    fn decode_step(&mut self) -> Result<(), BenchError>;
    fn tokens(&mut self) -> Result<Vec<Vec<u32>>, BenchError>;
    fn synchronize(&self) -> Result<(), BenchError>;
    fn launches_per_decode_step(&self) -> usize;
    /// `device_used` is left 0.
    fn memory(&self) -> MemoryUse;
    fn device(&self) -> &DeviceInfo;
    /// (label, launches, µs) of one decode step, slowest first, the total last.
    fn profile_decode_step(&mut self) -> Result<Vec<(String, usize, f64)>, BenchError> {
        Err(BenchError::Engine("this engine cannot profile a decode step".into()))
    }
    /// The in-graph timeline of `steps` decode steps (see `CudaEngine::timeline`).
    fn timeline(&mut self, _steps: usize) -> Result<Vec<(String, f64, f64)>, BenchError> {
        Err(BenchError::Engine("this engine cannot trace a decode step".into()))
    }
}

/// What the engine is built for.
pub(crate) struct EngineSpec {
    pub device: usize,
    pub max_batch: usize,
    pub max_context: usize,
    pub cuda_graphs: bool,
    pub pdl: bool,
    pub horizontal: bool,
    pub epilogue_gemv: bool,
    pub scaled_gemv: bool,
    pub attention_early: bool,
    pub attention_fused: bool,
    pub trace: bool,
    pub stream_gemv: bool,
    /// `None`: the engine's default.
    pub attention_long_keys: Option<usize>,
}

/// A deterministic prompt of `len` ids below `vocab` (sequence `seq` of a batch).
fn prompt(len: usize, vocab: usize, seq: usize) -> Vec<u32> {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn check_tokens(got: &[u32], vocab: usize, what: &str) -> Result<(), BenchError> {
    match got.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(BenchError::Engine(format!("{what}: token {t} is outside the vocabulary of {vocab}"))),
        None => Ok(()),
    }
}

/// Prefill of `len` tokens at batch 1: a warm-up, then [`PREFILL_REPS`] timed runs.
pub(crate) fn measure_prefill(e: &mut dyn Engine, len: usize, vocab: usize) -> Result<PrefillResult, BenchError> {
    let prompts = vec![prompt(len, vocab, 0)];
    let mut runs = Vec::with_capacity(PREFILL_REPS);
    for rep in 0..=PREFILL_REPS {
        let t = Instant::now();
        let next = e.prefill(&prompts)?;
        let dt = ms(t);
        if next.len() != 1 {
            return Err(BenchError::Engine(format!("prefill of 1 sequence returned {} tokens", next.len())));
        }
        check_tokens(&next, vocab, "prefill")?;
        if rep > 0 {
            runs.push(dt);
        }
    }
    let median_ms = bandwidth::median(&mut runs.clone());
    Ok(PrefillResult { tokens: len, batch: 1, median_ms, tokens_per_s: len as f64 / (median_ms / 1e3), runs_ms: runs })
}

/// Decode at `batch` sequences: per run a fresh prefill of `prompt_len` tokens,
/// [`DECODE_WARMUP`] synchronized steps, then `steps` steps queued with one
/// synchronization at the end. Returns the run times in ms (one per [`DECODE_REPS`]).
pub(crate) fn measure_decode(
    e: &mut dyn Engine,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    vocab: usize,
) -> Result<Vec<f64>, BenchError> {
    let prompts: Vec<Vec<u32>> = (0..batch).map(|s| prompt(prompt_len, vocab, s)).collect();
    let mut runs = Vec::with_capacity(DECODE_REPS);
    for _ in 0..DECODE_REPS {
        let first = e.prefill(&prompts)?;
        if first.len() != batch {
            return Err(BenchError::Engine(format!("prefill of {batch} sequences returned {} tokens", first.len())));
        }
        for _ in 0..DECODE_WARMUP {
            e.decode_step()?;
        }
        e.synchronize()?;
        let t = Instant::now();
        for _ in 0..steps {
            e.decode_step()?;
        }
        e.synchronize()?;
        runs.push(ms(t));
        let toks = e.tokens()?;
        if toks.len() != batch {
            return Err(BenchError::Engine(format!("tokens() returned {} sequences, expected {batch}", toks.len())));
        }
        for (i, seq) in toks.iter().enumerate() {
            if seq.len() < DECODE_WARMUP + steps {
                return Err(BenchError::Engine(format!(
                    "sequence {i} has {} tokens after {} decode steps",
                    seq.len(),
                    DECODE_WARMUP + steps
                )));
            }
            check_tokens(seq, vocab, "decode")?;
        }
    }
    Ok(runs)
}

fn decode_result(
    batch: usize,
    prompt_len: usize,
    steps: usize,
    mut runs: Vec<f64>,
    traced: &Graph,
    bw: f64,
) -> Result<DecodeResult, BenchError> {
    let median = bandwidth::median(&mut runs.clone());
    let tokens_per_s = (batch * steps) as f64 / (median / 1e3);
    let mean_context = mean_decode_context(prompt_len, DECODE_WARMUP, steps);
    let bytes = decode_step_bytes(traced, batch, mean_context.round() as usize)?;
    let roofline = roofline_tokens_per_s(bw, batch, bytes);
    runs.iter_mut().for_each(|r| *r = (*r * 1e3).round() / 1e3);
    Ok(DecodeResult {
        batch,
        steps,
        mean_context,
        median_ms_per_step: median / steps as f64,
        tokens_per_s,
        runs_ms: runs,
        launches_per_step: 0,
        bytes_per_step: bytes,
        roofline_tokens_per_s: roofline,
        roofline_fraction: tokens_per_s / roofline,
    })
}

// ---- the GPU engine ------------------------------------------------------------------

mod gpu {
    use super::{Backend, BenchError, Engine, EngineSpec, MemoryUse, BANDWIDTH_BYTES, BANDWIDTH_ITERS};
    use indexmap::IndexMap;
    use kiln_graph::Graph;
    use kiln_ops::HostTensor;
    use kiln_runtime::cuda::{bandwidth, CompileStats, CudaEngine, DeviceInfo, EngineOptions};
    use kiln_runtime::plan::{ExecutablePlan, LoadTimes};
    use std::path::Path;

    pub(super) struct Gpu;

    impl Backend for Gpu {
        fn check(&self, gpu: usize) -> Result<(), BenchError> {
            let info = kiln_runtime::cuda::device_info(gpu).map_err(BenchError::NoGpu)?;
            tracing::info!(gpu = %info, "kiln bench");
            Ok(())
        }

        fn copy_bandwidth(&self, gpu: usize) -> Result<f64, BenchError> {
            Ok(bandwidth::copy_bandwidth(gpu, BANDWIDTH_BYTES, BANDWIDTH_ITERS)?)
        }

        fn engine(
            &self,
            graph: Graph,
            weights: IndexMap<String, HostTensor>,
            spec: &EngineSpec,
        ) -> Result<Box<dyn Engine>, BenchError> {
            let opts = EngineOptions {
                device: spec.device,
                max_batch: spec.max_batch,
                max_context: spec.max_context,
                cuda_graphs: spec.cuda_graphs,
                pdl: spec.pdl,
                horizontal: spec.horizontal,
                epilogue_gemv: spec.epilogue_gemv,
                scaled_gemv: spec.scaled_gemv,
                attention_early: spec.attention_early,
                attention_fused: spec.attention_fused,
                trace: spec.trace,
                stream_gemv: spec.stream_gemv,
                attention_long_keys: spec
                    .attention_long_keys
                    .unwrap_or(kiln_codegen::decode::ATTENTION_DECODE_LONG_KEYS),
                ..Default::default()
            };
            Ok(Box::new(CudaEngine::new(graph, weights, opts)?))
        }

        fn device_used(&self, gpu: usize) -> usize {
            bandwidth::memory_info(gpu).map_or(0, |(free, total)| total.saturating_sub(free))
        }

        fn plan_engine(
            &self,
            plan: ExecutablePlan,
            read: f64,
            path: &Path,
            gpu: usize,
        ) -> Result<(Box<dyn Engine>, Graph, LoadTimes, CompileStats), BenchError> {
            let l = kiln_models::plan::load_opened(plan, read, path, gpu)?;
            Ok((Box::new(l.engine), l.graph, l.times, l.kernels))
        }
    }

    impl Engine for CudaEngine {
        fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<u32>, BenchError> {
            Ok(CudaEngine::prefill(self, prompts)?)
        }
        fn decode_step(&mut self) -> Result<(), BenchError> {
            Ok(CudaEngine::decode_step(self)?)
        }
        fn tokens(&mut self) -> Result<Vec<Vec<u32>>, BenchError> {
            Ok(CudaEngine::tokens(self)?)
        }
        fn synchronize(&self) -> Result<(), BenchError> {
            Ok(CudaEngine::synchronize(self)?)
        }
        fn launches_per_decode_step(&self) -> usize {
            CudaEngine::launches_per_decode_step(self)
        }
        fn profile_decode_step(&mut self) -> Result<Vec<(String, usize, f64)>, BenchError> {
            Ok(CudaEngine::profile_decode_step(self)?)
        }
        fn timeline(&mut self, steps: usize) -> Result<Vec<(String, f64, f64)>, BenchError> {
            Ok(CudaEngine::timeline(self, steps)?)
        }
        fn memory(&self) -> MemoryUse {
            let m = CudaEngine::memory(self);
            MemoryUse {
                weights: m.weights,
                kv_cache: m.kv_cache,
                arena: m.arena,
                workspace: m.workspace,
                total: m.total(),
                device_used: 0,
            }
        }
        fn device(&self) -> &DeviceInfo {
            CudaEngine::device(self)
        }
    }
}

/// The model and its weights: a preset with random weights, or a checkpoint.
fn load_model(args: &BenchArgs) -> Result<(String, LlamaForCausalLM, Weights), BenchError> {
    match (&args.preset, &args.model) {
        (Some(name), _) => {
            let model = LlamaForCausalLM::new(kiln_models::presets::preset(name)?)?;
            Ok((name.clone(), model, Weights::Random(args.seed)))
        }
        (None, Some(path)) => {
            let cfg = kiln_models::llm::load_config(path)?;
            Ok((path.display().to_string(), LlamaForCausalLM::new(cfg)?, Weights::Checkpoint(path.clone())))
        }
        (None, None) => Err(opt_err("preset", "give --preset NAME or --model DIR|FILE.gguf")),
    }
}

enum Weights {
    Random(u64),
    Checkpoint(PathBuf),
}

fn hf_config(preset: Option<&str>, model: Option<&Path>) -> Option<serde_json::Value> {
    let text = match (preset, model) {
        (Some(name), _) => kiln_models::presets::preset_json(name).ok()?.to_string(),
        (None, Some(dir)) if dir.is_dir() => std::fs::read_to_string(dir.join("config.json")).ok()?,
        _ => return None,
    };
    serde_json::from_str(&text).ok()
}

/// Runs the benchmark described by `args` on the GPU.
pub fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    run_on(args, &gpu::Gpu)
}

/// Where the benchmark runs: the GPU, or a fake in the tests.
pub(crate) trait Backend {
    /// Whether device `gpu` is usable ([`BenchError::NoGpu`] if not).
    fn check(&self, gpu: usize) -> Result<(), BenchError>;
    /// Read + written bytes per second of a large device-to-device copy.
    fn copy_bandwidth(&self, gpu: usize) -> Result<f64, BenchError>;
    fn engine(
        &self,
        graph: Graph,
        weights: IndexMap<String, HostTensor>,
        spec: &EngineSpec,
    ) -> Result<Box<dyn Engine>, BenchError>;
    /// Bytes in use on the whole device (0 when unknown).
    fn device_used(&self, gpu: usize) -> usize;
    /// The engine of a plan read from `path` (in `read` seconds): the plan's graph, the
    /// load times and how the kernels were obtained.
    fn plan_engine(
        &self,
        _plan: ExecutablePlan,
        _read: f64,
        _path: &Path,
        _gpu: usize,
    ) -> Result<(Box<dyn Engine>, Graph, kiln_runtime::plan::LoadTimes, CompileStats), BenchError> {
        Err(BenchError::Engine("this backend cannot load plans".into()))
    }
}

pub(crate) fn run_on(args: &BenchArgs, backend: &dyn Backend) -> Result<BenchReport, BenchError> {
    let mut setup = IndexMap::new();
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let max_prefill = args.prefill.iter().copied().max().unwrap_or(1);
    let (name, weights_desc, cfg, dtype, graph_info, fusion, cuda_graphs, max_context, mut engine, plan_use, bw);
    let (mut engine_max_batch, mut source) = (max_batch, None);
    if let Some(path) = &args.plan {
        let t = Instant::now();
        let plan = ExecutablePlan::open(path)?;
        let read = t.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len() as usize);
        cfg = kiln_models::plan::config(&plan.model.source)?;
        args.check(cfg.max_position_embeddings)?;
        let o = plan.options.clone();
        if max_batch > o.max_batch {
            return Err(opt_err("batch", format!("batch {max_batch} exceeds the plan's max batch {}", o.max_batch)));
        }
        let need = max_prefill.max(decode_context_end(args.decode_prompt, args.decode_steps)) + 1;
        if need > o.max_context {
            return Err(opt_err(
                "prefill",
                format!("the runs need {need} positions, the plan's max context is {}", o.max_context),
            ));
        }
        backend.check(args.gpu)?;
        tracing::info!(bytes = BANDWIDTH_BYTES, iters = BANDWIDTH_ITERS, "measuring copy bandwidth");
        bw = backend.copy_bandwidth(args.gpu)?;
        tracing::info!(gb_per_s = format!("{:.0}", bw / 1e9), "copy bandwidth");
        name = match &plan.model.source {
            ModelSource::Preset { name, .. } => name.clone(),
            ModelSource::Path(p) => p.clone(),
        };
        weights_desc = match &plan.model.source {
            ModelSource::Preset { seed, .. } => format!("random weights, seed {seed}"),
            ModelSource::Path(_) => "checkpoint weights".into(),
        };
        dtype = o.dtype().ok_or_else(|| opt_err("plan", format!("unknown dtype `{}`", o.dtype)))?;
        (fusion, cuda_graphs, max_context) = (o.pipeline == "default", o.cuda_graphs, o.max_context);
        let (key, target, kernels) = (plan.key.clone(), plan.target.to_string(), plan.kernels.len());
        (engine_max_batch, source) = (o.max_batch, Some(plan.model.source.clone()));
        let (e, g, times, stats) = backend.plan_engine(plan, read, path, args.gpu)?;
        for (k, v) in [
            ("plan read", times.read),
            ("plan graph parse", times.parse),
            ("weights", times.weights),
            ("engine", times.engine),
            ("engine kernels", times.kernels),
        ] {
            setup.insert(k.to_string(), v);
        }
        tracing::info!(prebuilt = stats.prebuilt, compiled = stats.compiled, "engine loaded from the plan");
        plan_use = Some(PlanUse {
            path: path.display().to_string(),
            key,
            bytes,
            target,
            kernels,
            prebuilt: stats.prebuilt,
            compiled: stats.compiled,
            cached: stats.cached,
        });
        (engine, graph_info) = (e, g);
    } else {
        dtype = args.dtype()?;
        let (n, model, weights_from) = load_model(args)?;
        name = n;
        cfg = model.config.clone();
        args.check(cfg.max_position_embeddings)?;
        backend.check(args.gpu)?;

        let t = Instant::now();
        let weights: IndexMap<String, HostTensor> = match &weights_from {
            Weights::Random(seed) => kiln_models::presets::random_weights(&model, dtype, *seed)?,
            Weights::Checkpoint(path) if kiln_models::llm::is_gguf(path) => {
                kiln_models::gguf::model::load_gguf(path, dtype)?.1
            }
            Weights::Checkpoint(path) => kiln_models::weights::load_weights(path, &model, dtype)?,
        };
        setup.insert("weights".to_string(), t.elapsed().as_secs_f64());
        let traced = model.trace(&TraceOptions { dtype, last_token_only: true })?;
        let t = Instant::now();
        let pipeline =
            if args.no_fusion { kiln_passes::pipeline::canonicalize() } else { kiln_passes::default_pipeline() };
        let graph = pipeline.run(traced.clone())?.graph;
        setup.insert("passes".to_string(), t.elapsed().as_secs_f64());

        tracing::info!(bytes = BANDWIDTH_BYTES, iters = BANDWIDTH_ITERS, "measuring copy bandwidth");
        bw = backend.copy_bandwidth(args.gpu)?;
        tracing::info!(gb_per_s = format!("{:.0}", bw / 1e9), "copy bandwidth");

        max_context = (max_prefill.max(decode_context_end(args.decode_prompt, args.decode_steps)) + 1)
            .min(cfg.max_position_embeddings);
        (fusion, cuda_graphs) = (!args.no_fusion, !args.no_cuda_graphs);
        let spec = EngineSpec {
            device: args.gpu,
            max_batch,
            max_context,
            cuda_graphs,
            pdl: !args.no_pdl,
            horizontal: !args.no_hfuse,
            epilogue_gemv: !args.no_epilogue_gemv,
            scaled_gemv: !args.no_scaled_gemv,
            attention_early: !args.no_attention_early,
            attention_fused: !args.no_attention_fused,
            trace: args.timeline,
            stream_gemv: !args.no_stream_gemv,
            attention_long_keys: args.attention_long_keys,
        };
        let t = Instant::now();
        engine = backend.engine(graph, weights, &spec)?;
        setup.insert("engine".to_string(), t.elapsed().as_secs_f64());
        tracing::info!(seconds = format!("{:.1}", t.elapsed().as_secs_f64()), "engine built");
        weights_desc = match weights_from {
            Weights::Random(seed) => format!("random weights, seed {seed}"),
            Weights::Checkpoint(_) => "checkpoint weights".into(),
        };
        graph_info = traced;
        plan_use = None;
    }
    let traced = &graph_info;

    let vocab = cfg.vocab_size;
    let mut prefill = Vec::new();
    for &len in &args.prefill {
        let r = measure_prefill(engine.as_mut(), len, vocab)?;
        tracing::info!(tokens = len, tokens_per_s = format!("{:.0}", r.tokens_per_s), "prefill");
        prefill.push(r);
    }
    let mut decode = Vec::new();
    for &batch in &args.batch {
        let runs = measure_decode(engine.as_mut(), batch, args.decode_prompt, args.decode_steps, vocab)?;
        let mut r = decode_result(batch, args.decode_prompt, args.decode_steps, runs, traced, bw)?;
        r.launches_per_step = engine.launches_per_decode_step();
        tracing::info!(batch, tokens_per_s = format!("{:.0}", r.tokens_per_s), "decode");
        decode.push(r);
    }
    let profile = if args.profile {
        engine.prefill(&[prompt(args.decode_prompt, vocab, 0)])?;
        Some(engine.profile_decode_step()?)
    } else {
        None
    };
    let timeline = if args.timeline {
        engine.prefill(&[prompt(args.decode_prompt, vocab, 0)])?;
        // Warm: the step's graph is captured and replayed once before the traced steps.
        engine.decode_step()?;
        engine.synchronize()?;
        Some(engine.timeline(args.decode_steps.clamp(2, 200))?)
    } else {
        None
    };
    // The arena grows to the largest plan run: read the memory after every measurement.
    let mut memory = engine.memory();
    memory.device_used = backend.device_used(args.gpu);
    let launches = decode.iter().find(|d| d.batch == 1).or(decode.first()).map_or(0, |d| d.launches_per_step);
    let roofline_batch1 = decode.iter().find(|d| d.batch == 1).map(|d| Roofline {
        context: d.mean_context,
        bytes_per_step: d.bytes_per_step.total(),
        tokens_per_s: d.roofline_tokens_per_s,
        decode_tokens_per_s: d.tokens_per_s,
        percent: 100.0 * d.roofline_fraction,
    });

    Ok(BenchReport {
        machine: machine(engine.device()),
        model: ModelInfo {
            name,
            weights: weights_desc,
            dtype: dtype.name().into(),
            parameters: kiln_models::presets::num_parameters(traced),
            weight_bytes: weight_bytes(traced),
            layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            hf_config: match &args.plan {
                None => hf_config(args.preset.as_deref(), args.model.as_deref()),
                Some(_) => match &source {
                    Some(ModelSource::Preset { name, .. }) => hf_config(Some(name), None),
                    Some(ModelSource::Path(p)) => hf_config(None, Some(Path::new(p))),
                    None => None,
                },
            },
        },
        cuda_graphs,
        pdl: !args.no_pdl,
        fusion,
        matvec_one_kernel: kiln_runtime::cuda::matvec_fused_gemv(),
        horizontal: !args.no_hfuse && !kiln_runtime::cuda::horizontal_off_by_env(),
        epilogue_gemv: !args.no_epilogue_gemv && !kiln_runtime::cuda::epilogue_gemv_off_by_env(),
        scaled_gemv: !args.no_scaled_gemv && !kiln_runtime::cuda::scaled_gemv_off_by_env(),
        attention_early: !args.no_attention_early && !kiln_runtime::cuda::attention_early_off_by_env(),
        attention_fused: !args.no_attention_fused && !kiln_runtime::cuda::attention_fused_off_by_env(),
        stream_gemv: !args.no_stream_gemv && !kiln_runtime::cuda::stream_gemv_off_by_env(),
        engine_max_batch,
        engine_max_context: max_context,
        copy_bandwidth_bytes_per_s: bw,
        prefill,
        decode,
        launches_per_decode_step: launches,
        memory,
        roofline_batch1,
        setup_s: setup,
        profile,
        timeline,
        plan: plan_use,
    })
}

/// The `--timeline` tables: the critical path per kernel and module (summed over the
/// step's launches, slowest first), then the first launches one by one.
fn timeline_table(launches: &[(String, f64, f64)]) -> String {
    use std::fmt::Write as _;
    let mut by: IndexMap<&str, (usize, f64, f64)> = IndexMap::new();
    for (label, us, lead) in launches {
        let e = by.entry(label).or_default();
        e.0 += 1;
        e.1 += us;
        e.2 += lead;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let mut s = String::new();
    let _ = writeln!(s, "\nthe batch-1 decode step in place (CUDA graph, PDL): critical path per kernel and module");
    let _ = writeln!(s, "{:>10} {:>9} {:>12}  kernel @module", "µs/step", "launches", "resident µs");
    for (label, (n, us, lead)) in &rows {
        let _ = writeln!(s, "{us:>10.1} {n:>9} {:>12.2}  {label}", lead / *n as f64);
    }
    let total: f64 = launches.iter().map(|l| l.1).sum();
    let _ = writeln!(s, "{total:>10.1} {:>9}               total, first wait to last", launches.len());
    let _ = writeln!(s, "\nthe first launches one by one:\n{:>10} {:>12}  kernel @module", "µs", "resident µs");
    for (label, us, lead) in launches.iter().take(24) {
        let _ = writeln!(s, "{us:>10.2} {lead:>12.2}  {label}");
    }
    s
}

/// `kiln bench`: runs, prints the table on stdout and writes the JSON when asked.
pub fn run_cli(args: &BenchArgs) -> Result<(), BenchError> {
    let report = run(args)?;
    print!("{}", report.table());
    if let Some(rows) = &report.profile {
        println!("\none decode step (batch 1), GPU time per kernel and module:");
        println!("{:>10} {:>9}  what", "µs", "launches");
        for (label, n, us) in rows {
            println!("{us:>10.1} {n:>9}  {label}");
        }
    }
    if let Some(launches) = &report.timeline {
        print!("{}", timeline_table(launches));
    }
    if let Some(path) = &args.json {
        report.write_json(path)?;
        tracing::info!(out = %path.display(), "JSON written");
    }
    Ok(())
}

// ---- machine description -------------------------------------------------------------

fn machine(info: &DeviceInfo) -> Machine {
    Machine {
        gpu: info.name.clone(),
        gpu_index: info.ordinal,
        compute_capability: format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
        multiprocessors: info.multiprocessors,
        gpu_memory_bytes: info.total_memory,
        driver: nvidia_driver(info.ordinal).unwrap_or_else(|| "unknown".into()),
        cuda_driver_api: format!("{}.{}", info.driver_version / 1000, info.driver_version % 1000 / 10),
        nvrtc: format!("{}.{}", info.nvrtc_version.0, info.nvrtc_version.1),
        date: utc_now(),
        kiln_commit: kiln_commit(),
    }
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).stderr(std::process::Stdio::null()).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn nvidia_driver(gpu: usize) -> Option<String> {
    let id = gpu.to_string();
    let out = command_output("nvidia-smi", &["--query-gpu=driver_version", "--format=csv,noheader", "-i", &id])?;
    out.lines().next().map(|l| l.trim().to_string())
}

/// The kiln commit: `KILN_GIT_COMMIT` at build time, else a `commit` file next to the
/// executable (what tools/gpu/build.sh writes: the commit the binary was built from;
/// the working tree it runs in may have another HEAD), else `git rev-parse` now, else
/// "unknown".
pub fn kiln_commit() -> String {
    if let Some(c) = option_env!("KILN_GIT_COMMIT").filter(|c| !c.is_empty()) {
        return c.to_string();
    }
    let file = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("commit")));
    if let Some(c) = file.and_then(|f| std::fs::read_to_string(f).ok()).map(|s| s.trim().to_string()) {
        if !c.is_empty() {
            return c;
        }
    }
    command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

fn utc_from_unix(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ---- output --------------------------------------------------------------------------

fn gib(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

impl BenchReport {
    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let m = &self.model;
        let _ = writeln!(
            s,
            "kiln bench: {} ({}), {}, {:.3} B parameters ({})",
            m.name,
            m.weights,
            m.dtype,
            m.parameters as f64 / 1e9,
            gib(m.weight_bytes)
        );
        let h = &self.machine;
        let _ = writeln!(
            s,
            "device: {} (sm {}, {} SMs, {}), driver {}, CUDA {}, NVRTC {} | kiln {} | {}",
            h.gpu,
            h.compute_capability,
            h.multiprocessors,
            gib(h.gpu_memory_bytes),
            h.driver,
            h.cuda_driver_api,
            h.nvrtc,
            h.kiln_commit,
            h.date
        );
        let _ = writeln!(
            s,
            "copy bandwidth: {:.0} GB/s (device-to-device, read + write, {} buffer, median of {BANDWIDTH_ITERS})",
            self.copy_bandwidth_bytes_per_s / 1e9,
            gib(BANDWIDTH_BYTES)
        );
        let _ = writeln!(
            s,
            "CUDA graphs: {} | PDL: {} | fusion: {} | horizontal: {} | epilogue GEMV: {} | scaled GEMV: {} | \
             early attention: {} | fused attention: {} | stream GEMV: {} | matvec groups: {} | kernels per decode step: {}",
            if self.cuda_graphs { "on" } else { "off" },
            if self.pdl { "on" } else { "off" },
            if self.fusion { "on" } else { "off" },
            if self.horizontal { "on" } else { "off" },
            if self.epilogue_gemv { "on" } else { "off" },
            if self.scaled_gemv { "on" } else { "off" },
            if self.attention_early { "on" } else { "off" },
            if self.attention_fused { "on" } else { "off" },
            if self.stream_gemv { "on" } else { "off" },
            if self.matvec_one_kernel { "one kernel (KILN_MATVEC=fused)" } else { "prologue kernel + GEMV" },
            self.launches_per_decode_step
        );
        if let Some(p) = &self.plan {
            let t = |k: &str| self.setup_s.get(k).copied().unwrap_or(0.0) * 1e3;
            let _ = writeln!(
                s,
                "plan: {} ({:.1} MiB, key {}, {}): kernels {} prebuilt, {} compiled, {} from the disk cache; load: \
                 read {:.1} ms, parse {:.1} ms, weights {:.1} ms, engine {:.1} ms (kernels {:.1} ms)",
                p.path,
                p.bytes as f64 / (1 << 20) as f64,
                p.key,
                p.target,
                p.prebuilt,
                p.compiled,
                p.cached,
                t("plan read"),
                t("plan graph parse"),
                t("weights"),
                t("engine"),
                t("engine kernels")
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "{:<22} {:>10} {:>14}", "prefill (batch 1)", "ms", "tokens/s");
        for p in &self.prefill {
            let _ =
                writeln!(s, "{:<22} {:>10.2} {:>14.0}", format!("{} tokens", p.tokens), p.median_ms, p.tokens_per_s);
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<9} {:>8} {:>10} {:>12} {:>9} {:>12} {:>15} {:>11}",
            "decode", "context", "ms/step", "tokens/s", "launches", "bytes/step", "roofline tok/s", "% roofline"
        );
        for d in &self.decode {
            let _ = writeln!(
                s,
                "{:<9} {:>8.0} {:>10.3} {:>12.1} {:>9} {:>12} {:>15.1} {:>10.1}%",
                format!("batch {}", d.batch),
                d.mean_context,
                d.median_ms_per_step,
                d.tokens_per_s,
                d.launches_per_step,
                gib(d.bytes_per_step.total()),
                d.roofline_tokens_per_s,
                100.0 * d.roofline_fraction
            );
        }
        let _ = writeln!(s);
        let mem = &self.memory;
        let _ = writeln!(
            s,
            "GPU memory: weights {}, KV cache {} (batch {} × {} positions), activations arena {}, workspace {}, \
             total {} (device in use: {})",
            gib(mem.weights),
            gib(mem.kv_cache),
            self.engine_max_batch,
            self.engine_max_context,
            gib(mem.arena),
            gib(mem.workspace),
            gib(mem.total),
            gib(mem.device_used)
        );
        if let Some(r) = &self.roofline_batch1 {
            let _ = writeln!(
                s,
                "decode roofline (batch 1, context {:.0}): {} per step at {:.0} GB/s = {:.1} tokens/s; kiln {:.1} \
                 tokens/s = {:.1}% of it",
                r.context,
                gib(r.bytes_per_step),
                self.copy_bandwidth_bytes_per_s / 1e9,
                r.tokens_per_s,
                r.decode_tokens_per_s,
                r.percent
            );
        }
        s
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes (no maps with non-string keys)")
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        std::fs::write(path, self.to_json() + "\n")
            .map_err(|source| BenchError::Write { path: path.to_path_buf(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_models::config::LlamaConfig;

    /// The `--timeline` tables: launches summed per kernel and module, slowest first,
    /// with the mean resident time per launch; the total over every launch; then the
    /// first launches one by one, in order.
    #[test]
    fn the_timeline_table_sums_per_kernel_and_lists_the_first_launches() {
        let l = |k: &str, us: f64, lead: f64| (k.to_string(), us, lead);
        let launches = vec![
            l("kiln_gather @model.embed_tokens", 1.5, 0.5),
            l("kiln_attn @model.layers.*.self_attn", 6.0, 4.0),
            l("kiln_gemv @model.layers.*.mlp", 2.0, 9.0),
            l("kiln_attn @model.layers.*.self_attn", 5.0, 6.0),
            l("kiln_gemv @model.layers.*.mlp", 3.0, 11.0),
        ];
        let t = timeline_table(&launches);
        let rows: Vec<&str> = t.lines().collect();
        let at = rows.iter().position(|r| r.contains("kernel @module")).unwrap();
        // attention 11.0 µs over 2 launches (mean resident 5.0), gemv 5.0, gather 1.5.
        let first: Vec<&str> = rows[at + 1].split_whitespace().collect();
        assert_eq!(first, ["11.0", "2", "5.00", "kiln_attn", "@model.layers.*.self_attn"]);
        assert!(rows[at + 2].trim_start().starts_with("5.0") && rows[at + 2].contains("kiln_gemv"), "{t}");
        assert!(rows[at + 3].contains("kiln_gather"), "{t}");
        assert!(rows[at + 4].trim_start().starts_with("17.5") && rows[at + 4].contains("total"), "{t}");
        // The launches one by one, in launch order.
        let one: Vec<&str> = rows.iter().filter(|r| r.contains("kiln_")).skip(3).copied().collect();
        assert_eq!(one.len(), 5, "{t}");
        assert!(one[0].contains("kiln_gather") && one[1].trim_start().starts_with("6.00"), "{t}");
    }

    fn tiny(tied: bool) -> LlamaForCausalLM {
        // hidden 8, 2 layers, 4 heads over 2 kv heads (head_dim 2), intermediate 12, vocab 10.
        let json = format!(
            r#"{{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "tie_word_embeddings": {tied}}}"#
        );
        LlamaForCausalLM::new(LlamaConfig::from_json_str(&json).unwrap()).unwrap()
    }

    fn traced(tied: bool, dtype: DType) -> Graph {
        tiny(tied).trace(&TraceOptions { dtype, last_token_only: true }).unwrap()
    }

    #[test]
    fn step_bytes_by_hand() {
        // Per layer: 2 norms (8 + 8), qkv (8 + 4 + 4) × 8 = 128, o 8 × 8 = 64,
        // gate_up 24 × 8 = 192, down 8 × 12 = 96: 496 elements; 2 layers: 992.
        // Final norm 8. Tied: the table (10 × 8 = 80) is read whole by the lm_head.
        let layers = 2 * (8 + 8 + 128 + 64 + 192 + 96);
        assert_eq!(layers, 992);
        let g = traced(true, DType::BF16);
        let b = decode_step_bytes(&g, 1, 100).unwrap();
        assert_eq!(b.weights, 2 * (layers + 8 + 80));
        // KV: 2 layers × (k, v) × batch 1 × 100 positions × 2 kv heads × head_dim 2 × 2 bytes.
        assert_eq!(b.kv_cache, 2 * 2 * 100 * 2 * 2 * 2);
        assert_eq!(b.total(), 2160 + 3200);
        assert_eq!(weight_bytes(&g), 2160);

        // Untied: the embedding table is only gathered (one row of 8 per sequence); the
        // lm_head (10 × 8) is read whole. Batch 3, f32, context 7.
        let g = traced(false, DType::F32);
        let b = decode_step_bytes(&g, 3, 7).unwrap();
        assert_eq!(b.weights, 4 * (layers + 8 + 3 * 8 + 80));
        assert_eq!(b.kv_cache, 4 * 2 * 2 * 3 * 7 * 2 * 2);
        assert_eq!(weight_bytes(&g), 4 * (layers + 8 + 80 + 80), "every parameter once");

        // After the default pipeline the parameters and their readers are the same.
        let piped = kiln_passes::default_pipeline().run(g.clone()).unwrap().graph;
        assert_eq!(decode_step_bytes(&piped, 3, 7).unwrap(), b);
    }

    #[test]
    fn roofline_rate() {
        let b = StepBytes { weights: 2_000_000_000, kv_cache: 500_000_000 };
        // 4 TB/s over 2.5 GB per step: 1600 steps/s, × batch tokens.
        assert!((roofline_tokens_per_s(4e12, 1, b) - 1600.0).abs() < 1e-9);
        assert!((roofline_tokens_per_s(4e12, 8, b) - 12800.0).abs() < 1e-9);
        // Steps at past = 128 + 8 + j attend to past + 1 positions; j = 0..4: 137..=140.
        assert_eq!(mean_decode_context(128, 8, 4), 138.5);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    /// Records the calls; tokens are `step mod vocab`.
    struct Fake {
        log: std::cell::RefCell<Vec<String>>,
        batch: usize,
        steps_since_prefill: usize,
        short: bool,
        vocab: u32,
        info: DeviceInfo,
    }

    impl Fake {
        fn new(short: bool) -> Fake {
            Fake::with_vocab(short, 10)
        }
        fn with_vocab(short: bool, vocab: u32) -> Fake {
            let info = DeviceInfo {
                ordinal: 0,
                name: "fake".into(),
                compute_capability: (9, 0),
                total_memory: 1 << 30,
                multiprocessors: 1,
                driver_version: 13000,
                nvrtc_version: (13, 0),
            };
            Fake { log: Default::default(), batch: 0, steps_since_prefill: 0, short, vocab, info }
        }
        fn log(&self, s: impl Into<String>) {
            self.log.borrow_mut().push(s.into());
        }
    }

    impl Engine for Fake {
        fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<u32>, BenchError> {
            let len = prompts[0].len();
            assert!(prompts.iter().all(|p| p.len() == len && p.iter().all(|&t| t < self.vocab)));
            self.log(format!("prefill {}x{len}", prompts.len()));
            self.batch = prompts.len();
            self.steps_since_prefill = 0;
            Ok(vec![1; prompts.len()])
        }
        fn decode_step(&mut self) -> Result<(), BenchError> {
            self.log("step");
            self.steps_since_prefill += 1;
            Ok(())
        }
        fn tokens(&mut self) -> Result<Vec<Vec<u32>>, BenchError> {
            self.log("tokens");
            let n = self.steps_since_prefill - usize::from(self.short);
            Ok((0..self.batch).map(|_| (0..n).map(|i| i as u32 % self.vocab).collect()).collect())
        }
        fn synchronize(&self) -> Result<(), BenchError> {
            self.log("sync");
            Ok(())
        }
        fn launches_per_decode_step(&self) -> usize {
            7
        }
        fn memory(&self) -> MemoryUse {
            MemoryUse { weights: 1000, kv_cache: 200, arena: 30, workspace: 4, total: 1234, device_used: 0 }
        }
        fn device(&self) -> &DeviceInfo {
            &self.info
        }
    }

    #[test]
    fn prefill_measures_after_a_warm_up() {
        let mut e = Fake::new(false);
        let r = measure_prefill(&mut e, 16, 10).unwrap();
        assert_eq!(*e.log.borrow(), vec!["prefill 1x16"; PREFILL_REPS + 1]);
        assert_eq!((r.tokens, r.batch, r.runs_ms.len()), (16, 1, PREFILL_REPS));
        assert!(r.tokens_per_s > 0.0 && r.median_ms >= 0.0);
    }

    #[test]
    fn decode_runs_the_steps_and_checks_the_tokens() {
        let mut e = Fake::new(false);
        let runs = measure_decode(&mut e, 4, DECODE_PROMPT, 5, 10).unwrap();
        assert_eq!(runs.len(), DECODE_REPS);
        // Warm-up steps, a sync, the timed steps with no sync in between, one sync.
        let step = |n| std::iter::repeat_n("step".to_string(), n);
        let one_run: Vec<String> = std::iter::once(format!("prefill 4x{DECODE_PROMPT}"))
            .chain(step(DECODE_WARMUP))
            .chain(["sync".to_string()])
            .chain(step(5))
            .chain(["sync".to_string(), "tokens".to_string()])
            .collect();
        assert_eq!(
            *e.log.borrow(),
            one_run.iter().cycle().take(one_run.len() * DECODE_REPS).cloned().collect::<Vec<_>>()
        );

        // An engine that loses a token is caught.
        let mut e = Fake::new(true);
        let err = measure_decode(&mut e, 2, DECODE_PROMPT, 5, 10).unwrap_err().to_string();
        assert!(err.contains("sequence 0 has 12 tokens after 13 decode steps"), "{err}");
    }

    #[test]
    fn decode_result_uses_the_median_run() {
        let g = traced(true, DType::BF16);
        // 3 runs of 4 steps at batch 2; median 20 ms → 400 tokens/s, 5 ms per step.
        let r = decode_result(2, DECODE_PROMPT, 4, vec![30.0, 20.0, 10.0], &g, 1e9).unwrap();
        assert_eq!(r.median_ms_per_step, 5.0);
        assert!((r.tokens_per_s - 400.0).abs() < 1e-9);
        assert_eq!(r.mean_context, mean_decode_context(DECODE_PROMPT, DECODE_WARMUP, 4));
        let bytes = decode_step_bytes(&g, 2, r.mean_context.round() as usize).unwrap();
        assert_eq!(r.bytes_per_step, bytes);
        assert!((r.roofline_tokens_per_s - 2.0 * 1e9 / bytes.total() as f64).abs() < 1e-6);
        assert!((r.roofline_fraction - 400.0 / r.roofline_tokens_per_s).abs() < 1e-12);
    }

    #[test]
    fn options_are_checked() {
        let mut a = BenchArgs::preset("smollm2-135m");
        assert!(a.check(8192).is_ok());
        a.prefill = vec![128, 9000];
        assert!(a.check(8192).unwrap_err().to_string().starts_with("--prefill: length 9000"));
        a.prefill = vec![128];
        a.batch = vec![1, 0];
        assert!(a.check(8192).unwrap_err().to_string().starts_with("--batch"));
        a.batch = vec![1];
        a.decode_steps = 8100;
        assert!(a.check(8192).unwrap_err().to_string().starts_with("--decode-steps"));
        // A long decode prompt counts against the positions too.
        a.decode_steps = 128;
        a.decode_prompt = 8100;
        let e = a.check(8192).unwrap_err().to_string();
        assert!(e.starts_with("--decode-steps") && e.contains("8100 prompt"), "{e}");
        a.decode_prompt = 0;
        assert!(a.check(8192).unwrap_err().to_string().starts_with("--decode-prompt"));
        a.decode_prompt = DECODE_PROMPT;
        a.dtype = "i8".into();
        assert!(a.dtype().is_err());
    }

    #[test]
    fn unknown_preset_and_missing_gpu_are_errors() {
        let e = run(&BenchArgs::preset("gpt-5")).unwrap_err().to_string();
        assert!(e.contains("unknown preset `gpt-5`") && e.contains("llama-3.2-1b"), "{e}");
        if let Err(why) = kiln_runtime::cuda::available() {
            let e = run(&BenchArgs::preset("smollm2-135m")).unwrap_err().to_string();
            assert_eq!(e, format!("kiln bench needs a CUDA GPU: {why}"));
        }
    }

    /// A backend without a GPU: a fixed bandwidth and the fake engine.
    /// What the fake backend was asked for: device, max batch, max context, CUDA
    /// graphs, epilogue GEMV.
    type SpecSeen = Option<(usize, usize, usize, bool, bool)>;

    struct FakeBackend {
        spec: std::cell::RefCell<SpecSeen>,
    }

    impl Backend for FakeBackend {
        fn check(&self, _gpu: usize) -> Result<(), BenchError> {
            Ok(())
        }
        fn copy_bandwidth(&self, _gpu: usize) -> Result<f64, BenchError> {
            Ok(4e12)
        }
        fn engine(
            &self,
            graph: Graph,
            weights: IndexMap<String, HostTensor>,
            spec: &EngineSpec,
        ) -> Result<Box<dyn Engine>, BenchError> {
            assert_eq!(weights.len(), graph.params().len());
            *self.spec.borrow_mut() =
                Some((spec.device, spec.max_batch, spec.max_context, spec.cuda_graphs, spec.epilogue_gemv));
            Ok(Box::new(Fake::with_vocab(false, 49152)))
        }
        fn device_used(&self, _gpu: usize) -> usize {
            5000
        }
    }

    #[test]
    fn a_whole_run_on_a_fake_backend() {
        let args = BenchArgs {
            prefill: vec![16, 64],
            batch: vec![1, 3],
            decode_steps: 4,
            no_cuda_graphs: true,
            no_epilogue_gemv: true,
            no_scaled_gemv: true,
            no_attention_early: true,
            no_attention_fused: true,
            ..BenchArgs::preset("smollm2-135m")
        };
        let backend = FakeBackend { spec: Default::default() };
        let r = run_on(&args, &backend).unwrap();
        // max_context: the longest of prefill (64) and decode (128 + 8 + 4), plus one.
        assert_eq!(*backend.spec.borrow(), Some((0, 3, DECODE_PROMPT + DECODE_WARMUP + 4 + 1, false, false)));
        assert_eq!(r.model.parameters, 134_515_008);
        assert_eq!(r.model.weight_bytes, 2 * 134_515_008);
        assert_eq!(r.model.dtype, "bf16");
        assert_eq!(r.prefill.iter().map(|p| p.tokens).collect::<Vec<_>>(), [16, 64]);
        assert_eq!(
            r.decode.iter().map(|d| (d.batch, d.steps, d.launches_per_step)).collect::<Vec<_>>(),
            [(1, 4, 7), (3, 4, 7)]
        );
        assert_eq!(r.memory.total, 1234);
        assert_eq!(r.memory.device_used, 5000);
        assert_eq!(r.launches_per_decode_step, 7);
        // Batch 1 at context 128 + 8 + 2.5 = 138.5 (rounded 139): all weights once (tied) +
        // 30 layers × (k, v) × 139 positions × 3 kv heads × 64 × 2 bytes.
        let roof = r.roofline_batch1.as_ref().unwrap();
        assert_eq!(roof.context, 138.5);
        assert_eq!(roof.bytes_per_step, 2 * 134_515_008 + 30 * 2 * 139 * 3 * 64 * 2);
        assert!((roof.tokens_per_s - 4e12 / roof.bytes_per_step as f64).abs() < 1e-6);
        // A longer decode prompt: an engine for its context, and a later mean context.
        let long = BenchArgs { decode_prompt: 1000, prefill: vec![16], batch: vec![1], ..args.clone() };
        let long_backend = FakeBackend { spec: Default::default() };
        let rl = run_on(&long, &long_backend).unwrap();
        assert_eq!(*long_backend.spec.borrow(), Some((0, 1, 1000 + DECODE_WARMUP + 4 + 1, false, false)));
        assert_eq!(rl.decode[0].mean_context, 1000.0 + 8.0 + 2.5);

        let table = r.table();
        eprintln!("{table}");
        let header = ["smollm2-135m", "prefill (batch 1)", "16 tokens", "batch 3", "% roofline", "CUDA graphs: off"];
        for want in header.into_iter().chain(["epilogue GEMV: off", "scaled GEMV: off", "early attention: off"]) {
            assert!(table.contains(want), "missing `{want}` in\n{table}");
        }
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["model"]["hf_config"]["hidden_size"], 576);
        assert_eq!(v["decode"][1]["batch"], 3);
        assert_eq!(v["prefill"][0]["tokens"], 16);
        assert!(v["roofline_batch1"]["percent"].as_f64().unwrap() > 0.0);
        assert!(v["copy_bandwidth_bytes_per_s"].as_f64().unwrap() == 4e12);
        assert_eq!(v["epilogue_gemv"], false);
        assert_eq!(v["scaled_gemv"], false);
        assert_eq!(v["attention_early"], false);
        assert_eq!(v["attention_fused"], false);
        assert!(v["machine"]["kiln_commit"].as_str().is_some_and(|c| !c.is_empty()));
        if let Ok(dir) = std::env::var("KILN_BENCH_SAMPLE_JSON") {
            // For trying tools/bench_hf.py and tools/gpu/bench.sh without a GPU.
            r.write_json(Path::new(&dir)).unwrap();
        }
    }
}
