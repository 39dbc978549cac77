//! The default pass pipeline, top to bottom.

use crate::{ConstFold, Cse, Dce, Fuse, FuseEpilogue, FuseMatVec, Pass, PassManager, Simplify};

/// The canonicalization passes, in order (the start of [`default_pipeline`]).
fn canonicalization_passes() -> Vec<Box<dyn Pass>> {
    vec![
        // Canonicalize: evaluate what depends on constants only, fold movement/cast
        // chains and identities, merge duplicates, then drop what no output needs.
        Box::new(ConstFold),
        Box::new(Simplify),
        Box::new(Cse),
        Box::new(Dce),
    ]
}

/// The passes every model goes through, in order.
pub fn default_pipeline() -> PassManager {
    let mut passes = canonicalization_passes();
    // Fuse last, on the canonical graph: elementwise, reduction and index-remapping ops
    // become one `fused` node per kernel (see `fusion`); everything after it (memory
    // planning, codegen) sees kernels, not primitive ops.
    passes.push(Box::new(Fuse));
    // Then a group whose value only feeds a `x · wᵀ` with a weight becomes that product's
    // prologue (see `matvec`): the decode GEMV computes its x (a norm, SwiGLU) itself.
    passes.push(Box::new(FuseMatVec));
    // Then an elementwise prologue that only reads another product's y column-wise moves
    // into that product as its epilogue (see `matvec::FuseEpilogue`): SwiGLU is computed
    // by the gate_up GEMV, and down_proj becomes a plain matmul.
    passes.push(Box::new(FuseEpilogue));
    PassManager::new(passes)
}

/// The canonicalization part of [`default_pipeline`] alone (fold, simplify, cse, dce),
/// for tools and tests that want primitive ops only.
pub fn canonicalize() -> PassManager {
    PassManager::new(canonicalization_passes())
}
