//! The viewer's state, without a window: which stage is shown, which module scopes are
//! collapsed, the visible graph (nodes and collapsed-scope boxes, with edges rerouted to
//! the boxes), its layered top-to-bottom layout, search, selection and the details of the
//! selected node. The egui front end (`viewer`, feature `viewer`) only draws this.
//!
//! Each stage gets a memory plan ([`kiln_passes::memory::plan`]) for representative symbol
//! values ([`PlanSizes`]: `seq` and `past` as configured, every other symbol 1), and a
//! node's details show where its outputs live in that arena and what the GPU backend runs
//! for it ([`kiln_codegen::lower_node`]: the CUDA C of its kernel, or cuBLAS, a view, an
//! upload).

pub use crate::model::VisKey;
use crate::model::{scope_of, Folded, COLLAPSED_RGB};
use crate::{node_label_lines, scope_levels, Numbering, OpClass, Stage};
use kiln_codegen::NodeLowering;
use kiln_graph::ops::{Bindings, Op, Sym};
use kiln_graph::{Graph, NodeId, Value};
use kiln_passes::memory::{self, MemoryPlan, PlanOptions};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Scopes at this depth are collapsed when a stage is opened (`model.layers.N` boxes).
pub const DEFAULT_COLLAPSE_DEPTH: usize = 2;
/// Default value of the `seq` symbol the memory plans are computed for.
pub const DEFAULT_PLAN_SEQ: usize = 128;
/// Default value of the `past` symbol (KV-cache length) the memory plans are computed for.
pub const DEFAULT_PLAN_PAST: usize = 0;
/// At most this many search hits are kept.
pub const MAX_SEARCH_HITS: usize = 500;

/// The symbol values each stage's memory plan is computed for: `seq` and `past` as given
/// here, every other symbol of the graph (`batch`, …) 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSizes {
    /// Tokens per step (default [`DEFAULT_PLAN_SEQ`]).
    pub seq: usize,
    /// Tokens already in the KV cache (default [`DEFAULT_PLAN_PAST`]).
    pub past: usize,
}

impl Default for PlanSizes {
    fn default() -> Self {
        PlanSizes { seq: DEFAULT_PLAN_SEQ, past: DEFAULT_PLAN_PAST }
    }
}

impl PlanSizes {
    /// Values for every symbol in `g`'s value shapes: `seq`, `past` from `self`, others 1.
    pub fn bindings(&self, g: &Graph) -> Bindings {
        let mut b = Bindings::new();
        for n in g.topo_order() {
            for t in &g.node(n).outputs {
                for d in t.shape.dims() {
                    for s in d.symbols() {
                        let v = match s.name() {
                            "seq" => self.seq,
                            "past" => self.past,
                            _ => 1,
                        };
                        b.insert(s, v);
                    }
                }
            }
        }
        b
    }
}

/// One stage's memory plan, or why planning failed.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// The symbol values it was computed for.
    pub bindings: Bindings,
    pub plan: Result<MemoryPlan, String>,
}

impl StagePlan {
    fn new(g: &Graph, sizes: PlanSizes) -> StagePlan {
        let bindings = sizes.bindings(g);
        let plan = memory::plan(g, &bindings, PlanOptions::default()).map_err(|e| e.to_string());
        StagePlan { bindings, plan }
    }

    /// `arena 1.5 MiB (naive 4.0 MiB)`, or `memory plan failed: …`.
    pub fn summary(&self) -> String {
        match &self.plan {
            Ok(p) => format!("arena {} (naive {})", human_bytes(p.arena_bytes), human_bytes(p.naive_bytes)),
            Err(e) => format!("memory plan failed: {e}"),
        }
    }

    /// `seq=128, past=0, batch=1` (sorted by name).
    pub fn bindings_text(&self) -> String {
        let mut v: Vec<(&str, usize)> = self.bindings.iter().map(|(s, n)| (Sym::name(*s), *n)).collect();
        v.sort();
        v.iter().map(|(s, n)| format!("{s}={n}")).collect::<Vec<_>>().join(", ")
    }
}

/// `512 B`, `4.5 KiB`, `1.2 MiB`, `3.0 GiB`.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

