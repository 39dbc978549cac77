//! Snapshots of `text::print` for traced models: a 2-layer MLP and a transformer block
//! with attention and a KV cache. Each snapshot also round-trips through the parser.

use kiln_graph::ops::{DType, Dim, Mask};
use kiln_graph::text::{parse, print};
use kiln_graph::{Graph, Module, Result, Tensor, TensorExt, Tracer};

/// `y = x · wᵀ + b` with PyTorch's `[out, in]` weight layout.
struct Linear {
    inp: usize,
    out: usize,
    bias: bool,
}

impl Linear {
    fn new(inp: usize, out: usize, bias: bool) -> Linear {
        Linear { inp, out, bias }
    }
}

impl Module for Linear {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        let w = tr.param("weight", DType::F32, [self.out, self.inp])?;
        let b = if self.bias { Some(tr.param("bias", DType::F32, [self.out])?) } else { None };
        x.linear(w, b)
    }
}

/// Linear → SiLU → Linear, both with bias.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Module for Mlp {
    fn forward<'t>(&self, x: Tensor<'t>) -> Result<Tensor<'t>> {
        let tr = x.tracer();
        let h = tr.scope("fc1", || self.fc1.forward(x))?.silu()?;
        tr.scope("fc2", || self.fc2.forward(h))
    }
}

fn mlp_graph() -> Graph {
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::sym("batch"), Dim::fixed(32)]).unwrap();
    let mlp = Mlp { fc1: Linear::new(32, 128, true), fc2: Linear::new(128, 16, true) };
    let y = tr.scope("mlp", || mlp.forward(x)).unwrap();
    tr.output("y", y).unwrap();
    tr.finish().unwrap()
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 128;

fn rms_norm<'t>(x: Tensor<'t>, name: &str) -> Result<Tensor<'t>> {
    let tr = x.tracer();
    tr.scope(name, || {
        let w = tr.param("weight", DType::F32, [HIDDEN])?;
        x.rms_norm(w, 1e-5)
    })
}

fn proj<'t>(x: Tensor<'t>, name: &str, out: usize, inp: usize) -> Result<Tensor<'t>> {
    x.tracer().scope(name, || Linear::new(inp, out, false).forward(x))
}

/// A Llama-style decoder block on `x [batch, seq, 64]` with a KV cache of `past`
/// positions: returns the block output and the extended caches.
fn block<'t>(
    x: Tensor<'t>,
    cos: Tensor<'t>,
    sin: Tensor<'t>,
    past_k: Tensor<'t>,
    past_v: Tensor<'t>,
) -> Result<(Tensor<'t>, Tensor<'t>, Tensor<'t>)> {
    let tr = x.tracer();
    let (b, s) = (Dim::sym("batch"), Dim::sym("seq"));
    let heads = |n: usize| [b.clone(), s.clone(), Dim::fixed(n), Dim::fixed(HEAD_DIM)];
    let h = rms_norm(x, "input_layernorm")?;
    let (attn, k, v) = tr.scope("self_attn", || {
        let q = proj(h, "q_proj", HEADS * HEAD_DIM, HIDDEN)?.reshape(heads(HEADS))?.rope(cos, sin)?;
        let k = proj(h, "k_proj", KV_HEADS * HEAD_DIM, HIDDEN)?.reshape(heads(KV_HEADS))?.rope(cos, sin)?;
        let v = proj(h, "v_proj", KV_HEADS * HEAD_DIM, HIDDEN)?.reshape(heads(KV_HEADS))?;
        let k = past_k.concat(&[k], 1)?;
        let v = past_v.concat(&[v], 1)?;
        let o = q.attention(k, v, Mask::Causal, 0.25)?;
        let o = o.reshape([b.clone(), s.clone(), Dim::fixed(HIDDEN)])?;
        Ok((proj(o, "o_proj", HIDDEN, HEADS * HEAD_DIM)?, k, v))
    })?;
    let x = (x + attn)?;
    let h = rms_norm(x, "post_attention_layernorm")?;
    let m = tr.scope("mlp", || {
        let gate = proj(h, "gate_proj", INTER, HIDDEN)?.silu()?;
        let up = proj(h, "up_proj", INTER, HIDDEN)?;
        proj((gate * up)?, "down_proj", HIDDEN, INTER)
    })?;
    Ok(((x + m)?, k, v))
}

fn block_graph() -> Graph {
    let tr = Tracer::new();
    let (b, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let x = tr.input("x", DType::F32, [b.clone(), s.clone(), Dim::fixed(HIDDEN)]).unwrap();
    let cos = tr.input("cos", DType::F32, [s.clone(), Dim::fixed(HEAD_DIM)]).unwrap();
    let sin = tr.input("sin", DType::F32, [s.clone(), Dim::fixed(HEAD_DIM)]).unwrap();
    let cache = [b.clone(), p.clone(), Dim::fixed(KV_HEADS), Dim::fixed(HEAD_DIM)];
    let past_k = tr.input("past_k", DType::F32, cache.clone()).unwrap();
    let past_v = tr.input("past_v", DType::F32, cache).unwrap();
    let (y, k, v) = tr.scope("model.layers.0", || block(x, cos, sin, past_k, past_v)).unwrap();
    tr.output("y", y).unwrap();
    tr.output("present_k", k).unwrap();
    tr.output("present_v", v).unwrap();
    tr.finish().unwrap()
}

/// Prints `g`, checks print → parse → print is the identity, and returns the text.
fn checked_print(g: &Graph) -> String {
    let text = print(g);
    let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(print(&back), text);
    text
}

#[test]
fn mlp() {
    let g = mlp_graph();
    insta::assert_snapshot!(checked_print(&g));
}

#[test]
fn transformer_block_with_kv_cache() {
    let g = block_graph();
    let present = Dim::sym("past") + Dim::sym("seq");
    for name in ["present_k", "present_v"] {
        let t = g.value_type(g.outputs()[name]);
        assert_eq!(t.to_string(), format!("f32[batch, {present}, 2, 16]"));
    }
    assert_eq!(g.value_type(g.outputs()["y"]).to_string(), "f32[batch, seq, 64]");
    insta::assert_snapshot!(checked_print(&g));
}

#[test]
fn snapshots_are_deterministic() {
    assert_eq!(print(&block_graph()), print(&block_graph()));
    assert_eq!(print(&mlp_graph()), print(&mlp_graph()));
}
