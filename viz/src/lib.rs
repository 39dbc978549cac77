//! # kiln-viz — seeing the graph
//!
//! Everything here works on *stages*: a list of `(name, Graph)` pairs such as
//! `("traced", g0), ("after fusion", g1)`, one graph per pass of a pipeline.
//!
//! * [`dot`]: Graphviz DOT text ([`dot::to_dot`], [`dot::stages_to_dot`]) with one cluster
//!   per module scope, nodes labelled with id, op, key attributes and output types,
//!   coloured by op class, optionally collapsing deep scopes into one box each.
//! * [`svg`]: runs Graphviz `dot -Tsvg` on DOT text ([`svg::to_svg`]).
//! * [`json`]: a documented, versioned JSON form ([`json::to_json`],
//!   [`json::stages_to_json`]); the schema is in `viz/SCHEMA.md`.
//! * [`state`]: the window-free state of the interactive viewer ([`ViewerState`]):
//!   which nodes are visible given the collapsed scopes, layout, search, selection, and
//!   node details with the memory plan's offset/size (`kiln-passes`) and the CUDA source
//!   the GPU backend renders for the node (`kiln-codegen`).
//! * `viewer` (cargo feature `viewer`): the eframe + egui_graphs window
//!   (`viewer::run(stages, title)`). Off by default so the core build stays light.
//!
//! Node ids everywhere are the dense numbering `%0, %1, …` in [`Graph::topo_order`]
//! order ([`Numbering`]), the numbering the IR text format uses.
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-passes`, `kiln-codegen`.

pub mod dot;
mod error;
pub mod json;
mod model;
pub mod state;
pub mod svg;
#[cfg(feature = "viewer")]
pub mod viewer;

pub use error::VizError;
pub use model::{attr_to_string, node_label_lines, scope_leaf, scope_levels, ClusterFn, Numbering, OpClass, VisKey};
pub use state::ViewerState;

/// A named graph: one stage of a pass pipeline (`("traced", graph)`).
pub type Stage = (String, kiln_graph::Graph);
