// Greedy sampling: the argmax of each row of `in0 [n, len]` (f32 logits, rows
// contiguous) into `out [n]` (i64), the first maximum winning and NaN counting as the
// largest value (Op::ArgMax's CPU semantics, kiln_before). One launch of n·splits blocks,
// split fastest: block (row, split) scans a chunk of the row (chunks of a multiple of
// 4 logits, 16-byte loads when the row is 16-byte aligned, GR_UNROLL loads in flight
// per thread), writes its best (value, index) to out1 / out2 [n, splits], and counts
// itself done on counters[row] after a fence; the last block of the row merges the
// splits' pairs in split order and writes out[row], then resets the counter to 0 (so the
// next launch, or a replayed CUDA graph, starts clean: counters are zero before the
// first launch). One block per row would read a 128K vocabulary through one SM.
// GR_KEY (decode::greedy_key, a WIP knob): no workspace, counter or merging block. Each
// block packs its best pair into a 64-bit key that orders like kiln_before (kiln.cuh) and
// takes atomicMax into out[row] (u64 keys, zero before the launch); the step-end kernel
// (resident::step_end_key) turns the keys into ids and zeroes them for the next step.
// One memory round trip fewer than the merge, and no fence.
#define GR_UNROLL 4
#ifndef GR_KEY
#define GR_KEY 0
#endif

// (v, i) := the better of (v, i) and (ov, oi); an index < 0 is "nothing yet".
__device__ __forceinline__ void gr_take(float& v, i64& i, float ov, i64 oi) {
    if (oi >= 0 && (i < 0 || kiln_before(ov, oi, v, i))) {
        v = ov;
        i = oi;
    }
}

// The block's best pair (valid in thread 0).
__device__ __forceinline__ void gr_block(float& v, i64& i, float* sv, i64* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) gr_take(v, i, __shfl_xor_sync(0xffffffffu, v, s), __shfl_xor_sync(0xffffffffu, i, s));
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? sv[lane] : 0.0f;
        i = lane < warps ? si[lane] : -1;
#pragma unroll
        for (int s = 16; s > 0; s >>= 1)
            gr_take(v, i, __shfl_xor_sync(0xffffffffu, v, s), __shfl_xor_sync(0xffffffffu, i, s));
    }
}

KILN_SIGNATURE {
    __shared__ float sv[32];
    __shared__ i64 si[32];
    __shared__ bool s_last;
    const int ns = (int)splits;
    const i64 row = blockIdx.x / ns;
    const int split = (int)(blockIdx.x - row * ns);
    if (row >= n || ns < 1) return;  // uniform per block
    // Chunks of a multiple of 4 logits, so every chunk of an aligned row starts aligned.
    const i64 chunk = ((len + ns - 1) / ns + 3) / 4 * 4;
    const i64 c0 = split * chunk < len ? split * chunk : len;
    const i64 c1 = c0 + chunk < len ? c0 + chunk : len;
    const float* x = in0 + row * len;
    float best = 0.0f;
    i64 bi = -1;
    if (len % 4 == 0 && (((unsigned long long)in0) & 15ull) == 0) {
        const kiln_f4* x4 = (const kiln_f4*)(x + c0);
        const int nv = (int)((c1 - c0) / 4);
        const int step = (int)blockDim.x;
        for (int v0 = threadIdx.x; v0 < nv; v0 += GR_UNROLL * step) {
            kiln_f4 q[GR_UNROLL];
#pragma unroll
            for (int u = 0; u < GR_UNROLL; ++u) {
                const int vi = v0 + u * step;
                if (vi < nv) q[u] = x4[vi];
            }
#pragma unroll
            for (int u = 0; u < GR_UNROLL; ++u) {
                const int vi = v0 + u * step;
                if (vi < nv) {
                    const i64 e = c0 + 4 * (i64)vi;
                    gr_take(best, bi, q[u].x, e);
                    gr_take(best, bi, q[u].y, e + 1);
                    gr_take(best, bi, q[u].z, e + 2);
                    gr_take(best, bi, q[u].w, e + 3);
                }
            }
        }
    } else {
        for (i64 e = c0 + threadIdx.x; e < c1; e += blockDim.x) gr_take(best, bi, x[e], e);
    }
    gr_block(best, bi, sv, si);
#if GR_KEY
    if (threadIdx.x == 0 && bi >= 0) atomicMax((unsigned long long*)out + row, kiln_argmax_key(best, bi));
    return;
#else
    if (ns == 1) {
        if (threadIdx.x == 0) out[row] = bi < 0 ? 0 : bi;
        return;
    }
    if (threadIdx.x == 0) {
        out1[row * ns + split] = best;
        out2[row * ns + split] = bi;
        __threadfence();  // the pair is visible device-wide before the block counts itself
        s_last = atomicAdd(&counters[row], 1u) == (unsigned)(ns - 1);
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // every other block's pair is visible to this one
    best = 0.0f;
    bi = -1;
    for (int sp = threadIdx.x; sp < ns; sp += blockDim.x)
        gr_take(best, bi, __ldcg(out1 + row * ns + sp), __ldcg(out2 + row * ns + sp));
    __syncthreads();  // sv / si are free again
    gr_block(best, bi, sv, si);
    if (threadIdx.x == 0) {
        out[row] = bi < 0 ? 0 : bi;
        counters[row] = 0u;
    }
#endif
}
