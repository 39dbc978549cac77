//! The interactive viewer (cargo feature `viewer`): an eframe window drawing the
//! [`ViewerState`] with egui_graphs.
//!
//! Left panel: stages, search, module scopes (collapse/expand). Centre: the graph, top
//! to bottom in data-flow order (positions come from [`ViewerState`]'s layout, not a
//! force simulation); drag to pan, scroll (with ctrl) to zoom, click a node to select
//! it (its producers are outlined blue, its consumers orange), double-click a collapsed
//! box to expand it. Right panel: the selected node's op, attributes, types, module
//! path, operands and users, where its outputs live in the stage's memory plan, and the
//! CUDA source of its kernel (or what runs instead: cuBLAS, a view, an upload). The
//! stage list shows each stage's planned arena peak against the naive sum.
//!
//! `KILN_VIZ_SCREENSHOT=out.png` makes the viewer save a screenshot of its window after
//! the first frames and exit (used by `tools/viz_screenshot.sh`).

use crate::state::{Details, Highlight, PlanSizes, VisibleGraph};
use crate::{Stage, ViewerState, VisKey, VizError};
use eframe::egui;
use egui::epaint::{RectShape, TextShape};
use egui::{Color32, CornerRadius, FontFamily, FontId, Pos2, Rect, Shape, Stroke, StrokeKind, Vec2};
use egui_graphs::{
    DefaultEdgeShape, DisplayNode, DrawContext, GraphChange, GraphView, Layout, LayoutStateRandom, NodeProps,
    SettingsInteraction, SettingsNavigation, SettingsStyle,
};
use petgraph::stable_graph::{DefaultIx, IndexType, NodeIndex};
use petgraph::{Directed, EdgeType};
use std::path::PathBuf;

/// Where `kiln_codegen` starts a kernel after the shared prelude.
const KERNEL_MARK: &str = "// ---- kernel ----\n";

/// Options of [`run_with`].
#[derive(Clone, Debug, Default)]
pub struct ViewerOptions {
    /// Save a PNG screenshot of the window here after the first frames, then exit.
    pub screenshot: Option<PathBuf>,
    /// Scopes to expand at start (`model.layers.0`).
    pub expand: Vec<String>,
    /// Select the first search hit of this query at start (`o_proj.weight`).
    pub select: Option<String>,
    /// Window size in points (default 1400 × 900).
    pub size: Option<[f32; 2]>,
    /// Symbol values the memory plans are computed for (`seq`, `past`; other symbols 1).
    pub plan: PlanSizes,
}

impl ViewerOptions {
    /// Reads `KILN_VIZ_SCREENSHOT` (a PNG path), `KILN_VIZ_EXPAND` (comma-separated
    /// scopes), `KILN_VIZ_SELECT` (a search query) and `KILN_VIZ_SEQ` / `KILN_VIZ_PAST`
    /// (the `seq` / `past` values memory is planned for; default 128 / 0).
    pub fn from_env() -> ViewerOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        let num = |k: &str, d: usize| var(k).and_then(|s| s.trim().parse().ok()).unwrap_or(d);
        let dflt = PlanSizes::default();
        ViewerOptions {
            screenshot: var("KILN_VIZ_SCREENSHOT").map(PathBuf::from),
            expand: var("KILN_VIZ_EXPAND")
                .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
                .unwrap_or_default(),
            select: var("KILN_VIZ_SELECT"),
            size: None,
            plan: PlanSizes { seq: num("KILN_VIZ_SEQ", dflt.seq), past: num("KILN_VIZ_PAST", dflt.past) },
        }
    }
}

/// Opens the viewer on `stages` (blocks until the window is closed). Honours the
/// environment variables of [`ViewerOptions::from_env`].
pub fn run(stages: Vec<Stage>, title: &str) -> Result<(), VizError> {
    run_with(stages, title, ViewerOptions::from_env())
}

