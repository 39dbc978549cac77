mod common;

use common::{mlp_graph, toy_transformer};
use kiln_graph::ops::Op;
use kiln_viz::state::{Details, ViewerState, VisKey, KERNEL_PLACEHOLDER, MEMORY_PLACEHOLDER};

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
fn selection_highlights_producers_and_consumers_and_details_have_placeholders() {
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
    assert_eq!(d.memory.as_deref().unwrap_or(MEMORY_PLACEHOLDER), "not planned yet");
    assert_eq!(d.kernel.as_deref().unwrap_or(KERNEL_PLACEHOLDER), "no kernel yet");

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
