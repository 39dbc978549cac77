// A fused row-reduction group (kiln_codegen::fused): tensors shaped [rows.., cols..];
// one block per row (a grid-stride loop over rows), threads stride over the row's
// columns. Reductions run in dependency order, one column pass per level, each followed
// by a block reduction (warp shuffles, then the per-warp partials in shared memory,
// combined in the same order by every thread, so all threads hold the identical row
// value). A final column pass writes the full-shaped outputs; thread 0 writes the
// row-shaped ones. The block size is the constant kiln_row_threads (fused.rs:
// `row_threads`, one column per thread up to 1024), so the column loops unroll.
// The row count `n_rows` and column count `n_cols` are derived from the device symbol
// table `syms`, not from the parameter `n` (which only sized the launch).

KILN_SIGNATURE {
KILN_DIMS
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
KILN_BODY
    }
}
