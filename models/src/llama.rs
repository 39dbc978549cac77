//! The Llama family (`llama`, `qwen2`) as a DSL model.
//!
//! Graph contract (what generation relies on), with symbols `batch`, `seq`, `past`:
//! * inputs: `input_ids: i64[batch, seq]`, then for each layer `i`
//!   `past.{i}.key`, `past.{i}.value`: `dtype[batch, past, kv_heads, head_dim]`;
//! * outputs: `logits: f32[batch, seq, vocab]` (`[batch, 1, vocab]` with
//!   `last_token_only`), then `present.{i}.key`, `present.{i}.value`:
//!   `dtype[batch, past + seq, kv_heads, head_dim]` — feed them back as `past.*`.
//!
//! The new tokens sit at positions `past .. past + seq`.

use crate::config::LlamaConfig;
use crate::layers::{Attention, Embedding, GatedMLP, KvCache, Linear, Parallel, RmsNorm, Rope, RotaryEmbedding};
use crate::{ModelError, Result};
use kiln_graph::ops::{DType, Dim, TensorType};
use kiln_graph::{Graph, Module, Result as GraphResult, Tensor, TensorExt, Tracer};

/// Hugging Face checkpoint names → kiln parameter names (module paths). `{i}` is the
/// layer index. A kiln parameter made of several HF tensors is their concatenation
/// along dim 0 in the listed order (TensorRT-LLM's fused `qkv` and gate+up `fc`).
/// Optional entries (biases, an untied `lm_head`) are read only when the config has them.
#[rustfmt::skip]
pub const WEIGHT_MAP: &[(&str, &[&str])] = &[
    // kiln                                          HF
    ("model.embed_tokens.weight",                    &["model.embed_tokens.weight"]),
    ("model.layers.{i}.input_layernorm.weight",      &["model.layers.{i}.input_layernorm.weight"]),
    ("model.layers.{i}.self_attn.qkv.weight",        &["model.layers.{i}.self_attn.q_proj.weight",
                                                       "model.layers.{i}.self_attn.k_proj.weight",
                                                       "model.layers.{i}.self_attn.v_proj.weight"]),
    ("model.layers.{i}.self_attn.qkv.bias",          &["model.layers.{i}.self_attn.q_proj.bias",
                                                       "model.layers.{i}.self_attn.k_proj.bias",
                                                       "model.layers.{i}.self_attn.v_proj.bias"]),
    ("model.layers.{i}.self_attn.o_proj.weight",     &["model.layers.{i}.self_attn.o_proj.weight"]),
    ("model.layers.{i}.self_attn.o_proj.bias",       &["model.layers.{i}.self_attn.o_proj.bias"]),
    ("model.layers.{i}.post_attention_layernorm.weight", &["model.layers.{i}.post_attention_layernorm.weight"]),
    ("model.layers.{i}.mlp.gate_up.weight",          &["model.layers.{i}.mlp.gate_proj.weight",
                                                       "model.layers.{i}.mlp.up_proj.weight"]),
    ("model.layers.{i}.mlp.gate_up.bias",            &["model.layers.{i}.mlp.gate_proj.bias",
                                                       "model.layers.{i}.mlp.up_proj.bias"]),
    ("model.layers.{i}.mlp.down_proj.weight",        &["model.layers.{i}.mlp.down_proj.weight"]),
    ("model.layers.{i}.mlp.down_proj.bias",          &["model.layers.{i}.mlp.down_proj.bias"]),
    ("model.norm.weight",                            &["model.norm.weight"]),
    ("lm_head.weight",                               &["lm_head.weight"]),
];

/// HF tensors that are not weights of the model and are skipped when present: rotary
/// buffers some older checkpoints saved, and `lm_head.weight` when the embeddings are
/// tied (some exporters write the shared tensor twice).
pub const IGNORED_HF_TENSORS: &[&str] = &["model.layers.{i}.self_attn.rotary_emb.inv_freq", "lm_head.weight"];

/// Options of [`LlamaForCausalLM::trace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOptions {
    /// Dtype of the weights, activations and KV cache (logits are always f32).
    pub dtype: DType,
    /// Compute logits for the last position only (`[batch, 1, vocab]`), as decoding needs.
    pub last_token_only: bool,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions { dtype: DType::F32, last_token_only: false }
    }
}

