// out[i] = start + i (i64).
KILN_SIGNATURE {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = start + i;
    }
}
