//! The default pass pipeline must not change what a graph computes: the CPU reference
//! executor gives bit-identical outputs before and after it.

use indexmap::IndexMap;
use kiln_graph::{Graph, TensorExt, Tracer};
use kiln_ops::{DType, Dim, HostTensor, Mask, TensorType};
use kiln_runtime::cpu::CpuExecutor;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A decoder block with a KV cache, rope from an arange over `past`, constants that fold
/// (the rope frequencies), identities that simplify and a bf16 cast round trip.
fn block() -> Graph {
    let (h, heads, hd) = (16usize, 2usize, 8usize);
    let tr = Tracer::new();
    let x = tr.input("x", DType::F32, [Dim::fixed(1), Dim::sym("seq"), Dim::fixed(h)]).unwrap();
    let past_k = tr.input("past_k", DType::F32, [Dim::fixed(1), Dim::sym("past"), Dim::fixed(heads), Dim::fixed(hd)]);
    let past_k = past_k.unwrap();
    let w = |name: &str, r: usize, c: usize| tr.param(name, DType::F32, [r, c]).unwrap();
    let norm = tr.param("norm", DType::F32, [h]).unwrap();
    let hn = x.rms_norm(norm, 1e-5).unwrap();
    let q = hn.linear(w("wq", h, h), None).unwrap();
    let k = hn.linear(w("wk", h, h), None).unwrap();
    let shape = [Dim::fixed(1), Dim::sym("seq"), Dim::fixed(heads), Dim::fixed(hd)];
    let (q, k) = (q.reshape(shape.clone()).unwrap(), k.reshape(shape.clone()).unwrap());
    // Rope: inv_freq = 1 / 10000^(2i/hd) as constants (folded), positions past..past+seq.
    let inv: Vec<f64> = (0..hd / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)).collect();
    let half = x.constant(TensorType::new(DType::F32, [hd / 2]), &inv).unwrap();
    let freqs = half.concat(&[half], 0).unwrap().mul_scalar(1.0).unwrap(); // *1 simplifies
    let pos = tr.apply(kiln_ops::Op::Arange { start: Dim::sym("past"), len: Dim::sym("seq") }, &[]).unwrap()[0]
        .cast(DType::F32)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let ang = pos.mul(freqs.unsqueeze(0).unwrap()).unwrap();
    let (q, k) = (
        q.rope(ang.cos().unwrap(), ang.sin().unwrap()).unwrap(),
        k.rope(ang.cos().unwrap(), ang.sin().unwrap()).unwrap(),
    );
    let k_all = past_k.concat(&[k], 1).unwrap();
    let a = q.attention(k_all, k_all, Mask::Causal, 0.25).unwrap();
    let a = a.reshape([Dim::fixed(1), Dim::sym("seq"), Dim::fixed(h)]).unwrap();
    let a = a.cast(DType::BF16).unwrap().cast(DType::F32).unwrap(); // rounds: kept
    let y = (x + a.linear(w("wo", h, h), None).unwrap()).unwrap();
    let gate = y.linear(w("wg", 32, h), None).unwrap().silu().unwrap();
    let up = y.linear(w("wu", 32, h), None).unwrap();
    let out = (y + (gate * up).unwrap().linear(w("wd", h, 32), None).unwrap()).unwrap();
    tr.output("out", out.softmax(-1).unwrap()).unwrap();
    tr.output("present_k", k_all).unwrap();
    tr.finish().unwrap()
}

fn run(g: Graph, seq: usize, past: usize) -> IndexMap<String, HostTensor> {
    let mut weights = IndexMap::new();
    for (i, (name, &n)) in g.params().iter().enumerate() {
        let shape = g.node(n).outputs[0].shape.as_fixed().unwrap();
        let len = shape.iter().product();
        weights.insert(name.clone(), HostTensor::from_f32(&shape, values(len, i as u64 + 1)));
    }
    let exec = CpuExecutor::new(g, weights).unwrap();
    let mut feeds = IndexMap::new();
    feeds.insert("x".to_string(), HostTensor::from_f32(&[1, seq, 16], values(seq * 16, 100)));
    feeds.insert("past_k".to_string(), HostTensor::from_f32(&[1, past, 2, 8], values(past * 16, 200)));
    exec.run(&feeds).unwrap()
}

#[test]
fn the_default_pipeline_preserves_cpu_outputs_bit_for_bit() {
    let traced = block();
    let optimized = kiln_passes::default_pipeline().verify(true).run(traced.clone()).unwrap();
    let rewrites: usize = optimized.timings.iter().map(|t| t.1).sum();
    assert!(rewrites > 0, "the pipeline should have something to do on this block");
    assert!(optimized.graph.node_count() < traced.node_count());
    // Fusion ran: the rms norm, the rope angles' cos/sin, RoPE of q and of k, the bf16
    // round trip, the first residual add, SiLU·up, and the second residual add with the
    // softmax are one fused node each; no bare elementwise or reduce op is left.
    let ops: Vec<&str> = optimized.graph.topo_order().into_iter().map(|n| optimized.graph.node(n).op.name()).collect();
    assert_eq!(ops.iter().filter(|&&o| o == "fused").count(), 8, "{ops:?}");
    assert!(optimized.graph.petgraph().node_weights().all(|n| !n.op.is_elementwise() && !n.op.is_reduce()), "{ops:?}");
    for (seq, past) in [(5, 0), (1, 5), (3, 4)] {
        let (a, b) = (run(traced.clone(), seq, past), run(optimized.graph.clone(), seq, past));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert_eq!(t.shape(), b[name].shape(), "{name}");
            let (x, y) = (t.to_f32_vec(), b[name].to_f32_vec());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name} differs at seq={seq} past={past}"
            );
        }
    }
}