/// One kiln parameter and the HF tensors it is assembled from (see [`WEIGHT_MAP`]).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSource {
    /// The kiln parameter name.
    pub name: String,
    pub ty: TensorType,
    /// HF tensor names with their expected shapes, concatenated along dim 0 in order.
    pub parts: Vec<(String, Vec<usize>)>,
}

/// Pre-norm decoder block: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLayer {
    pub name: String,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: GatedMLP,
}

impl DecoderLayer {
    pub fn forward<'t>(
        &self,
        x: Tensor<'t>,
        rope: Rope<'t>,
        past: KvCache<'t>,
    ) -> GraphResult<(Tensor<'t>, KvCache<'t>)> {
        x.tracer().scope(&self.name, || {
            let (attn, present) = self.self_attn.forward(self.input_layernorm.forward(x)?, rope, past)?;
            let h = x.add(attn)?;
            let out = h.add(self.mlp.forward(self.post_attention_layernorm.forward(h)?)?)?;
            Ok((out, present))
        })
    }
}

/// A Llama-family causal LM: embeddings, decoder layers, final norm, `lm_head` (or the
/// embedding table when `tie_word_embeddings`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaForCausalLM {
    pub config: LlamaConfig,
    pub embed_tokens: Embedding,
    pub rotary_emb: RotaryEmbedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
}

