//! Model configuration read from a Hugging Face `config.json`.
//!
//! [`LlamaConfig`] covers the Llama family: `model_type` `llama` and `qwen2` (which is
//! Llama with q/k/v biases). Fields missing from the file take the defaults of
//! `transformers`' `LlamaConfig`/`Qwen2Config`, except the sizes, which are required.
//! The rotary settings are read from `rope_theta` + `rope_scaling` (transformers 4.x) or
//! from `rope_parameters` (transformers 5).

use crate::{ModelError, Result};
use kiln_ops::DType;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The `model_type`s this config (and [`crate::llama::LlamaForCausalLM`]) supports.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "qwen2"];
/// The rotary scalings supported (`rope_scaling.rope_type`).
pub const SUPPORTED_ROPE_TYPES: &[&str] = &["default", "linear", "llama3"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Qwen2,
}

/// How the rotary frequencies are scaled, as in transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `_compute_default_rope_parameters`.
    Default,
    /// `_compute_linear_scaling_rope_parameters`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `_compute_llama3_parameters`: low frequencies divided by `factor`, high ones kept,
    /// a smooth interpolation in between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// A Llama-family configuration, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (qwen2 always; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (llama with `attention_bias`).
    pub o_proj_bias: bool,
    /// Biases on the MLP projections (llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's `torch_dtype` (or `dtype`), when given and known.
    pub torch_dtype: Option<DType>,
}

/// An int or a list of ints (`eos_token_id`).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![x],
            TokenIds::Many(v) => v,
        }
    }
}

/// `config.json` as written by transformers; everything optional, checked afterwards.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    rope_parameters: Option<Map<String, Value>>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
}

impl LlamaConfig {
    /// Reads and validates `config.json`. Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<LlamaConfig> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a `config.json` (errors name `<json>`).
    pub fn from_json_str(json: &str) -> Result<LlamaConfig> {
        Self::parse(json, Path::new("<json>"))
    }

    fn parse(json: &str, path: &Path) -> Result<LlamaConfig> {
        let bad = |msg: String| ModelError::Config { path: PathBuf::from(path), msg };
        let raw: RawConfig = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let model_type = match raw.model_type.as_deref() {
            Some("llama") => ModelType::Llama,
            Some("qwen2") => ModelType::Qwen2,
            other => {
                let name = other.map_or("(none)".to_string(), |s| format!("`{s}`"));
                return Err(ModelError::Unsupported(format!(
                    "model_type {name} in `{}` (supported: {})",
                    path.display(),
                    SUPPORTED_MODEL_TYPES.join(", ")
                )));
            }
        };
        let need = |v: Option<usize>, name: &str| -> Result<usize> {
            match v {
                None => Err(bad(format!("missing `{name}`"))),
                Some(0) => Err(bad(format!("`{name}` must be positive"))),
                Some(n) => Ok(n),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = need(raw.num_key_value_heads.or(Some(num_attention_heads)), "num_key_value_heads")?;
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads \
                 ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None if !hidden_size.is_multiple_of(num_attention_heads) => {
                return Err(bad(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}); \
                     set `head_dim`"
                )))
            }
            None => hidden_size / num_attention_heads,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim ({head_dim}) must be even for rotary embeddings")));
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ModelError::Unsupported(format!(
                "hidden_act `{act}` in `{}` (supported: silu)",
                path.display()
            )));
        }
        if let Some(kind) = raw.layer_types.iter().flatten().find(|t| *t != "full_attention") {
            return Err(ModelError::Unsupported(format!(
                "layer type `{kind}` in `{}` (supported: full_attention)",
                path.display()
            )));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(ModelError::Unsupported(format!("use_sliding_window in `{}`", path.display())));
        }
        // transformers 5 folds rope_theta into `rope_parameters`.
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = match raw.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| bad(format!("`rope_parameters.rope_theta` is not a number: {v}")))?,
            None => raw.rope_theta.unwrap_or(10000.0),
        };
        if rope_theta <= 0.0 {
            return Err(bad(format!("rope_theta ({rope_theta}) must be positive")));
        }
        let rope_scaling = parse_rope_scaling(rope, path)?;
        let eps = raw.rms_norm_eps.unwrap_or(1e-6);
        let torch_dtype = raw.torch_dtype.or(raw.dtype).and_then(|s| match s.as_str() {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        });
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(LlamaConfig {
            model_type,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(match model_type {
                ModelType::Llama => 2048,
                ModelType::Qwen2 => 32768,
            }),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: model_type == ModelType::Qwen2 || attention_bias,
            o_proj_bias: model_type == ModelType::Llama && attention_bias,
            mlp_bias: model_type == ModelType::Llama && raw.mlp_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id.and_then(|t| t.into_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            torch_dtype,
        })
    }
}

fn parse_rope_scaling(map: Option<&Map<String, Value>>, path: &Path) -> Result<RopeScaling> {
    let Some(map) = map else { return Ok(RopeScaling::Default) };
    let bad = |msg: String| ModelError::Config { path: PathBuf::from(path), msg };
    let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        let v = map.get(key).ok_or_else(|| bad(format!("rope scaling `{kind}` needs `{key}`")))?;
        let x = v.as_f64().ok_or_else(|| bad(format!("rope scaling `{key}` is not a number: {v}")))?;
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(bad(format!("rope scaling `{key}` must be positive, got {x}")))
        }
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if low >= high {
                return Err(bad(format!(
                    "llama3 rope scaling needs low_freq_factor ({low}) < high_freq_factor ({high})"
                )));
            }
            Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            })
        }
        other => Err(ModelError::Unsupported(format!(
            "rope scaling `{other}` in `{}` (supported: {})",
            path.display(),
            SUPPORTED_ROPE_TYPES.join(", ")
        ))),
    }
}

impl RopeScaling {
    /// The inverse frequencies (`head_dim / 2` of them), computed in f32 exactly as
    /// transformers' rope init functions do.
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        // _compute_default_rope_parameters:
        // 1 / (base ** (arange(0, dim, 2).float() / dim))
        let dim = head_dim as f32;
        let default: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / ((theta as f32) as f64).powf(((i as f32) / dim) as f64) as f32)
            .collect();
        match *self {
            RopeScaling::Default => default,
            RopeScaling::Linear { factor } => default.into_iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // _compute_llama3_parameters, step by step in f32 (python scalars are
                // applied to f32 tensors as f32; `s / t` is `reciprocal(t) * s`).
                let old = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = ((old / low_freq_factor) as f32, (old / high_freq_factor) as f32);
                let (factor, lo) = (factor as f32, low_freq_factor as f32);
                let span = (high_freq_factor - low_freq_factor) as f32;
                default
                    .into_iter()
                    .map(|f| {
                        let wavelen = (1.0 / f) * (2.0 * std::f64::consts::PI) as f32;
                        let f_llama = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = ((1.0 / wavelen) * old as f32 - lo) / span;
                        let smoothed = (1.0 - smooth) * f_llama / factor + smooth * f_llama;
                        if (high_wavelen..=low_wavelen).contains(&wavelen) {
                            smoothed
                        } else {
                            f_llama
                        }
                    })
                    .collect()
            }
        }
    }
}
