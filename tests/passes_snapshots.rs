//! The IR of a tiny Llama after every stage of the default pipeline, as insta snapshots
//! (each stage also round-trips through the text format), and structural checks of the
//! fused graph: how many kernels each decoder layer launches, and that RMSNorm, RoPE and
//! SiLU·up are one fused node each.

use kiln::graph::text::{parse, print};
use kiln::graph::{Graph, NodeId, Value};
use kiln::models::config::LlamaConfig;
use kiln::models::llama::{LlamaForCausalLM, TraceOptions};
use kiln::ops::{DType, FusedBody, FusedKind, Op};
use kiln::passes::default_pipeline;
use std::collections::BTreeMap;

/// 2 layers, hidden 64, 4 heads over 2 kv heads of 16, intermediate 128, vocab 128;
/// bf16, logits for the last token only (the decode graph).
fn tiny_llama() -> Graph {
    let cfg = LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    let model = LlamaForCausalLM::new(cfg).unwrap();
    model.trace(&TraceOptions { dtype: DType::BF16, last_token_only: true }).unwrap()
}

fn optimized() -> Graph {
    default_pipeline().verify(true).run(tiny_llama()).unwrap().graph
}

#[test]
fn every_stage_of_a_tiny_llama() {
    let traced = tiny_llama();
    let pm = default_pipeline().verify(true).keep_stages(true);
    assert_eq!(pm.pass_names(), ["fold", "simplify", "cse", "dce", "fuse", "fuse_matvec", "fuse_epilogue"]);
    let out = pm.run(traced.clone()).unwrap();
    let mut stages = vec![("traced", traced)];
    stages.extend(out.stages.into_iter().map(|s| (s.pass, s.graph)));
    for (i, (name, g)) in stages.iter().enumerate() {
        let text = print(g);
        assert_eq!(print(&parse(&text).unwrap()), text, "stage {name} round-trips");
        insta::assert_snapshot!(format!("tiny_llama_{i:02}_{name}"), text);
    }
}

/// The decoder layer a scope belongs to (`model.layers.{i}` and below).
fn layer_of(scope: &str) -> Option<usize> {
    let rest = scope.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Sources produce no kernel and a reshape is a view; everything else launches one.
fn launches_kernel(op: &Op) -> bool {
    !op.is_source() && !matches!(op, Op::Reshape(_))
}

fn body(g: &Graph, n: NodeId) -> Option<&FusedBody> {
    match &g.node(n).op {
        Op::Fused(b) => Some(b),
        _ => None,
    }
}

fn body_ops(b: &FusedBody) -> Vec<&'static str> {
    b.nodes.iter().map(|n| n.op.name()).collect()
}

/// The fused nodes that read the param `name`.
fn fused_readers(g: &Graph, name: &str) -> Vec<NodeId> {
    let p = g.params()[name];
    g.users(p).into_iter().map(|(u, _)| u).filter(|&u| body(g, u).is_some()).collect()
}

