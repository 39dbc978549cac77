//! Shared pieces of the exporters and the viewer: dense node numbering, op classes and
//! their colours, attribute and label formatting, and module-scope levels.

use kiln_graph::ops::{Attr, Mask, Op};
use kiln_graph::{Graph, Node, NodeId, Value};
use std::collections::HashMap;

/// Dense node numbering `%0, %1, …` in [`Graph::topo_order`] order — the numbering the IR
/// text format uses, so ids in DOT, JSON and the viewer match the text dump.
#[derive(Clone, Debug)]
pub struct Numbering {
    order: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
}

impl Numbering {
    pub fn new(g: &Graph) -> Numbering {
        let order = g.topo_order();
        let index = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        Numbering { order, index }
    }

    /// The nodes in topological order (position = dense id).
    pub fn order(&self) -> &[NodeId] {
        &self.order
    }

    /// The dense id of `n`.
    pub fn id(&self, n: NodeId) -> usize {
        self.index[&n]
    }

    /// `%k`, or `%k.o` for output `o > 0` of a multi-output node.
    pub fn value_name(&self, v: Value) -> String {
        if v.output == 0 {
            format!("%{}", self.id(v.node))
        } else {
            format!("%{}.{}", self.id(v.node), v.output)
        }
    }
}

/// The class of an op, for colours and legends. Derived from the `Op::is_*` predicates so
/// new ops fall into a class without touching this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpClass {
    /// `input` (graph inputs).
    Input,
    /// `param` (weights).
    Param,
    /// Other sources: `const`, `arange`.
    Constant,
    Elementwise,
    Reduce,
    Movement,
    /// `matmul`, `attention`.
    Structured,
    /// Anything else (a future op the predicates do not cover yet, e.g. a fused group).
    Other,
}

impl OpClass {
    pub fn of(op: &Op) -> OpClass {
        match op {
            Op::Input { .. } => OpClass::Input,
            Op::Param { .. } => OpClass::Param,
            _ if op.is_source() => OpClass::Constant,
            _ if op.is_elementwise() => OpClass::Elementwise,
            _ if op.is_reduce() => OpClass::Reduce,
            _ if op.is_movement() => OpClass::Movement,
            _ if op.is_structured() => OpClass::Structured,
            _ => OpClass::Other,
        }
    }

    pub const ALL: [OpClass; 8] = [
        OpClass::Input,
        OpClass::Param,
        OpClass::Constant,
        OpClass::Elementwise,
        OpClass::Reduce,
        OpClass::Movement,
        OpClass::Structured,
        OpClass::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            OpClass::Input => "input",
            OpClass::Param => "param",
            OpClass::Constant => "constant",
            OpClass::Elementwise => "elementwise",
            OpClass::Reduce => "reduce",
            OpClass::Movement => "movement",
            OpClass::Structured => "structured",
            OpClass::Other => "other",
        }
    }

    /// Fill colour as RGB.
    pub const fn rgb(self) -> [u8; 3] {
        match self {
            OpClass::Input => [0xb9, 0xe0, 0xa5],
            OpClass::Param => [0xff, 0xe5, 0x99],
            OpClass::Constant => [0xe6, 0xe6, 0xe6],
            OpClass::Elementwise => [0xc6, 0xdb, 0xf5],
            OpClass::Reduce => [0xff, 0xcc, 0x99],
            OpClass::Movement => [0xd9, 0xc6, 0xe6],
            OpClass::Structured => [0xf4, 0xa6, 0xa6],
            OpClass::Other => [0xcc, 0xcc, 0xcc],
        }
    }

    /// Fill colour as `#rrggbb`.
    pub fn hex(self) -> String {
        let [r, g, b] = self.rgb();
        format!("#{r:02x}{g:02x}{b:02x}")
    }
}

/// Colour of a collapsed-scope box.
pub(crate) const COLLAPSED_RGB: [u8; 3] = [0xf0, 0xf0, 0xf0];

