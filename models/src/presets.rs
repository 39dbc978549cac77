//! Model presets (the configs of well-known checkpoints) and deterministic random
//! weights, for benchmarks that need the shapes of a real model but not its values.
//!
//! Each preset is the checkpoint's Hugging Face `config.json`, parsed by
//! [`LlamaConfig::from_json_str`] exactly as loading the checkpoint would parse it, so
//! every field (rope scaling, eps, tying, token ids, …) is what the real model has.
//!
//! [`random_weights`] fills every parameter of the traced graph with pseudo-random
//! values the way transformers initializes a fresh model: matrices ~ N(0, 0.02²)
//! (`initializer_range`; here an Irwin–Hall sum of four uniforms, normal-ish and bounded
//! at ±3.5σ), norm weights 1, biases 0. Generation is parallel (rayon) and deterministic:
//! the values depend on the seed and the parameter's name only, never on the thread count.

use crate::config::LlamaConfig;
use crate::llama::{LlamaForCausalLM, TraceOptions};
use crate::{ModelError, Result};
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use indexmap::IndexMap;
use kiln_graph::Graph;
use kiln_ops::{DType, HostData, HostTensor};
use rayon::prelude::*;

/// `meta-llama/Llama-3.2-1B` `config.json`.
const LLAMA_3_2_1B: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 128256
}"#;

/// `meta-llama/Meta-Llama-3-8B` `config.json`.
const LLAMA_3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 128256
}"#;

/// `HuggingFaceTB/SmolLM2-135M` `config.json`.
const SMOLLM2_135M: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "eos_token_id": 0,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "is_llama_config": true,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_interleaved": false,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 49152
}"#;

/// The presets: name and `config.json` text.
const TABLE: &[(&str, &str)] =
    &[("llama-3.2-1b", LLAMA_3_2_1B), ("llama-3-8b", LLAMA_3_8B), ("smollm2-135m", SMOLLM2_135M)];

/// The names [`preset`] accepts.
pub const PRESETS: &[&str] = &["llama-3.2-1b", "llama-3-8b", "smollm2-135m"];

/// Standard deviation of random matrices (transformers' default `initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// The Hugging Face `config.json` text of preset `name` (case-insensitive).
pub fn preset_json(name: &str) -> Result<&'static str> {
    TABLE
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
        .map(|(_, json)| *json)
        .ok_or_else(|| ModelError::Unsupported(format!("unknown preset `{name}` (presets: {})", PRESETS.join(", "))))
}

/// The config of preset `name` (one of [`PRESETS`], case-insensitive), parsed from the
/// checkpoint's `config.json` as loading it would.
pub fn preset(name: &str) -> Result<LlamaConfig> {
    LlamaConfig::from_json_str(preset_json(name)?)
}

/// Number of parameter elements of a graph (every param once: a tied table counts once).
pub fn num_parameters(graph: &Graph) -> usize {
    graph
        .params()
        .values()
        .map(|&n| graph.node(n).outputs[0].shape.as_fixed().map_or(0, |s| s.iter().product::<usize>()))
        .sum()
}

/// How a parameter is initialized.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal(f32),
    Const(f32),
}

/// transformers' `_init_weights` for Llama: biases 0, norm weights (rank 1) 1, the rest
/// (linear and embedding matrices) normal with `initializer_range`.
fn init_for(name: &str, rank: usize) -> Init {
    if name.ends_with(".bias") {
        Init::Const(0.0)
    } else if rank <= 1 {
        Init::Const(1.0)
    } else {
        Init::Normal(INIT_STD)
    }
}

/// Every parameter of `model`'s traced graph (names, shapes and dtype as the graph has
/// them; `dtype` must be f32, f16 or bf16), filled with deterministic pseudo-random
/// values (see the module docs). The same `seed` gives the same bytes.
pub fn random_weights(model: &LlamaForCausalLM, dtype: DType, seed: u64) -> Result<IndexMap<String, HostTensor>> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::Request(format!(
            "random weights: dtype must be f32, f16 or bf16, not {}",
            dtype.name()
        )));
    }
    random_weights_for(&model.trace(&TraceOptions { dtype, last_token_only: true })?, seed)
}