/// What the GPU backend runs for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelInfo {
    /// A generated kernel: its name and full CUDA C source (what NVRTC compiles).
    Cuda { name: String, source: String },
    /// No generated kernel; what runs instead (`cuBLAS matmul`, `view: no kernel`, …).
    Instead(String),
    /// The GPU backend cannot run the node (an unsupported dtype or op).
    Unsupported(String),
}

impl NodeDetails {
    /// Notes in the kernel line that the node shares its launch with `others`.
    fn with_group(mut self, others: Option<Vec<String>>) -> NodeDetails {
        if let (Some(others), KernelInfo::Cuda { name, .. }) = (others, &mut self.kernel) {
            name.push_str(&format!(" (one launch with {}: horizontal fusion)", others.join(", ")));
        }
        self
    }
}

impl KernelInfo {
    /// One line for the details table.
    pub fn summary(&self) -> String {
        match self {
            KernelInfo::Cuda { name, .. } => format!("CUDA kernel {name}"),
            KernelInfo::Instead(s) => s.clone(),
            KernelInfo::Unsupported(e) => format!("not supported on the GPU: {e}"),
        }
    }
    /// The CUDA C source, for a generated kernel.
    pub fn source(&self) -> Option<&str> {
        match self {
            KernelInfo::Cuda { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Layout geometry, in canvas units.
pub const ROW_HEIGHT: f32 = 90.0;
pub const COLUMN_GAP: f32 = 30.0;
/// Estimated width of one label character and height of one label line.
pub const CHAR_WIDTH: f32 = 7.0;
pub const LINE_HEIGHT: f32 = 15.0;
const BOX_PAD: f32 = 10.0;

/// One drawn node: a graph node or a collapsed scope.
#[derive(Clone, Debug)]
pub struct VisNode {
    pub key: VisKey,
    /// Label lines (`%3 matmul`, attributes, output type; or the scope path and size).
    pub lines: Vec<String>,
    /// The op class, `None` for a collapsed scope.
    pub class: Option<OpClass>,
    /// Number of graph nodes this stands for.
    pub members: usize,
    /// Row of the layout (0 = top).
    pub layer: usize,
    /// Centre, canvas units (y grows downwards).
    pub pos: [f32; 2],
    /// Box size, canvas units.
    pub size: [f32; 2],
}

impl VisNode {
    /// Fill colour.
    pub fn rgb(&self) -> [u8; 3] {
        self.class.map_or(COLLAPSED_RGB, OpClass::rgb)
    }
}

/// A drawn edge between visible nodes (indices into [`VisibleGraph::nodes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisEdge {
    pub from: usize,
    pub to: usize,
    /// The value carried when the producer has several outputs (`%5.1`).
    pub label: Option<String>,
}

/// What is drawn for the current stage and collapsed scopes.
#[derive(Clone, Debug, Default)]
pub struct VisibleGraph {
    pub nodes: Vec<VisNode>,
    pub edges: Vec<VisEdge>,
    index: HashMap<VisKey, usize>,
    item_of: HashMap<NodeId, usize>,
}

impl VisibleGraph {
    /// The index of a visible key.
    pub fn index_of(&self, key: &VisKey) -> Option<usize> {
        self.index.get(key).copied()
    }
    /// The visible node (itself or its collapsed box) that shows graph node `n`.
    pub fn shown_as(&self, n: NodeId) -> Option<usize> {
        self.item_of.get(&n).copied()
    }
    pub fn producers(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.edges.iter().filter(|e| e.to == i).map(|e| e.from).collect();
        v.sort();
        v.dedup();
        v
    }
    pub fn consumers(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.edges.iter().filter(|e| e.from == i).map(|e| e.to).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A module scope (one level, see [`scope_levels`]) of the current stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeInfo {
    pub path: String,
    /// 1 for `model`, 2 for `model.layers.0`, …
    pub depth: usize,
    /// Graph nodes inside it, nested scopes included.
    pub nodes: usize,
}

/// Everything the details panel shows for a graph node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeDetails {
    /// `%3`.
    pub id: String,
    pub op: String,
    pub class: OpClass,
    /// Every attribute, formatted.
    pub attrs: Vec<(String, String)>,
    /// Output types (`f32[seq, 64]`), one per output.
    pub outputs: Vec<String>,
    /// Output dtypes and shapes, one per output.
    pub dtypes: Vec<String>,
    pub shapes: Vec<String>,
    /// Module path, `""` at the top level.
    pub scope: String,
    /// Operands in slot order (`%0: f32[seq, 8]`).
    pub inputs: Vec<String>,
    /// Consumers (`%7 add`).
    pub users: Vec<String>,
    /// Graph outputs this node feeds.
    pub graph_outputs: Vec<String>,
    /// Where each output lives under the stage's memory plan, one line per output
    /// (`offset 0x1200, 4.5 KiB`, `… in place of %7`, `own buffer (param)`, or the
    /// planner's error); multi-output nodes prefix the value (`%5.1: …`).
    pub memory: Vec<String>,
    /// What the GPU backend runs for the node.
    pub kernel: KernelInfo,
}

/// What the details panel shows for a collapsed scope.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeDetails {
    pub path: String,
    pub nodes: usize,
    /// Op names inside with their counts, most frequent first.
    pub ops: Vec<(String, usize)>,
    /// Params inside.
    pub params: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Details {
    Node(Box<NodeDetails>),
    Scope(ScopeDetails),
}

/// The selected visible node and its neighbours in the visible graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Highlight {
    pub selected: Option<usize>,
    pub producers: Vec<usize>,
    pub consumers: Vec<usize>,
}

/// One search hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchHit {
    pub node: NodeId,
    /// `%12 param model.layers.0.mlp.up.weight` or `%14 matmul (model.layers.0.mlp.up)`.
    pub text: String,
}

/// The viewer's state, without a window.
pub struct ViewerState {
    stages: Vec<Stage>,
    stage: usize,
    collapse_depth: usize,
    num: Numbering,
    scopes: Vec<ScopeInfo>,
    collapsed: BTreeSet<String>,
    visible: VisibleGraph,
    selection: Option<VisKey>,
    query: String,
    hits: Vec<SearchHit>,
    generation: u64,
    sizes: PlanSizes,
    plans: Vec<StagePlan>,
}

impl ViewerState {
    /// Opens the first stage with the scopes at [`DEFAULT_COLLAPSE_DEPTH`] collapsed.
    /// `stages` must not be empty.
    pub fn new(stages: Vec<Stage>) -> ViewerState {
        ViewerState::with_collapse_depth(stages, DEFAULT_COLLAPSE_DEPTH)
    }

    /// As [`ViewerState::new`], collapsing the scopes at `depth` (0 = nothing collapsed).
    pub fn with_collapse_depth(stages: Vec<Stage>, depth: usize) -> ViewerState {
        ViewerState::with_options(stages, depth, PlanSizes::default())
    }

    /// As [`ViewerState::with_collapse_depth`], planning memory for `sizes`.
    pub fn with_options(stages: Vec<Stage>, depth: usize, sizes: PlanSizes) -> ViewerState {
        assert!(!stages.is_empty(), "ViewerState needs at least one stage");
        let plans = stages.iter().map(|(_, g)| StagePlan::new(g, sizes)).collect();
        let num = Numbering::new(&stages[0].1);
        let mut s = ViewerState {
            stages,
            stage: 0,
            collapse_depth: depth,
            num,
            scopes: vec![],
            collapsed: BTreeSet::new(),
            visible: VisibleGraph::default(),
            selection: None,
            query: String::new(),
            hits: vec![],
            generation: 0,
            sizes,
            plans,
        };
        s.open_stage(0);
        s
    }

    // ---- stages --------------------------------------------------------------------

    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|(n, _)| n.as_str()).collect()
    }
    pub fn stage(&self) -> usize {
        self.stage
    }
    pub fn graph(&self) -> &Graph {
        &self.stages[self.stage].1
    }
    pub fn numbering(&self) -> &Numbering {
        &self.num
    }

