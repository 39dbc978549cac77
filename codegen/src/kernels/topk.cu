// top-k along one axis, the input viewed as [outer, len, inner]; one block per lane of
// `len` elements. k passes: pass r picks the best element ranked after pass r-1's pick
// (NaN first, larger first, lower index first), so results are sorted and ties stable.
// Values are copied as stored (exact); indices are i64.
#define KILN_TOPK_WARPS 8
KILN_SIGNATURE {
    __shared__ KILN_C s_val[KILN_TOPK_WARPS];
    __shared__ i64 s_idx[KILN_TOPK_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 l = blockIdx.x;
    const i64 oi = l / inner, ii = l % inner;
    const i64 base = oi * len * inner + ii;
    KILN_C prev = (KILN_C)0;
    i64 pi = -1;
    for (i64 r = 0; r < k; ++r) {
        KILN_C best = (KILN_C)0;
        i64 bi = -1;
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
            KILN_C v = kiln_ld(in0, base + j * inner);
            if (pi >= 0 && !kiln_before(prev, pi, v, j)) continue;  // already taken
            if (bi < 0 || kiln_before(v, j, best, bi)) { best = v; bi = j; }
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            KILN_C ov = __shfl_xor_sync(0xffffffffu, best, s);
            i64 oj = __shfl_xor_sync(0xffffffffu, bi, s);
            if (oj >= 0 && (bi < 0 || kiln_before(ov, oj, best, bi))) { best = ov; bi = oj; }
        }
        if (lane == 0) { s_val[warp] = best; s_idx[warp] = bi; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
                if (s_idx[w] >= 0 && (bi < 0 || kiln_before(s_val[w], s_idx[w], best, bi))) { best = s_val[w]; bi = s_idx[w]; }
            }
            s_val[0] = best;
            s_idx[0] = bi;
            const i64 dst = (oi * k + r) * inner + ii;
            out[dst] = in0[base + bi * inner];
            out1[dst] = bi;
        }
        __syncthreads();
        prev = s_val[0];
        pi = s_idx[0];
        __syncthreads();
    }
}
