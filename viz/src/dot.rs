//! Graphviz DOT export.
//!
//! * one `subgraph cluster_…` per module scope, nested by level (`model` ⊃
//!   `model.layers.0` ⊃ `model.layers.0.self_attn`, see [`scope_levels`]);
//! * node `%k` (dense topological numbering, as in the IR text format) labelled with its
//!   op, key attributes and output type(s) (`f32[batch, seq, 64]`), filled by op class
//!   ([`OpClass`]);
//! * edges from a multi-output node labelled with the value they carry (`%5.1`);
//! * graph outputs as ovals;
//! * with [`DotOptions::collapse_depth`], every scope at that depth becomes one box.
//!
//! Output is deterministic: the same graph gives the same bytes.
//!
//! [`scope_levels`]: crate::scope_levels

use crate::model::{scope_of, Folded, VisKey, COLLAPSED_RGB};
use crate::{node_label_lines, scope_levels, ClusterFn, Numbering, OpClass, Stage};
use kiln_graph::Graph;
use std::collections::HashMap;
use std::fmt::Write;

/// How to draw a graph.
#[derive(Clone, Copy)]
pub struct DotOptions<'a> {
    /// Collapse every cluster at this depth (counted as in [`scope_levels`]: `model` is 1,
    /// `model.layers.0` is 2) into one box, hiding what is inside. `None` draws every node.
    ///
    /// [`scope_levels`]: crate::scope_levels
    pub collapse_depth: Option<usize>,
    /// How nodes are grouped into clusters; `None` = by module scope. See [`ClusterFn`].
    pub cluster_of: Option<ClusterFn<'a>>,
    /// Draw graph outputs as oval nodes.
    pub show_outputs: bool,
    /// Graphviz `rankdir` (`TB` = data flows top to bottom).
    pub rankdir: &'a str,
}

impl Default for DotOptions<'_> {
    fn default() -> Self {
        DotOptions { collapse_depth: None, cluster_of: None, show_outputs: true, rankdir: "TB" }
    }
}

impl std::fmt::Debug for DotOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DotOptions")
            .field("collapse_depth", &self.collapse_depth)
            .field("cluster_of", &self.cluster_of.map(|_| "<fn>"))
            .field("show_outputs", &self.show_outputs)
            .field("rankdir", &self.rankdir)
            .finish()
    }
}

/// The DOT text of one graph.
pub fn to_dot(g: &Graph, opts: &DotOptions<'_>) -> String {
    let mut out = header(opts);
    write_graph(&mut out, g, opts, "", 1);
    out.push_str("}\n");
    out
}