    /// The symbol values the memory plans are computed for.
    pub fn plan_sizes(&self) -> PlanSizes {
        self.sizes
    }
    /// Stage `i`'s memory plan (or why planning failed).
    pub fn stage_plan(&self, i: usize) -> &StagePlan {
        &self.plans[i]
    }
    /// The shown stage's memory plan.
    pub fn plan(&self) -> &StagePlan {
        &self.plans[self.stage]
    }

    /// Switches to stage `i`: default collapsing, no selection; the search is re-run.
    pub fn set_stage(&mut self, i: usize) {
        if i < self.stages.len() && i != self.stage {
            self.open_stage(i);
        }
    }

    fn open_stage(&mut self, i: usize) {
        self.stage = i;
        self.num = Numbering::new(&self.stages[i].1);
        self.scopes = collect_scopes(&self.stages[i].1, &self.num);
        let d = self.collapse_depth;
        self.collapsed = self.scopes.iter().filter(|s| s.depth == d).map(|s| s.path.clone()).collect();
        self.selection = None;
        self.rebuild();
        let q = std::mem::take(&mut self.query);
        self.search(&q);
    }

    /// Increases whenever the visible graph changes (the front end rebuilds its widgets).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    // ---- scopes --------------------------------------------------------------------

    /// Every scope level of the stage, in order of first appearance.
    pub fn scopes(&self) -> &[ScopeInfo] {
        &self.scopes
    }
    pub fn is_collapsed(&self, scope: &str) -> bool {
        self.collapsed.contains(scope)
    }
    /// Whether `scope` is inside a collapsed scope (so it is not drawn at all).
    pub fn is_hidden(&self, scope: &str) -> bool {
        let levels = scope_levels(scope);
        levels[..levels.len().saturating_sub(1)].iter().any(|l| self.collapsed.contains(*l))
    }
    pub fn collapse(&mut self, scope: &str) {
        if self.scopes.iter().any(|s| s.path == scope) && self.collapsed.insert(scope.to_string()) {
            self.rebuild();
        }
    }
    pub fn expand(&mut self, scope: &str) {
        if self.collapsed.remove(scope) {
            self.rebuild();
        }
    }
    pub fn toggle(&mut self, scope: &str) {
        if self.is_collapsed(scope) {
            self.expand(scope)
        } else {
            self.collapse(scope)
        }
    }
    /// Collapses exactly the scopes at `depth` (0 expands everything).
    pub fn collapse_at_depth(&mut self, depth: usize) {
        self.collapsed = self.scopes.iter().filter(|s| s.depth == depth).map(|s| s.path.clone()).collect();
        self.rebuild();
    }
    pub fn expand_all(&mut self) {
        self.collapse_at_depth(0);
    }

