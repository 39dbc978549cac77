//! # kiln-codegen — CUDA source and NVRTC
//!
//! Renders kernels for graph nodes as CUDA C and compiles them with NVRTC.
//!
//! * [`params`]: a kernel's ONE parameter list ([`KernelSig`]); the C signature and the
//!   launch arguments are both produced from it.
//! * [`table`]: the per-op table — C storage/compute types per dtype and the C
//!   expression of every elementwise op.
//! * [`kernels`]: the kernels (elementwise, strided copy, gather, arange, reduce,
//!   argmax, topk, attention) as `.cu` templates under `src/kernels/`, specialised per
//!   dtype. Sizes, shapes and strides are kernel arguments, so symbolic dims are resolved
//!   at run time and one compiled kernel serves every binding. [`lower_node`] says what
//!   the GPU executor runs for one graph node (a kernel, cuBLAS, a view, an upload) and
//!   [`render_node_source`] gives that kernel's CUDA C (the viewer shows it).
//! * [`resident`]: the device-resident decode loop's kernels (KV append, arange from
//!   the symbol table, step end).
//! * [`fused`]: one kernel per fused group ([`kiln_ops::Op::Fused`]): an elementwise
//!   form (one thread per output element, index mapping through the body's movement
//!   ops) and a row-reduction form (one block per row, block reductions in dependency
//!   order). Sizes come from the device symbol table, never from launch arguments.
//! * [`horizontal`]: one launch for several independent grid-stride kernels (a decode
//!   layer's RoPE of q and its k / v cache appends), each part a device function
//!   taking its share of the blocks.
//! * [`decode`]: bandwidth-bound decode kernels (GEMV, split-K decode attention,
//!   sampling).
//! * [`prefill`]: compute-bound prefill attention, a tiled tensor-core
//!   (FlashAttention-2 style) kernel over the KV cache with the decode kernel's
//!   semantics and parameter roles, bf16 / f16.
//! * [`symbols`]: the device symbol table's order and dims rendered as C over it.
//! * [`nvrtc`]: compilation for the device's architecture with a disk cache keyed by a
//!   hash of (source, architecture, options, NVRTC version).
//!
//! Matmul is not generated: the runtime calls cuBLAS.
//!
//! May depend on: `kiln-ops`, `kiln-graph`, `kiln-passes`.

pub mod decode;
pub mod fused;
pub mod horizontal;
pub mod kernels;
pub mod nvrtc;
pub mod params;
pub mod prefill;
pub mod resident;
pub mod symbols;
pub mod table;

pub use fused::{
    fused_append, fused_append_items, fused_append_kernel, fused_items, fused_kernel, gemv_epilogue,
    gemv_epilogue_items, gemv_epilogue_warp_items, gemv_prologue, gemv_scaled, gemv_scaled_argmax,
    gemv_scaled_epi_warp, gemv_scaled_epi_warp_chain, gemv_scaled_epi_warp_chain_helped, gemv_scaled_one_row,
    gemv_stream_scaled, gemv_stream_scaled_if_pays, scaled_gemv_one_row_choice, scaled_prologue, scaled_prologue_in,
    FusedAppend, ScaledPrologue,
};
pub use kernels::{lower_node, render_node_source, CodegenError, Grid, Kernel, NodeLowering};
pub use nvrtc::{CompileError, CompileStats, Compiler};
pub use params::{ArgValue, KernelSig, PackError, Param, ParamTy, Role};
