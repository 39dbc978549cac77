//! Shared helpers of the model tests: tiny HF-style checkpoints written with the
//! `safetensors` crate, and running a traced model on the CPU executor with its KV cache.
#![allow(dead_code)]

use indexmap::IndexMap;
use kiln_models::config::LlamaConfig;
use kiln_models::llama::{LlamaForCausalLM, TraceOptions};
use kiln_ops::{DType, HostTensor};
use kiln_runtime::cpu::CpuExecutor;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// A fresh, empty directory under cargo's temporary directory for integration tests.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-models").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn rand_values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// One checkpoint tensor: HF name, shape, values.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor a `transformers` checkpoint of `cfg` holds, with random values (norm
/// weights around 1).
pub fn hf_tensors(cfg: &LlamaConfig, seed: u64) -> Vec<Tensor> {
    let (h, q, kv, f) = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (n, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            shapes.push((format!("{p}.self_attn.{n}.weight"), vec![rows, h]));
            if cfg.qkv_bias {
                shapes.push((format!("{p}.self_attn.{n}.bias"), vec![rows]));
            }
        }
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.o_proj_bias {
            shapes.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (n, shape) in [("gate_proj", vec![f, h]), ("up_proj", vec![f, h]), ("down_proj", vec![h, f])] {
            let rows = shape[0];
            shapes.push((format!("{p}.mlp.{n}.weight"), shape));
            if cfg.mlp_bias {
                shapes.push((format!("{p}.mlp.{n}.bias"), vec![rows]));
            }
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n = shape.iter().product();
            let mut values = rand_values(seed * 1000 + k as u64, n, 0.5);
            if name.ends_with("norm.weight") {
                values.iter_mut().for_each(|v| *v = 1.0 + *v * 0.4);
            }
            Tensor { name, shape, values }
        })
        .collect()
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` as one safetensors file with element type `dtype` (F32, F16, BF16).
pub fn write_safetensors(path: &Path, tensors: &[Tensor], dtype: Dtype) {
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|t| {
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => t.values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                Dtype::BF16 => t.values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
                other => panic!("unsupported {other:?}"),
            };
            (t.name.clone(), Raw { dtype, shape: t.shape.clone(), bytes })
        })
        .collect();
    safetensors::serialize_to_file(raws.iter().map(|(n, r)| (n.as_str(), r)), None, path).unwrap();
}

/// A checkpoint directory: `config.json` and `model.safetensors` (f32).
pub fn write_checkpoint(dir: &Path, config_json: &str, tensors: &[Tensor]) {
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors, Dtype::F32);
}

/// A `config.json` for a tiny llama; `extra` is spliced into the object (`"k": v, …`).
pub fn llama_json(layers: usize, hidden: usize, heads: usize, kv_heads: usize, extra: &str) -> String {
    let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
    format!(
        r#"{{"model_type": "llama", "vocab_size": 11, "hidden_size": {hidden}, "intermediate_size": 12,
            "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "num_key_value_heads": {kv_heads},
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "torch_dtype": "float32"{extra}}}"#
    )
}

/// A model loaded for the CPU: the executors of the full-sequence and last-token graphs.
pub struct Loaded {
    pub model: LlamaForCausalLM,
    pub full: CpuExecutor,
    pub last: CpuExecutor,
    pub dtype: DType,
}

impl Loaded {
    pub fn new(dir: &Path, dtype: DType) -> Loaded {
        let (model, weights) = kiln_models::weights::load_pretrained(dir, dtype).unwrap();
        let exec = |last_token_only| {
            let g = model.trace(&TraceOptions { dtype, last_token_only }).unwrap();
            CpuExecutor::new(g, weights.clone()).unwrap()
        };
        let (full, last) = (exec(false), exec(true));
        Loaded { model, full, last, dtype }
    }

    /// An empty cache for `batch` sequences.
    pub fn empty_cache(&self, batch: usize) -> Vec<HostTensor> {
        let c = &self.model.config;
        let n = 2 * c.num_hidden_layers;
        (0..n).map(|_| HostTensor::zeros(self.dtype, &[batch, 0, c.num_key_value_heads, c.head_dim])).collect()
    }

    /// Runs `ids` (`batch` rows of equal length) after `cache`; returns the logits
    /// (`[batch, seq or 1, vocab]`) and the new cache.
    pub fn step(&self, ids: &[Vec<i64>], cache: Vec<HostTensor>, last_only: bool) -> (HostTensor, Vec<HostTensor>) {
        let (b, s) = (ids.len(), ids[0].len());
        let mut feeds = IndexMap::new();
        feeds.insert("input_ids".to_string(), HostTensor::from_i64(&[b, s], ids.concat()));
        for (i, t) in cache.into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            feeds.insert(format!("past.{}.{kind}", i / 2), t);
        }
        let exec = if last_only { &self.last } else { &self.full };
        let mut out = exec.run(&feeds).unwrap();
        let logits = out.shift_remove("logits").unwrap();
        (logits, out.into_values().collect())
    }

    /// Greedy decoding of one sequence with the KV cache: prefill the prompt, then feed
    /// each argmax back one token at a time. Returns the prompt plus `new` tokens.
    pub fn greedy(&self, prompt: &[i64], new: usize) -> Vec<i64> {
        let mut tokens = prompt.to_vec();
        let (mut logits, mut cache) = self.step(&[prompt.to_vec()], self.empty_cache(1), true);
        for k in 0..new {
            let next = argmax(&logits.to_f32_vec());
            tokens.push(next as i64);
            if k + 1 < new {
                (logits, cache) = self.step(&[vec![next as i64]], cache, true);
            }
        }
        tokens
    }
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `max |a - b|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
