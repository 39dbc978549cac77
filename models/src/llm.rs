//! The high-level LLM API, in the shape of TensorRT-LLM's and vLLM's
//! `LLM.generate(prompts, SamplingParams) -> [CompletionOutput]`.
//!
//! [`LLM::load`] reads a Hugging Face model directory (`config.json`, safetensors
//! weights, `tokenizer.json`, optional `tokenizer_config.json` and
//! `generation_config.json`) or a GGUF file (config, weights, tokenizer and chat
//! template from its metadata), traces the model with `last_token_only = true` (prefill
//! and decode share that graph; the sequence length is symbolic) and builds an executor
//! for the chosen [`Device`]. Generation is token-level ([`kiln_runtime::generate`]);
//! this layer adds text: encoding (BOS per the tokenizer config), chat templates, stop
//! strings, streaming text deltas that never split a character, and end-of-sequence ids
//! from the config, the generation config and the tokenizer.
//!
//! Text outputs are decoded with special tokens skipped. A stop token that ends
//! generation is kept in `token_ids` but not in `text`; a stop string cuts `text` just
//! before it (the tokens that produced it stay in `token_ids`).

use crate::config::LlamaConfig;
use crate::llama::{LlamaForCausalLM, TraceOptions};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::{ModelError, Result};
use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_ops::{DType, HostTensor};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::cuda::{CudaEngine, EngineOptions};
use kiln_runtime::error::RuntimeError;
use kiln_runtime::generate::{generate_with, Backend, Forward, GenerateError, Generation, Generator};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

pub use kiln_runtime::generate::FinishReason;
pub use kiln_runtime::sampling::SamplingParams;

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda,
    /// The best device available: CUDA when a CUDA backend is built and a GPU is found,
    /// otherwise the CPU.
    #[default]
    Auto,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }

    /// The device that actually runs: `Cuda` needs a usable GPU (else an error saying
    /// why), `Auto` picks CUDA when a GPU is usable and the CPU otherwise, and says which.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Cuda => match kiln_runtime::cuda::available() {
                Ok(info) => {
                    tracing::info!(gpu = %info, "device cuda");
                    Ok(Device::Cuda)
                }
                Err(why) => Err(ModelError::Device { device: "cuda".into(), msg: format!("no usable GPU: {why}") }),
            },
            Device::Auto => match kiln_runtime::cuda::available() {
                Ok(info) => {
                    tracing::info!(gpu = %info, "device auto: using CUDA");
                    Ok(Device::Cuda)
                }
                Err(why) => {
                    tracing::info!(reason = %why, "device auto: no usable GPU, running on the CPU");
                    Ok(Device::Cpu)
                }
            },
        }
    }

    /// An executor for `graph` on this (resolved) device (one forward pass at a time,
    /// feeds and outputs on the host).
    fn executor(self, graph: Graph, weights: IndexMap<String, HostTensor>) -> Result<Backend> {
        Ok(match self {
            Device::Cuda => {
                Backend::Cuda(kiln_runtime::cuda::CudaExecutor::new(graph, weights).map_err(RuntimeError::from)?)
            }
            _ => Backend::Cpu(CpuExecutor::new(graph, weights)?),
        })
    }

    /// What runs `graph` on this (resolved) device: the CPU executor with the KV cache on
    /// the host, or the CUDA engine with everything on the GPU.
    fn runner(self, graph: Graph, weights: IndexMap<String, HostTensor>, context_len: usize) -> Result<Runner> {
        Ok(match self {
            Device::Cuda => {
                let context_len = context_len.min(MAX_GPU_CONTEXT);
                let vocab = graph
                    .outputs()
                    .get("logits")
                    .and_then(|v| graph.value_type(*v).shape.dims().last().and_then(|d| d.as_fixed()))
                    .ok_or_else(|| ModelError::Unsupported("the graph's logits have no fixed vocabulary".into()))?;
                let opts = EngineOptions { max_batch: 1, max_context: context_len, ..Default::default() };
                let engine = CudaEngine::new(graph.clone(), weights, opts).map_err(RuntimeError::from)?;
                Runner::Resident { engine: Mutex::new(engine), graph, context_len, vocab }
            }
            _ => Runner::Host(Generator::new(Backend::Cpu(CpuExecutor::new(graph, weights)?), context_len)?),
        })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Device {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Device> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(ModelError::Device { device: s.into(), msg: "unknown device; expected cpu, cuda or auto".into() }),
        }
    }
}

