//! Llama-family models from GGUF files (llama.cpp's format): the config from the
//! `llama.*` metadata, the weights dequantized from the tensors, the tokenizer from
//! `tokenizer.ggml.*` (see [`super::tokenizer`]).
//!
//! One source of truth for each mapping:
//! * **Config.** [`hf_config_json`] turns the metadata into the `config.json` a
//!   Hugging Face checkpoint of the model would have; [`config_from_gguf`] parses it with
//!   [`LlamaConfig::from_json_str`] (so every check of `config.json` applies), and
//!   [`crate::convert`] writes it out.
//! * **Weights.** [`TENSOR_NAMES`] maps GGUF tensor names to Hugging Face names;
//!   from there [`crate::llama::WEIGHT_MAP`] fuses q/k/v and gate/up into kiln's
//!   parameters, and [`crate::weights::assemble_weights`] checks every shape and reports
//!   every missing, mis-shaped or unexpected tensor at once — the same code as for
//!   safetensors checkpoints. `attn_q` / `attn_k` rows are un-permuted on the way
//!   ([`super::unpermute_qk`]): llama.cpp's converter reorders them for ggml's
//!   adjacent-pair RoPE, kiln (like transformers) rotates halves.
//!
//! Tied embeddings are the absence of `output.weight`. Rope scaling:
//! `llama.rope.scaling.type` `none` or `linear` (with `llama.rope.scaling.factor`); other
//! types, llama3-style `rope_freqs.weight` factors and mixtures of experts are refused
//! with an error naming them.

use super::tokenizer::tokenizer_from_gguf;
use super::{dequant, unpermute_qk, GgufFile};
use crate::config::LlamaConfig;
use crate::llama::{match_pattern, LlamaForCausalLM};
use crate::tokenizer::Tokenizer;
use crate::weights::{assemble_weights, TensorSource};
use crate::{ModelError, Result};
use indexmap::IndexMap;
use kiln_ops::{DType, HostTensor};
use serde_json::{json, Value};
use std::path::Path;

/// The `general.architecture` values supported.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// GGUF tensor names → Hugging Face tensor names (`{i}` is the layer index), as
/// written by llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`.
#[rustfmt::skip]
pub const TENSOR_NAMES: &[(&str, &str)] = &[
    // GGUF                          Hugging Face
    ("token_embd.weight",            "model.embed_tokens.weight"),
    ("blk.{i}.attn_norm.weight",     "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight",        "model.layers.{i}.self_attn.q_proj.weight"), // rows permuted
    ("blk.{i}.attn_k.weight",        "model.layers.{i}.self_attn.k_proj.weight"), // rows permuted
    ("blk.{i}.attn_v.weight",        "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_q.bias",          "model.layers.{i}.self_attn.q_proj.bias"),   // permuted
    ("blk.{i}.attn_k.bias",          "model.layers.{i}.self_attn.k_proj.bias"),   // permuted
    ("blk.{i}.attn_v.bias",          "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight",   "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_output.bias",     "model.layers.{i}.self_attn.o_proj.bias"),
    ("blk.{i}.ffn_norm.weight",      "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight",      "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight",        "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight",      "model.layers.{i}.mlp.down_proj.weight"),
    ("blk.{i}.ffn_gate.bias",        "model.layers.{i}.mlp.gate_proj.bias"),
    ("blk.{i}.ffn_up.bias",          "model.layers.{i}.mlp.up_proj.bias"),
    ("blk.{i}.ffn_down.bias",        "model.layers.{i}.mlp.down_proj.bias"),
    ("output_norm.weight",           "model.norm.weight"),
    ("output.weight",                "lm_head.weight"),
];

/// Which heads count un-permutes a GGUF tensor's rows, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permuted {
    No,
    Query,
    Key,
}

fn permuted(gguf_name: &str) -> Permuted {
    let kind = gguf_name.split('.').rev().nth(1);
    match kind {
        Some("attn_q") => Permuted::Query,
        Some("attn_k") => Permuted::Key,
        _ => Permuted::No,
    }
}

/// The Hugging Face name of a GGUF tensor, `None` when [`TENSOR_NAMES`] has no entry.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    TENSOR_NAMES.iter().find_map(|(g, hf)| {
        match_pattern(g, gguf_name).map(|layer| match layer {
            Some(i) => hf.replace("{i}", &i.to_string()),
            None => hf.to_string(),
        })
    })
}