/// Formats an attribute value compactly (long lists are elided after 8 items).
pub fn attr_to_string(a: &Attr) -> String {
    fn list<T: std::fmt::Display>(v: &[T]) -> String {
        const MAX: usize = 8;
        let mut s: Vec<String> = v.iter().take(MAX).map(|x| x.to_string()).collect();
        if v.len() > MAX {
            s.push(format!("… ({} total)", v.len()));
        }
        format!("[{}]", s.join(", "))
    }
    match a {
        Attr::Int(i) => i.to_string(),
        Attr::Bool(b) => b.to_string(),
        Attr::F32(f) => format!("{f:?}"),
        Attr::Str(s) => s.clone(),
        Attr::DType(d) => d.name().to_string(),
        Attr::Dim(d) => d.to_string(),
        Attr::Shape(s) => s.to_string(),
        Attr::Ints(v) => list(v),
        Attr::Floats(v) => list(&v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>()),
        Attr::Mask(m) => mask_to_string(*m),
    }
}

pub(crate) fn mask_to_string(m: Mask) -> String {
    match m {
        Mask::None => "none".into(),
        Mask::Causal => "causal".into(),
        Mask::SlidingWindow(w) => format!("sliding_window({w})"),
    }
}

/// The output type(s) of a node: `f32[seq, 64]`, or `(f32[seq, 2], i64[seq, 2])`.
pub(crate) fn output_types(node: &Node) -> String {
    let tys: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
    if tys.len() == 1 {
        tys.into_iter().next().unwrap_or_default()
    } else {
        format!("({})", tys.join(", "))
    }
}

/// The key attributes shown in labels: all attributes except `false` flags (the usual
/// default); a source's name is shown on its own.
pub(crate) fn key_attrs(op: &Op) -> Vec<(&'static str, String)> {
    op.attrs()
        .into_iter()
        .filter(|(_, a)| !matches!(a, Attr::Bool(false)))
        .map(|(k, a)| (k, attr_to_string(&a)))
        .collect()
}

/// The lines of a node's label: `%3 matmul`, then the key attributes
/// (`transpose_b=true`; a param or input shows its name, a fused node the number of ops
/// in its body), then the output type(s).
pub fn node_label_lines(num: &Numbering, n: NodeId, node: &Node) -> Vec<String> {
    let mut lines = vec![format!("%{} {}", num.id(n), node.op.name())];
    let attrs = key_attrs(&node.op);
    match &node.op {
        Op::Input { name, .. } | Op::Param { name, .. } => lines.push(name.clone()),
        Op::Fused(body) => lines.push(format!("{} ops", body.nodes.len())),
        _ if !attrs.is_empty() => {
            lines.push(attrs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
        }
        _ => {}
    }
    lines.push(output_types(node));
    lines
}

/// How the exporters group nodes into clusters: a dotted path for each node (`""` = top
/// level). The default is the node's module scope ([`Node::scope`]). This is the hook for
/// later passes: a fusion pass can group the members of a fused kernel by returning
/// e.g. `model.layers.0.mlp.<fused#3>`, without the exporters knowing about fusion.
pub type ClusterFn<'a> = &'a dyn Fn(NodeId, &Node) -> String;

/// The default [`ClusterFn`]: the module scope.
pub(crate) fn scope_of(_: NodeId, node: &Node) -> String {
    node.scope.clone()
}

/// The nesting levels of a dotted module path, outermost first. A purely numeric
/// component is a list index and belongs to the level before it, so
/// `model.layers.0.self_attn` has the levels `model`, `model.layers.0`,
/// `model.layers.0.self_attn` (depths 1, 2, 3). `""` has no levels.
pub fn scope_levels(path: &str) -> Vec<&str> {
    if path.is_empty() {
        return vec![];
    }
    let comps: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    let mut end = 0usize; // byte offset of the end of the current prefix
    for (i, c) in comps.iter().enumerate() {
        end += if i == 0 { c.len() } else { c.len() + 1 };
        let next_is_index = comps.get(i + 1).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !next_is_index {
            out.push(&path[..end]);
        }
    }
    out
}

/// The last level of `path` relative to its parent level (`model.layers.0` → `layers.0`).
pub fn scope_leaf(path: &str) -> &str {
    let levels = scope_levels(path);
    match levels.len() {
        0 => "",
        1 => levels[0],
        k => &path[levels[k - 2].len() + 1..],
    }
}

/// What the exporters and the viewer draw for a node: the node itself, or the box of the
/// collapsed scope that contains it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VisKey {
    Node(NodeId),
    /// A collapsed scope (cluster path), drawn as one box.
    Scope(String),
}