/// The longest context the GPU engine allocates a KV cache for (the model's
/// `max_position_embeddings` when smaller).
pub const MAX_GPU_CONTEXT: usize = 16384;

/// How an [`LLM`] runs: host-side KV cache (CPU), or the device-resident CUDA engine.
/// (One per loaded model, so the size difference between the variants does not matter.)
#[allow(clippy::large_enum_variant)]
enum Runner {
    Host(Generator<Backend>),
    Resident { engine: Mutex<CudaEngine>, graph: Graph, context_len: usize, vocab: usize },
}

/// Options of [`LLM::load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Storage dtype of the weights, activations and KV cache (`F32`, `F16`, `BF16`);
    /// the CPU computes in f32 either way.
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Auto }
    }
}

/// One completion, as TensorRT-LLM's `CompletionOutput`.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionOutput {
    /// The generated text (special tokens skipped, cut at a stop string).
    pub text: String,
    /// The generated ids (a stop token that ended generation is included, last).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Sum of the generated tokens' logprobs under the model's distribution.
    pub cumulative_logprob: f64,
    /// Per-token logprobs, when `SamplingParams::logprobs` is set.
    pub logprobs: Option<Vec<f32>>,
    pub prompt_tokens: usize,
    pub prefill_ms: f64,
    pub decode_tokens_per_s: f64,
}

impl From<GenerateError> for ModelError {
    fn from(e: GenerateError) -> ModelError {
        match e {
            GenerateError::ContextExceeded { prompt, max_new, context } => {
                ModelError::PromptTooLong { tokens: prompt, max_new, context }
            }
            GenerateError::Runtime(r) => ModelError::Runtime(*r),
            other => ModelError::Generate(other),
        }
    }
}

/// A loaded model ready to generate text.
pub struct LLM {
    dir: PathBuf,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    runner: Runner,
    device: Device,
    dtype: DType,
    /// End-of-sequence ids, always added to a request's `stop_token_ids`.
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for LLM {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LLM")
            .field("dir", &self.dir)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

/// `config.json` of `dir`, with a clear error when the directory or file is missing.
pub fn load_config(dir: &Path) -> Result<LlamaConfig> {
    if is_gguf(dir) {
        let file = crate::gguf::GgufFile::open(dir)?;
        return crate::gguf::model::config_from_gguf(&file);
    }
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        });
    }
    LlamaConfig::from_file(dir.join("config.json"))
}

/// A path names a GGUF file (by extension) rather than a checkpoint directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Checks `dtype` is a float storage type the models run in.
fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(ModelError::Request(format!("model dtype must be f32, f16 or bf16, not {}", other.name()))),
    }
}

/// End-of-sequence ids from `generation_config.json` (`eos_token_id`, int or list).
fn generation_config_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.clone(), msg: e.to_string() })?;
    let ids = match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    };
    Ok(ids)
}