/// Opens the viewer with explicit options.
pub fn run_with(stages: Vec<Stage>, title: &str, opts: ViewerOptions) -> Result<(), VizError> {
    if stages.is_empty() {
        return Err(VizError::NoStages);
    }
    let mut state = ViewerState::with_options(stages, crate::state::DEFAULT_COLLAPSE_DEPTH, opts.plan);
    for s in &opts.expand {
        state.expand(s);
    }
    if let Some(q) = &opts.select {
        if let Some(hit) = state.search(q).first().cloned() {
            state.reveal(hit.node);
        }
    }
    let size = opts.size.unwrap_or([1400.0, 900.0]);
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Glow,
        viewport: egui::ViewportBuilder::default().with_inner_size(size).with_title(title),
        ..Default::default()
    };
    let saved = std::sync::Arc::new(std::sync::Mutex::new(None::<Result<(), String>>));
    let saved2 = saved.clone();
    let app_title = title.to_string();
    eframe::run_native(
        title,
        native,
        Box::new(move |cc| {
            cc.egui_ctx.set_theme(egui::Theme::Light);
            Ok(Box::new(App::new(state, app_title, opts.screenshot, saved2)))
        }),
    )
    .map_err(|e| VizError::Viewer(e.to_string()))?;
    let result = saved.lock().map(|mut g| g.take()).unwrap_or(None);
    match result {
        Some(Err(e)) => Err(VizError::Viewer(format!("saving the screenshot failed: {e}"))),
        _ => Ok(()),
    }
}

// ---- drawing nodes -------------------------------------------------------------------

/// How a node is outlined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Mark {
    #[default]
    None,
    Selected,
    Producer,
    Consumer,
    SearchHit,
}

/// The payload of an egui_graphs node: which visible node it is, its size and mark.
#[derive(Clone, Debug)]
pub(crate) struct NodePayload {
    size: [f32; 2],
    mark: Mark,
}

/// A rounded box with the label inside, sized by the layout.
#[derive(Clone, Debug)]
pub(crate) struct BoxNode {
    pos: Pos2,
    size: Vec2,
    mark: Mark,
    hovered: bool,
    color: Color32,
    label: String,
}

impl From<NodeProps<NodePayload>> for BoxNode {
    fn from(p: NodeProps<NodePayload>) -> Self {
        BoxNode {
            pos: p.location(),
            size: Vec2::from(p.payload.size),
            mark: p.payload.mark,
            hovered: p.hovered,
            color: p.color().unwrap_or(Color32::LIGHT_GRAY),
            label: p.label.clone(),
        }
    }
}

impl<E: Clone, Ty: EdgeType, Ix: IndexType> DisplayNode<NodePayload, E, Ty, Ix> for BoxNode {
    fn closest_boundary_point(&self, dir: Vec2) -> Pos2 {
        // Where the ray from the centre leaves the rectangle.
        let half = self.size / 2.0;
        if dir.x == 0.0 && dir.y == 0.0 {
            return self.pos;
        }
        let tx = if dir.x != 0.0 { half.x / dir.x.abs() } else { f32::INFINITY };
        let ty = if dir.y != 0.0 { half.y / dir.y.abs() } else { f32::INFINITY };
        self.pos + dir * tx.min(ty)
    }

