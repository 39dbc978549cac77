//! Small traced graphs for the tests.
#![allow(dead_code)]

use kiln_graph::ops::{DType, Dim, Mask};
use kiln_graph::{Graph, Result, Tensor, TensorExt, Tracer};

/// `x [seq, 8]` → `mlp.up` (linear 8→32) → silu → `mlp.down` (linear 32→8) → top-2.
pub fn mlp_graph() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("seq"), Dim::fixed(8)]).unwrap();
    let y = tr
        .scope("mlp", || {
            let h = tr.scope("up", || {
                let w = tr.param("weight", DType::F32, [32usize, 8])?;
                x.linear(w, None)
            })?;
            let h = h.silu()?;
            tr.scope("down", || {
                let w = tr.param("weight", DType::F32, [8usize, 32])?;
                h.linear(w, None)
            })
        })
        .unwrap();
    let (values, indices) = y.top_k(2, -1).unwrap();
    tr.output("values", values).unwrap();
    tr.output("indices", indices).unwrap();
    tr.finish().unwrap()
}

fn layer<'t>(tr: &'t Tracer, x: Tensor<'t>, d: usize, heads: usize) -> Result<Tensor<'t>> {
    let hd = d / heads;
    let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
    let h = tr.scope("input_layernorm", || {
        let w = tr.param("weight", DType::F32, [d])?;
        x.rms_norm(w, 1e-5)
    })?;
    let a = tr.scope("self_attn", || {
        let proj = |name: &str| -> Result<Tensor<'t>> {
            tr.scope(name, || {
                let w = tr.param("weight", DType::F32, [d, d])?;
                h.linear(w, None)?.reshape([batch.clone(), seq.clone(), Dim::fixed(heads), Dim::fixed(hd)])
            })
        };
        let (q, k, v) = (proj("q_proj")?, proj("k_proj")?, proj("v_proj")?);
        let o = q.attention(k, v, Mask::Causal, 1.0 / (hd as f32).sqrt())?.reshape([
            batch.clone(),
            seq.clone(),
            Dim::fixed(d),
        ])?;
        tr.scope("o_proj", || {
            let w = tr.param("weight", DType::F32, [d, d])?;
            o.linear(w, None)
        })
    })?;
    let x = x.add(a)?;
    let h = tr.scope("post_attention_layernorm", || {
        let w = tr.param("weight", DType::F32, [d])?;
        x.rms_norm(w, 1e-5)
    })?;
    let m = tr.scope("mlp", || {
        let up = tr.scope("up_proj", || {
            let w = tr.param("weight", DType::F32, [2 * d, d])?;
            h.linear(w, None)
        })?;
        let act = up.silu()?;
        tr.scope("down_proj", || {
            let w = tr.param("weight", DType::F32, [d, 2 * d])?;
            act.linear(w, None)
        })
    })?;
    x.add(m)
}

/// A toy decoder: `model.embed_tokens`, `model.layers.{0..n}` (attention + MLP),
/// `model.norm`, `lm_head`, then argmax.
pub fn toy_transformer(layers: usize) -> Graph {
    let (vocab, d, heads) = (64usize, 16usize, 2usize);
    let tr = Tracer::new();
    let ids = tr.input("input_ids", DType::I64, [Dim::sym("batch"), Dim::sym("seq")]).unwrap();
    let logits = tr
        .scope("model", || {
            let mut x = tr.scope("embed_tokens", || {
                let w = tr.param("weight", DType::F32, [vocab, d])?;
                w.gather(ids, 0)
            })?;
            for i in 0..layers {
                x = tr.scope(&format!("layers.{i}"), || layer(&tr, x, d, heads))?;
            }
            tr.scope("norm", || {
                let w = tr.param("weight", DType::F32, [d])?;
                x.rms_norm(w, 1e-5)
            })
        })
        .and_then(|h| {
            tr.scope("lm_head", || {
                let w = tr.param("weight", DType::F32, [vocab, d])?;
                h.linear(w, None)
            })
        })
        .unwrap();
    let next = logits.argmax(-1).unwrap();
    tr.output("logits", logits).unwrap();
    tr.output("next_token", next).unwrap();
    tr.finish().unwrap()
}
