// Reduction over arbitrary axes, one warp per output element. The input is viewed as
// (kept dims) x (reduced dims) through two shape/stride lists, so any axis set works;
// lanes stride over the reduced elements (coalesced when the last axis is reduced).
// The renderer defines KILN_ACC (accumulator type), KILN_INIT, KILN_COMBINE(a, b) and
// KILN_FINISH(acc) for sum / max / mean.
KILN_SIGNATURE {
    const int lane = threadIdx.x & 31;
    const i64 o = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (o >= n_out) return;  // uniform per warp
    const i64 base = kiln_offset(o, kept_rank, kept_shape, kept_strides);
    KILN_ACC acc = KILN_INIT;
    for (i64 r = lane; r < n_red; r += 32) {
        KILN_ACC v = (KILN_ACC)kiln_ld(in0, base + kiln_offset(r, red_rank, red_shape, red_strides));
        acc = KILN_COMBINE(acc, v);
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        KILN_ACC other = __shfl_xor_sync(0xffffffffu, acc, s);
        acc = KILN_COMBINE(acc, other);
    }
    if (lane == 0) kiln_st(out, o, KILN_FINISH(acc));
}
