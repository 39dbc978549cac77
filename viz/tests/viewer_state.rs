mod common;

use common::{mlp_graph, toy_transformer};
use kiln_graph::ops::Op;
use kiln_graph::TensorExt;
use kiln_viz::state::{human_bytes, Details, KernelInfo, NodeDetails, PlanSizes, ViewerState, VisKey};

fn stages(layers: usize) -> Vec<(String, kiln_graph::Graph)> {
    vec![("traced".to_string(), toy_transformer(layers))]
}

fn param_node(s: &ViewerState, name: &str) -> kiln_graph::NodeId {
    s.graph().params()[name]
}

fn assert_layout_flows_down(s: &ViewerState) {
    let v = s.visible();
    for e in &v.edges {
        let (a, b) = (&v.nodes[e.from], &v.nodes[e.to]);
        assert!(b.pos[1] > a.pos[1], "{:?} is not below its producer {:?}", b.lines, a.lines);
        assert!(b.layer > a.layer);
    }
    // No two boxes in a row overlap.
    for a in &v.nodes {
        for b in &v.nodes {
            if !std::ptr::eq(a, b) && a.layer == b.layer {
                let gap = (a.pos[0] - b.pos[0]).abs();
                assert!(gap >= (a.size[0] + b.size[0]) / 2.0, "{:?} overlaps {:?}", a.lines, b.lines);
            }
        }
    }
}

#[test]
fn layers_start_collapsed_and_edges_go_to_the_boxes() {
    let s = ViewerState::new(stages(3));
    let v = s.visible();
    for i in 0..3 {
        let key = VisKey::Scope(format!("model.layers.{i}"));
        assert!(v.index_of(&key).is_some(), "layer {i} box");
    }
    let w = param_node(&s, "model.layers.1.mlp.up_proj.weight");
    assert!(v.index_of(&VisKey::Node(w)).is_none(), "inner param hidden");
    let b1 = v.index_of(&VisKey::Scope("model.layers.1".into())).unwrap();
    assert_eq!(v.shown_as(w), Some(b1));
    let b0 = v.index_of(&VisKey::Scope("model.layers.0".into())).unwrap();
    let b2 = v.index_of(&VisKey::Scope("model.layers.2".into())).unwrap();
    assert_eq!(v.producers(b1), vec![b0]);
    assert_eq!(v.consumers(b1), vec![b2]);
    // Top-level lm_head stays expanded.
    assert!(v.index_of(&VisKey::Node(param_node(&s, "lm_head.weight"))).is_some());
    assert!(v.nodes.len() < 20, "{} drawn", v.nodes.len());
    assert_layout_flows_down(&s);
}

#[test]
fn expand_restores_and_collapse_hides_again() {
    let mut s = ViewerState::new(stages(2));
    let before = s.visible().nodes.len();
    let w = param_node(&s, "model.layers.0.self_attn.q_proj.weight");
    s.expand("model.layers.0");
    assert!(!s.is_collapsed("model.layers.0"));
    assert!(s.visible().index_of(&VisKey::Node(w)).is_some());
    assert!(s.visible().nodes.len() > before);
    assert_layout_flows_down(&s);
    s.collapse("model.layers.0");
    assert_eq!(s.visible().nodes.len(), before);
    assert!(s.visible().index_of(&VisKey::Node(w)).is_none());
    // Collapsing an inner scope folds only that scope.
    s.expand_all();
    assert_eq!(s.visible().nodes.len(), s.graph().node_count());
    assert_layout_flows_down(&s);
    s.collapse("model.layers.1.self_attn");
    let v = s.visible();
    let b = v.index_of(&VisKey::Scope("model.layers.1.self_attn".into())).unwrap();
    assert!(!v.producers(b).is_empty() && !v.consumers(b).is_empty());
    assert!(s.is_hidden("model.layers.1.self_attn.q_proj"));
    assert!(!s.is_hidden("model.layers.1.mlp"));
    assert_layout_flows_down(&s);
}

