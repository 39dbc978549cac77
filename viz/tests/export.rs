mod common;

use common::{mlp_graph, toy_transformer};
use kiln_viz::dot::{stages_to_dot, to_dot, DotOptions};
use kiln_viz::json::{stages_to_json, to_json, SCHEMA_VERSION};
use kiln_viz::svg::{to_svg, to_svg_with};
use kiln_viz::{OpClass, VizError};

#[test]
fn dot_of_traced_mlp() {
    let dot = to_dot(&mlp_graph(), &DotOptions::default());
    insta::assert_snapshot!(dot);
}

#[test]
fn dot_is_deterministic_and_nests_scopes() {
    let a = to_dot(&toy_transformer(2), &DotOptions::default());
    let b = to_dot(&toy_transformer(2), &DotOptions::default());
    assert_eq!(a, b);
    // model ⊃ model.layers.0 ⊃ model.layers.0.self_attn, in that order.
    let model = a.find("subgraph \"cluster_model\" {").unwrap();
    let layer = a.find("subgraph \"cluster_model.layers.0\" {").unwrap();
    let attn = a.find("subgraph \"cluster_model.layers.0.self_attn\" {").unwrap();
    assert!(model < layer && layer < attn);
    // No cluster for the list itself.
    assert!(!a.contains("\"cluster_model.layers\""));
    // Symbolic output types and op-class colours.
    assert!(a.contains("f32[batch, seq, 16]"));
    assert!(a.contains(&OpClass::Structured.hex()));
}

#[test]
fn dot_labels_edges_of_multi_output_nodes() {
    let dot = to_dot(&mlp_graph(), &DotOptions::default());
    let topk_edges: Vec<&str> = dot.lines().filter(|l| l.contains("out") && l.contains("->")).collect();
    assert_eq!(topk_edges.len(), 2, "{dot}");
    assert!(topk_edges.iter().any(|l| l.contains("label=\"%") && l.contains(".1\"")), "{topk_edges:?}");
}

#[test]
fn dot_collapses_deep_scopes_into_boxes() {
    let g = toy_transformer(3);
    let dot = to_dot(&g, &DotOptions { collapse_depth: Some(2), ..Default::default() });
    for i in 0..3 {
        assert!(dot.contains(&format!("\"box_model.layers.{i}\" [label=\"model.layers.{i}\\n")), "{dot}");
    }
    assert!(!dot.contains("cluster_model.layers.0.self_attn"));
    assert!(!dot.contains("q_proj.weight"));
    // Layer boxes are chained: 0 → 1 → 2.
    assert!(dot.contains("\"box_model.layers.0\" -> \"box_model.layers.1\";"));
    assert!(dot.contains("\"box_model.layers.1\" -> \"box_model.layers.2\";"));
    // The embedding stays visible (depth 2 scope model.embed_tokens is a box too).
    assert!(dot.contains("\"box_model.embed_tokens\""));
    // lm_head (depth 1) is not collapsed.
    assert!(dot.contains("lm_head.weight"));
    let full = to_dot(&g, &DotOptions::default());
    assert!(dot.len() < full.len() / 2);
}

#[test]
fn dot_cluster_hook_groups_by_any_function() {
    let g = mlp_graph();
    let by_class = |_: kiln_graph::NodeId, n: &kiln_graph::Node| OpClass::of(&n.op).name().to_string();
    let dot = to_dot(&g, &DotOptions { cluster_of: Some(&by_class), ..Default::default() });
    assert!(dot.contains("subgraph \"cluster_elementwise\""));
    assert!(dot.contains("subgraph \"cluster_param\""));
    assert!(!dot.contains("cluster_mlp"));
}

#[test]
fn dot_of_stages_puts_each_stage_in_a_cluster() {
    let stages = vec![("traced".to_string(), mlp_graph()), ("after fusion".to_string(), mlp_graph())];
    let dot = stages_to_dot(&stages, &DotOptions::default());
    assert!(dot.contains("subgraph \"cluster_stage0\" {\n    label=\"traced\""));
    assert!(dot.contains("label=\"after fusion\""));
    assert!(dot.contains("s0_n0 ") && dot.contains("s1_n0 "));
    assert!(dot.contains("\"cluster_s1_mlp.up\""));
}

#[test]
fn svg_without_graphviz_says_how_to_install_it() {
    let err = to_svg_with("kiln-no-such-graphviz-binary", "digraph {}").unwrap_err();
    assert!(matches!(err, VizError::GraphvizNotInstalled));
    let msg = err.to_string();
    assert!(msg.contains("Graphviz is not installed") && msg.contains("apt-get install graphviz"), "{msg}");
}

