//! Graphs shared by the codegen test files.

use kiln_ops::{DType, Dim};

/// One attention layer as the models trace it (qkv split, RoPE of q and k, the k / v
/// cache appends, causal GQA attention: 6 query heads over 2 kv heads of 64), through
/// the default pass pipeline.
pub fn attention_layer(dtype: DType) -> kiln_graph::Graph {
    use kiln_graph::{TensorExt, Tracer};
    let (b, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let (h, kh, d) = (6usize, 2usize, 64usize);
    let tr = Tracer::new();
    let qkv = tr.input("qkv", dtype, [b.clone(), s.clone(), Dim::fixed((h + 2 * kh) * d)]).unwrap();
    let cos = tr.input("cos", dtype, [s.clone(), Dim::fixed(d)]).unwrap();
    let sin = tr.input("sin", dtype, [s.clone(), Dim::fixed(d)]).unwrap();
    let cache = [b.clone(), p.clone(), Dim::fixed(kh), Dim::fixed(d)];
    let pk = tr.input("past.k", dtype, cache.clone()).unwrap();
    let pv = tr.input("past.v", dtype, cache).unwrap();
    let heads = |t, n: usize| -> kiln_graph::Tensor<'_> {
        kiln_graph::Tensor::reshape(t, [b.clone(), s.clone(), Dim::fixed(n), Dim::fixed(d)]).unwrap()
    };
    let q = heads(qkv.slice(-1, 0, h * d).unwrap(), h).rope(cos, sin).unwrap();
    let k = heads(qkv.slice(-1, h * d, (h + kh) * d).unwrap(), kh).rope(cos, sin).unwrap();
    let v = heads(qkv.slice(-1, (h + kh) * d, (h + 2 * kh) * d).unwrap(), kh);
    let (k, v) = (pk.concat(&[k], 1).unwrap(), pv.concat(&[v], 1).unwrap());
    let y = q.attention(k, v, kiln_ops::Mask::Causal, 0.125).unwrap();
    tr.output("y", y).unwrap();
    tr.output("present.k", k).unwrap();
    tr.output("present.v", v).unwrap();
    let g = tr.finish().unwrap();
    kiln_passes::default_pipeline().run(g).unwrap().graph
}

/// The attention node of a graph such as [`attention_layer`]'s, with what the fused
/// decode attention takes from it: its producers, their fused bodies and the caches' key
/// dim. (Every test crate compiles this module; not every one reads every field.)
#[allow(dead_code)]
pub struct AttentionParts {
    pub node: kiln_graph::NodeId,
    pub producers: kiln_codegen::decode::AttentionProducers,
    pub q: kiln_ops::FusedBody,
    pub k: kiln_ops::FusedBody,
    pub v: kiln_ops::FusedBody,
    pub keys: Dim,
}

/// [`AttentionParts`] of `g`'s (first) attention node.
pub fn attention_parts(g: &kiln_graph::Graph) -> AttentionParts {
    use kiln_ops::Op;
    let node = g.topo_order().into_iter().find(|&n| matches!(g.node(n).op, Op::Attention(_))).unwrap();
    let producers = kiln_codegen::decode::attention_producers(g, node).unwrap();
    let body = |n| match &g.node(n).op {
        Op::Fused(b) => (**b).clone(),
        other => panic!("a producer is {}", other.name()),
    };
    let keys = g.value_type(g.operands(node)[1]).shape.dims()[1].clone();
    AttentionParts { node, q: body(producers.q), k: body(producers.k), v: body(producers.v), producers, keys }
}