    // ---- the visible graph ---------------------------------------------------------

    pub fn visible(&self) -> &VisibleGraph {
        &self.visible
    }

    fn rebuild(&mut self) {
        let g = &self.stages[self.stage].1;
        let collapsed = &self.collapsed;
        let folded = Folded::new(g, &self.num, &scope_of, &|l: &str| collapsed.contains(l));
        let mut nodes: Vec<VisNode> = folded
            .items
            .iter()
            .map(|item| {
                let (lines, class) = match &item.key {
                    VisKey::Node(n) => {
                        let node = g.node(*n);
                        (node_label_lines(&self.num, *n, node), Some(OpClass::of(&node.op)))
                    }
                    VisKey::Scope(s) => (vec![s.clone(), format!("{} nodes (collapsed)", item.members.len())], None),
                };
                let chars = lines.iter().map(|l| l.chars().count()).max().unwrap_or(1) as f32;
                let size = [chars * CHAR_WIDTH + 2.0 * BOX_PAD, lines.len() as f32 * LINE_HEIGHT + 2.0 * BOX_PAD];
                VisNode {
                    key: item.key.clone(),
                    lines,
                    class,
                    members: item.members.len(),
                    layer: 0,
                    pos: [0.0; 2],
                    size,
                }
            })
            .collect();
        let edges: Vec<VisEdge> = folded
            .edges
            .iter()
            .map(|e| VisEdge {
                from: e.from,
                to: e.to,
                label: e.output.map(|o| match &folded.items[e.from].key {
                    VisKey::Node(n) => format!("%{}.{o}", self.num.id(*n)),
                    VisKey::Scope(_) => String::new(),
                }),
            })
            .collect();
        layout(&mut nodes, &edges);
        let index = nodes.iter().enumerate().map(|(i, n)| (n.key.clone(), i)).collect();
        self.visible = VisibleGraph { nodes, edges, index, item_of: folded.item_of };
        // Keep the selection meaningful: a hidden node selects its box; an expanded box
        // clears the selection.
        self.selection = match self.selection.take() {
            Some(VisKey::Node(n)) => self.visible.shown_as(n).map(|i| self.visible.nodes[i].key.clone()),
            Some(k) => self.visible.index_of(&k).map(|_| k),
            None => None,
        };
        self.generation += 1;
    }