/// Checks `general.architecture` and refuses what the llama model cannot run.
fn check_architecture(g: &GgufFile) -> Result<&'static str> {
    let arch = g.architecture()?;
    let Some(&arch) = SUPPORTED_ARCHITECTURES.iter().find(|a| **a == arch) else {
        return Err(ModelError::Unsupported(format!(
            "GGUF architecture `{arch}` in `{}` (supported: {})",
            g.path().display(),
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    };
    if g.opt_u32(&format!("{arch}.expert_count"))?.unwrap_or(0) > 0 {
        return Err(ModelError::Unsupported(format!(
            "mixture-of-experts model (`{arch}.expert_count` > 0) in `{}`",
            g.path().display()
        )));
    }
    if g.tensors().contains_key("rope_freqs.weight") {
        return Err(ModelError::Unsupported(format!(
            "per-frequency rope factors (`rope_freqs.weight`, llama3-style rope scaling) in `{}`",
            g.path().display()
        )));
    }
    Ok(arch)
}

/// An f32 metadata value as the decimal it was most likely written from: the shortest
/// decimal that rounds to it (`1e-5` stored as f32 is 9.99999974e-6; the HF config said
/// `1e-5`).
fn decimal(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(f64::from(x))
}

/// The `config.json` of the Hugging Face checkpoint the GGUF file was converted from,
/// rebuilt from its metadata (float32 weights).
pub fn hf_config_json(g: &GgufFile) -> Result<Value> {
    let arch = check_architecture(g)?;
    let key = |k: &str| format!("{arch}.{k}");
    let heads = g.get_usize(&key("attention.head_count"))?;
    let kv_heads = g.opt_u32(&key("attention.head_count_kv"))?.map_or(heads, |n| n as usize);
    let hidden = g.get_usize(&key("embedding_length"))?;
    let vocab = match g.opt_u32(&key("vocab_size"))? {
        Some(n) => n as usize,
        None => match g.tensors().get("token_embd.weight") {
            Some(t) => t.shape[0],
            None => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        },
    };
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.get_usize(&key("feed_forward_length"))?,
        "num_hidden_layers": g.get_usize(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": decimal(g.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        "rope_theta": g.opt_f32(&key("rope.freq_base"))?.map_or(10000.0, decimal),
        "max_position_embeddings": g.get_usize(&key("context_length"))?,
        "hidden_act": "silu",
        "tie_word_embeddings": !g.tensors().contains_key("output.weight"),
        "attention_bias": g.tensors().contains_key("blk.0.attn_q.bias"),
        "mlp_bias": g.tensors().contains_key("blk.0.ffn_up.bias"),
        "torch_dtype": "float32",
    });
    let obj = cfg.as_object_mut().expect("an object");
    // head_dim: `attention.key_length` when given; the rotary dims must cover it.
    let head_dim = match g.opt_u32(&key("attention.key_length"))? {
        Some(d) => {
            obj.insert("head_dim".into(), json!(d));
            Some(d as usize)
        }
        None => (heads > 0 && hidden % heads == 0).then(|| hidden / heads),
    };
    if let (Some(hd), Some(rot)) = (head_dim, g.opt_u32(&key("rope.dimension_count"))?) {
        if rot as usize != hd {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embeddings (`{arch}.rope.dimension_count` = {rot}, head_dim {hd}) in `{}`",
                g.path().display()
            )));
        }
    }
    if let Some(v) = g.opt_u32(&key("attention.value_length"))? {
        if Some(v as usize) != head_dim {
            return Err(ModelError::Unsupported(format!(
                "`{arch}.attention.value_length` = {v} differs from the key length in `{}`",
                g.path().display()
            )));
        }
    }
    let scaling = g.opt_str(&key("rope.scaling.type"))?;
    match scaling {
        None | Some("none") => {}
        Some("linear") => {
            let factor = g.get_f32(&key("rope.scaling.factor"))?;
            obj.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": decimal(factor)}));
        }
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "rope scaling `{other}` (`{arch}.rope.scaling.type`) in `{}` (supported: none, linear)",
                g.path().display()
            )))
        }
    }
    if let Some(bos) = g.opt_u32("tokenizer.ggml.bos_token_id")? {
        obj.insert("bos_token_id".into(), json!(bos));
    }
    if let Some(eos) = g.opt_u32("tokenizer.ggml.eos_token_id")? {
        obj.insert("eos_token_id".into(), json!(eos));
    }
    Ok(cfg)
}

/// The model configuration from the GGUF metadata (see the module docs).
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
    let json = hf_config_json(g)?;
    LlamaConfig::from_json_str(&json.to_string()).map_err(|e| match e {
        ModelError::Config { msg, .. } => ModelError::Gguf {
            path: g.path().to_path_buf(),
            msg: format!("the config made from the metadata is invalid: {msg}"),
        },
        other => other,
    })
}

/// The tensors of a GGUF file under their Hugging Face names, q/k un-permuted and
/// dequantized on read: a [`TensorSource`] for [`assemble_weights`], and what
/// [`crate::convert`] writes out.
pub struct GgufTensors<'a> {
    file: &'a GgufFile,
    heads: usize,
    kv_heads: usize,
    /// HF (or, when unmapped, GGUF) name → GGUF name, in file order.
    names: IndexMap<String, String>,
}

