//! # kiln-ops — the op set
//!
//! The bottom of kiln: element types ([`DType`]), symbolic dimensions ([`Dim`], [`Sym`]),
//! shapes, and the closed set of primitive and structured ops ([`Op`]). Each op's
//! definition — typed attributes, shape/dtype rule and CPU reference semantics — lives in
//! the module of its class (`elementwise`, `reduce`, `movement`, `linalg`, `attention`,
//! `source`), and fused groups ([`fused`]). [`functional`] holds the high-level functions (softmax, rms_norm, rope, …)
//! as short compositions of primitives, written against the [`functional::Trace`] trait
//! that the tracer's tensors implement.
//!
//! May depend on: nothing else in kiln (only `smallvec`, `half`, `serde`, `thiserror`,
//! `gemm`, `rayon`). Everything else depends on it.

mod attention;
pub mod dim;
pub mod dtype;
mod elementwise;
pub mod error;
pub mod functional;
pub mod fused;
pub mod host;
mod linalg;
mod movement;
pub mod op;
mod reduce;
pub mod shape;
mod source;

pub use dim::{Bindings, Dim, Sym};
pub use dtype::DType;
pub use error::{EvalError, OpError};
pub use fused::{Epilogue, FusedBody, FusedKind, FusedNode, FusedRef, EPILOGUE_MAX_SLICES};
pub use host::{compute_dtype, Element, HostData, HostTensor};
pub use op::{
    Arity, AttentionAttrs, Attr, Axes, BinaryOp, ConstValues, F32Bits, Mask, Op, OutTypes, ReduceOp, UnaryOp,
};
pub use shape::{Shape, TensorType};
