//! # kiln — a Rust compute-graph DSL and tracing compiler for LLM inference
//!
//! The facade: re-exports the member crates and owns the `kiln` CLI, the examples and
//! the end-to-end tests.
//!
#![doc = include_str!("../README.md")]

pub mod bench;
pub mod dump;

pub use kiln_codegen as codegen;
pub use kiln_graph as graph;
pub use kiln_models as models;
pub use kiln_ops as ops;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;
pub use kiln_viz as viz;

/// What model code needs: the tracer, tensor methods, dtypes and dims.
pub mod prelude {
    pub use kiln_graph::{Graph, Module, Result, Tensor, TensorExt, Tracer};
    pub use kiln_ops::{DType, Dim, Mask, Shape};
}
