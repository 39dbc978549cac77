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
