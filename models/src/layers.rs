//! Layers in the DSL: [`Embedding`], [`Linear`], [`RmsNorm`], [`RotaryEmbedding`],
//! [`Attention`] (GQA/MQA with a KV cache), [`GatedMLP`].
//!
//! A layer is a plain description (sizes, flags, its name); its `forward` records ops on
//! the tracer of its input, inside a scope of its own name, so parameters are named by
//! module path (`model.layers.0.self_attn.qkv.weight`). Parameters take the dtype of the
//! activations they meet. The layout follows TensorRT-LLM: one fused `qkv` projection
//! and one fused gate+up projection (`gate_up`), split after the matmul.

use kiln_graph::ops::{DType, Dim, Mask, Op, Shape};
use kiln_graph::{Module, Result, Tensor, TensorExt, Tracer};

/// How a later tensor-parallel pass shards a [`Linear`] (TensorRT-LLM's `ColumnLinear` /
/// `RowLinear`). Tracing ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallel {
    /// Split the output features (the weight's dim 0): each rank computes a slice.
    Column,
    /// Split the input features (the weight's dim 1), then all-reduce the partial sums.
    Row,
    /// Replicated.
    None,
}

/// `y = x · Wᵀ (+ b)` with `W [out, in]`. A fused linear (qkv, gate_up) lists the sizes
/// of its parts in `out_splits`; their sum is `out`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub name: String,
    pub in_features: usize,
    pub out_splits: Vec<usize>,
    pub bias: bool,
    pub parallel: Parallel,
}

impl Linear {
    pub fn new(name: &str, in_features: usize, out_features: usize, bias: bool, parallel: Parallel) -> Linear {
        Linear::fused(name, in_features, &[out_features], bias, parallel)
    }

    /// Several projections of the same input as one matmul; split the result with
    /// [`Linear::split`].
    pub fn fused(name: &str, in_features: usize, parts: &[usize], bias: bool, parallel: Parallel) -> Linear {
        Linear { name: name.into(), in_features, out_splits: parts.to_vec(), bias, parallel }
    }

    pub fn out_features(&self) -> usize {
        self.out_splits.iter().sum()
    }

    /// The parts of a fused output along its last axis.
    pub fn split<'t>(&self, y: Tensor<'t>) -> Result<Vec<Tensor<'t>>> {
        let mut start = 0;
        self.out_splits
            .iter()
            .map(|&n| {
                start += n;
                y.slice(-1, start - n, start)
            })
            .collect()
    }
}

impl Module for Linear {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        tr.scope(&self.name, || {
            let w = tr.param("weight", x.dtype(), [self.out_features(), self.in_features])?;
            let b = if self.bias { Some(tr.param("bias", x.dtype(), [self.out_features()])?) } else { None };
            x.linear(w, b)
        })
    }
}

/// Token embeddings: `weight [vocab, hidden]`, rows gathered by id.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
}

impl Embedding {
    /// Declares the table (so a tied `lm_head` can read it too).
    pub fn weight<'t>(&self, tr: &'t Tracer, dtype: DType) -> Result<Tensor<'t>> {
        tr.scope(&self.name, || tr.param("weight", dtype, [self.vocab_size, self.hidden_size]))
    }

    /// `ids [..]` (i64) → `[.., hidden]`, rows of `weight` (from [`Embedding::weight`]).
    pub fn forward<'t>(&self, weight: Tensor<'t>, ids: Tensor<'t>) -> Result<Tensor<'t>> {
        ids.tracer().scope(&self.name, || weight.gather(ids, 0))
    }
}

/// Root-mean-square norm over the last axis (computed in f32, as HF's `LlamaRMSNorm`).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub name: String,
    pub size: usize,
    pub eps: f64,
}

impl Module for RmsNorm {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        tr.scope(&self.name, || x.rms_norm(tr.param("weight", x.dtype(), [self.size])?, self.eps))
    }
}

/// Rotary position embedding tables, computed in the graph in f32 as HF's
/// `LlamaRotaryEmbedding.forward`: `freqs = positions ⊗ inv_freq`, `emb = [freqs, freqs]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RotaryEmbedding {
    /// `head_dim / 2` inverse frequencies (see [`crate::config::RopeScaling::inv_freq`]).
    pub inv_freq: Vec<f32>,
}

/// `cos`/`sin` tables `[seq, head_dim]` for the positions of the new tokens.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'t> {
    pub cos: Tensor<'t>,
    pub sin: Tensor<'t>,
}

