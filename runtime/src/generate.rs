//! Token-level generation: prefill, then decode steps feeding the KV cache back.
//!
//! A [`Generator`] drives an executor whose graph follows the model contract:
//!
//! * input `input_ids: i64[batch, seq]`;
//! * cache inputs `past.<name>` (for decoder models `past.{i}.key` / `past.{i}.value`,
//!   `[batch, past, kv_heads, head_dim]`), each with a matching output `present.<name>`
//!   `[batch, past + seq, …]`;
//! * output `logits: f32[batch, seq | 1, vocab]` (the last position is used).
//!
//! Generation runs the whole prompt at once on an empty cache (`[1, 0, …]` tensors:
//! the **prefill**), samples a token from the last position's logits, then runs one
//! token at a time (the **decode** steps), feeding every `present.*` output back as the
//! next step's `past.*` input. A batch of prompts is generated one sequence after the
//! other (batch size 1 per run), so prompts of different lengths need no padding.

use crate::cpu::CpuExecutor;
use crate::error::RuntimeError;
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_ops::{DType, HostTensor};
use std::ops::ControlFlow;
use std::time::Instant;

/// Something that runs a model graph: the CPU executor now, other backends later.
pub trait Forward {
    fn graph(&self) -> &Graph;
    fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, RuntimeError>;
}

impl Forward for CpuExecutor {
    fn graph(&self) -> &Graph {
        CpuExecutor::graph(self)
    }
    fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, RuntimeError> {
        CpuExecutor::run(self, feeds)
    }
}

impl Forward for crate::cuda::CudaExecutor {
    fn graph(&self) -> &Graph {
        crate::cuda::CudaExecutor::graph(self)
    }
    fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, RuntimeError> {
        crate::cuda::CudaExecutor::run(self, feeds).map_err(RuntimeError::from)
    }
}

/// An executor on the device chosen at run time. (One per loaded model, so the size
/// difference between the variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Cpu(CpuExecutor),
    Cuda(crate::cuda::CudaExecutor),
}

impl Backend {
    /// The device's name: `cpu` or `cuda`.
    pub fn device(&self) -> &'static str {
        match self {
            Backend::Cpu(_) => "cpu",
            Backend::Cuda(_) => "cuda",
        }
    }
}

impl Forward for Backend {
    fn graph(&self) -> &Graph {
        match self {
            Backend::Cpu(e) => Forward::graph(e),
            Backend::Cuda(e) => Forward::graph(e),
        }
    }
    fn run(&self, feeds: &IndexMap<String, HostTensor>) -> Result<IndexMap<String, HostTensor>, RuntimeError> {
        match self {
            Backend::Cpu(e) => Forward::run(e, feeds),
            Backend::Cuda(e) => Forward::run(e, feeds),
        }
    }
}

/// A model that keeps its own KV cache, one sequence at a time: what the sampling loop
/// ([`generate_with`]) drives. [`Generator`] implements it over any [`Forward`] with the
/// cache on the host; [`crate::cuda::CudaEngine`] keeps the cache on the GPU.
pub trait Decoder {
    /// Starts a new sequence with `prompt`; returns the last position's logits.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, GenerateError>;
    /// Appends `token`; returns the logits after it.
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, GenerateError>;
}

impl Decoder for crate::cuda::CudaEngine {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, GenerateError> {
        crate::cuda::CudaEngine::prefill(self, &[prompt.to_vec()]).map_err(RuntimeError::from)?;
        Ok(self.logits().map_err(RuntimeError::from)?)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, GenerateError> {
        self.set_tokens(&[token]).map_err(RuntimeError::from)?;
        self.decode_step().map_err(RuntimeError::from)?;
        Ok(self.logits().map_err(RuntimeError::from)?)
    }
}

/// [`Decoder`] over a [`Generator`] with the KV cache on the host.
struct HostDecoder<'g, E: Forward> {
    gen: &'g Generator<E>,
    cache: Option<KvCache>,
}

impl<E: Forward> Decoder for HostDecoder<'_, E> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let (logits, cache) = self.gen.forward(prompt, self.gen.empty_cache())?;
        self.cache = Some(cache);
        Ok(logits)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, GenerateError> {
        let cache = self.cache.take().ok_or_else(|| GenerateError::Contract("decode before prefill".into()))?;
        let (logits, cache) = self.gen.forward(&[token], cache)?;
        self.cache = Some(cache);
        Ok(logits)
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A stop token was sampled, or the step callback asked to stop (a stop string).
    Stop,
    /// `max_tokens` were generated.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generated token, as passed to the step callback.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// 0 for the token sampled after the prefill.
    pub index: usize,
    pub token: u32,
    /// Log-probability under the model's distribution (see [`crate::sampling`]).
    pub logprob: f32,
    /// Whether this token is one of `stop_token_ids` (generation ends after it).
    pub is_stop: bool,
}