/// The DOT text of several stages side by side, each in a cluster labelled with its name
/// (node ids are prefixed `s0_`, `s1_`, … per stage).
pub fn stages_to_dot(stages: &[Stage], opts: &DotOptions<'_>) -> String {
    let mut out = header(opts);
    for (i, (name, g)) in stages.iter().enumerate() {
        let _ = writeln!(out, "  subgraph \"cluster_stage{i}\" {{");
        let _ = writeln!(out, "    label=\"{}\"; fontsize=16; style=\"solid\"; color=\"#333333\";", esc(name));
        write_graph(&mut out, g, opts, &format!("s{i}_"), 2);
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

fn header(opts: &DotOptions<'_>) -> String {
    let mut out = String::from("digraph kiln {\n");
    let _ = writeln!(out, "  graph [rankdir={}, fontname=\"Helvetica\", fontsize=11, newrank=true];", opts.rankdir);
    out.push_str("  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];\n");
    out.push_str("  edge [fontname=\"Helvetica\", fontsize=9, color=\"#555555\"];\n");
    out
}

/// Escapes text for a double-quoted DOT string.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label(lines: &[String]) -> String {
    lines.iter().map(|l| esc(l)).collect::<Vec<_>>().join("\\n")
}

/// A cluster of the tree: its items and child clusters, in first-appearance order.
#[derive(Default)]
struct Cluster {
    items: Vec<usize>,
    children: Vec<String>,
}

fn write_graph(out: &mut String, g: &Graph, opts: &DotOptions<'_>, prefix: &str, indent: usize) {
    let num = Numbering::new(g);
    let default_cluster = scope_of;
    let cluster_of: ClusterFn<'_> = opts.cluster_of.unwrap_or(&default_cluster);
    let folded = match opts.collapse_depth {
        Some(d) => Folded::new(g, &num, cluster_of, &|l: &str| scope_levels(l).len() == d),
        None => Folded::new(g, &num, cluster_of, &|_: &str| false),
    };

    // The cluster tree; "" is the root.
    let mut tree: HashMap<String, Cluster> = HashMap::new();
    tree.insert(String::new(), Cluster::default());
    for (i, item) in folded.items.iter().enumerate() {
        let mut parent = String::new();
        for l in &item.levels {
            if !tree.contains_key(l) {
                tree.insert(l.clone(), Cluster::default());
                tree.get_mut(&parent).expect("parent exists").children.push(l.clone());
            }
            parent = l.clone();
        }
        tree.get_mut(&parent).expect("cluster exists").items.push(i);
    }

    let node_id = |i: usize| -> String {
        match &folded.items[i].key {
            VisKey::Node(n) => format!("{prefix}n{}", num.id(*n)),
            VisKey::Scope(s) => format!("\"{prefix}box_{}\"", esc(s)),
        }
    };

    fn write_cluster(
        out: &mut String,
        tree: &HashMap<String, Cluster>,
        path: &str,
        indent: usize,
        prefix: &str,
        item_line: &dyn Fn(usize) -> String,
    ) {
        let pad = "  ".repeat(indent);
        let c = &tree[path];
        for &i in &c.items {
            let _ = writeln!(out, "{pad}{}", item_line(i));
        }
        for child in &c.children {
            let _ = writeln!(out, "{pad}subgraph \"cluster_{prefix}{}\" {{", esc(child));
            let _ = writeln!(
                out,
                "{pad}  label=\"{}\"; style=\"rounded,dashed\"; color=\"#888888\"; fontcolor=\"#444444\";",
                esc(child)
            );
            write_cluster(out, tree, child, indent + 1, prefix, item_line);
            let _ = writeln!(out, "{pad}}}");
        }
    }

    let item_line = |i: usize| -> String {
        let item = &folded.items[i];
        match &item.key {
            VisKey::Node(n) => {
                let node = g.node(*n);
                let lines = node_label_lines(&num, *n, node);
                let tip = if node.scope.is_empty() { "(top level)".to_string() } else { node.scope.clone() };
                format!(
                    "{} [label=\"{}\", fillcolor=\"{}\", tooltip=\"{}\"];",
                    node_id(i),
                    label(&lines),
                    OpClass::of(&node.op).hex(),
                    esc(&tip)
                )
            }
            VisKey::Scope(s) => {
                let [r, gg, b] = COLLAPSED_RGB;
                let lines = vec![s.clone(), format!("{} nodes (collapsed)", item.members.len())];
                format!(
                    "{} [label=\"{}\", shape=box3d, style=filled, fillcolor=\"#{r:02x}{gg:02x}{b:02x}\", tooltip=\"{}\"];",
                    node_id(i),
                    label(&lines),
                    esc(s)
                )
            }
        }
    };
    write_cluster(out, &tree, "", indent, prefix, &item_line);

    let pad = "  ".repeat(indent);
    for e in &folded.edges {
        let attrs = match (e.output, &folded.items[e.from].key) {
            (Some(o), VisKey::Node(n)) => format!(" [label=\"%{}.{o}\"]", num.id(*n)),
            _ => String::new(),
        };
        let _ = writeln!(out, "{pad}{} -> {}{attrs};", node_id(e.from), node_id(e.to));
    }
    if opts.show_outputs {
        for (k, (name, v)) in g.outputs().iter().enumerate() {
            let oid = format!("{prefix}out{k}");
            let ty = g.value_type(*v).to_string();
            let _ = writeln!(
                out,
                "{pad}{oid} [label=\"{}\", shape=oval, fillcolor=\"{}\"];",
                label(&[format!("output {name}"), ty]),
                OpClass::Input.hex()
            );
            let from = folded.item_of[&v.node];
            let multi = matches!(folded.items[from].key, VisKey::Node(_)) && g.node(v.node).outputs.len() > 1;
            let attrs = if multi { format!(" [label=\"{}\"]", num.value_name(*v)) } else { String::new() };
            let _ = writeln!(out, "{pad}{} -> {oid}{attrs};", node_id(from));
        }
    }
}