    // ---- selection -----------------------------------------------------------------

    pub fn selection(&self) -> Option<&VisKey> {
        self.selection.as_ref()
    }

    /// Selects a visible node (`None` clears). A key that is not visible is ignored.
    pub fn select(&mut self, key: Option<VisKey>) {
        self.selection = key.filter(|k| self.visible.index_of(k).is_some());
    }

    /// Selects visible node `i`.
    pub fn select_index(&mut self, i: usize) {
        self.selection = self.visible.nodes.get(i).map(|n| n.key.clone());
    }

    /// Expands every collapsed scope around graph node `n` and selects it.
    pub fn reveal(&mut self, n: NodeId) {
        if !self.graph().contains(n) {
            return;
        }
        let scope = self.graph().node(n).scope.clone();
        let before = self.collapsed.len();
        for l in scope_levels(&scope) {
            self.collapsed.remove(l);
        }
        if self.collapsed.len() != before {
            self.rebuild();
        }
        self.selection = Some(VisKey::Node(n));
    }

    /// The selected node and its producers and consumers in the visible graph.
    pub fn highlight(&self) -> Highlight {
        match self.selection.as_ref().and_then(|k| self.visible.index_of(k)) {
            Some(i) => Highlight {
                selected: Some(i),
                producers: self.visible.producers(i),
                consumers: self.visible.consumers(i),
            },
            None => Highlight::default(),
        }
    }

    /// Details of the selection.
    pub fn selected_details(&self) -> Option<Details> {
        self.selection.as_ref().map(|k| self.details(k))
    }

    /// Details of a graph node or a scope.
    pub fn details(&self, key: &VisKey) -> Details {
        let g = self.graph();
        match key {
            VisKey::Node(n) => Details::Node(Box::new(self.node_details(*n))),
            VisKey::Scope(s) => {
                let members: Vec<NodeId> = self
                    .num
                    .order()
                    .iter()
                    .copied()
                    .filter(|&n| scope_levels(&g.node(n).scope).contains(&s.as_str()))
                    .collect();
                let mut counts: HashMap<&str, usize> = HashMap::new();
                let mut params = vec![];
                for &n in &members {
                    let op = &g.node(n).op;
                    *counts.entry(op.name()).or_default() += 1;
                    if let Op::Param { name, .. } = op {
                        params.push(name.clone());
                    }
                }
                let mut ops: Vec<(String, usize)> = counts.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                ops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                Details::Scope(ScopeDetails { path: s.clone(), nodes: members.len(), ops, params })
            }
        }
    }