/// One drawn item of a folded graph.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub key: VisKey,
    /// The cluster levels the item sits in, outermost first (for a box: the levels above
    /// its own path).
    pub levels: Vec<String>,
    /// The graph nodes it stands for, in topological order.
    pub members: Vec<NodeId>,
}

/// An edge between drawn items. `output` is set when the producer is a single node with
/// several outputs (so the edge says which one it carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FoldedEdge {
    pub from: usize,
    pub to: usize,
    pub output: Option<u8>,
}

/// A graph with some cluster levels collapsed into boxes. Items are in the order of their
/// first member in topological order; edges in the order of their first use.
#[derive(Clone, Debug)]
pub(crate) struct Folded {
    pub items: Vec<Item>,
    pub item_of: HashMap<NodeId, usize>,
    pub edges: Vec<FoldedEdge>,
}

impl Folded {
    /// Folds `g`: a node is drawn as the box of the outermost level of its cluster path
    /// for which `collapsed` holds, or as itself.
    pub fn new(g: &Graph, num: &Numbering, cluster_of: ClusterFn<'_>, collapsed: &dyn Fn(&str) -> bool) -> Folded {
        let mut items: Vec<Item> = Vec::new();
        let mut item_of = HashMap::new();
        let mut box_index: HashMap<String, usize> = HashMap::new();
        for &n in num.order() {
            let path = cluster_of(n, g.node(n));
            let levels = scope_levels(&path);
            let i = match levels.iter().position(|l| collapsed(l)) {
                Some(k) => {
                    let b = levels[k].to_string();
                    *box_index.entry(b.clone()).or_insert_with(|| {
                        items.push(Item {
                            key: VisKey::Scope(b),
                            levels: levels[..k].iter().map(|s| s.to_string()).collect(),
                            members: vec![],
                        });
                        items.len() - 1
                    })
                }
                None => {
                    items.push(Item {
                        key: VisKey::Node(n),
                        levels: levels.iter().map(|s| s.to_string()).collect(),
                        members: vec![],
                    });
                    items.len() - 1
                }
            };
            items[i].members.push(n);
            item_of.insert(n, i);
        }
        let mut edges = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &n in num.order() {
            for v in g.operands(n) {
                let (from, to) = (item_of[&v.node], item_of[&n]);
                if from == to {
                    continue;
                }
                let multi = matches!(items[from].key, VisKey::Node(_)) && g.node(v.node).outputs.len() > 1;
                let e = FoldedEdge { from, to, output: multi.then_some(v.output) };
                if seen.insert(e) {
                    edges.push(e);
                }
            }
        }
        Folded { items, item_of, edges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_levels_merge_list_indices() {
        assert_eq!(scope_levels(""), Vec::<&str>::new());
        assert_eq!(scope_levels("mlp"), vec!["mlp"]);
        assert_eq!(
            scope_levels("model.layers.0.self_attn"),
            vec!["model", "model.layers.0", "model.layers.0.self_attn"]
        );
        assert_eq!(scope_levels("layers.12.mlp.up"), vec!["layers.12", "layers.12.mlp", "layers.12.mlp.up"]);
        assert_eq!(scope_leaf("model.layers.3"), "layers.3");
        assert_eq!(scope_leaf("model.layers.3.mlp"), "mlp");
        assert_eq!(scope_leaf("model"), "model");
    }
}