#[test]
fn search_finds_params_by_name_and_reveal_expands() {
    let mut s = ViewerState::new(stages(2));
    let hits: Vec<String> = s.search("o_proj.WEIGHT").iter().map(|h| h.text.clone()).collect();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits[0].ends_with("param model.layers.0.self_attn.o_proj.weight"), "{hits:?}");
    // Hits inside collapsed layers mark the layer boxes.
    assert_eq!(s.visible_hits().len(), 2);
    // Op names and scope paths are searchable too.
    let hits: Vec<_> = s.search("argmax").iter().map(|h| h.node).collect();
    assert_eq!(hits.len(), 1);
    assert_eq!(s.graph().node(hits[0]).op.name(), "argmax");
    // "attention" also matches the post_attention_layernorm scopes.
    assert!(s.search("attention").len() > 2);
    assert!(!s.search("layers.1.mlp").is_empty());
    assert!(s.search("no-such-thing").is_empty());
    assert!(s.search("").is_empty());

    let hit = s.search("layers.1.mlp.down_proj.weight")[0].node;
    s.reveal(hit);
    assert!(!s.is_collapsed("model.layers.1"));
    assert!(s.is_collapsed("model.layers.0"));
    assert_eq!(s.selection(), Some(&VisKey::Node(hit)));
}

#[test]
fn selection_highlights_producers_and_consumers_and_details_show_types() {
    let mut s = ViewerState::new(vec![("traced".into(), mlp_graph())]);
    assert!(s.is_collapsed("mlp.up"));
    s.expand_all();
    let g = s.graph().clone();
    let matmul = s.numbering().order().iter().copied().find(|&n| matches!(g.node(n).op, Op::MatMul { .. })).unwrap();
    s.select(Some(VisKey::Node(matmul)));
    let hl = s.highlight();
    let v = s.visible();
    let names = |ix: &[usize]| -> Vec<String> { ix.iter().map(|&i| v.nodes[i].lines[0].clone()).collect() };
    assert_eq!(hl.selected, v.index_of(&VisKey::Node(matmul)));
    assert_eq!(names(&hl.producers), ["%0 input", "%1 param"]);
    assert_eq!(names(&hl.consumers), ["%3 neg", "%8 div"]); // silu(x) = x / (1 + exp(-x))
    let Some(Details::Node(d)) = s.selected_details() else { panic!() };
    assert_eq!(d.id, "%2");
    assert_eq!(d.op, "matmul");
    assert_eq!(d.scope, "mlp.up");
    assert_eq!(d.outputs, ["f32[seq, 32]"]);
    assert_eq!(d.dtypes, ["f32"]);
    assert_eq!(d.shapes, ["[seq, 32]"]);
    assert!(d.attrs.contains(&("transpose_b".to_string(), "true".to_string())));
    assert_eq!(d.inputs[1], "%1: f32[32, 8] (param)");
    assert!(d.memory[0].starts_with("offset 0x"), "{:?}", d.memory);
    assert!(d.kernel.summary().contains("cuBLAS"), "{:?}", d.kernel);

    // A node with two outputs: edges carry the value names.
    let v = s.visible();
    let labels: Vec<&str> = v.edges.iter().filter_map(|e| e.label.as_deref()).collect();
    assert!(labels.is_empty(), "topk feeds only graph outputs here: {labels:?}");
}

#[test]
fn collapsed_box_details_count_ops_and_params() {
    let s = ViewerState::new(stages(1));
    let Details::Scope(d) = s.details(&VisKey::Scope("model.layers.0".into())) else { panic!() };
    assert_eq!(d.params.len(), 8);
    assert!(d.ops.iter().any(|(op, n)| op == "matmul" && *n == 6));
    assert_eq!(
        d.nodes,
        s.visible().nodes[s.visible().index_of(&VisKey::Scope("model.layers.0".into())).unwrap()].members
    );
}

#[test]
fn stage_switch_resets_selection_and_collapsing() {
    let mut s = ViewerState::new(vec![("two layers".into(), toy_transformer(2)), ("mlp".into(), mlp_graph())]);
    assert_eq!(s.stage_names(), ["two layers", "mlp"]);
    s.expand("model.layers.0");
    let w = param_node(&s, "model.layers.0.mlp.up_proj.weight");
    s.select(Some(VisKey::Node(w)));
    s.search("weight");
    assert!(s.selection().is_some());
    let gen = s.generation();
    s.set_stage(1);
    assert_eq!(s.stage(), 1);
    assert!(s.selection().is_none());
    assert!(s.generation() > gen);
    assert_eq!(s.query(), "weight");
    assert_eq!(s.search_hits().len(), 2, "search re-run on the new stage");
    assert!(s.is_collapsed("mlp.up") && s.is_collapsed("mlp.down"));
    assert_eq!(s.visible().nodes.len(), s.graph().node_count() - 4 + 2);
    s.set_stage(0);
    assert!(s.is_collapsed("model.layers.0"), "default collapsing again");
    assert_layout_flows_down(&s);
}