/// Per decoder layer: at most 8 kernels. Layer 0's 8: attention, the o_proj and
/// down_proj matmuls and 5 fused nodes: input RMSNorm + the qkv projection (a
/// matrix-vector group), RoPE of q, the k-cache append with the RoPE of k, the v-cache
/// append with the v slice, residual add + post-attention RMSNorm + gate_up + SiLU·up
/// (a matrix-vector group with an epilogue). In later layers the input norm also takes
/// the previous layer's last residual add, so that group (with the qkv projection) is in
/// scope `model.layers`: 7 in the layer.
#[test]
fn decoder_layers_launch_at_most_8_kernels() {
    let g = optimized();
    let mut per_layer: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        if let Some(i) = layer_of(&node.scope) {
            if launches_kernel(&node.op) {
                per_layer.entry(i).or_default().push(node.op.name());
            }
        }
    }
    assert_eq!(per_layer.len(), 2);
    for (i, kernels) in &per_layer {
        let mut k = kernels.clone();
        k.sort_unstable();
        let fused = if *i == 0 { 5 } else { 4 };
        let mut want = vec!["attention", "matmul", "matmul"];
        want.extend(std::iter::repeat_n("fused", fused));
        want.sort_unstable();
        assert_eq!(k, want, "layer {i}");
        assert!(kernels.len() <= 8, "layer {i}: {kernels:?}");
    }
    // Outside the layers: the embedding, the rope tables, the cross-layer add + norm +
    // qkv, the last residual add, the final norm with lm_head, and the logits cast.
    let rest: Vec<&str> = g
        .topo_order()
        .into_iter()
        .filter(|&n| layer_of(&g.node(n).scope).is_none() && launches_kernel(&g.node(n).op))
        .map(|n| g.node(n).op.name())
        .collect();
    assert_eq!(rest, ["gather", "fused", "fused", "fused", "fused", "fused"]);
    // Every matrix-vector group: a prologue (a norm), the projection, and for gate_up
    // the SwiGLU epilogue (two column slices of y).
    let matvec: Vec<String> = g
        .topo_order()
        .into_iter()
        .filter_map(|n| match body(&g, n)?.kind() {
            Ok(FusedKind::MatVec { prologue, epilogue, .. }) => {
                let w = g.operands(n).last().map(|v| g.node(v.node).op.clone())?;
                let Op::Param { name, .. } = w else { return None };
                let form = if matches!(*prologue, FusedKind::Rows { .. }) { "rows" } else { "elementwise" };
                let epi = epilogue.map_or(String::new(), |e| format!(" + epilogue {:?} x {}", e.offsets, e.width));
                Some(format!("{form} {name}{epi}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        matvec,
        [
            "rows model.layers.0.self_attn.qkv.weight",
            "rows model.layers.0.mlp.gate_up.weight + epilogue [0, 128] x 128",
            "rows model.layers.1.self_attn.qkv.weight",
            "rows model.layers.1.mlp.gate_up.weight + epilogue [0, 128] x 128",
            "rows lm_head.weight",
        ]
    );
}

#[test]
fn rms_norm_rope_and_silu_up_are_one_fused_node_each() {
    let g = optimized();
    for i in 0..2 {
        // Each RMSNorm (weight, mean of squares, rsqrt) is one row-reduction kernel; from
        // the second norm on it also computes the residual add before it (two outputs).
        for (norm, adds) in [("input_layernorm", i > 0), ("post_attention_layernorm", true)] {
            let readers = fused_readers(&g, &format!("model.layers.{i}.{norm}.weight"));
            assert_eq!(readers.len(), 1, "layer {i} {norm}");
            // The norm is the prologue of the projection after it (a matrix-vector
            // group): its outputs are the residual sum (when it adds), the normalized x,
            // then the projection.
            let b = body(&g, readers[0]).unwrap();
            let ops = body_ops(b);
            assert_eq!(ops.iter().filter(|&&o| o == "reduce_mean").count(), 1, "{ops:?}");
            assert!(ops.contains(&"rsqrt"));
            let Ok(FusedKind::MatVec { prologue, epilogue, .. }) = b.kind() else { panic!("{:?}", b.kind()) };
            assert!(matches!(*prologue, FusedKind::Rows { .. }));
            // The post-attention norm's projection (gate_up) also has SwiGLU as epilogue.
            let swiglu = norm == "post_attention_layernorm";
            assert_eq!(epilogue.is_some(), swiglu, "layer {i} {norm}");
            let pro_ops = body_ops(&b.prologue().unwrap());
            assert_eq!(ops[pro_ops.len()], "matmul");
            assert_eq!(ops.last(), Some(if swiglu { &"mul" } else { &"matmul" }));
            let outputs = if adds { 3 } else { 2 } + usize::from(swiglu);
            assert_eq!(b.outputs.len(), outputs, "layer {i} {norm}: {ops:?}");
            // The norm adds eps; with the residual add there is a second add.
            let n_adds = pro_ops.iter().filter(|&&o| o == "add").count();
            assert_eq!(n_adds, 1 + usize::from(adds), "layer {i} {norm}: {ops:?}");
        }
        // RoPE: q and k each one elementwise kernel reading the qkv projection, doing the
        // head slices, rotate_half (neg + concat) and the cos/sin products; k's also
        // appends to the cache (its domain is the whole concat), and the v append is a
        // third kernel reading the projection.
        let qkv = fused_readers(&g, &format!("model.layers.{i}.self_attn.qkv.weight"));
        let y = Value::new(qkv[0], (body(&g, qkv[0]).unwrap().outputs.len() - 1) as u8);
        let readers: Vec<&FusedBody> = g
            .users(qkv[0])
            .into_iter()
            .filter(|&(u, slot)| g.operands(u)[slot as usize] == y)
            .filter_map(|(u, _)| body(&g, u))
            .collect();
        assert_eq!(readers.len(), 3, "layer {i}");
        let ropes: Vec<&FusedBody> = readers.iter().copied().filter(|b| body_ops(b).contains(&"neg")).collect();
        assert_eq!(ropes.len(), 2, "layer {i}");
        let v = readers.iter().find(|b| !body_ops(b).contains(&"neg")).unwrap();
        assert_eq!(body_ops(v), ["slice", "reshape", "concat"], "layer {i}: the v append");
        let mut heads = Vec::new();
        for b in ropes {
            let ops = body_ops(b);
            for op in ["slice", "reshape", "neg", "concat", "mul", "add"] {
                assert!(ops.contains(&op), "layer {i} rope: {ops:?}");
            }
            let Ok(FusedKind::Elementwise { domain }) = b.kind() else { panic!("{:?}", b.kind()) };
            heads.push(domain.to_string());
        }
        heads.sort();
        assert_eq!(heads, ["[batch, past + seq, 2, 16]", "[batch, seq, 4, 16]"]);
        // SiLU·up: the gate and up slices, silu and the product, the epilogue of gate_up;
        // down_proj is a plain matmul of its result.
        let gate_up = fused_readers(&g, &format!("model.layers.{i}.mlp.gate_up.weight"));
        let b = body(&g, gate_up[0]).unwrap();
        let mut ops = body_ops(&b.epilogue().unwrap());
        ops.sort_unstable();
        assert_eq!(ops, ["add", "div", "exp", "expand", "mul", "neg", "slice", "slice"], "layer {i}");
        assert!(fused_readers(&g, &format!("model.layers.{i}.mlp.down_proj.weight")).is_empty());
    }
}

/// Fusion shrinks the activation memory of a decode step: intermediates inside a fused
/// group never reach memory (the sum of all intermediates at least halves; the peak
/// stays within 10%). Checked on the real Llama-3.2-1B and SmolLM2 shapes
/// (tracing only, no weights), planned at batch 1, seq 1, past 200 (the numbers the
/// README's before/after table quotes; run with `--nocapture` to see them).
#[test]
fn fusion_lowers_the_decode_arena_of_real_shapes() {
    use kiln::ops::{Bindings, Sym};
    use kiln::passes::memory::{check, plan, PlanOptions};
    for preset in ["llama-3.2-1b", "smollm2-135m"] {
        let model = LlamaForCausalLM::new(kiln::models::presets::preset(preset).unwrap()).unwrap();
        let traced = model.trace(&TraceOptions { dtype: DType::BF16, last_token_only: true }).unwrap();
        let mut b = Bindings::new();
        for (s, v) in [("batch", 1), ("seq", 1), ("past", 200)] {
            b.insert(Sym::new(s), v);
        }
        let before = kiln::passes::pipeline::canonicalize().run(traced.clone()).unwrap().graph;
        let after = default_pipeline().run(traced).unwrap().graph;
        let (pb, pa) =
            (plan(&before, &b, PlanOptions::default()).unwrap(), plan(&after, &b, PlanOptions::default()).unwrap());
        check(&before, &pb).unwrap();
        check(&after, &pa).unwrap();
        println!(
            "{preset}: arena {} -> {} bytes (naive {} -> {}), nodes {} -> {}",
            pb.arena_bytes,
            pa.arena_bytes,
            pb.naive_bytes,
            pa.naive_bytes,
            before.node_count(),
            after.node_count()
        );
        assert!(pa.naive_bytes < pb.naive_bytes / 2, "{preset}: fusion should remove most intermediates");
        // A matrix-vector group keeps x as an output next to y (so it can also run as
        // its prologue's kernel and a matmul): the peak may grow by about one activation
        // row, never by much.
        assert!(pa.arena_bytes <= pb.arena_bytes + pb.arena_bytes / 10, "{preset}: the fused arena grew by > 10%");
    }
}

/// Fused decode attention reads its producers' inputs (the qkv projection) besides its
/// operands; planned with those reads (`AttentionProducers::reads`, as the CUDA engine
/// plans), no attention output shares bytes with anything its kernel reads, for the
/// decode step and prefills of 89 and 120 rows on the real shapes. Planned without them,
/// some do: the race the GPU test `fused_attention_over_two_stages_computes_the_same_bits`
/// caught (f32 logits changing from run to run).
#[test]
fn fused_attention_reads_stay_live_in_the_memory_plan() {
    use kiln::codegen::decode::attention_producers;
    use kiln::ops::{Bindings, Sym};
    use kiln::passes::memory::{check, plan_with_reads, view_root, PlanOptions};
    for preset in ["llama-3.2-1b", "smollm2-135m"] {
        let model = LlamaForCausalLM::new(kiln::models::presets::preset(preset).unwrap()).unwrap();
        let traced = model.trace(&TraceOptions { dtype: DType::BF16, last_token_only: true }).unwrap();
        let g = default_pipeline().run(traced).unwrap().graph;
        let mut reads = Vec::new();
        for n in g.topo_order() {
            if let Ok(p) = attention_producers(&g, n) {
                reads.extend(p.reads(&g, n));
            }
        }
        assert!(!reads.is_empty(), "{preset}: every layer's attention computes its producers");
        let overlaps = |extra: &[(Value, NodeId)], seq: usize| {
            let mut b = Bindings::new();
            for (s, v) in [("batch", 1), ("seq", seq), ("past", 256 - seq)] {
                b.insert(Sym::new(s), v);
            }
            let p = plan_with_reads(&g, &b, PlanOptions::default(), extra).unwrap();
            check(&g, &p).unwrap();
            let place = |v: Value| p.allocations.get(&view_root(&g, v)).map(|a| (a.offset, a.offset + a.size));
            reads
                .iter()
                .filter(|(v, n)| match (place(*v), place(Value::new(*n, 0))) {
                    (Some((a0, a1)), Some((o0, o1))) => a0 < o1 && o0 < a1,
                    _ => false,
                })
                .count()
        };
        for seq in [1, 89, 120] {
            assert_eq!(overlaps(&reads, seq), 0, "{preset}, seq {seq}: planned with the reads");
        }
        assert!(overlaps(&[], 1) > 0, "{preset}: without the reads the plan shares those bytes (the race)");
    }
}

/// Programmatic dependent launch lets a kernel start before the previous one ends, so
/// every kernel the engine may launch for the decode graph (fused groups, appends, both
/// forms of the matrix-vector groups, GEMVs, attention) must wait for it before touching
/// memory; and each compiles. A fused KV
/// append once did not (its template skipped `kiln_grid_entry`), and PDL decode
/// diverged from the serial launches.
#[test]
fn every_kernel_of_the_decode_graph_waits_for_the_previous_one() {
    use kiln::codegen::kernels::NodeLowering;
    use kiln::codegen::{
        decode, fused_append, fused_append_kernel, fused_kernel, gemv_epilogue, gemv_prologue, lower_node,
        symbols::graph_symbols,
    };
    let g = optimized();
    let syms = graph_symbols(&g);
    let mut kernels = Vec::new();
    for n in g.topo_order() {
        let node = g.node(n);
        match &node.op {
            Op::Fused(b) if fused_append(b).is_some() => kernels.push(fused_append_kernel(b, &syms).unwrap()),
            Op::Fused(b) if matches!(b.kind(), Ok(FusedKind::MatVec { epilogue: Some(_), .. })) => {
                for m in [1, 2] {
                    let cfg = decode::GemvConfig { rows_per_warp: 1, ..decode::GemvConfig::for_rows(m) };
                    kernels.push(gemv_epilogue(b, &syms, cfg).unwrap());
                }
                kernels.push(fused_kernel(&b.epilogue().unwrap(), &syms).unwrap());
                kernels.push(fused_kernel(&b.prologue().unwrap(), &syms).unwrap());
            }
            Op::Fused(b) if matches!(b.kind(), Ok(FusedKind::MatVec { .. })) => {
                kernels.push(gemv_prologue(b, &syms, decode::GemvConfig::for_prologue()).unwrap());
                kernels.push(fused_kernel(&b.prologue().unwrap(), &syms).unwrap());
            }
            Op::MatMul { .. } => {
                let (x, w) = (g.value_type(g.operands(n)[0]).dtype, g.value_type(g.operands(n)[1]).dtype);
                for m in [1, 2] {
                    let cfg = decode::GemvConfig::for_rows(m);
                    kernels.push(decode::gemv_with(x, w, node.outputs[0].dtype, cfg).unwrap());
                }
            }
            Op::Attention(_) => {
                let k = g.value_type(g.operands(n)[1]);
                kernels.push(decode::attention_decode(k.dtype, 2, &k.shape.dims()[1], &syms).unwrap());
            }
            _ => {
                if let NodeLowering::Kernel(k) = lower_node(&g, n).unwrap() {
                    kernels.push(k);
                }
            }
        }
    }
    let appends = kernels.iter().filter(|k| k.sig.name.starts_with("kiln_fused_append")).count();
    assert_eq!(appends, 4, "2 layers × (k, v)");
    for k in &kernels {
        assert!(k.waits_for_previous(), "kernel {} does not wait for the previous kernel", k.sig.name);
    }
    // And they compile for sm_90 where NVRTC can be loaded (no GPU needed).
    if !kiln::codegen::nvrtc::nvrtc_present() {
        println!("skipping the NVRTC compile: libnvrtc could not be loaded");
        return;
    }
    let compiler = kiln::codegen::Compiler::new((9, 0), None).unwrap();
    let refs: Vec<&kiln::codegen::Kernel> = kernels.iter().collect();
    compiler.compile_all(&refs).unwrap_or_else(|e| panic!("{e}"));
}
