// Split-K ("flash-decoding") attention for few query rows over a long KV cache.
//
// Semantics of Op::Attention: softmax(scale · q kᵀ + mask) v with grouped KV heads;
// q [b, s, h, d] (in0), out [b, s, h, dv]; query row i sits at position t - s + i;
// mask_kind 0 none, 1 causal, 2 causal sliding window of `window` keys. The key count
// t = KILN_KEYS is read from the device symbol table `syms` (not an argument), so a
// captured decode step stays valid while the cache grows. Keys and values are read from
// caches (in1, in2) whose batch entries are k_batch_stride / v_batch_stride elements
// apart; inside an entry, position j of kv head g is the row (j·kv_heads + g)·d (·dv).
//
// One kernel. Block x ↦ (batch, kv head, query tile, split), split fastest. The keys
// any query row of the launch may see, [lo(first row), hi(last row)), are cut into
// `splits` chunks of max(ceil(len / splits), AD_MIN_CHUNK) keys (trailing chunks may be
// empty, so short contexts use fewer splits). A block
// streams its chunk's K and V rows once, in tiles of AD_STAGE bytes double-buffered in
// shared memory (cp.async, 16 bytes per copy, when rows are 16-byte aligned; plain loads
// otherwise), for all query (row, head) pairs of its tile: up to AD_QT of the s·(h/kh)
// pairs of the kv head (the GQA group times the query rows). Each warp takes key slots
// of lpk lanes (lpk·kpw = 32; a lane holds 16-byte vectors li, li + lpk, ... of q, k, v
// rows) and keeps, per query, an online softmax in base 2 (max, sum, unnormalized
// output). Slots are merged with shuffles, warps through shared memory, and the split's
// partial result is written to the f32 workspaces:
//   out1 [b, s, h, splits, dv]  Σ_j 2^(s_j - max) v_j
//   out2 [b, s, h, splits, 2]   (max, Σ_j 2^(s_j - max)),  s_j = scale·log2(e)·q·k_j
// A split that sees no key of a query writes (-inf, 0) and zeros.
//
// Then the block counts itself done on `counters[(b, kv head, tile)]` (after a fence
// that makes its partials visible device-wide); the last of the `splits` blocks of a
// tile merges the splits that saw keys (their (max, sum) pairs staged in shared
// memory): out (storage dtype) = Σ_i 2^(max_i - M) out1_i / Σ_i 2^(max_i - M)
// sum_i, rounded once; 0 for a row without any key (like the CPU reference). It resets
// the counter to 0, so the next launch (or a replayed CUDA graph) starts clean; the
// counters must be zero before the first launch.
// AD_WARPS (warps per block), AD_QT (query pairs per block), AD_NVL (16-byte vectors
// per lane and row) come from decode.rs.
#define AD_MAXD 256
#define AD_MIN_CHUNK 32
#define AD_STAGE 16384
#define AD_LOG2E 1.4426950408889634f

// The keys [lo, hi) query position `pos` may see among t keys.
__device__ __forceinline__ void ad_range(int mask_kind, i64 window, i64 pos, i64 t, i64& lo, i64& hi) {
    lo = 0;
    hi = t;
    if (mask_kind >= 1) hi = pos + 1;
    if (mask_kind == 2) lo = pos + 1 > window ? pos + 1 - window : 0;
    if (hi > t) hi = t;
    if (hi < 0) hi = 0;
    if (lo < 0) lo = 0;
    if (lo > hi) lo = hi;
}

__device__ __forceinline__ unsigned ad_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 kiln_sa; cvta.to.shared.u64 kiln_sa, %1; cvt.u32.u64 %0, kiln_sa; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void ad_cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ad_smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void ad_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void ad_cp_wait_all_but_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void ad_cp_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Copies keys [j0, j1) of K and V into one stage: K rows of dp elements, then V rows of
// dvp elements (dp, dvp: d, dv rounded up to KILN_VEC; the K padding is zeroed).
__device__ __forceinline__ void ad_stage(KILN_T* sk, const KILN_T* kbase, const KILN_T* vbase,
                                         i64 j0, i64 j1, i64 kv_heads, int d, int dv, int dp, int dvp, int kt, bool vec) {
    KILN_T* sv = sk + kt * dp;
    const int nk = (int)(j1 - j0);
    if (vec) {
        const int ck = d / KILN_VEC, cv = dv / KILN_VEC;
        for (int idx = threadIdx.x; idx < nk * ck; idx += blockDim.x) {
            const int r = idx / ck, c = idx - r * ck;
            ad_cp16(sk + r * dp + c * KILN_VEC, kbase + (j0 + r) * kv_heads * d + c * KILN_VEC);
        }
        for (int idx = threadIdx.x; idx < nk * cv; idx += blockDim.x) {
            const int r = idx / cv, c = idx - r * cv;
            ad_cp16(sv + r * dvp + c * KILN_VEC, vbase + (j0 + r) * kv_heads * dv + c * KILN_VEC);
        }
    } else {
        for (int idx = threadIdx.x; idx < nk * dp; idx += blockDim.x) {
            const int r = idx / dp, e = idx - r * dp;
            if (e < d) sk[r * dp + e] = kbase[(j0 + r) * kv_heads * d + e];
            else kiln_st(sk, r * dp + e, 0.0f);
        }
        for (int idx = threadIdx.x; idx < nk * dv; idx += blockDim.x) {
            const int r = idx / dv, e = idx - r * dv;
            sv[r * dvp + e] = vbase[(j0 + r) * kv_heads * dv + e];
        }
    }
}

