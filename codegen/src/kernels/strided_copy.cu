// Index-mapping copy for permute / slice / expand / concat: for every linear index `i`
// of the iteration `shape`, out[out_offset + i·out_strides] = in[in_offset + i·in_strides].
// Elements are copied as raw words of their size (KILN_WORD), so every dtype shares it.
KILN_SIGNATURE {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 o = out_offset + kiln_offset(i, rank, shape, out_strides);
        i64 s = in_offset + kiln_offset(i, rank, shape, in_strides);
        out[o] = in0[s];
    }
}