impl LlamaForCausalLM {
    pub fn new(cfg: LlamaConfig) -> Result<LlamaForCausalLM> {
        let c = &cfg;
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
            || !c.head_dim.is_multiple_of(2)
        {
            return Err(ModelError::Unsupported(format!(
                "{} heads over {} kv heads with head_dim {}",
                c.num_attention_heads, c.num_key_value_heads, c.head_dim
            )));
        }
        let norm = |name: &str| RmsNorm { name: name.into(), size: c.hidden_size, eps: c.rms_norm_eps };
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer {
                name: i.to_string(),
                input_layernorm: norm("input_layernorm"),
                self_attn: Attention::new(
                    "self_attn",
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    (c.qkv_bias, c.o_proj_bias),
                ),
                post_attention_layernorm: norm("post_attention_layernorm"),
                mlp: GatedMLP::new("mlp", c.hidden_size, c.intermediate_size, c.mlp_bias),
            })
            .collect();
        Ok(LlamaForCausalLM {
            embed_tokens: Embedding {
                name: "embed_tokens".into(),
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
            },
            rotary_emb: RotaryEmbedding { inv_freq: c.rope_scaling.inv_freq(c.rope_theta, c.head_dim) },
            layers,
            norm: norm("norm"),
            lm_head: (!c.tie_word_embeddings)
                .then(|| Linear::new("lm_head", c.hidden_size, c.vocab_size, false, Parallel::Column)),
            config: cfg,
        })
    }

    /// Records the model (see the module docs for the graph's inputs and outputs).
    pub fn trace(&self, opts: &TraceOptions) -> Result<Graph> {
        let c = &self.config;
        let dt = opts.dtype;
        let tr = Tracer::new();
        let (batch, seq, past) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
        let ids = tr.input("input_ids", DType::I64, [batch.clone(), seq.clone()])?;
        let cache_shape = [batch, past.clone(), c.num_key_value_heads.into(), c.head_dim.into()];
        let mut cache = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let key = tr.input(&format!("past.{i}.key"), dt, cache_shape.clone())?;
            let value = tr.input(&format!("past.{i}.value"), dt, cache_shape.clone())?;
            cache.push(KvCache { key, value });
        }
        let (h, table, presents) = tr.scope("model", || {
            let table = self.embed_tokens.weight(&tr, dt)?;
            let mut h = self.embed_tokens.forward(table, ids)?;
            let rope = self.rotary_emb.tables(&tr, past.clone(), seq.clone(), dt)?;
            let mut presents = Vec::with_capacity(self.layers.len());
            tr.scope("layers", || {
                for (layer, past) in self.layers.iter().zip(&cache) {
                    let (out, present) = layer.forward(h, rope, *past)?;
                    h = out;
                    presents.push(present);
                }
                Ok(())
            })?;
            if opts.last_token_only {
                h = h.slice(1, &seq - &Dim::fixed(1), seq.clone())?;
            }
            Ok((self.norm.forward(h)?, table, presents))
        })?;
        let logits = match &self.lm_head {
            Some(lm_head) => lm_head.forward(h)?,
            None => tr.scope("lm_head", || h.linear(table, None))?,
        };
        tr.output("logits", logits.cast(DType::F32)?)?;
        for (i, p) in presents.iter().enumerate() {
            tr.output(&format!("present.{i}.key"), p.key)?;
            tr.output(&format!("present.{i}.value"), p.value)?;
        }
        Ok(tr.finish()?)
    }

    /// Every parameter of the traced model with the HF tensors it is made of (from
    /// [`WEIGHT_MAP`]) and their expected shapes.
    pub fn weight_sources(&self, dtype: DType) -> Result<Vec<WeightSource>> {
        let g = self.trace(&TraceOptions { dtype, last_token_only: false })?;
        g.params()
            .iter()
            .map(|(name, &node)| {
                let ty = g.node(node).outputs[0].clone();
                let shape = ty.shape.as_fixed().expect("parameters have fixed shapes");
                let (hf, layer) = WEIGHT_MAP
                    .iter()
                    .find_map(|(kiln, hf)| match_pattern(kiln, name).map(|i| (*hf, i)))
                    .ok_or_else(|| ModelError::Unsupported(format!("parameter `{name}` has no HF name")))?;
                let parts = if let [one] = hf {
                    vec![(fill(one, layer), shape)]
                } else {
                    let linear = self.fused_linear(name, layer)?;
                    let rows = &linear.out_splits;
                    hf.iter().zip(rows).map(|(p, &r)| (fill(p, layer), [&[r], &shape[1..]].concat())).collect()
                };
                Ok(WeightSource { name: name.clone(), ty, parts })
            })
            .collect()
    }

    /// The weight of every [`Linear`] with its tensor-parallel role, by parameter name
    /// (`model.layers.0.self_attn.qkv.weight` → `Column`), for a sharding pass. A tied
    /// `lm_head` reads `model.embed_tokens.weight` and is not listed.
    pub fn parallel_plan(&self) -> Vec<(String, Parallel)> {
        let mut plan = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (m, lin) in [("self_attn", &l.self_attn.qkv), ("self_attn", &l.self_attn.o_proj)]
                .into_iter()
                .chain([("mlp", &l.mlp.gate_up), ("mlp", &l.mlp.down_proj)])
            {
                plan.push((format!("{p}.{m}.{}.weight", lin.name), lin.parallel));
            }
        }
        plan.extend(self.lm_head.as_ref().map(|l| (format!("{}.weight", l.name), l.parallel)));
        plan
    }

    /// Whether an HF tensor that no parameter reads may be skipped silently.
    pub fn is_ignored_hf_tensor(&self, hf: &str) -> bool {
        IGNORED_HF_TENSORS.iter().any(|p| match_pattern(p, hf).is_some())
    }

    fn fused_linear(&self, param: &str, layer: Option<usize>) -> Result<&Linear> {
        let l = layer.and_then(|i| self.layers.get(i));
        match (l, param.rsplit('.').nth(1)) {
            (Some(l), Some("qkv")) => Ok(&l.self_attn.qkv),
            (Some(l), Some("gate_up")) => Ok(&l.mlp.gate_up),
            _ => Err(ModelError::Unsupported(format!("no fused linear for `{param}`"))),
        }
    }
}

/// Matches `name` against a pattern with at most one `{i}`; returns the layer index
/// (`Some(None)` for a pattern without `{i}`).
pub(crate) fn match_pattern(pattern: &str, name: &str) -> Option<Option<usize>> {
    match pattern.split_once("{i}") {
        None => (pattern == name).then_some(None),
        Some((pre, post)) => {
            let mid = name.strip_prefix(pre)?.strip_suffix(post)?;
            let ok = !mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit());
            ok.then(|| mid.parse().ok()).flatten().map(Some)
        }
    }
}

fn fill(pattern: &str, layer: Option<usize>) -> String {
    match layer {
        Some(i) => pattern.replace("{i}", &i.to_string()),
        None => pattern.to_string(),
    }
}
