// A fused elementwise group (kiln_codegen::fused): one thread per element of the
// output domain, in a grid-stride loop. The renderer fills in the signature, the sizes
// (C expressions over the device symbol table `syms`) and the loop body (the domain
// coordinate of element `i`, the body's values computed from it by index mapping, and
// one store per output). The loop bound `n_items` is derived from `syms`, not from the
// parameter `n` (which only sized the launch), so a replayed CUDA graph stays correct
// when a symbol changes.

KILN_SIGNATURE {
KILN_DIMS
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n_items; i += (i64)gridDim.x * blockDim.x) {
KILN_BODY
    }
}
