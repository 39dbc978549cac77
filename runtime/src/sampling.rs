//! Sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded.
//!
//! [`SamplingParams`] is the request-level configuration (the shape of TensorRT-LLM's
//! and vLLM's `SamplingParams`); [`Sampler`] turns one row of logits into a token.
//!
//! The logits are processed in the order Hugging Face `generate` uses:
//!
//! 1. **repetition penalty** (`repetition_penalty = θ`): for every token id already in the
//!    sequence (prompt and generated), a positive logit is divided by `θ` and a negative
//!    one multiplied by `θ` (each id once, however often it occurred);
//! 2. **temperature**: logits divided by `T`; `T = 0` means greedy (argmax of the
//!    penalized logits, lowest id on ties) and skips the remaining steps;
//! 3. **top-k**: only the `k` most likely tokens stay (`0` = off);
//! 4. **top-p** (nucleus): the smallest set of most likely tokens whose cumulative
//!    probability is `≥ p` stays (always at least one token; `1.0` = off).
//!
//! The token is then drawn from the renormalized distribution with a
//! [`ChaCha8Rng`]: the same seed gives the same tokens on every platform.
//!
//! **Logprobs.** The log-probability returned with each token is taken from the
//! *original model distribution*, `log_softmax(logits)[token]`, before penalty,
//! temperature and filtering (what vLLM and the OpenAI API report). It is therefore
//! comparable across sampling settings, and finite even when a filter would have
//! given the token probability 1.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// How to pick tokens and when to stop.
///
/// `Default` is greedy decoding of up to 32 tokens with every filter off (what
/// TensorRT-LLM does when no sampling option is set).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Softmax temperature, `>= 0`; `0` = greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Nucleus sampling threshold in `(0, 1]`; `1.0` = off.
    pub top_p: f32,
    /// Hugging Face repetition penalty, `> 0`; `1.0` = off.
    pub repetition_penalty: f32,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Token ids that end generation (the id itself is kept in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text is cut before the first one (applied by
    /// the text-level API, `kiln_models::llm`).
    pub stop: Vec<String>,
    /// Report per-token logprobs.
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 32,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            logprobs: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams { max_tokens, ..Default::default() }
    }

    /// Checks every field; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |field: &'static str, value: String, expected: &'static str| {
            Err(SamplingError::InvalidParam { field, value, expected })
        };
        if self.max_tokens == 0 {
            return bad("max_tokens", "0".into(), "at least 1");
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature.to_string(), "a finite number >= 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p.to_string(), "a number in (0, 1] (1 = off)");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty", self.repetition_penalty.to_string(), "a finite number > 0 (1 = off)");
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return bad("stop", format!("entry {i} is the empty string"), "non-empty strings");
        }
        Ok(())
    }

    /// Whether sampling is greedy (deterministic argmax).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A bad sampling request or bad logits.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter `{field}` = {value}: expected {expected}")]
    InvalidParam { field: &'static str, value: String, expected: &'static str },
    #[error("logits row is empty (vocabulary of size 0)")]
    EmptyLogits,
    #[error("logits contain NaN (at token id {0})")]
    NanLogits(usize),
}

/// One sampled token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// `log_softmax(original logits)[token]` (see the module docs).
    pub logprob: f32,
}

/// Draws tokens according to [`SamplingParams`]; owns the seeded RNG, so one
/// `Sampler` per sequence gives reproducible sequences.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
    rng: ChaCha8Rng,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("temperature", &self.temperature)
            .field("top_k", &self.top_k)
            .field("top_p", &self.top_p)
            .field("repetition_penalty", &self.repetition_penalty)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Validates `params` and seeds the RNG (from `params.seed`, or from the OS).
    pub fn new(params: &SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Sampler {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            repetition_penalty: params.repetition_penalty,
            rng,
        })
    }

    /// Picks the next token from one row of logits (`[vocab]`). `history` is every
    /// token of the sequence so far (prompt and generated), for the repetition penalty;
    /// ids outside the vocabulary are ignored.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<Sampled, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(SamplingError::NanLogits(i));
        }
        let mut processed = logits.to_vec();
        apply_repetition_penalty(&mut processed, history, self.repetition_penalty);
        let token = if self.temperature == 0.0 {
            argmax(&processed)
        } else {
            let probs = filtered_probs(&processed, self.temperature, self.top_k, self.top_p);
            // Walk the kept tokens in (probability desc, id asc) order.
            let total: f64 = probs.iter().map(|&(_, p)| p).sum();
            let u: f64 = self.rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut chosen = probs[probs.len() - 1].0;
            for &(id, p) in &probs {
                acc += p;
                if u < acc {
                    chosen = id;
                    break;
                }
            }
            chosen
        };
        Ok(Sampled { token: token as u32, logprob: log_softmax_at(logits, token) })
    }
}

/// HF repetition penalty, in place: for each distinct id in `history`, a logit `> 0` is
/// divided by `penalty`, otherwise multiplied by it.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

/// Index of the largest value; the lowest index on ties.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[i]`, computed in f64.
pub fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    (logits[i] as f64 - lse) as f32
}

/// The distribution after temperature, top-k and top-p: `(id, probability)` pairs sorted by
/// probability descending (id ascending on ties), renormalized to sum to 1. Never empty.
pub fn filtered_probs(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<(usize, f64)> {
    let t = temperature as f64;
    let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    // Descending by logit, ascending id on ties (stable sort keeps id order).
    order.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 && top_k < order.len() {
        order.truncate(top_k);
    }
    let m = scaled[order[0]];
    let mut probs: Vec<(usize, f64)> = if m == f64::NEG_INFINITY {
        // Every logit is -inf: uniform over what is left.
        order.iter().map(|&i| (i, 1.0)).collect()
    } else {
        order.iter().map(|&i| (i, (scaled[i] - m).exp())).collect()
    };
    let z: f64 = probs.iter().map(|&(_, p)| p).sum();
    for p in &mut probs {
        p.1 /= z;
    }
    if top_p < 1.0 {
        let p = top_p as f64;
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, &(_, q)) in probs.iter().enumerate() {
            cum += q;
            // A little slack so that a cumulative sum landing exactly on `p` counts as
            // reaching it despite rounding (HF: drop tokens whose ascending cumsum is
            // `<= 1 - p`).
            if cum >= p - 1e-6 {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let z: f64 = probs.iter().map(|&(_, p)| p).sum();
        for p in &mut probs {
            p.1 /= z;
        }
    }
    probs.retain(|&(_, p)| p > 0.0);
    if probs.is_empty() {
        probs.push((order[0], 1.0));
    }
    probs
}