    fn shapes(&mut self, ctx: &DrawContext) -> Vec<Shape> {
        let center = ctx.meta.canvas_to_screen_pos(self.pos);
        let size = Vec2::new(ctx.meta.canvas_to_screen_size(self.size.x), ctx.meta.canvas_to_screen_size(self.size.y));
        let rect = Rect::from_center_size(center, size);
        let (width, color) = match self.mark {
            Mark::Selected => (3.0, Color32::BLACK),
            Mark::Producer => (3.0, Color32::from_rgb(0x1f, 0x77, 0xb4)),
            Mark::Consumer => (3.0, Color32::from_rgb(0xe0, 0x6c, 0x00)),
            Mark::SearchHit => (2.5, Color32::from_rgb(0xc0, 0x00, 0xc0)),
            Mark::None if self.hovered => (2.0, Color32::DARK_GRAY),
            Mark::None => (1.0, Color32::GRAY),
        };
        let radius = ctx.meta.canvas_to_screen_size(6.0).min(255.0) as u8;
        let mut out = vec![Shape::Rect(RectShape::new(
            rect,
            CornerRadius::same(radius),
            self.color,
            Stroke::new(width, color),
            StrokeKind::Middle,
        ))];
        let font = ctx.meta.canvas_to_screen_size(11.0);
        if font >= 4.0 {
            let galley = ctx.ctx.fonts_mut(|f| {
                f.layout_no_wrap(self.label.clone(), FontId::new(font, FontFamily::Monospace), Color32::from_gray(20))
            });
            let pos = center - galley.size() / 2.0;
            out.push(TextShape::new(pos, galley, Color32::from_gray(20)).into());
        }
        out
    }

    fn update(&mut self, p: &NodeProps<NodePayload>) {
        self.pos = p.location();
        self.size = Vec2::from(p.payload.size);
        self.mark = p.payload.mark;
        self.hovered = p.hovered;
        self.color = p.color().unwrap_or(Color32::LIGHT_GRAY);
        self.label = p.label.clone();
    }

    fn is_inside(&self, pos: Pos2) -> bool {
        Rect::from_center_size(self.pos, self.size).contains(pos)
    }
}

/// Positions come from [`ViewerState`]; this layout never moves a node.
#[derive(Debug, Default)]
pub(crate) struct FixedLayout {
    state: LayoutStateRandom,
}

impl Layout<LayoutStateRandom> for FixedLayout {
    fn from_state(state: LayoutStateRandom) -> impl Layout<LayoutStateRandom> {
        FixedLayout { state }
    }

    fn next<N, E, Ty, Ix, Dn, De>(&mut self, _: &mut egui_graphs::Graph<N, E, Ty, Ix, Dn, De>, _: &egui::Ui)
    where
        N: Clone,
        E: Clone,
        Ty: EdgeType,
        Ix: IndexType,
        Dn: DisplayNode<N, E, Ty, Ix>,
        De: egui_graphs::DisplayEdge<N, E, Ty, Ix, Dn>,
    {
    }

    fn state(&self) -> LayoutStateRandom {
        self.state.clone()
    }
}

type EGraph = egui_graphs::Graph<NodePayload, (), Directed, DefaultIx, BoxNode, DefaultEdgeShape>;

/// Builds the egui_graphs graph of the visible graph; node `i` gets index `i`.
fn build_egraph(v: &VisibleGraph) -> EGraph {
    let mut g = EGraph::new();
    for n in &v.nodes {
        let [r, gg, b] = n.rgb();
        let payload = NodePayload { size: n.size, mark: Mark::None };
        let label = n.lines.join("\n");
        let pos = Pos2::new(n.pos[0], n.pos[1]);
        g.add_node_custom(payload, |node| {
            node.set_location(pos);
            node.set_label(label);
            node.set_color(Color32::from_rgb(r, gg, b));
        });
    }
    for e in &v.edges {
        let (a, b) = (NodeIndex::new(e.from), NodeIndex::new(e.to));
        match &e.label {
            Some(l) => g.add_edge_with_label(a, b, (), l.clone()),
            None => g.add_edge_with_label(a, b, (), String::new()),
        };
    }
    g
}

// ---- the app -------------------------------------------------------------------------

struct App {
    state: ViewerState,
    title: String,
    egraph: EGraph,
    built: u64,
    /// Bumped to re-fit the view (new egui_graphs id → fresh zoom/pan, fit on first frame).
    fit_epoch: u64,
    search_text: String,
    /// Centre the view on this visible node at zoom 1 after the next frame.
    focus: Option<usize>,
    screenshot: Option<PathBuf>,
    screenshot_requested: bool,
    frames: u64,
    saved: std::sync::Arc<std::sync::Mutex<Option<Result<(), String>>>>,
}