#[test]
fn selecting_a_hidden_node_is_ignored_and_collapsing_selects_the_box() {
    let mut s = ViewerState::new(stages(1));
    let w = param_node(&s, "model.layers.0.mlp.up_proj.weight");
    s.select(Some(VisKey::Node(w)));
    assert!(s.selection().is_none());
    s.expand("model.layers.0");
    s.select(Some(VisKey::Node(w)));
    s.collapse("model.layers.0");
    assert_eq!(s.selection(), Some(&VisKey::Scope("model.layers.0".into())));
    s.expand("model.layers.0");
    assert!(s.selection().is_none());
}

#[test]
fn a_thirty_layer_model_stays_readable() {
    let s = ViewerState::new(stages(30));
    assert!(s.visible().nodes.len() < 50, "{}", s.visible().nodes.len());
    assert_layout_flows_down(&s);
}

fn node_details(s: &ViewerState, n: kiln_graph::NodeId) -> NodeDetails {
    match s.details(&VisKey::Node(n)) {
        Details::Node(d) => *d,
        Details::Scope(_) => panic!("a node"),
    }
}

fn find(s: &ViewerState, f: impl Fn(&Op) -> bool) -> kiln_graph::NodeId {
    let g = s.graph();
    s.numbering().order().iter().copied().find(|&n| f(&g.node(n).op)).expect("node")
}

#[test]
fn memory_details_match_the_planner() {
    use kiln_passes::memory::{plan, PlanOptions};
    let sizes = PlanSizes { seq: 40, past: 0 };
    let s = ViewerState::with_options(vec![("traced".into(), mlp_graph())], 0, sizes);
    let g = s.graph().clone();
    let mut b = kiln_graph::ops::Bindings::new();
    b.insert(kiln_graph::ops::Sym::new("seq"), 40);
    let p = plan(&g, &b, PlanOptions::default()).unwrap();
    assert_eq!(s.plan().plan.as_ref().unwrap(), &p);
    assert_eq!(s.plan().bindings_text(), "seq=40");
    assert_eq!(
        s.stage_plan(0).summary(),
        format!("arena {} (naive {})", human_bytes(p.arena_bytes), human_bytes(p.naive_bytes))
    );
    assert!(p.arena_bytes < p.naive_bytes);

    // A planned intermediate: the matmul's [seq, 32] f32 output.
    let mm = find(&s, |op| matches!(op, Op::MatMul { .. }));
    let a = p.allocations[&kiln_graph::Value::new(mm, 0)];
    assert_eq!(a.size, 40 * 32 * 4);
    let d = node_details(&s, mm);
    assert_eq!(d.memory, [format!("offset 0x{:x}, 5.0 KiB", a.offset)]);

    // An in-place elementwise node names the value whose buffer it reuses.
    let (v, a) = p.allocations.iter().find(|(_, a)| a.in_place_of.is_some()).expect("some in-place reuse");
    let x = a.in_place_of.unwrap();
    let d = node_details(&s, v.node);
    let want = format!("offset 0x{:x}, {}, in place of %{}", a.offset, human_bytes(a.size), s.numbering().id(x.node));
    assert_eq!(d.memory, [want]);
    assert_eq!(p.allocations[&x].offset, a.offset);

    // Sources and graph outputs own their buffers.
    let w = s.graph().params()["mlp.up.weight"];
    assert_eq!(node_details(&s, w).memory, ["own buffer (param)"]);
    let x_in = find(&s, |op| matches!(op, Op::Input { .. }));
    assert_eq!(node_details(&s, x_in).memory, ["own buffer (input)"]);
    let topk = find(&s, |op| matches!(op, Op::TopK { .. }));
    let d = node_details(&s, topk);
    let id = s.numbering().id(topk);
    assert_eq!(d.memory, [format!("%{id}: own buffer (output)"), format!("%{id}.1: own buffer (output)")]);
}

#[test]
fn kernel_details_show_cuda_source_or_what_runs_instead() {
    let s = ViewerState::with_collapse_depth(stages(1), 0);
    let exp = find(&s, |op| matches!(op, Op::Unary(kiln_graph::ops::UnaryOp::Exp)));
    let d = node_details(&s, exp);
    let KernelInfo::Cuda { name, source } = &d.kernel else { panic!("{:?}", d.kernel) };
    assert!(name.starts_with("kiln_ew_exp"), "{name}");
    assert!(source.contains("expf"), "{source}");
    assert_eq!(
        Some(source.as_str()),
        kiln_codegen::render_node_source(s.graph(), exp).as_deref(),
        "the source the executor compiles"
    );
    assert!(d.kernel.summary().starts_with("CUDA kernel kiln_ew_exp"));

    let mm = find(&s, |op| matches!(op, Op::MatMul { .. }));
    let d = node_details(&s, mm);
    assert!(matches!(&d.kernel, KernelInfo::Instead(t) if t.contains("cuBLAS matmul")), "{:?}", d.kernel);
    assert_eq!(d.kernel.source(), None);

    let reshape = find(&s, |op| matches!(op, Op::Reshape(_)));
    let d = node_details(&s, reshape);
    assert!(d.kernel.summary().starts_with("view: no kernel"), "{:?}", d.kernel);

    let w = s.graph().params()["lm_head.weight"];
    assert!(node_details(&s, w).kernel.summary().starts_with("uploaded weight"));

    let attn = find(&s, |op| matches!(op, Op::Attention(_)));
    assert!(node_details(&s, attn).kernel.source().unwrap().contains("kiln_attention_f32"));
}

