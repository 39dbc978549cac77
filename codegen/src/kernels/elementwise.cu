// One elementwise node: out[i] = EXPR(a, b, c) over `n` elements. The renderer defines
// KILN_SIGNATURE (from the kernel's parameter list), KILN_LOADS (a, b, c in their compute
// types), KILN_OUT_C (the output's compute type) and KILN_EXPR (from the op table).
KILN_SIGNATURE {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        KILN_LOADS
        KILN_OUT_C r = (KILN_EXPR);
        kiln_st(out, i, r);
    }
}