impl App {
    fn new(
        state: ViewerState,
        title: String,
        screenshot: Option<PathBuf>,
        saved: std::sync::Arc<std::sync::Mutex<Option<Result<(), String>>>>,
    ) -> App {
        let egraph = build_egraph(state.visible());
        let built = state.generation();
        let search_text = state.query().to_string();
        let focus = state.highlight().selected;
        App {
            state,
            title,
            egraph,
            built,
            fit_epoch: 0,
            search_text,
            focus,
            screenshot,
            screenshot_requested: false,
            frames: 0,
            saved,
        }
    }

    fn sync_graph(&mut self) {
        if self.state.generation() != self.built {
            self.egraph = build_egraph(self.state.visible());
            self.built = self.state.generation();
        }
        let hl: Highlight = self.state.highlight();
        let hits = self.state.visible_hits();
        let n = self.state.visible().nodes.len();
        for i in 0..n {
            let mark = if hl.selected == Some(i) {
                Mark::Selected
            } else if hl.producers.contains(&i) {
                Mark::Producer
            } else if hl.consumers.contains(&i) {
                Mark::Consumer
            } else if hits.contains(&i) {
                Mark::SearchHit
            } else {
                Mark::None
            };
            if let Some(node) = self.egraph.node_mut(NodeIndex::new(i)) {
                node.payload_mut().mark = mark;
            }
        }
        let edges: Vec<_> = self.egraph.edges_iter().map(|(id, _)| id).collect();
        for id in edges {
            let touches = self
                .egraph
                .edge_endpoints(id)
                .is_some_and(|(a, b)| Some(a.index()) == hl.selected || Some(b.index()) == hl.selected);
            if let Some(e) = self.egraph.edge_mut(id) {
                e.set_selected(touches);
            }
        }
    }

