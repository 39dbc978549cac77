// argmax along one axis, the input viewed as [outer, len, inner]; one block per output
// (a vocabulary of 128K logits is one row: a single warp would scan it serially).
// The first maximum wins; NaN counts as the largest value (like the CPU semantics).
KILN_SIGNATURE {
    __shared__ KILN_C sv[32];
    __shared__ i64 si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const i64 o = blockIdx.x;
    if (o >= n) return;  // uniform per block
    const i64 base = (o / inner) * len * inner + o % inner;
    KILN_C best = (KILN_C)0;
    i64 bi = -1;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
        KILN_C v = kiln_ld(in0, base + j * inner);
        if (bi < 0 || kiln_before(v, j, best, bi)) { best = v; bi = j; }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        KILN_C ov = __shfl_xor_sync(0xffffffffu, best, s);
        i64 oi = __shfl_xor_sync(0xffffffffu, bi, s);
        if (oi >= 0 && (bi < 0 || kiln_before(ov, oi, best, bi))) { best = ov; bi = oi; }
    }
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? sv[lane] : (KILN_C)0;
        bi = lane < warps ? si[lane] : -1;
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            KILN_C ov = __shfl_xor_sync(0xffffffffu, best, s);
            i64 oi = __shfl_xor_sync(0xffffffffu, bi, s);
            if (oi >= 0 && (bi < 0 || kiln_before(ov, oi, best, bi))) { best = ov; bi = oi; }
        }
        if (lane == 0) out[o] = bi;
    }
}
