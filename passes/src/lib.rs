//! # kiln-passes — graph-to-graph transformations
//!
//! Canonicalization, operator fusion, memory planning and (later) sharding and
//! quantization rewrites, run as one pipeline that reads top to bottom.
//!
//! May depend on: `kiln-ops`, `kiln-graph`.