impl RotaryEmbedding {
    /// Tables for positions `past .. past + seq`, cast to `dtype`.
    pub fn tables<'t>(&self, tr: &'t Tracer, past: Dim, seq: Dim, dtype: DType) -> Result<Rope<'t>> {
        tr.scope("rotary_emb", || {
            let pos = tr.apply(Op::Arange { start: past, len: seq.clone() }, &[])?[0];
            let half = self.inv_freq.len();
            let values: Vec<f64> = self.inv_freq.iter().map(|&f| f as f64).collect();
            let inv_freq = pos.constant(kiln_graph::ops::TensorType::new(DType::F32, [half]), &values)?;
            let freqs = pos.cast(DType::F32)?.reshape([seq, Dim::fixed(1)])?.mul(inv_freq)?;
            let emb = freqs.concat(&[freqs], -1)?;
            Ok(Rope { cos: emb.cos()?.cast(dtype)?, sin: emb.sin()?.cast(dtype)? })
        })
    }
}

/// One layer's KV cache: `[batch, len, kv_heads, head_dim]` each.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'t> {
    pub key: Tensor<'t>,
    pub value: Tensor<'t>,
}

/// Causal self-attention with grouped KV heads (`num_kv_heads` divides `num_heads`),
/// rotary embeddings and a KV cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub name: String,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Fused q, k, v projection (`[(h + 2·kh)·hd, hidden]`), column-parallel.
    pub qkv: Linear,
    /// Output projection (`o_proj`), row-parallel.
    pub o_proj: Linear,
}

impl Attention {
    pub fn new(name: &str, hidden: usize, heads: usize, kv_heads: usize, head_dim: usize, bias: (bool, bool)) -> Self {
        let (q, kv) = (heads * head_dim, kv_heads * head_dim);
        Attention {
            name: name.into(),
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            qkv: Linear::fused("qkv", hidden, &[q, kv, kv], bias.0, Parallel::Column),
            o_proj: Linear::new("o_proj", q, hidden, bias.1, Parallel::Row),
        }
    }

    /// `x [batch, seq, hidden]` with the cache of earlier positions → the output and the
    /// cache extended by the new keys and values.
    pub fn forward<'t>(&self, x: Tensor<'t>, rope: Rope<'t>, past: KvCache<'t>) -> Result<(Tensor<'t>, KvCache<'t>)> {
        x.tracer().scope(&self.name, || {
            let (b, s) = (x.dim(0)?, x.dim(1)?);
            let heads = |t: Tensor<'t>, n: usize| t.reshape([b.clone(), s.clone(), n.into(), self.head_dim.into()]);
            let [q, k, v] = <[_; 3]>::try_from(self.qkv.split(self.qkv.forward(x)?)?).expect("three parts");
            let q = heads(q, self.num_heads)?.rope(rope.cos, rope.sin)?;
            let k = heads(k, self.num_kv_heads)?.rope(rope.cos, rope.sin)?;
            let present = KvCache {
                key: past.key.concat(&[k], 1)?,
                value: past.value.concat(&[heads(v, self.num_kv_heads)?], 1)?,
            };
            let scale = 1.0 / (self.head_dim as f32).sqrt();
            let y = q.attention(present.key, present.value, Mask::Causal, scale)?;
            let y = y.reshape(Shape::new([b, s, (self.num_heads * self.head_dim).into()]))?;
            Ok((self.o_proj.forward(y)?, present))
        })
    }
}

/// `down(silu(gate(x)) · up(x))`, gate and up fused into one `gate_up` projection.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedMLP {
    pub name: String,
    pub gate_up: Linear,
    pub down_proj: Linear,
}

impl GatedMLP {
    pub fn new(name: &str, hidden: usize, intermediate: usize, bias: bool) -> GatedMLP {
        GatedMLP {
            name: name.into(),
            gate_up: Linear::fused("gate_up", hidden, &[intermediate, intermediate], bias, Parallel::Column),
            down_proj: Linear::new("down_proj", intermediate, hidden, bias, Parallel::Row),
        }
    }
}

impl Module for GatedMLP {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        x.tracer().scope(&self.name, || {
            let parts = self.gate_up.split(self.gate_up.forward(x)?)?;
            self.down_proj.forward(parts[0].silu()?.mul(parts[1])?)
        })
    }
}