/// One forward pass over `ids` with the full-sequence graph (`last_token_only = false`):
/// the logits of every position, shape `[ids.len(), vocab]` (f32).
pub fn prompt_logits(dir: &Path, opts: &LoadOptions, ids: &[u32]) -> Result<HostTensor> {
    opts.device.resolve()?;
    check_dtype(opts.dtype)?;
    let cfg = load_config(dir)?;
    if ids.is_empty() {
        return Err(ModelError::Request("no token ids given".into()));
    }
    if ids.len() > cfg.max_position_embeddings {
        return Err(ModelError::PromptTooLong { tokens: ids.len(), max_new: 0, context: cfg.max_position_embeddings });
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(ModelError::Request(format!(
            "token id {bad} is outside the vocabulary of {} tokens",
            cfg.vocab_size
        )));
    }
    let model = LlamaForCausalLM::new(cfg)?;
    let weights = match is_gguf(dir) {
        true => crate::gguf::model::load_gguf(dir, opts.dtype)?.1,
        false => crate::weights::load_weights(dir, &model, opts.dtype)?,
    };
    let graph = model.trace(&TraceOptions { dtype: opts.dtype, last_token_only: false })?;
    let gen = Generator::new(opts.device.resolve()?.executor(graph, weights)?, model.config.max_position_embeddings)?;
    let mut feeds = gen.empty_cache();
    feeds.insert("input_ids".into(), HostTensor::from_i64(&[1, ids.len()], ids.iter().map(|&i| i as i64).collect()));
    let mut out = gen.executor().run(&feeds)?;
    let logits = out.swap_remove("logits").ok_or_else(|| ModelError::Request("the model returned no logits".into()))?;
    let vocab = model.config.vocab_size;
    Ok(HostTensor::from_f32(&[ids.len(), vocab], logits.to_f32_vec()))
}

/// Tracks stop strings over the growing text and decides how much may be streamed.
struct StopMatcher<'a> {
    stops: &'a [String],
}

impl StopMatcher<'_> {
    /// Byte offset of the earliest stop string in `text`.
    fn find(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// How much of `text` is safe to emit: all of it except a suffix that could still
    /// grow into a stop string.
    fn safe_len(&self, text: &str) -> usize {
        let mut hold = 0;
        for s in self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        text.len() - hold
    }
}

impl LLM {
    /// Loads the model at `path`: a Hugging Face directory or a `.gguf` file (see the
    /// module docs).
    pub fn load(path: &Path, opts: LoadOptions) -> Result<LLM> {
        let device = opts.device.resolve()?;
        check_dtype(opts.dtype)?;
        let t0 = std::time::Instant::now();
        let (model, weights, tokenizer, mut eos_ids) = if is_gguf(path) {
            let (model, weights, tokenizer) = crate::gguf::model::load_gguf_with_tokenizer(path, opts.dtype)?;
            let eos = model.config.eos_token_ids.clone();
            (model, weights, tokenizer, eos)
        } else {
            let cfg = load_config(path)?;
            let tokenizer = Tokenizer::from_dir(path)?;
            let mut eos = cfg.eos_token_ids.clone();
            eos.extend(generation_config_eos(path)?);
            let model = LlamaForCausalLM::new(cfg)?;
            let weights = crate::weights::load_weights(path, &model, opts.dtype)?;
            (model, weights, tokenizer, eos)
        };
        if tokenizer.vocab_size() > model.config.vocab_size {
            tracing::warn!(
                tokenizer = tokenizer.vocab_size(),
                model = model.config.vocab_size,
                "the tokenizer has more tokens than the model's vocabulary"
            );
        }
        eos_ids.extend(tokenizer.eos_token_id());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let graph = model.trace(&TraceOptions { dtype: opts.dtype, last_token_only: true })?;
        let graph = kiln_passes::default_pipeline()
            .run(graph)
            .map_err(|e| ModelError::Unsupported(format!("pass pipeline: {e}")))?
            .graph;
        let runner = device.runner(graph, weights, model.config.max_position_embeddings)?;
        tracing::info!(
            model = %path.display(),
            device = %device,
            dtype = opts.dtype.name(),
            load_ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
            "model loaded"
        );
        Ok(LLM { dir: path.to_path_buf(), model, tokenizer, runner, device, dtype: opts.dtype, eos_ids })
    }

