// argmax along one axis, the input viewed as [outer, len, inner]; one warp per output.
// The first maximum wins; NaN counts as the largest value (like the CPU semantics).
KILN_SIGNATURE {
    const int lane = threadIdx.x & 31;
    const i64 o = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (o >= n) return;  // uniform per warp
    const i64 base = (o / inner) * len * inner + o % inner;
    KILN_C best = (KILN_C)0;
    i64 bi = -1;
    for (i64 j = lane; j < len; j += 32) {
        KILN_C v = kiln_ld(in0, base + j * inner);
        if (bi < 0 || kiln_before(v, j, best, bi)) { best = v; bi = j; }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        KILN_C ov = __shfl_xor_sync(0xffffffffu, best, s);
        i64 oi = __shfl_xor_sync(0xffffffffu, bi, s);
        if (oi >= 0 && (bi < 0 || kiln_before(ov, oi, best, bi))) { best = ov; bi = oi; }
    }
    if (lane == 0) out[o] = bi;
}