    fn node_details(&self, n: NodeId) -> NodeDetails {
        let g = self.graph();
        let node = g.node(n);
        let short = |m: NodeId| format!("%{} {}", self.num.id(m), g.node(m).op.name());
        NodeDetails {
            id: format!("%{}", self.num.id(n)),
            op: node.op.name().to_string(),
            class: OpClass::of(&node.op),
            attrs: node.op.attrs().into_iter().map(|(k, a)| (k.to_string(), crate::attr_to_string(&a))).collect(),
            outputs: node.outputs.iter().map(|t| t.to_string()).collect(),
            dtypes: node.outputs.iter().map(|t| t.dtype.name().to_string()).collect(),
            shapes: node.outputs.iter().map(|t| t.shape.to_string()).collect(),
            scope: node.scope.clone(),
            inputs: g
                .operands(n)
                .iter()
                .map(|v| format!("{}: {} ({})", self.num.value_name(*v), g.value_type(*v), g.node(v.node).op.name()))
                .collect(),
            users: {
                let mut u: Vec<NodeId> = g.users(n).into_iter().map(|(m, _)| m).collect();
                u.sort_by_key(|&m| self.num.id(m));
                u.dedup();
                u.into_iter().map(short).collect()
            },
            graph_outputs: g.outputs().iter().filter(|(_, v)| v.node == n).map(|(k, _)| k.clone()).collect(),
            memory: {
                let k = node.outputs.len();
                (0..k)
                    .map(|o| {
                        let v = Value::new(n, o as u8);
                        let text = self.memory_of(v);
                        if k > 1 {
                            format!("{}: {text}", self.num.value_name(v))
                        } else {
                            text
                        }
                    })
                    .collect()
            },
            kernel: match (&node.op, kiln_codegen::lower_node(g, n)) {
                // A matrix-vector group whose norm the scaled GEMV computes (one row of x):
                // that kernel.
                (Op::Fused(b), Err(_)) if kiln_codegen::scaled_prologue_in(g, n).is_ok() => {
                    let syms = kiln_codegen::symbols::graph_symbols(g);
                    match kiln_codegen::scaled_gemv_one_row_choice(b, &syms) {
                        Ok((k, text)) => KernelInfo::Cuda {
                            name: format!("{text}; else the prologue's kernel then a GEMV"),
                            source: k.source,
                        },
                        Err(e) => KernelInfo::Unsupported(e.0),
                    }
                }
                // A matrix-vector group: what the CUDA engine runs by default (the
                // prologue's kernel, then the GEMV), naming the one-kernel form too.
                (Op::Fused(b), Err(_))
                    if matches!(b.kind(), Ok(kiln_ops::FusedKind::MatVec { epilogue: Some(_), .. })) =>
                {
                    let syms = kiln_codegen::symbols::graph_symbols(g);
                    let pro = b.prologue().map(|p| kiln_codegen::fused_kernel(&p, &syms));
                    let epi = kiln_codegen::gemv_epilogue(b, &syms, kiln_codegen::decode::GemvConfig::for_rows(1));
                    match (pro, epi) {
                        (Some(Ok(p)), Ok(e)) => KernelInfo::Cuda {
                            name: format!(
                                "{} then {} (the GEMV that also computes the epilogue)",
                                p.sig.name, e.sig.name
                            ),
                            source: e.source,
                        },
                        (Some(Err(e)), _) | (_, Err(e)) => KernelInfo::Unsupported(e.0),
                        (None, _) => KernelInfo::Unsupported("a matrix-vector group without a prologue".into()),
                    }
                }
                (Op::Fused(b), Err(_)) if matches!(b.kind(), Ok(kiln_ops::FusedKind::MatVec { .. })) => {
                    let syms = kiln_codegen::symbols::graph_symbols(g);
                    let pro = b.prologue().map(|p| kiln_codegen::fused_kernel(&p, &syms));
                    let one = kiln_codegen::gemv_prologue(b, &syms, kiln_codegen::decode::GemvConfig::for_prologue());
                    match (pro, one) {
                        (Some(Ok(p)), Ok(f)) => KernelInfo::Cuda {
                            name: format!(
                                "{} then a GEMV over the weight (one kernel with KILN_MATVEC=fused: {})",
                                p.sig.name, f.sig.name
                            ),
                            source: p.source,
                        },
                        (Some(Err(e)), _) | (_, Err(e)) => KernelInfo::Unsupported(e.0),
                        (None, _) => KernelInfo::Unsupported("a matrix-vector group without a prologue".into()),
                    }
                }
                // Decode attention that computes its producers (the engine's rule): that
                // kernel, naming the producers whose launch it saves.
                (Op::Attention(_), _) if kiln_codegen::decode::attention_producers(g, n).is_ok() => {
                    let syms = kiln_codegen::symbols::graph_symbols(g);
                    match kiln_codegen::decode::attention_decode_fused_in(g, n, None, &syms) {
                        Ok((f, p)) => KernelInfo::Cuda {
                            name: format!(
                                "{} in decode (computes q and the new K/V rows itself: %{}, %{}, %{} launch nothing \
                                 there)",
                                f.sig.name,
                                self.num.id(p.q),
                                self.num.id(p.k),
                                self.num.id(p.v)
                            ),
                            source: f.source,
                        },
                        Err(e) => KernelInfo::Unsupported(e.0),
                    }
                }
                (_, Ok(NodeLowering::Kernel(k))) => KernelInfo::Cuda { name: k.sig.name, source: k.source },
                (_, Ok(other)) => KernelInfo::Instead(other.describe().unwrap_or_default().to_string()),
                (_, Err(e)) => KernelInfo::Unsupported(e.0),
            },
        }
        .with_group(self.launch_group(n))
    }