impl<'a> GgufTensors<'a> {
    pub fn new(file: &'a GgufFile, config: &LlamaConfig) -> GgufTensors<'a> {
        let names =
            file.tensors().keys().map(|g| (hf_tensor_name(g).unwrap_or_else(|| g.clone()), g.clone())).collect();
        GgufTensors { file, heads: config.num_attention_heads, kv_heads: config.num_key_value_heads, names }
    }

    /// The GGUF name behind a Hugging Face name.
    pub fn gguf_name(&self, hf: &str) -> Option<&str> {
        self.names.get(hf).map(String::as_str)
    }
}

impl TensorSource for GgufTensors<'_> {
    fn tensor_names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn tensor_shape(&self, name: &str) -> Option<std::result::Result<Vec<usize>, String>> {
        let info = self.file.tensors().get(self.names.get(name)?)?;
        if !dequant::SUPPORTED.contains(&info.ggml_type) {
            let names: Vec<_> = dequant::SUPPORTED.iter().map(|t| t.name()).collect();
            return Some(Err(format!(
                "has type {}, which kiln cannot dequantize (supported: {})",
                info.ggml_type,
                names.join(", ")
            )));
        }
        let heads = match permuted(&info.name) {
            Permuted::No => None,
            Permuted::Query => Some(self.heads),
            Permuted::Key => Some(self.kv_heads),
        };
        if let Some(h) = heads {
            let rows = info.shape.first().copied().unwrap_or(1);
            if h == 0 || !rows.is_multiple_of(2 * h) {
                return Some(Err(format!("has {rows} rows, which do not split into {h} heads of an even size")));
            }
        }
        Some(Ok(info.shape.clone()))
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let gguf = self.names.get(name).ok_or_else(|| ModelError::Weights(format!("  missing `{name}`")))?;
        let (shape, values) = self.file.tensor_f32(gguf)?;
        let heads = match permuted(gguf) {
            Permuted::No => return Ok(values),
            Permuted::Query => self.heads,
            Permuted::Key => self.kv_heads,
        };
        let rows = shape.first().copied().unwrap_or(1);
        let row_len = shape.iter().skip(1).product();
        if heads == 0 || !rows.is_multiple_of(2 * heads) {
            return Err(ModelError::Weights(format!(
                "  `{gguf}` has {rows} rows, which do not split into {heads} heads of an even size"
            )));
        }
        Ok(unpermute_qk(&values, rows, row_len, heads))
    }

    fn describe(&self, name: &str) -> String {
        match self.names.get(name) {
            Some(g) if g != name => format!("`{g}` (`{name}`)"),
            Some(g) => format!("`{g}`"),
            None => match TENSOR_NAMES.iter().find_map(|(g, hf)| match_pattern(hf, name).map(|l| (g, l))) {
                Some((g, Some(i))) => format!("`{}` (`{name}`)", g.replace("{i}", &i.to_string())),
                Some((g, None)) => format!("`{g}` (`{name}`)"),
                None => format!("`{name}`"),
            },
        }
    }
}

/// The model and its weights (as `dtype`) of an open GGUF file.
pub fn model_from_gguf(g: &GgufFile, dtype: DType) -> Result<(LlamaForCausalLM, IndexMap<String, HostTensor>)> {
    let model = LlamaForCausalLM::new(config_from_gguf(g)?)?;
    let weights = assemble_weights(&GgufTensors::new(g, &model.config), &model, dtype)?;
    Ok((model, weights))
}

/// Loads the Llama-family model in the GGUF file at `path`: the model and its weights
/// dequantized to `dtype`, ready for [`LlamaForCausalLM::trace`] with the same dtype.
pub fn load_gguf(path: impl AsRef<Path>, dtype: DType) -> Result<(LlamaForCausalLM, IndexMap<String, HostTensor>)> {
    model_from_gguf(&GgufFile::open(path)?, dtype)
}

/// [`load_gguf`] plus the tokenizer (with its chat template) from the same file.
pub fn load_gguf_with_tokenizer(
    path: impl AsRef<Path>,
    dtype: DType,
) -> Result<(LlamaForCausalLM, IndexMap<String, HostTensor>, Tokenizer)> {
    let g = GgufFile::open(path)?;
    let tokenizer = tokenizer_from_gguf(&g)?;
    let (model, weights) = model_from_gguf(&g, dtype)?;
    Ok((model, weights, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(hf_tensor_name("blk.12.attn_q.weight").unwrap(), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(hf_tensor_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(permuted("blk.3.attn_q.weight"), Permuted::Query);
        assert_eq!(permuted("blk.3.attn_k.bias"), Permuted::Key);
        assert_eq!(permuted("blk.3.attn_v.weight"), Permuted::No);
    }
}
