// out[o, j, k] = data[o, ids[j], k] with data viewed as [outer, size, inner] and the
// index tensor flattened to `nidx` entries. Out-of-range ids write zero.
KILN_SIGNATURE {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 k = i % inner;
        i64 t = i / inner;
        i64 j = t % nidx;
        i64 o = t / nidx;
        i64 id = (i64)ids[j];
        out[i] = (id >= 0 && id < size) ? in0[(o * size + id) * inner + k] : (KILN_WORD)0;
    }
}