KILN_SIGNATURE {
    __shared__ kiln_u4 s_kv[2][AD_STAGE / 16];
    __shared__ float s_m[AD_WARPS][AD_QT], s_l[AD_WARPS][AD_QT];
    if (head_dim < 1 || value_dim < 1 || head_dim > AD_MAXD || value_dim > AD_MAXD || kv_heads < 1 ||
        heads % kv_heads != 0 || splits < 1)
        return;  // uniform: the host checks these
    const i64 t = KILN_KEYS;
    const i64 group = heads / kv_heads, nq = seq * group;
    const i64 ntiles = (nq + AD_QT - 1) / AD_QT;
    i64 x = blockIdx.x;
    const i64 split = x % splits;
    x /= splits;
    const i64 tile = x % ntiles;
    x /= ntiles;
    const i64 kvh = x % kv_heads;
    const i64 bi = x / kv_heads;
    if (bi >= batch) return;
    const int d = (int)head_dim, dv = (int)value_dim;

    // This split's chunk of the keys any query row of the launch may see.
    i64 lo0, hi0, lo1, hi1;
    ad_range(mask_kind, window, t - seq, t, lo0, hi0);
    ad_range(mask_kind, window, t - 1, t, lo1, hi1);
    const i64 rlo = lo0, rhi = hi1 > lo0 ? hi1 : lo0;
    i64 chunk = (rhi - rlo + splits - 1) / splits;
    if (chunk < AD_MIN_CHUNK) chunk = AD_MIN_CHUNK;  // short contexts use fewer splits
    const i64 c0 = rlo + split * chunk < rhi ? rlo + split * chunk : rhi;
    const i64 c1 = c0 + chunk < rhi ? c0 + chunk : rhi;

    // Lanes per key slot: the 16-byte vectors of the longer of the k and v rows, AD_NVL
    // per lane; lpk <= 32 because d, dv <= AD_MAXD = 32·AD_NVL·KILN_VEC.
    const int nvec = ((d > dv ? d : dv) + KILN_VEC - 1) / KILN_VEC;
    int lpk = 1;
    while (lpk * AD_NVL < nvec) lpk <<= 1;
    const int kpw = 32 / lpk, slots = AD_WARPS * kpw;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane / lpk, li = lane - g * lpk;
    const float scale2 = scale * AD_LOG2E;

    // Queries of the tile: q (pre-scaled), visible keys relative to c0, softmax state.
    float qr[AD_QT][AD_NVL][KILN_VEC], acc[AD_QT][AD_NVL][KILN_VEC], mx[AD_QT], sm[AD_QT];
    int qlo[AD_QT], qhi[AD_QT];
#pragma unroll
    for (int a = 0; a < AD_QT; ++a) {
        const i64 gq = tile * AD_QT + a;
        i64 lo = 0, hi = 0, qrow = 0;
        if (gq < nq) {
            const i64 i = gq / group, hh = gq - (gq / group) * group;
            ad_range(mask_kind, window, t - seq + i, t, lo, hi);
            qrow = ((bi * seq + i) * heads + kvh * group + hh) * head_dim;
        }
        lo = lo < c0 ? c0 : (lo > c1 ? c1 : lo);
        hi = hi < c0 ? c0 : (hi > c1 ? c1 : hi);
        qlo[a] = (int)(lo - c0);
        qhi[a] = (int)(hi - c0);
        mx[a] = -KILN_INF;
        sm[a] = 0.0f;
#pragma unroll
        for (int u = 0; u < AD_NVL; ++u) {
#pragma unroll
            for (int j = 0; j < KILN_VEC; ++j) {
                const int e = (li + u * lpk) * KILN_VEC + j;
                qr[a][u][j] = (gq < nq && e < d) ? kiln_ld(in0, qrow + e) * scale2 : 0.0f;
                acc[a][u][j] = 0.0f;
            }
        }
    }

    const bool vec = head_dim % KILN_VEC == 0 && value_dim % KILN_VEC == 0 && k_batch_stride % KILN_VEC == 0 &&
                     v_batch_stride % KILN_VEC == 0 &&
                     ((((unsigned long long)in1) | ((unsigned long long)in2)) & 15ull) == 0;
    const int dp = (d + KILN_VEC - 1) / KILN_VEC * KILN_VEC, dvp = (dv + KILN_VEC - 1) / KILN_VEC * KILN_VEC;
    const int kt = AD_STAGE / ((dp + dvp) * (int)sizeof(KILN_T));
    const KILN_T* kbase = in1 + bi * k_batch_stride + kvh * head_dim;
    const KILN_T* vbase = in2 + bi * v_batch_stride + kvh * value_dim;
    const i64 ntk = (c1 - c0 + kt - 1) / kt;

    if (ntk > 0) {
        ad_stage((KILN_T*)s_kv[0], kbase, vbase, c0, c0 + kt < c1 ? c0 + kt : c1, kv_heads, d, dv, dp, dvp, kt, vec);
        ad_cp_commit();
    }
    for (i64 tt = 0; tt < ntk; ++tt) {
        const i64 j0 = c0 + tt * kt;
        if (tt + 1 < ntk) {
            const i64 n0 = j0 + kt, n1 = n0 + kt < c1 ? n0 + kt : c1;
            ad_stage((KILN_T*)s_kv[(tt + 1) & 1], kbase, vbase, n0, n1, kv_heads, d, dv, dp, dvp, kt, vec);
            ad_cp_commit();
            ad_cp_wait_all_but_one();
        } else {
            ad_cp_wait_all();
        }
        __syncthreads();  // tile tt is in shared memory for every thread

        const KILN_T* sk = (const KILN_T*)s_kv[tt & 1];
        const KILN_T* sv = sk + kt * dp;
        const int nk = (int)((c1 - j0) < (i64)kt ? (c1 - j0) : (i64)kt);
        const int jr0 = (int)(j0 - c0);
        for (int kb = warp * kpw; kb < nk; kb += slots) {  // uniform per warp
            const int kk = kb + g;
            const bool in_tile = kk < nk;
            float kf[AD_NVL][KILN_VEC], vf[AD_NVL][KILN_VEC];
#pragma unroll
            for (int u = 0; u < AD_NVL; ++u) {
                const int vi = li + u * lpk;
                if (in_tile && vi * KILN_VEC < dp) {
                    kiln_unpack(((const kiln_u4*)(sk + kk * dp))[vi], kf[u], sk);
                } else {
#pragma unroll
                    for (int j = 0; j < KILN_VEC; ++j) kf[u][j] = 0.0f;
                }
                if (in_tile && vi * KILN_VEC < dvp) {
                    kiln_unpack(((const kiln_u4*)(sv + kk * dvp))[vi], vf[u], sv);
                } else {
#pragma unroll
                    for (int j = 0; j < KILN_VEC; ++j) vf[u][j] = 0.0f;
                }
            }
            const int jr = jr0 + kk;
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
                if (tile * AD_QT + a < nq) {  // uniform
                    float s = 0.0f;
#pragma unroll
                    for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                        for (int j = 0; j < KILN_VEC; ++j) s += qr[a][u][j] * kf[u][j];
                    for (int off = lpk >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                    if (in_tile && jr >= qlo[a] && jr < qhi[a]) {
                        if (s > mx[a]) {
                            const float corr = exp2f(mx[a] - s);  // 0 for the first key
                            mx[a] = s;
                            sm[a] = sm[a] * corr + 1.0f;
#pragma unroll
                            for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                                for (int j = 0; j < KILN_VEC; ++j) acc[a][u][j] = acc[a][u][j] * corr + vf[u][j];
                        } else {
                            const float p = exp2f(s - mx[a]);
                            sm[a] += p;
#pragma unroll
                            for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                                for (int j = 0; j < KILN_VEC; ++j) acc[a][u][j] += p * vf[u][j];
                        }
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // Merge the key slots of each warp (lanes li of slots g and g ^ (off / lpk)).
    for (int off = lpk; off < 32; off <<= 1) {
#pragma unroll
        for (int a = 0; a < AD_QT; ++a) {
            if (tile * AD_QT + a < nq) {  // uniform
                const float mo = __shfl_xor_sync(0xffffffffu, mx[a], off);
                const float so = __shfl_xor_sync(0xffffffffu, sm[a], off);
                const float mn = fmaxf(mx[a], mo);
                const float wa = mx[a] == -KILN_INF ? 0.0f : exp2f(mx[a] - mn);
                const float wb = mo == -KILN_INF ? 0.0f : exp2f(mo - mn);
                sm[a] = sm[a] * wa + so * wb;
                mx[a] = mn;
#pragma unroll
                for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                    for (int j = 0; j < KILN_VEC; ++j) {
                        const float ao = __shfl_xor_sync(0xffffffffu, acc[a][u][j], off);
                        acc[a][u][j] = acc[a][u][j] * wa + ao * wb;
                    }
            }
        }
    }

    // Merge the warps through shared memory (the stages are free now) and write.
    float(*s_acc)[AD_QT][AD_MAXD] = (float(*)[AD_QT][AD_MAXD])s_kv;  // AD_WARPS·AD_QT·AD_MAXD floats = 2 stages
    if (lane < lpk) {
#pragma unroll
        for (int a = 0; a < AD_QT; ++a) {
#pragma unroll
            for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                for (int j = 0; j < KILN_VEC; ++j) {
                    const int e = (li + u * lpk) * KILN_VEC + j;
                    if (e < dv) s_acc[warp][a][e] = acc[a][u][j];
                }
            if (lane == 0) {
                s_m[warp][a] = mx[a];
                s_l[warp][a] = sm[a];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < AD_QT * dv; idx += blockDim.x) {
        const int a = idx / dv, e = idx - a * dv;
        const i64 gq = tile * AD_QT + a;
        if (gq >= nq) continue;
        float mn = -KILN_INF;
#pragma unroll
        for (int w = 0; w < AD_WARPS; ++w) mn = fmaxf(mn, s_m[w][a]);
        float l = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < AD_WARPS; ++w) {
            const float wt = s_m[w][a] == -KILN_INF ? 0.0f : exp2f(s_m[w][a] - mn);
            l += s_l[w][a] * wt;
            o += s_acc[w][a][e] * wt;
        }
        const i64 i = gq / group, hh = gq - (gq / group) * group;
        const i64 r = ((bi * seq + i) * heads + kvh * group + hh) * splits + split;
        out1[r * value_dim + e] = o;
        if (e == 0) {
            out2[r * 2] = mn;
            out2[r * 2 + 1] = l;
        }
    }

    // The last block of this (batch, kv head, query tile) merges the splits.
    __shared__ bool s_last;
    __threadfence();  // this block's partials are visible device-wide before it counts itself
    __syncthreads();
    const i64 cidx = (bi * kv_heads + kvh) * ntiles + tile;
    if (threadIdx.x == 0) s_last = atomicAdd(&counters[cidx], 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // every other block's partials are visible to this one
    // Only the first `ns` splits saw keys (chunks of at least AD_MIN_CHUNK keys); the
    // rest wrote (-inf, 0). Their (max, sum) pairs for the tile's rows go to shared
    // memory (the stages are free: AD_QT·256·2 floats = 16 KiB at most).
    const i64 active = (rhi - rlo + chunk - 1) / chunk;
    const int ns = (int)(active < splits ? active : splits);
    float* s_ml = (float*)s_kv;
    for (int idx = threadIdx.x; idx < AD_QT * ns; idx += blockDim.x) {
        const int a = idx / ns, sp = idx - a * ns;
        const i64 gq = tile * AD_QT + a;
        if (gq >= nq) continue;
        const i64 i = gq / group, hh = gq - (gq / group) * group;
        const i64 r = ((bi * seq + i) * heads + kvh * group + hh) * splits + sp;
        s_ml[2 * idx] = __ldcg(out2 + 2 * r);
        s_ml[2 * idx + 1] = __ldcg(out2 + 2 * r + 1);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < AD_QT * dv; idx += blockDim.x) {
        const int a = idx / dv, e = idx - a * dv;
        const i64 gq = tile * AD_QT + a;
        if (gq >= nq) continue;
        const i64 i = gq / group, hh = gq - (gq / group) * group;
        const i64 row = (bi * seq + i) * heads + kvh * group + hh;
        const float* ml = s_ml + 2 * a * ns;
        float mn = -KILN_INF;
        for (int sp = 0; sp < ns; ++sp) mn = fmaxf(mn, ml[2 * sp]);
        float l = 0.0f, o = 0.0f;
#pragma unroll 4
        for (int sp = 0; sp < ns; ++sp) {
            const float m = ml[2 * sp];
            if (m != -KILN_INF) {
                const float w = exp2f(m - mn);
                l += ml[2 * sp + 1] * w;
                o += __ldcg(out1 + (row * splits + sp) * value_dim + e) * w;
            }
        }
        kiln_st(out, row * value_dim + e, l > 0.0f ? o * (1.0f / l) : 0.0f);
    }
    if (threadIdx.x == 0) counters[cidx] = 0u;
}