    fn left_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Stages");
        let names: Vec<String> = self.state.stage_names().iter().map(|s| s.to_string()).collect();
        for (i, name) in names.iter().enumerate() {
            if ui.radio(self.state.stage() == i, name).clicked() && self.state.stage() != i {
                self.state.set_stage(i);
                self.fit_epoch += 1;
            }
            let plan = self.state.stage_plan(i);
            ui.horizontal(|ui| {
                ui.add_space(22.0);
                ui.add(egui::Label::new(egui::RichText::new(plan.summary()).small().weak()).wrap())
                    .on_hover_text(format!("memory planned for {}", plan.bindings_text()));
            });
        }
        ui.separator();
        ui.heading("Search");
        let r = ui.add(egui::TextEdit::singleline(&mut self.search_text).hint_text("param, op or scope"));
        if r.changed() {
            let q = self.search_text.clone();
            self.state.search(&q);
        }
        let hits = self.state.search_hits().to_vec();
        if !self.search_text.trim().is_empty() {
            ui.label(format!("{} hit(s)", hits.len()));
        }
        egui::ScrollArea::vertical().id_salt("hits").max_height(180.0).show(ui, |ui| {
            for h in &hits {
                if ui.selectable_label(false, &h.text).clicked() {
                    self.state.reveal(h.node);
                    self.focus = self.state.highlight().selected;
                }
            }
        });
        ui.separator();
        ui.heading("Module scopes");
        ui.horizontal(|ui| {
            if ui.button("Collapse layers").on_hover_text("collapse every scope at depth 2").clicked() {
                self.state.collapse_at_depth(crate::state::DEFAULT_COLLAPSE_DEPTH);
            }
            if ui.button("Expand all").clicked() {
                self.state.expand_all();
            }
            if ui.button("Fit").clicked() {
                self.fit_epoch += 1;
            }
        });
        let scopes: Vec<_> = self.state.scopes().iter().filter(|s| !self.state.is_hidden(&s.path)).cloned().collect();
        egui::ScrollArea::vertical().id_salt("scopes").show(ui, |ui| {
            for s in &scopes {
                ui.horizontal(|ui| {
                    ui.add_space(12.0 * (s.depth.saturating_sub(1)) as f32);
                    let collapsed = self.state.is_collapsed(&s.path);
                    let icon = if collapsed { "[+]" } else { "[-]" };
                    let leaf = crate::scope_leaf(&s.path);
                    if ui
                        .selectable_label(false, format!("{icon} {leaf} ({})", s.nodes))
                        .on_hover_text(&s.path)
                        .clicked()
                    {
                        self.state.toggle(&s.path);
                    }
                });
            }
        });
    }

    fn right_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Details");
        let Some(details) = self.state.selected_details() else {
            ui.label("Click a node to see its op, attributes and types.");
            return;
        };
        egui::ScrollArea::vertical().id_salt("details").show(ui, |ui| match details {
            Details::Node(d) => {
                egui::Grid::new("node").num_columns(2).striped(true).show(ui, |ui| {
                    let row = |ui: &mut egui::Ui, k: &str, v: &str| {
                        ui.strong(k);
                        ui.add(egui::Label::new(egui::RichText::new(v).monospace()).wrap());
                        ui.end_row();
                    };
                    row(ui, "node", &d.id);
                    row(ui, "op", &format!("{} ({})", d.op, d.class.name()));
                    for (k, v) in &d.attrs {
                        row(ui, k, v);
                    }
                    row(ui, "dtype", &d.dtypes.join(", "));
                    row(ui, "shape", &d.shapes.join(", "));
                    row(ui, "module", if d.scope.is_empty() { "(top level)" } else { &d.scope });
                    row(ui, "memory", &d.memory.join("\n"));
                    row(ui, "kernel", &d.kernel.summary());
                    if !d.graph_outputs.is_empty() {
                        row(ui, "graph output", &d.graph_outputs.join(", "));
                    }
                });
                ui.separator();
                ui.strong("inputs (producers, blue)");
                for s in &d.inputs {
                    ui.monospace(s);
                }
                ui.strong("users (consumers, orange)");
                for s in &d.users {
                    ui.monospace(s);
                }
                if let Some(src) = d.kernel.source() {
                    ui.separator();
                    ui.strong("CUDA source");
                    // The kernel first; the shared prelude (kiln.cuh) folded away below it.
                    let (prelude, kernel) = match src.split_once(KERNEL_MARK) {
                        Some((p, k)) => (Some(p), k),
                        None => (None, src),
                    };
                    let code = |ui: &mut egui::Ui, salt: &str, text: &str| {
                        egui::ScrollArea::both().id_salt(salt).max_height(360.0).show(ui, |ui| {
                            ui.add(
                                egui::Label::new(egui::RichText::new(text).family(FontFamily::Monospace).size(10.5))
                                    .extend(),
                            );
                        });
                    };
                    code(ui, "kernel-source", kernel);
                    if let Some(p) = prelude {
                        egui::CollapsingHeader::new(format!("prelude (kiln.cuh, {} lines)", p.lines().count()))
                            .id_salt("kernel-prelude")
                            .show(ui, |ui| code(ui, "kernel-prelude-src", p));
                    }
                }
            }
            Details::Scope(d) => {
                ui.monospace(&d.path);
                ui.label(format!("{} nodes (collapsed)", d.nodes));
                if ui.button("Expand").clicked() {
                    self.state.expand(&d.path);
                }
                ui.separator();
                ui.strong("ops");
                for (op, n) in &d.ops {
                    ui.monospace(format!("{n:>4} × {op}"));
                }
                ui.strong("params");
                for p in &d.params {
                    ui.monospace(p);
                }
            }
        });
    }

    fn legend(ui: &mut egui::Ui) {
        for c in crate::OpClass::ALL.iter().filter(|c| **c != crate::OpClass::Other) {
            let [r, g, b] = c.rgb();
            let (rect, _) = ui.allocate_exact_size(Vec2::new(12.0, 12.0), egui::Sense::hover());
            ui.painter().rect_filled(rect, 2.0, Color32::from_rgb(r, g, b));
            ui.label(c.name());
        }
    }

    fn handle_screenshot(&mut self, ui: &mut egui::Ui) {
        let Some(path) = self.screenshot.clone() else { return };
        // A few frames so fonts are loaded and the view is fitted.
        if !self.screenshot_requested && self.frames >= 10 {
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Screenshot(Default::default()));
            self.screenshot_requested = true;
        }
        let image = ui.ctx().input(|i| {
            i.raw.events.iter().find_map(|e| match e {
                egui::Event::Screenshot { image, .. } => Some(image.clone()),
                _ => None,
            })
        });
        if let Some(image) = image {
            let r = save_png(&path, &image);
            if let Ok(mut g) = self.saved.lock() {
                *g = Some(r);
            }
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
        }
        ui.ctx().request_repaint();
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frames += 1;
        egui::Panel::top("kiln-viz-top").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.strong(&self.title);
                ui.separator();
                ui.label(self.state.summary());
                ui.separator();
                App::legend(ui);
            });
        });
        egui::Panel::left("kiln-viz-left").default_size(280.0).show(ui, |ui| self.left_panel(ui));
        egui::Panel::right("kiln-viz-right").default_size(340.0).show(ui, |ui| self.right_panel(ui));
        self.sync_graph();
        egui::CentralPanel::default_margins().show(ui, |ui| {
            let interaction = SettingsInteraction::new()
                .with_dragging_enabled(false)
                .with_hover_enabled(true)
                .with_node_clicking_enabled(true)
                .with_node_selection_enabled(false);
            let navigation = SettingsNavigation::new()
                .with_fit_to_screen_enabled(false)
                .with_zoom_and_pan_enabled(true)
                .with_fit_to_screen_padding(0.08);
            let style = SettingsStyle::new().with_labels_always(true);
            let id = Some(format!("kiln-viz-{}-{}", self.state.stage(), self.fit_epoch));
            let resp = GraphView::<LayoutStateRandom, FixedLayout>::new()
                .with_interactions(&interaction)
                .with_navigations(&navigation)
                .with_styles(&style)
                .with_id(id.clone())
                .show(ui, &mut self.egraph);
            // After the graph (and its first-frame fit): centre on a searched node.
            if let Some(i) = self.focus.take() {
                if let Some(n) = self.state.visible().nodes.get(i) {
                    let mut meta = egui_graphs::MetadataFrame::new(id).load(ui);
                    meta.zoom = 1.0;
                    meta.pan = resp.response.rect.size() / 2.0 - Vec2::new(n.pos[0], n.pos[1]);
                    meta.save(ui);
                }
            }
            for change in resp.changes {
                match change {
                    GraphChange::NodeClicked { node } => self.state.select_index(node.index()),
                    GraphChange::NodeDoubleClicked { node } => {
                        if let Some(VisKey::Scope(s)) =
                            self.state.visible().nodes.get(node.index()).map(|n| n.key.clone())
                        {
                            self.state.expand(&s);
                        }
                    }
                    _ => {}
                }
            }
        });
        self.handle_screenshot(ui);
    }
}

/// Writes an egui screenshot as PNG.
fn save_png(path: &std::path::Path, image: &egui::ColorImage) -> Result<(), String> {
    let [w, h] = image.size;
    let mut data = Vec::with_capacity(w * h * 4);
    for p in &image.pixels {
        data.extend_from_slice(&p.to_srgba_unmultiplied());
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&data).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}