    /// The other nodes of `n`'s horizontal group (launched as one kernel with it by the
    /// CUDA engine: `kiln_codegen::horizontal::graph_runs`), if it is in one.
    fn launch_group(&self, n: NodeId) -> Option<Vec<String>> {
        let g = self.graph();
        let run = kiln_codegen::horizontal::graph_runs(g).into_iter().find(|r| r.contains(&n))?;
        Some(run.into_iter().filter(|&m| m != n).map(|m| format!("%{}", self.num.id(m))).collect())
    }

    /// Where value `v` lives under the stage's memory plan.
    fn memory_of(&self, v: Value) -> String {
        let g = self.graph();
        let own = match g.node(v.node).op {
            Op::Input { .. } => Some("input"),
            Op::Param { .. } => Some("param"),
            Op::Constant { .. } => Some("constant"),
            _ if g.outputs().values().any(|o| *o == v) => Some("output"),
            _ => None,
        };
        if let Some(kind) = own {
            return format!("own buffer ({kind})");
        }
        match &self.plan().plan {
            Err(e) => format!("memory plan failed: {e}"),
            Ok(p) => match p.allocations.get(&v) {
                None => "not in the memory plan".to_string(),
                Some(a) => {
                    let mut s = format!("offset 0x{:x}, {}", a.offset, human_bytes(a.size));
                    if let Some(x) = a.in_place_of {
                        s.push_str(&format!(", in place of {}", self.num.value_name(x)));
                    }
                    s
                }
            },
        }
    }

    // ---- search --------------------------------------------------------------------

    /// Finds nodes whose param/input name, op name, scope path or id (`%12`) contains
    /// `query` (case-insensitive). An empty query clears the results.
    pub fn search(&mut self, query: &str) -> &[SearchHit] {
        self.query = query.to_string();
        self.hits.clear();
        let q = query.trim().to_lowercase();
        if q.is_empty() {
            return &self.hits;
        }
        let g = &self.stages[self.stage].1;
        for &n in self.num.order() {
            let node = g.node(n);
            let id = format!("%{}", self.num.id(n));
            let name = match &node.op {
                Op::Param { name, .. } | Op::Input { name, .. } => Some(name.as_str()),
                _ => None,
            };
            let matches = name.is_some_and(|s| s.to_lowercase().contains(&q))
                || node.op.name().contains(&q)
                || node.scope.to_lowercase().contains(&q)
                || id == q;
            if matches {
                let text = match name {
                    Some(s) => format!("{id} {} {s}", node.op.name()),
                    None if node.scope.is_empty() => format!("{id} {}", node.op.name()),
                    None => format!("{id} {} ({})", node.op.name(), node.scope),
                };
                self.hits.push(SearchHit { node: n, text });
                if self.hits.len() >= MAX_SEARCH_HITS {
                    break;
                }
            }
        }
        &self.hits
    }

    pub fn query(&self) -> &str {
        &self.query
    }
    pub fn search_hits(&self) -> &[SearchHit] {
        &self.hits
    }
    /// Visible nodes that show at least one search hit (a box counts if a hit is inside).
    pub fn visible_hits(&self) -> HashSet<usize> {
        self.hits.iter().filter_map(|h| self.visible.shown_as(h.node)).collect()
    }

    /// A short summary of the graph (`123 nodes, 45 params, …`).
    pub fn summary(&self) -> String {
        let g = self.graph();
        format!(
            "{} nodes, {} inputs, {} params, {} outputs; {} drawn",
            g.node_count(),
            g.inputs().len(),
            g.params().len(),
            g.outputs().len(),
            self.visible.nodes.len()
        )
    }
}

