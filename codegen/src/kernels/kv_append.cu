// KV-cache append: the new rows `in0 [batch, seq, row]` (contiguous) are written into a
// device-resident cache `out [batch, capacity, row]` (batch entries `batch_stride`
// elements apart) at rows KILN_AT .. KILN_AT + seq, where KILN_AT (the number of cached
// positions, e.g. `past`) is read from the device symbol table, so a captured decode step
// stays valid as the cache grows. Elements move as raw words (KILN_WORD).
KILN_SIGNATURE {
    const i64 at = KILN_AT;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i % inner;
        const i64 t = (i / inner) % seq;
        const i64 b = i / (inner * seq);
        out[b * batch_stride + (at + t) * inner + r] = in0[i];
    }
}
