//! # kiln-runtime — executors, KV cache, sampling, generation
//!
//! Runs graphs. [`cpu`] is the reference executor every other backend is checked
//! against: it evaluates each node with the op set's CPU semantics (f32 arithmetic for
//! f16/bf16 storage, multi-threaded, matmul through the `gemm` crate). [`sampling`] and
//! [`generate`] turn a model graph into tokens: prefill, then decode steps that feed the
//! KV cache outputs back as inputs. [`cuda`] runs the same graphs on an NVIDIA GPU
//! (NVRTC-compiled kernels and cuBLAS), loading CUDA at run time. [`plan`] saves what the
//! CUDA engine is built from (the optimized graph, its launch list and the kernel
//! binaries) as an executable plan file that loads without tracing, passes or NVRTC.
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-passes`, `kiln-codegen`.

pub mod cpu;
pub mod cuda;
pub mod error;
mod feeds;
pub mod generate;
pub mod plan;
pub mod sampling;