fn collect_scopes(g: &Graph, num: &Numbering) -> Vec<ScopeInfo> {
    let mut out: Vec<ScopeInfo> = vec![];
    let mut index: HashMap<String, usize> = HashMap::new();
    for &n in num.order() {
        for (d, l) in scope_levels(&g.node(n).scope).into_iter().enumerate() {
            let i = *index.entry(l.to_string()).or_insert_with(|| {
                out.push(ScopeInfo { path: l.to_string(), depth: d + 1, nodes: 0 });
                out.len() - 1
            });
            out[i].nodes += 1;
        }
    }
    // Parents before children, siblings in first-appearance order.
    let pos: HashMap<String, usize> = out.iter().enumerate().map(|(i, s)| (s.path.clone(), i)).collect();
    let key = |s: &ScopeInfo| -> Vec<usize> { scope_levels(&s.path).iter().map(|l| pos[*l]).collect() };
    out.sort_by_key(key);
    out
}

/// Layered top-to-bottom layout in data-flow order. Items are in topological order of
/// their first member; an edge to an earlier item (possible only when a collapsed box
/// both feeds and reads an outside node) is ignored for layering.
///
/// * A node with producers sits one row below its lowest producer.
/// * A node without producers (weights, constants, inputs) sits one row above its
///   highest consumer, so weights appear next to where they are used.
/// * Within a row, nodes are placed at the mean x of their producers (sources: of their
///   first consumer's producers), pushed right to avoid overlap.
fn layout(nodes: &mut [VisNode], edges: &[VisEdge]) {
    let n = nodes.len();
    let mut preds: Vec<Vec<usize>> = vec![vec![]; n];
    let mut succs: Vec<Vec<usize>> = vec![vec![]; n];
    for e in edges {
        if e.from < e.to {
            preds[e.to].push(e.from);
            succs[e.from].push(e.to);
        }
    }
    let mut layer = vec![0usize; n];
    for i in 0..n {
        layer[i] = preds[i].iter().map(|&p| layer[p] + 1).max().unwrap_or(0);
    }
    for i in 0..n {
        if preds[i].is_empty() {
            if let Some(m) = succs[i].iter().map(|&s| layer[s]).min() {
                layer[i] = m.saturating_sub(1);
            }
        }
    }
    let rows = layer.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_row: Vec<Vec<usize>> = vec![vec![]; rows];
    for i in 0..n {
        by_row[layer[i]].push(i);
    }
    let mut x = vec![0f32; n];
    let mut placed = vec![false; n];
    let mean = |v: &[usize], x: &[f32], placed: &[bool]| -> Option<f32> {
        let xs: Vec<f32> = v.iter().filter(|&&p| placed[p]).map(|&p| x[p]).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f32>() / xs.len() as f32)
    };
    for row in &by_row {
        let mut want: Vec<(usize, Option<f32>)> = row
            .iter()
            .map(|&i| {
                let w = mean(&preds[i], &x, &placed)
                    .or_else(|| succs[i].first().and_then(|&s| mean(&preds[s], &x, &placed)));
                (i, w)
            })
            .collect();
        // Nodes with a wish first (by wish), then the rest in topological order.
        want.sort_by(|a, b| match (a.1, b.1) {
            (Some(p), Some(q)) => p.total_cmp(&q).then(a.0.cmp(&b.0)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.0.cmp(&b.0),
        });
        let mut right = f32::NEG_INFINITY;
        for (i, w) in want {
            let half = nodes[i].size[0] / 2.0;
            let min_x = if right.is_finite() { right + COLUMN_GAP + half } else { f32::NEG_INFINITY };
            let desired = w.unwrap_or(if right.is_finite() { min_x } else { 0.0 });
            x[i] = desired.max(min_x);
            right = x[i] + half;
            placed[i] = true;
        }
    }
    for i in 0..n {
        nodes[i].layer = layer[i];
        nodes[i].pos = [x[i], layer[i] as f32 * ROW_HEIGHT];
    }
}