/// The result of generating one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated ids (a stop token that ended generation is included, last).
    pub token_ids: Vec<u32>,
    /// One logprob per generated id.
    pub logprobs: Vec<f32>,
    /// Sum of `logprobs`.
    pub cumulative_logprob: f64,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Wall time of the prefill forward pass, in milliseconds.
    pub prefill_ms: f64,
    /// Wall time of the decode forward passes, in milliseconds.
    pub decode_ms: f64,
    /// Decode forward passes per second (each produces one token); 0 when there were none.
    pub decode_tokens_per_s: f64,
}

/// A generation request that cannot run, or a failed forward pass.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the prompt is empty: generation needs at least one prompt token")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus {max_new} new tokens exceeds the context of {context} tokens")]
    ContextExceeded { prompt: usize, max_new: usize, context: usize },
    #[error("prompt token id {id} (position {position}) is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, position: usize, vocab: usize },
    #[error("the graph does not follow the model contract: {0}")]
    Contract(String),
    /// Boxed: the runtime's error is large and generation errors are returned often.
    #[error(transparent)]
    Runtime(Box<RuntimeError>),
}

impl From<RuntimeError> for GenerateError {
    fn from(e: RuntimeError) -> GenerateError {
        GenerateError::Runtime(Box::new(e))
    }
}

/// One cache input and its empty-cache tensor.
#[derive(Clone, Debug)]
struct CacheSlot {
    past: String,
    present: String,
    dtype: DType,
    /// Dims after `[batch, past]`.
    tail: Vec<usize>,
}

/// Generates tokens with a model graph (see the module docs for the contract).
pub struct Generator<E: Forward = CpuExecutor> {
    exec: E,
    context_len: usize,
    cache: Vec<CacheSlot>,
    /// Fixed vocabulary size from the logits type, if known.
    vocab: Option<usize>,
}

impl<E: Forward> std::fmt::Debug for Generator<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("context_len", &self.context_len)
            .field("cache", &self.cache.iter().map(|c| &c.past).collect::<Vec<_>>())
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

/// A KV cache: the `past.*` feeds for the next step.
pub type KvCache = IndexMap<String, HostTensor>;

impl<E: Forward> Generator<E> {
    /// Checks that the executor's graph follows the model contract. `context_len` is the
    /// model's maximum sequence length (prompt plus generated tokens).
    pub fn new(exec: E, context_len: usize) -> Result<Generator<E>, GenerateError> {
        let g = exec.graph();
        let contract = |m: String| GenerateError::Contract(m);
        let ids = g.inputs().get("input_ids").ok_or_else(|| contract("no input `input_ids`".into()))?;
        let ids_ty = &g.node(*ids).outputs[0];
        if ids_ty.dtype != DType::I64 || ids_ty.shape.dims().len() != 2 {
            return Err(contract(format!("input `input_ids` must be i64[batch, seq], is {ids_ty}")));
        }
        let logits = g.outputs().get("logits").ok_or_else(|| contract("no output `logits`".into()))?;
        let logits_ty = g.value_type(*logits);
        if logits_ty.shape.dims().len() != 3 {
            return Err(contract(format!("output `logits` must be [batch, seq, vocab], is {logits_ty}")));
        }
        let vocab = logits_ty.shape.dims()[2].as_fixed();
        let mut cache = Vec::new();
        for (name, &n) in g.inputs() {
            if name == "input_ids" {
                continue;
            }
            let rest = name.strip_prefix("past.").ok_or_else(|| {
                contract(format!("unexpected input `{name}` (only `input_ids` and `past.*` cache inputs are fed)"))
            })?;
            let present = format!("present.{rest}");
            if !g.outputs().contains_key(&present) {
                return Err(contract(format!("cache input `{name}` has no matching output `{present}`")));
            }
            let ty = &g.node(n).outputs[0];
            let dims = ty.shape.dims();
            if dims.len() < 2 {
                return Err(contract(format!("cache input `{name}` must be [batch, past, …], is {ty}")));
            }
            let tail =
                dims[2..].iter().map(|d| d.as_fixed()).collect::<Option<Vec<usize>>>().ok_or_else(|| {
                    contract(format!("cache input `{name}` has symbolic dims after [batch, past]: {ty}"))
                })?;
            cache.push(CacheSlot { past: name.clone(), present, dtype: ty.dtype, tail });
        }
        Ok(Generator { exec, context_len, cache, vocab })
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    pub fn into_executor(self) -> E {
        self.exec
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The vocabulary size, when the logits' last dim is fixed.
    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }

    /// The cache inputs' names (`past.0.key`, …).
    pub fn cache_inputs(&self) -> impl Iterator<Item = &str> {
        self.cache.iter().map(|c| c.past.as_str())
    }

    /// An empty cache (`[1, 0, …]` tensors).
    pub fn empty_cache(&self) -> KvCache {
        self.cache
            .iter()
            .map(|c| {
                let mut shape = vec![1, 0];
                shape.extend_from_slice(&c.tail);
                (c.past.clone(), HostTensor::zeros(c.dtype, &shape))
            })
            .collect()
    }

    /// Runs `ids` (one sequence) on top of `cache`: returns the last position's logits
    /// and the grown cache.
    pub fn forward(&self, ids: &[u32], mut cache: KvCache) -> Result<(Vec<f32>, KvCache), GenerateError> {
        let mut feeds: IndexMap<String, HostTensor> = IndexMap::with_capacity(cache.len() + 1);
        feeds
            .insert("input_ids".into(), HostTensor::from_i64(&[1, ids.len()], ids.iter().map(|&i| i as i64).collect()));
        for c in &self.cache {
            let t = cache
                .swap_remove(&c.past)
                .ok_or_else(|| GenerateError::Contract(format!("the cache has no tensor `{}`", c.past)))?;
            feeds.insert(c.past.clone(), t);
        }
        let mut out = self.exec.run(&feeds)?;
        let logits =
            out.swap_remove("logits").ok_or_else(|| GenerateError::Contract("the run returned no `logits`".into()))?;
        let shape = logits.shape().to_vec();
        if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] == 0 {
            return Err(GenerateError::Contract(format!("`logits` has shape {shape:?}, expected [1, seq | 1, vocab]")));
        }
        let vocab = shape[2];
        let all = logits.to_f32_vec();
        let last = all[all.len() - vocab..].to_vec();
        let mut next = KvCache::with_capacity(self.cache.len());
        for c in &self.cache {
            let t = out
                .swap_remove(&c.present)
                .ok_or_else(|| GenerateError::Contract(format!("the run returned no `{}`", c.present)))?;
            next.insert(c.past.clone(), t);
        }
        Ok((last, next))
    }