    /// Loads an executable plan (`kiln build`) of a checkpoint onto the GPU: the engine
    /// from the plan (no tracing, passes or kernel compilation, see
    /// [`crate::plan::load`]), the tokenizer and end-of-sequence ids from the checkpoint
    /// the plan names. A plan of a preset has no tokenizer and is refused.
    pub fn load_plan(plan_path: &Path) -> Result<LLM> {
        use kiln_runtime::plan::{ExecutablePlan, ModelSource};
        let t0 = std::time::Instant::now();
        let plan = ExecutablePlan::open(plan_path)?;
        let read = t0.elapsed().as_secs_f64();
        let dir = match &plan.model.source {
            ModelSource::Path(p) => PathBuf::from(p),
            other => {
                return Err(ModelError::Request(format!(
                    "plan `{}` is of {other}, which has no tokenizer; build the plan from a checkpoint (--model)",
                    plan_path.display()
                )))
            }
        };
        let dtype = plan.options.dtype().unwrap_or(DType::F32);
        let tokenizer = if is_gguf(&dir) {
            crate::gguf::tokenizer::tokenizer_from_gguf(&crate::gguf::GgufFile::open(&dir)?)?
        } else {
            Tokenizer::from_dir(&dir)?
        };
        let loaded = crate::plan::load_opened(plan, read, plan_path, 0)?;
        let mut eos_ids = loaded.config.eos_token_ids.clone();
        if !is_gguf(&dir) {
            eos_ids.extend(generation_config_eos(&dir)?);
        }
        eos_ids.extend(tokenizer.eos_token_id());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let vocab = loaded.config.vocab_size;
        let context_len = loaded.plan.options.max_context;
        let model = LlamaForCausalLM::new(loaded.config)?;
        let runner = Runner::Resident { engine: Mutex::new(loaded.engine), graph: loaded.graph, context_len, vocab };
        tracing::info!(
            plan = %plan_path.display(),
            model = %dir.display(),
            load_ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
            "model loaded from the plan"
        );
        Ok(LLM { dir, model, tokenizer, runner, device: Device::Cuda, dtype, eos_ids })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &LlamaConfig {
        &self.model.config
    }
    pub fn model(&self) -> &LlamaForCausalLM {
        &self.model
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    /// The traced prompt/decode graph (`last_token_only = true`).
    pub fn graph(&self) -> &Graph {
        match &self.runner {
            Runner::Host(g) => g.executor().graph(),
            Runner::Resident { graph, .. } => graph,
        }
    }
    /// The device the model runs on (never `Auto`).
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Maximum prompt plus generated tokens.
    pub fn context_len(&self) -> usize {
        match &self.runner {
            Runner::Host(g) => g.context_len(),
            Runner::Resident { context_len, .. } => *context_len,
        }
    }
    /// End-of-sequence ids (config, generation config and tokenizer).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Encodes a plain prompt (with BOS as the tokenizer config says).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt, true)
    }

    /// Renders `messages` with the chat template (generation prompt appended) and encodes
    /// the result without adding special tokens (the template holds them).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Generates a completion for every prompt (one after the other).
    pub fn generate(&self, prompts: &[&str], params: &SamplingParams) -> Result<Vec<CompletionOutput>> {
        params.validate().map_err(GenerateError::from)?;
        let encoded = prompts.iter().map(|p| self.encode(p)).collect::<Result<Vec<_>>>()?;
        for ids in &encoded {
            self.check_prompt(ids, params)?;
        }
        encoded.iter().map(|ids| self.complete(ids, params, &mut |_| {})).collect()
    }

    /// Generates one completion, calling `on_delta` with each new piece of text as it is
    /// produced (never a split character, never part of a stop string).
    pub fn generate_stream(
        &self,
        prompt: &str,
        params: &SamplingParams,
        mut on_delta: impl FnMut(&str),
    ) -> Result<CompletionOutput> {
        let ids = self.encode(prompt)?;
        self.complete(&ids, params, &mut on_delta)
    }

    /// A chat completion: the template applied to `messages`, then generation.
    pub fn chat(&self, messages: &[ChatMessage], params: &SamplingParams) -> Result<CompletionOutput> {
        let ids = self.encode_chat(messages)?;
        self.complete(&ids, params, &mut |_| {})
    }

    /// [`LLM::chat`], streaming text deltas.
    pub fn chat_stream(
        &self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        mut on_delta: impl FnMut(&str),
    ) -> Result<CompletionOutput> {
        let ids = self.encode_chat(messages)?;
        self.complete(&ids, params, &mut on_delta)
    }

    fn check_prompt(&self, ids: &[u32], params: &SamplingParams) -> Result<()> {
        match &self.runner {
            Runner::Host(g) => Ok(g.check_prompt(ids, params.max_tokens)?),
            Runner::Resident { context_len, vocab, .. } => {
                if ids.is_empty() {
                    return Err(GenerateError::EmptyPrompt.into());
                }
                if ids.len() + params.max_tokens > *context_len {
                    return Err(GenerateError::ContextExceeded {
                        prompt: ids.len(),
                        max_new: params.max_tokens,
                        context: *context_len,
                    }
                    .into());
                }
                if let Some((position, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= *vocab) {
                    return Err(GenerateError::TokenOutOfRange { id, position, vocab: *vocab }.into());
                }
                Ok(())
            }
        }
    }

    /// Generates from prompt ids: the common core of every entry point.
    pub fn complete(
        &self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<CompletionOutput> {
        params.validate().map_err(GenerateError::from)?;
        self.check_prompt(prompt_ids, params)?;
        let mut p = params.clone();
        p.stop_token_ids.extend(self.eos_ids.iter().copied());
        let matcher = StopMatcher { stops: &params.stop };
        let mut stream = self.tokenizer.decode_stream(true);
        let mut text = String::new();
        let mut emitted = 0usize;
        let mut stopped_at: Option<usize> = None;
        let mut error: Option<ModelError> = None;
        let on_step = |step: &kiln_runtime::generate::Step| {
            if step.is_stop {
                return ControlFlow::Continue(());
            }
            match stream.push(step.token) {
                Ok(delta) => text.push_str(&delta),
                Err(e) => {
                    error = Some(e);
                    return ControlFlow::Break(());
                }
            }
            if let Some(pos) = matcher.find(&text) {
                if pos > emitted {
                    on_delta(&text[emitted..pos]);
                }
                emitted = pos;
                stopped_at = Some(pos);
                return ControlFlow::Break(());
            }
            let safe = matcher.safe_len(&text);
            if safe > emitted {
                on_delta(&text[emitted..safe]);
                emitted = safe;
            }
            ControlFlow::Continue(())
        };
        let gen: Generation = match &self.runner {
            Runner::Host(g) => g.generate(prompt_ids, &p, on_step)?,
            Runner::Resident { engine, .. } => {
                let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
                generate_with(&mut *engine, prompt_ids, &p, on_step)?
            }
        };
        if let Some(e) = error {
            return Err(e);
        }
        if stopped_at.is_none() {
            // Flush what the decoder held back (an incomplete final character) and any
            // text kept for a stop string that never completed.
            text.push_str(&stream.finish()?);
            if let Some(pos) = matcher.find(&text) {
                stopped_at = Some(pos);
            }
            let end = stopped_at.unwrap_or(text.len());
            if end > emitted {
                on_delta(&text[emitted..end]);
            }
        }
        let finish_reason = if stopped_at.is_some() { FinishReason::Stop } else { gen.finish_reason };
        if let Some(pos) = stopped_at {
            text.truncate(pos);
        }
        Ok(CompletionOutput {
            text,
            token_ids: gen.token_ids,
            finish_reason,
            cumulative_logprob: gen.cumulative_logprob,
            logprobs: params.logprobs.then_some(gen.logprobs),
            prompt_tokens: gen.prompt_tokens,
            prefill_ms: gen.prefill_ms,
            decode_tokens_per_s: gen.decode_tokens_per_s,
        })
    }
}