#[test]
fn svg_with_graphviz_when_available() {
    let g = toy_transformer(2);
    let stages = vec![("traced".to_string(), mlp_graph()), ("toy".to_string(), g.clone())];
    let dots = [
        to_dot(&mlp_graph(), &DotOptions::default()),
        to_dot(&g, &DotOptions::default()),
        to_dot(&g, &DotOptions { collapse_depth: Some(2), ..Default::default() }),
        stages_to_dot(&stages, &DotOptions::default()),
    ];
    for dot in &dots {
        match to_svg(dot) {
            Ok(svg) => assert!(svg.contains("<svg") && svg.contains("matmul")),
            Err(VizError::GraphvizNotInstalled) => {
                eprintln!("graphviz not installed; skipped");
                return;
            }
            Err(e) => panic!("{e}\n{dot}"),
        }
    }
    // Graphviz errors are reported with its message.
    match to_svg("digraph { a -> }") {
        Err(VizError::Graphviz { stderr, .. }) => assert!(stderr.contains("syntax error"), "{stderr}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_round_trips_with_documented_fields() {
    let g = mlp_graph();
    let v = to_json(&g);
    let text = serde_json::to_string_pretty(&v).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&to_json(&mlp_graph())).unwrap(), "deterministic");
    let back: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(back["version"], SCHEMA_VERSION);
    let nodes = back["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), g.node_count());
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["id"], i);
        for key in ["op", "class", "attrs", "outputs", "scope", "inputs"] {
            assert!(n.get(key).is_some(), "node {i} lacks {key}: {n}");
        }
        for inp in n["inputs"].as_array().unwrap() {
            assert!(inp["node"].as_u64().unwrap() < i as u64, "inputs precede their users");
        }
    }
    assert_eq!(nodes[0]["op"], "input");
    assert_eq!(nodes[0]["attrs"]["name"], "x");
    assert_eq!(nodes[0]["outputs"][0]["shape"], serde_json::json!(["seq", 8]));
    assert_eq!(nodes[0]["outputs"][0]["type"], "f32[seq, 8]");
    assert_eq!(nodes[0]["class"], "input");

    let matmul = nodes.iter().find(|n| n["op"] == "matmul").unwrap();
    assert_eq!(matmul["scope"], "mlp.up");
    assert_eq!(matmul["attrs"]["transpose_b"], true);
    assert_eq!(matmul["inputs"].as_array().unwrap().len(), 2);

    let topk = nodes.iter().find(|n| n["op"] == "topk").unwrap();
    assert_eq!(topk["attrs"], serde_json::json!({"k": 2, "axis": 1}));
    assert_eq!(topk["outputs"][1]["dtype"], "i64");

    assert_eq!(back["inputs"], serde_json::json!([{"name": "x", "node": 0}]));
    let params: Vec<&str> = back["params"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(params, ["mlp.up.weight", "mlp.down.weight"]);
    let outs = back["outputs"].as_array().unwrap();
    assert_eq!(outs[0]["name"], "values");
    assert_eq!(outs[1]["output"], 1);
    assert_eq!(outs[0]["node"], outs[1]["node"]);
    assert_eq!(outs[0]["node"], topk["id"]);
}

#[test]
fn json_of_stages() {
    let stages = vec![("traced".to_string(), mlp_graph())];
    let v = stages_to_json(&stages);
    assert_eq!(v["version"], SCHEMA_VERSION);
    assert_eq!(v["stages"][0]["name"], "traced");
    assert_eq!(v["stages"][0]["graph"]["nodes"], to_json(&mlp_graph())["nodes"]);
    assert!(v["stages"][0]["graph"].get("version").is_none());
}

#[test]
fn a_fused_node_is_one_node_labelled_with_its_op_count() {
    let g = kiln_passes::default_pipeline().run(toy_transformer(1)).unwrap().graph;
    let dot = to_dot(&g, &DotOptions::default());
    let mut fused = 0;
    for n in g.topo_order() {
        if let kiln_graph::ops::Op::Fused(b) = &g.node(n).op {
            fused += 1;
            let ops = format!("{} ops", b.nodes.len());
            assert!(
                dot.lines().any(|l| l.contains(" fused") && l.contains(&ops)),
                "no `fused` node with {ops}:\n{dot}"
            );
        }
    }
    assert!(fused >= 2, "{dot}");
    assert!(to_json(&g).is_object());
}
