//! # kiln-codegen — CUDA source and NVRTC
//!
//! Renders kernels for (fused) graph nodes as CUDA C and compiles them with NVRTC.
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-passes`.