/// [`random_weights`] for the parameters of `graph` (a traced graph, or the same after
/// the pass pipeline, which keeps every parameter's name, shape and dtype): the same
/// values, without tracing the model again (an executable plan holds the graph).
pub fn random_weights_for(graph: &Graph, seed: u64) -> Result<IndexMap<String, HostTensor>> {
    let mut out = IndexMap::with_capacity(graph.params().len());
    for (name, &node) in graph.params() {
        let ty = &graph.node(node).outputs[0];
        let shape = ty
            .shape
            .as_fixed()
            .ok_or_else(|| ModelError::Unsupported(format!("parameter `{name}` has a symbolic shape {}", ty.shape)))?;
        let n: usize = shape.iter().product();
        let init = init_for(name, shape.len());
        let tseed = splitmix(seed ^ fnv1a(name.as_bytes()));
        let data = fill(ty.dtype, n, init, tseed)
            .ok_or_else(|| ModelError::Unsupported(format!("parameter `{name}`: dtype {} is not a float", ty.dtype)))?;
        let t = HostTensor::new(shape, data).map_err(|e| ModelError::Weights(format!("`{name}`: {e}")))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Elements generated from one RNG stream; the unit of parallel work.
const CHUNK: usize = 1 << 16;

/// `n` values of `init` in `dtype` storage (`None` for a non-float dtype).
fn fill(dtype: DType, n: usize, init: Init, seed: u64) -> Option<HostData> {
    Some(match dtype {
        DType::F32 => {
            let mut v = vec![0f32; n];
            fill_with(&mut v, init, seed, |x| x);
            HostData::F32(v)
        }
        // Generated as bits into a zeroed (calloc'd) u16 vector, then reinterpreted.
        DType::F16 => {
            let mut v = vec![0u16; n];
            fill_with(&mut v, init, seed, |x| f16::from_f32(x).to_bits());
            HostData::F16(v.reinterpret_into::<f16>())
        }
        DType::BF16 => {
            let mut v = vec![0u16; n];
            fill_with(&mut v, init, seed, |x| bf16::from_f32(x).to_bits());
            HostData::BF16(v.reinterpret_into::<bf16>())
        }
        _ => return None,
    })
}

fn fill_with<T: Copy + Send + Sync>(v: &mut [T], init: Init, seed: u64, conv: impl Fn(f32) -> T + Sync) {
    match init {
        Init::Const(c) => {
            let c = conv(c);
            v.par_iter_mut().for_each(|x| *x = c);
        }
        Init::Normal(std) => {
            // Irwin–Hall: the sum of four 16-bit uniforms has mean 4·(2¹⁶−1)/2 and
            // variance 4·(2³²−1)/12.
            let mean = 2.0 * 65535.0;
            let scale = std / ((4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt() as f32);
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut state = splitmix(seed ^ (i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
                for x in chunk {
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let r = mix(state);
                    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
                    *x = conv((s as f32 - mean) * scale);
                }
            });
        }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One SplitMix64 step from `x` (a well-mixed seed).
fn splitmix(x: u64) -> u64 {
    mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_rules() {
        assert_eq!(init_for("model.layers.0.self_attn.qkv.bias", 1), Init::Const(0.0));
        assert_eq!(init_for("model.norm.weight", 1), Init::Const(1.0));
        assert_eq!(init_for("model.embed_tokens.weight", 2), Init::Normal(INIT_STD));
    }

    #[test]
    fn irwin_hall_is_centred_and_bounded() {
        let mut v = vec![0f32; 200_000];
        fill_with(&mut v, Init::Normal(1.0), 7, |x| x);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "std {}", var.sqrt());
        assert!(v.iter().all(|x| x.abs() <= 3.47), "bounded at 2·sqrt(3)");
        // Normal-ish: Irwin–Hall(4) has 67.0% within one standard deviation (normal:
        // 68.3%, uniform: 57.7%).
        let within = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / n;
        assert!((within - 0.670).abs() < 0.01, "within 1σ: {within}");
    }
}
