//! # kiln-graph — the IR, tracing and the text format
//!
//! * [`Graph`]: a petgraph `StableGraph` of typed [`Node`]s (op + output types + module
//!   path), hash-consed at insertion (exact CSE), with named inputs, params and outputs
//!   in `IndexMap`s, and a verifier ([`Graph::verify`]).
//! * [`Tracer`] / [`Tensor`] / [`Module`]: the DSL. Model code calls ops on `Copy`
//!   tensor handles; each op is shape-checked as it is recorded and errors name the
//!   module path, the op and the shapes.
//! * [`text`]: the human-readable IR format (printer and parser; print → parse → print
//!   is the identity).
//!
//! May depend on: `kiln-ops`. Everything above (passes, codegen, runtime, models, viz)
//! depends on it.

mod error;
mod graph;
pub mod text;
mod trace;
mod verify;

pub use error::{Error, Result};
pub use graph::{Edge, Graph, Node, NodeId, Value};
pub use kiln_ops as ops;
pub use kiln_ops::functional::{TensorExt, Trace};
pub use text::{parse as parse_text, print as print_text};
pub use trace::{Module, Tensor, Tracer};