#[test]
fn plan_sizes_bind_seq_and_past_and_every_other_symbol_to_one() {
    let s = ViewerState::new(stages(1));
    assert_eq!(s.plan_sizes(), PlanSizes { seq: 128, past: 0 });
    // The toy transformer has `batch` and `seq`.
    assert_eq!(s.plan().bindings_text(), "batch=1, seq=128");
    assert!(s.plan().summary().starts_with("arena "), "{}", s.plan().summary());
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(4608), "4.5 KiB");
    assert_eq!(human_bytes(3 << 20), "3.0 MiB");
}

/// A matrix-vector group (after `fuse_matvec`) shows what the CUDA engine runs by
/// default: the scaled GEMV that computes its RMSNorm (also with an epilogue, after
/// `fuse_epilogue`); for a prologue that does not factor (layer norm), its prologue's
/// kernel, then a GEMV, naming the one-kernel form too.
#[test]
fn a_matvec_node_shows_its_prologue_kernel_and_the_gemv() {
    let g = kiln_passes::default_pipeline().run(toy_transformer(1)).unwrap().graph;
    let s = ViewerState::with_collapse_depth(vec![("optimized".into(), g)], 0);
    let n = find(
        &s,
        |op| matches!(op, Op::Fused(b) if matches!(b.kind(), Ok(kiln_graph::ops::FusedKind::MatVec { epilogue: None, .. }))),
    );
    let d = node_details(&s, n);
    // Its RMSNorm runs in the scaled GEMV (one row of x); the toy's weight rows are short,
    // so the streaming form runs, and its source is shown, the tiled form named.
    let KernelInfo::Cuda { name, source } = &d.kernel else { panic!("{:?}", d.kernel) };
    assert!(name.starts_with("kiln_gemv_stream_scaled_") && name.contains("for one row of x"), "{name}");
    assert!(name.contains("else kiln_gemv_scaled_"), "{name}");
    assert!(source.contains("#define GS_SCALE 1"), "the streaming scaled GEMV's source");
    // The MLP's gate_up group (SwiGLU as its epilogue) too.
    let n = find(
        &s,
        |op| matches!(op, Op::Fused(b) if matches!(b.kind(), Ok(kiln_graph::ops::FusedKind::MatVec { epilogue: Some(_), .. }))),
    );
    let d = node_details(&s, n);
    let KernelInfo::Cuda { name, .. } = &d.kernel else { panic!("{:?}", d.kernel) };
    assert!(name.starts_with("kiln_gemv_scaled_"), "{name}");

    // A layer norm (a reduction of a reduced value) does not factor: the prologue's
    // kernel runs, then the GEMV (the one-kernel form named too).
    let tr = kiln_graph::Tracer::new();
    let shape = [kiln_graph::ops::Dim::fixed(1), kiln_graph::ops::Dim::sym("seq"), kiln_graph::ops::Dim::fixed(64)];
    let x = tr.input("x", kiln_graph::ops::DType::F32, shape).unwrap();
    let h = x.layer_norm(tr.param("n", kiln_graph::ops::DType::F32, [64]).unwrap(), None, 1e-5).unwrap();
    tr.output("y", h.linear(tr.param("w", kiln_graph::ops::DType::F32, [32, 64]).unwrap(), None).unwrap()).unwrap();
    let g = kiln_passes::default_pipeline().run(tr.finish().unwrap()).unwrap().graph;
    let s = ViewerState::with_collapse_depth(vec![("optimized".into(), g)], 0);
    let n =
        find(&s, |op| matches!(op, Op::Fused(b) if matches!(b.kind(), Ok(kiln_graph::ops::FusedKind::MatVec { .. }))));
    let d = node_details(&s, n);
    let KernelInfo::Cuda { name, source } = &d.kernel else { panic!("{:?}", d.kernel) };
    assert!(name.starts_with("kiln_fused_") && name.contains("then a GEMV"), "{name}");
    assert!(name.contains("KILN_MATVEC=fused: kiln_gemv_pro_"), "{name}");
    assert!(source.contains("kiln_grid_entry();") && !source.contains("gv_stage"), "the prologue's own kernel");
}