    /// Generates one sequence. `on_step` is called after every sampled token (for
    /// streaming); returning `ControlFlow::Break(())` ends generation with
    /// [`FinishReason::Stop`] (used for stop strings).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        on_step: impl FnMut(&Step) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        self.check_prompt(prompt, params.max_tokens)?;
        generate_with(&mut HostDecoder { gen: self, cache: None }, prompt, params, on_step)
    }

    /// Generates every prompt (one after the other, each with its own sampler seeded from
    /// `params.seed`, so a seeded batch is reproducible prompt by prompt). All prompts
    /// are checked before any runs.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, GenerateError> {
        params.validate()?;
        for p in prompts {
            self.check_prompt(p, params.max_tokens)?;
        }
        prompts.iter().map(|p| self.generate(p, params, |_| ControlFlow::Continue(()))).collect()
    }

    /// Errors if `prompt` is empty, holds ids outside the vocabulary, or together with
    /// `max_tokens` exceeds the context.
    pub fn check_prompt(&self, prompt: &[u32], max_tokens: usize) -> Result<(), GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() + max_tokens > self.context_len {
            return Err(GenerateError::ContextExceeded {
                prompt: prompt.len(),
                max_new: max_tokens,
                context: self.context_len,
            });
        }
        if let Some(vocab) = self.vocab {
            if let Some((position, &id)) = prompt.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Err(GenerateError::TokenOutOfRange { id, position, vocab });
            }
        }
        Ok(())
    }
}

/// The sampling loop: prefill, then sample and decode one token at a time until a stop
/// token, `max_tokens`, or `on_step` breaks (a stop string). The caller checks the prompt
/// against the context first ([`Generator::check_prompt`]).
pub fn generate_with(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_step: impl FnMut(&Step) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    let mut sampler = Sampler::new(params)?;
    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Generation {
        token_ids: Vec::with_capacity(params.max_tokens),
        logprobs: Vec::with_capacity(params.max_tokens),
        cumulative_logprob: 0.0,
        finish_reason: FinishReason::Length,
        prompt_tokens: prompt.len(),
        prefill_ms: 0.0,
        decode_ms: 0.0,
        decode_tokens_per_s: 0.0,
    };
    let t0 = Instant::now();
    let mut logits = dec.prefill(prompt)?;
    out.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(prompt_tokens = prompt.len(), prefill_ms = out.prefill_ms, "prefill done");
    let mut decode_steps = 0usize;
    let mut decode_time = 0.0f64;
    loop {
        let s = sampler.sample(&logits, &history)?;
        let is_stop = params.stop_token_ids.contains(&s.token);
        out.token_ids.push(s.token);
        out.logprobs.push(s.logprob);
        out.cumulative_logprob += s.logprob as f64;
        history.push(s.token);
        let step = Step { index: out.token_ids.len() - 1, token: s.token, logprob: s.logprob, is_stop };
        let flow = on_step(&step);
        if is_stop || flow.is_break() {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.token_ids.len() >= params.max_tokens {
            out.finish_reason = FinishReason::Length;
            break;
        }
        let t = Instant::now();
        logits = dec.decode(s.token)?;
        decode_time += t.elapsed().as_secs_f64();
        decode_steps += 1;
    }
    out.decode_ms = decode_time * 1e3;
    out.decode_tokens_per_s = if decode_time > 0.0 { decode_steps as f64 / decode_time } else { 0.0 };
    tracing::debug!(
        generated = out.token_ids.len(),
        decode_tokens_per_s = out.decode_tokens_per_s,
        finish = %out.finish_reason,
        "generation done"
    );
    Ok(out)
}
