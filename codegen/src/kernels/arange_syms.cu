// out[i] = KILN_START + i (i64), the start read from the device symbol table (e.g. the
// rope positions `past .. past + seq` of a decode step).
KILN_SIGNATURE {
    const i64 start = KILN_START;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = start + i;
    }
}