#[test]
fn nodes_that_share_a_launch_say_with_which() {
    // Two independent elementwise chains (like a layer's RoPE of q and its appends).
    let tr = kiln_graph::Tracer::new();
    let shape = [kiln_graph::ops::Dim::sym("seq"), kiln_graph::ops::Dim::fixed(8)];
    let x = tr.input("x", kiln_graph::ops::DType::F32, shape.clone()).unwrap();
    let y = tr.input("y", kiln_graph::ops::DType::F32, shape).unwrap();
    let a = x.silu().unwrap().mul(x).unwrap();
    let b = y.exp().unwrap().add(y).unwrap();
    tr.output("a", a).unwrap();
    tr.output("b", b).unwrap();
    let g = kiln_passes::default_pipeline().run(tr.finish().unwrap()).unwrap().graph;
    let runs = kiln_codegen::horizontal::graph_runs(&g);
    assert_eq!(runs.len(), 1, "{}", kiln_graph::text::print(&g));
    let s = ViewerState::with_collapse_depth(vec![("optimized".into(), g)], 0);
    let run = &runs[0];
    let d = node_details(&s, run[0]);
    let KernelInfo::Cuda { name, .. } = &d.kernel else { panic!("{:?}", d.kernel) };
    assert!(name.contains("one launch with %") && name.contains("horizontal fusion"), "{name}");
    assert_eq!(name.matches('%').count(), run.len() - 1, "{name}");
}

/// An attention layer as the models trace it (RoPE of q and k, the k / v cache appends):
/// the attention node shows the decode kernel that computes those producers itself
/// (`attention_producers`, the engine's rule) and names them.
#[test]
fn an_attention_that_computes_its_producers_names_them() {
    use kiln_graph::ops::{DType, Dim};
    let (b, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let (h, kh, d) = (4usize, 2usize, 16usize);
    let tr = kiln_graph::Tracer::new();
    let qkv = tr.input("qkv", DType::BF16, [b.clone(), s.clone(), Dim::fixed((h + 2 * kh) * d)]).unwrap();
    let cos = tr.input("cos", DType::BF16, [s.clone(), Dim::fixed(d)]).unwrap();
    let sin = tr.input("sin", DType::BF16, [s.clone(), Dim::fixed(d)]).unwrap();
    let cache = [b.clone(), p, Dim::fixed(kh), Dim::fixed(d)];
    let pk = tr.input("past.k", DType::BF16, cache.clone()).unwrap();
    let pv = tr.input("past.v", DType::BF16, cache).unwrap();
    let shape = |n: usize| [b.clone(), s.clone(), Dim::fixed(n), Dim::fixed(d)];
    let q = qkv.slice(-1, 0, h * d).unwrap().reshape(shape(h)).unwrap().rope(cos, sin).unwrap();
    let k = qkv.slice(-1, h * d, (h + kh) * d).unwrap().reshape(shape(kh)).unwrap().rope(cos, sin).unwrap();
    let v = qkv.slice(-1, (h + kh) * d, (h + 2 * kh) * d).unwrap().reshape(shape(kh)).unwrap();
    let (k, v) = (pk.concat(&[k], 1).unwrap(), pv.concat(&[v], 1).unwrap());
    tr.output("y", q.attention(k, v, kiln_graph::ops::Mask::Causal, 0.25).unwrap()).unwrap();
    tr.output("present.k", k).unwrap();
    tr.output("present.v", v).unwrap();
    let g = kiln_passes::default_pipeline().run(tr.finish().unwrap()).unwrap().graph;
    let st = ViewerState::with_collapse_depth(vec![("optimized".into(), g)], 0);
    let attn = find(&st, |op| matches!(op, Op::Attention(_)));
    let producers = kiln_codegen::decode::attention_producers(st.graph(), attn).unwrap();
    let KernelInfo::Cuda { name, source } = &node_details(&st, attn).kernel else { panic!() };
    assert!(name.starts_with("kiln_attn_decode_fused_bf16_q2_"), "{name}");
    for n in [producers.q, producers.k, producers.v] {
        assert!(name.contains(&format!("%{}", st.numbering().id(n))), "{name}");
    }
    assert!(source.contains("#define AD_FUSED 1"), "the fused kernel's source");
}
