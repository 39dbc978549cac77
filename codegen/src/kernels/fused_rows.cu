// A fused row-reduction group (kiln_codegen::fused): tensors shaped [rows.., cols..];
// one block per row (a grid-stride loop over rows), threads stride over the row's
// columns. Reductions run in dependency order, one column pass per level, each followed
// by a block reduction (warp shuffles, then the per-warp partials in shared memory,
// combined in the same order by every thread, so all threads hold the identical row
// value). A final column pass writes the full-shaped outputs; thread 0 writes the
// row-shaped ones. Any block size that is a multiple of 32 (up to 1024) works.
// The row count `n_rows` and column count `n_cols` are derived from the device symbol
// table `syms`, not from the parameter `n` (which only sized the launch).

// Round an f32 value to the nearest bf16 / f16 value (the CPU reference rounds every
// float op's result to its logical dtype).
__device__ __forceinline__ float kiln_rnd_bf16(float x) { return kiln_bf16_to_f32(kiln_f32_to_bf16(x)); }
__device__ __forceinline__ float kiln_rnd_f16(float x) { return kiln_f16_to_f32(kiln_f32_to_f16(x)); }

KILN_SIGNATURE {
KILN_DIMS
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
KILN_BODY
    }
}
