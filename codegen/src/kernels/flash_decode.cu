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
// One kernel. Block x ↦ (split, batch, kv head, query tile), split slowest: the blocks
// of the first splits (the only ones with keys in a short context) come first, so they
// start in the first wave even when the others do not fit beside them. A query
// tile is AD_QT consecutive (row, head) pairs of one kv head (the s·(h/kh) pairs of the
// GQA group times the query rows); AD_QT divides the group (decode.rs checks it), so
// every tile is full and the per-query loops carry no guards. The keys any query row of
// the launch may see, [lo(first row), hi(last row)), are cut into chunks of
// max(ceil(len / splits), AD_MIN_CHUNK) keys; only the first ns = ceil(len / chunk)
// splits have keys (ns is the same for every block of a launch: it depends on the key
// count only), so the blocks of the other splits return at once.
// A block streams its chunk's K and V rows once, in tiles of AD_STAGE bytes
// double-buffered in dynamic shared memory (cp.async, 16 bytes per copy, when rows are
// 16-byte aligned; plain loads otherwise), for all AD_QT queries of its tile. Both
// stages are in flight before the first is used, so a chunk of up to two stages of keys
// (384 keys of head dim 64 in bf16) costs one memory round trip. Each warp takes
// key slots of lpk lanes (lpk·kpw = 32; a lane holds 16-byte vectors li, li + lpk, ...
// of q, k, v rows) and keeps, per query, an online softmax in base 2 (max, sum,
// unnormalized output), updated without branches: the running max starts at AD_NEG (a
// finite stand-in for -inf, so no inf - inf) and an invisible key scores -inf, which
// weighs 0. Slots are merged with shuffles, warps through shared memory.
// A chunk that fits one stage (a short context) takes two passes over the staged rows
// instead (see `two_pass` below): measured on an H200
// (2026-12-04, same-run A/B, batch 1, context ~200) SmolLM2 1,896 → 1,955 tok/s and the
// Llama-3.2-1B shape 1,040 → 1,153.
//
// ns = 1 (a short context: at most AD_MIN_CHUNK keys): the one block normalizes and
// writes `out` itself, with no workspace, fence or counter.
// ns > 1: each block writes its split's partial result to the f32 workspaces
//   out1 [b, s, h, splits, dv]  Σ_j 2^(s_j - max) v_j
//   out2 [b, s, h, splits, 2]   (max, Σ_j 2^(s_j - max)),  s_j = scale·log2(e)·q·k_j
// (a query without a visible key in the chunk writes (AD_NEG, 0) and zeros), then counts
// itself done on `counters[(b, kv head, tile)]` (after a fence that makes its partials
// visible device-wide); the last of the ns blocks of a tile merges them (their (max, sum)
// pairs staged in shared memory): out (storage dtype) = Σ_i 2^(max_i - M) out1_i /
// Σ_i 2^(max_i - M) sum_i, rounded once; 0 for a row without any key (like the CPU
// reference). It resets the counter to 0, so the next launch (or a replayed CUDA graph)
// starts clean; the counters must be zero before the first launch.
// AD_WARPS (warps per block), AD_QT (query pairs per block), AD_NVL (16-byte vectors
// per lane and row), AD_MIN_CHUNK (keys) come from decode.rs.
// KILN_MANUAL_ENTRY (programmatic dependent launch, kiln.cuh): the kernel lets the next
// one be scheduled at once. With `early` = 0 it then waits for the previous kernel
// before anything else. With `early` = 1 (the engine's captured decode step) it first
// reads the key count and issues the copies of its first stage's rows that precede the
// launch's own rows (t - seq and later, which the kernels just before it append): those
// rows, and the symbol table, were written by earlier replays of the step (a CUDA graph
// launch starts after the previous one completed), so they may be read before the wait,
// while the previous kernel runs. After the wait: the launch's own rows, q, the rest.
// AD_FUSED (attention_decode_fused in decode.rs): q and the launch's own K/V rows come
// from their producers (fused elementwise groups: RoPE, the cache appends) instead of
// memory. Every block computes its tile's q (the value block of q's group: `fv` at
// (fq0, fq1, fq2, fq3) = (batch, row, head, element)) into shared memory, and the
// launch's own rows [t - seq, t) of its chunk (the appends' value blocks, at (batch,
// row - (t - seq), kv head, element)) straight into its stage; the blocks of query tile
// 0 also store those rows into the caches (AD_KC, AD_VC: the appends' `past` inputs),
// which no block of the launch reads them from. The producers' kernels are not launched.
// AD_UNROLL (a measurement knob, KILN_ATTN_UNROLL): the unroll factor of the two-pass
// path's loops over the keys (the scores and p·v), so that one iteration's shared loads
// and shuffles overlap the next's; unset, the compiler picks.
#ifdef AD_UNROLL
#define AD_PRAGMA_(x) _Pragma(#x)
#define AD_PRAGMA(x) AD_PRAGMA_(x)
#define AD_UNROLL_KEYS AD_PRAGMA(unroll AD_UNROLL)
#else
#define AD_UNROLL_KEYS
#endif
// AD_PVW (a measurement knob, KILN_ATTN_PVW=1): in the two-pass path of a one-head tile
// with one 16-byte vector of v per warp (dv = 8·AD_WARPS elements, a multiple of 8
// vectors), warp w computes output vector w over all the keys, lane L taking keys L,
// L + 32, ...; the lanes' sums are added by shuffles and lanes 0..7 write the output, with
// no second barrier, warp merge or final loop. V rows are staged swizzled for it (vector c
// of stage slot r at c ^ (r % 8): the 8 lanes of a shared-memory phase read 8 keys' vector
// w from distinct banks).
#ifndef AD_PVW
#define AD_PVW 0
#endif
#define AD_MAXD 256
#define AD_LOG2E 1.4426950408889634f
#define AD_NEG (-1.0e30f)

// 2^x with the SFU (relative error ~2^-22; -inf gives +0, subnormal results flush to 0).
__device__ __forceinline__ float ad_exp2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);  // compiled for a host (the tests' emulation)
#endif
}

// kiln_key_range, kiln_cp16 and the cp.async group helpers: cache_attention.cuh.

// Copies keys [j0, j1) of K and V into one stage: K rows of dp elements, then V rows of
// dvp elements (dp, dvp: d, dv rounded up to KILN_VEC; the K padding is zeroed).
// Rows go to slots r0, r0 + 1, ... of the stage; with `swz` (AD_PVW, the vector path) V's
// vector c of slot r goes to c ^ (r % 8).
__device__ __forceinline__ void ad_stage(KILN_T* sk, const KILN_T* kbase, const KILN_T* vbase, int j0, int j1,
                                         int r0, i64 kv_heads, int d, int dv, int dp, int dvp, int kt, bool vec,
                                         bool swz) {
    KILN_T* sv = sk + kt * dp + r0 * dvp;
    sk += r0 * dp;
    const int nk = j1 - j0;
    if (vec) {
        const int ck = d / KILN_VEC, cv = dv / KILN_VEC;
        for (int idx = threadIdx.x; idx < nk * ck; idx += blockDim.x) {
            const int r = idx / ck, c = idx - r * ck;
            kiln_cp16(sk + r * dp + c * KILN_VEC, kbase + (i64)(j0 + r) * kv_heads * d + c * KILN_VEC);
        }
        for (int idx = threadIdx.x; idx < nk * cv; idx += blockDim.x) {
            const int r = idx / cv, c = idx - r * cv, cs = swz ? c ^ ((r0 + r) & 7) : c;
            kiln_cp16(sv + r * dvp + cs * KILN_VEC, vbase + (i64)(j0 + r) * kv_heads * dv + c * KILN_VEC);
        }
    } else {
        for (int idx = threadIdx.x; idx < nk * dp; idx += blockDim.x) {
            const int r = idx / dp, e = idx - r * dp;
            if (e < d) sk[r * dp + e] = kbase[(i64)(j0 + r) * kv_heads * d + e];
            else kiln_st(sk, r * dp + e, 0.0f);
        }
        for (int idx = threadIdx.x; idx < nk * dv; idx += blockDim.x) {
            const int r = idx / dv, e = idx - r * dv;
            sv[r * dvp + e] = vbase[(i64)(j0 + r) * kv_heads * dv + e];
        }
    }
}

// Element e of query row `row`'s result: with one split the output, normalized (0 for a
// row without a visible key, like the CPU reference); else this split's partials (o,
// and (max, sum) with element 0).
__device__ __forceinline__ void ad_write(KILN_T* out, float* out1, float* out2, i64 row, int e, float o, float mn,
                                         float l, int ns, int split, i64 splits, i64 value_dim) {
    if (ns == 1) {
        kiln_st(out, row * value_dim + e, l > 0.0f ? o * (1.0f / l) : 0.0f);
    } else {
        const i64 r = row * splits + split;
        out1[r * value_dim + e] = o;
        if (e == 0) {
            out2[r * 2] = mn;
            out2[r * 2 + 1] = l;
        }
    }
}

#ifndef AD_FUSED
#define AD_KC in1
#define AD_VC in2
#endif

KILN_SIGNATURE {
    extern __shared__ kiln_u4 s_dyn[];  // 2 · AD_STAGE bytes: the launch's dynamic shared memory
    kiln_u4(*s_kv)[AD_STAGE / 16] = (kiln_u4(*)[AD_STAGE / 16])s_dyn;
    __shared__ float s_m[AD_WARPS][AD_QT], s_l[AD_WARPS][AD_QT];
    __shared__ bool s_last;
    // With `kiln bench --timeline` and the chain off (KILN_MLP_CHAIN=0: the chained
    // kernel's phases share the slots), block 0's phases (µs after its wait): 0 the
    // launch's own K/V rows computed, 1 q computed; the two-pass path's 2 the stage complete,
    // 3 the scores, 5 thread 0's p·v loop, 7 its shuffles and stores, 4 p·v (after the
    // barrier), 6 the output written.
    KILN_PHASE_DECL;
    kiln_grid_launch_dependents();
    if (!early) kiln_grid_wait();
    if (!early) KILN_PHASE_START;
    if (head_dim < 1 || value_dim < 1 || head_dim > AD_MAXD || value_dim > AD_MAXD || kv_heads < 1 ||
        heads % kv_heads != 0 || (heads / kv_heads) % AD_QT != 0 || splits < 1)
        return;  // uniform: the host checks these
    // Block indices in 32 bits (64-bit division is a long subroutine on the GPU).
    const int t = (int)(KILN_KEYS), sq = (int)seq, nsplit = (int)splits, khs = (int)kv_heads;
    const int group = (int)(heads / kv_heads);
    const int ntiles = sq * group / AD_QT;
    int x = (int)blockIdx.x;
    const int tile = x % ntiles;
    x /= ntiles;
    const int kvh = x % khs;
    x /= khs;
    const int bi = x % (int)batch;
    const int split = x / (int)batch;
    if (split >= nsplit) return;
    const int d = (int)head_dim, dv = (int)value_dim;
    // The tile's query row (a tile lies within one row: AD_QT divides the group) and the
    // first of its heads within the group.
    const int qi = tile * AD_QT / group, hh0 = tile * AD_QT - qi * group;
    const i64 row0 = ((i64)bi * sq + qi) * heads + (i64)kvh * group + hh0;  // row of query 0 in [b·s·h]

    // This split's chunk of the keys any query row of the launch may see; the splits
    // with keys: the first ns (at least one, which writes zeros when no key is visible).
    int lo0, hi0, lo1, hi1;
    kiln_key_range(mask_kind, window, t - sq, t, lo0, hi0);
    kiln_key_range(mask_kind, window, t - 1, t, lo1, hi1);
    const int rlo = lo0, rhi = hi1 > lo0 ? hi1 : lo0;
    int chunk = (rhi - rlo + nsplit - 1) / nsplit;
    if (chunk < AD_MIN_CHUNK) chunk = AD_MIN_CHUNK;  // short contexts use fewer splits
    const int active = (rhi - rlo + chunk - 1) / chunk;
    const int ns = active < 1 ? 1 : (active < nsplit ? active : nsplit);
    if (split >= ns) return;  // uniform per block: no keys in this chunk
    const int c0 = rlo + split * chunk < rhi ? rlo + split * chunk : rhi;
    const int c1 = c0 + chunk < rhi ? c0 + chunk : rhi;
    // The keys the tile's row sees, relative to c0.
    int qlo, qhi;
    kiln_key_range(mask_kind, window, t - sq + qi, t, qlo, qhi);
    qlo = (qlo < c0 ? c0 : (qlo > c1 ? c1 : qlo)) - c0;
    qhi = (qhi < c0 ? c0 : (qhi > c1 ? c1 : qhi)) - c0;

    // Lanes per key slot: the 16-byte vectors of the longer of the k and v rows, AD_NVL
    // per lane; lpk <= 32 because d, dv <= AD_MAXD <= 32·AD_NVL·KILN_VEC.
    const int nvec = ((d > dv ? d : dv) + KILN_VEC - 1) / KILN_VEC;
    int lpk = 1;
    while (lpk * AD_NVL < nvec) lpk <<= 1;
    const int kpw = 32 / lpk, slots = AD_WARPS * kpw;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane / lpk, li = lane - g * lpk;
    const float scale2 = scale * AD_LOG2E;
#ifdef AD_FUSED
    __shared__ __align__(16) KILN_T s_q[AD_QT * AD_MAXD];
    const KILN_T* qbase = s_q;
#else
    const KILN_T* qbase = in0 + row0 * head_dim;
#endif
    const bool qvec = head_dim % KILN_VEC == 0 && (((unsigned long long)qbase) & 15ull) == 0;

    const bool vec = head_dim % KILN_VEC == 0 && value_dim % KILN_VEC == 0 && k_batch_stride % KILN_VEC == 0 &&
                     v_batch_stride % KILN_VEC == 0 &&
                     ((((unsigned long long)AD_KC) | ((unsigned long long)AD_VC)) & 15ull) == 0;
    const int dp = (d + KILN_VEC - 1) / KILN_VEC * KILN_VEC, dvp = (dv + KILN_VEC - 1) / KILN_VEC * KILN_VEC;
    const int kt = AD_STAGE / ((dp + dvp) * (int)sizeof(KILN_T));
    const KILN_T* kbase = AD_KC + bi * k_batch_stride + kvh * head_dim;
    const KILN_T* vbase = AD_VC + bi * v_batch_stride + kvh * value_dim;
    const int ntk = (c1 - c0 + kt - 1) / kt;
    // 16-byte vectors of a v row; AD_PVW's swizzled V (see above) where its p·v runs.
    const int nvv = dvp / KILN_VEC;
    const bool swz = AD_PVW && AD_QT == 1 && vec && ntk == 1 && dvp == dv && nvv == AD_WARPS && nvv % 8 == 0;
    const int tnew = t - sq;  // the launch's own rows: [tnew, t)
#ifdef AD_FUSED
    // Rows [j0, j1) (the launch's own) of the stage whose first row is sj0, computed by
    // their producers; query tile 0 also writes them to the caches.
    auto ad_new_rows = [&](KILN_T* sk, int sj0, int j0, int j1) {
        KILN_T* sv = sk + kt * dp;
        const bool writer = tile == 0;
        for (int idx = threadIdx.x; idx < (j1 - j0) * dp; idx += blockDim.x) {
            const int r = idx / dp, e = idx - r * dp, j = j0 + r;
            float fv = 0.0f;
            if (e < d) {
                const i64 fq0 = bi, fq1 = j - tnew, fq2 = kvh, fq3 = e;
                KILN_FUSED_K
                if (writer) kiln_st((KILN_T*)AD_KC, bi * k_batch_stride + ((i64)j * kv_heads + kvh) * d + e, fv);
            }
            kiln_st(sk, (i64)(j - sj0) * dp + e, fv);
        }
        for (int idx = threadIdx.x; idx < (j1 - j0) * dv; idx += blockDim.x) {
            const int r = idx / dv, e = idx - r * dv, j = j0 + r;
            float fv;
            {
                const i64 fq0 = bi, fq1 = j - tnew, fq2 = kvh, fq3 = e;
                KILN_FUSED_V
            }
            if (writer) kiln_st((KILN_T*)AD_VC, bi * v_batch_stride + ((i64)j * kv_heads + kvh) * dv + e, fv);
            const int sl = j - sj0, es = swz ? (((e / KILN_VEC) ^ (sl & 7)) * KILN_VEC + e % KILN_VEC) : e;
            kiln_st(sv, (i64)sl * dvp + es, fv);
        }
    };
#endif

    if (ntk > 0) {
        const int s1 = c0 + kt < c1 ? c0 + kt : c1;
        // Before the wait (early): the stage's rows before the launch's own.
        const int o1 = early ? (tnew < c0 ? c0 : (tnew < s1 ? tnew : s1)) : c0;
        if (early) {
            ad_stage((KILN_T*)s_kv[0], kbase, vbase, c0, o1, 0, kv_heads, d, dv, dp, dvp, kt, vec, swz);
            kiln_grid_wait();
            KILN_PHASE_START;
        }
#ifdef AD_FUSED
        const int o2 = tnew < o1 ? o1 : (tnew < s1 ? tnew : s1);  // the cached rows end here
        ad_stage((KILN_T*)s_kv[0], kbase, vbase, o1, o2, o1 - c0, kv_heads, d, dv, dp, dvp, kt, vec, swz);
        kiln_cp_commit();
        ad_new_rows((KILN_T*)s_kv[0], c0, o2, s1);
        KILN_PHASE(0);
#else
        ad_stage((KILN_T*)s_kv[0], kbase, vbase, o1, s1, o1 - c0, kv_heads, d, dv, dp, dvp, kt, vec, swz);
        kiln_cp_commit();
#endif
    } else if (early) {
        kiln_grid_wait();
        KILN_PHASE_START;
    }
#ifdef AD_FUSED
    // The tile's q rows, computed by their producer.
    for (int idx = threadIdx.x; idx < AD_QT * d; idx += blockDim.x) {
        const int a = idx / d, e = idx - a * d;
        float fv;
        {
            const i64 fq0 = bi, fq1 = qi, fq2 = (i64)kvh * group + hh0 + a, fq3 = e;
            KILN_FUSED_Q
        }
        kiln_st(s_q, (i64)a * head_dim + e, fv);
    }
    __syncthreads();
    KILN_PHASE(1);
#endif

    // Queries of the tile: q (pre-scaled), softmax state.
    float qr[AD_QT][AD_NVL][KILN_VEC], acc[AD_QT][AD_NVL][KILN_VEC], mx[AD_QT], sm[AD_QT];
#pragma unroll
    for (int a = 0; a < AD_QT; ++a) {
        const KILN_T* qp = qbase + a * head_dim;
        mx[a] = AD_NEG;
        sm[a] = 0.0f;
#pragma unroll
        for (int u = 0; u < AD_NVL; ++u) {
            const int vi = li + u * lpk;
            if (qvec && vi * KILN_VEC < d) {
                kiln_unpack(((const kiln_u4*)qp)[vi], qr[a][u], qbase);
            } else {
#pragma unroll
                for (int j = 0; j < KILN_VEC; ++j) {
                    const int e = vi * KILN_VEC + j;
                    qr[a][u][j] = e < d ? kiln_ld(qp, e) : 0.0f;
                }
            }
#pragma unroll
            for (int j = 0; j < KILN_VEC; ++j) {
                qr[a][u][j] *= scale2;
                acc[a][u][j] = 0.0f;
            }
        }
    }

    // A chunk that fits one stage (short contexts: nk <= kt keys), value rows of a
    // power-of-two count of 16-byte vectors: two passes over the staged rows instead of
    // the streaming loop's online softmax, whose per-key chain (score, shuffles, max,
    // rescale) and slot and warp merges dominate when there are few keys. 1. every key
    // slot scores its key for the tile's queries into shared memory, each warp keeping
    // the max of its keys' scores; 2. threads (key group, 16-byte vector of v) take the
    // max over the warps' maxima and, over their keys, the weights 2^(s - max), their
    // sum and Σ p·v, reduced across key groups by shuffles and across warps through
    // shared memory. (Before, one warp per query took the max, the weights and their sum
    // in a pass of its own between the two: block 0's phases on an H200, 2026-12-05,
    // Llama-3.2-1B shape, 200 keys: scores 0.8 µs, that pass 1.7, p·v 1.4.)
    const bool two_pass = ntk == 1 && dvp == dv && (nvv & (nvv - 1)) == 0 && nvv <= 32;
    if (two_pass) {  // uniform
        kiln_cp_wait_all();
        __syncthreads();  // the stage is in shared memory for every thread
        KILN_PHASE(2);
        const KILN_T* sk = (const KILN_T*)s_kv[0];
        const KILN_T* sv = sk + kt * dp;
        const int nk = c1 - c0;
        // Stage 1 is free: the scores [AD_QT][kt], then the warps' sums [AD_WARPS][AD_QT][dv]
        // (6 + 32 KiB at most, under a stage's 48 KiB at least: decode.rs).
        float* s_p = (float*)s_kv[1];
        float* s_o = s_p + AD_QT * kt;
        float wm[AD_QT];  // the max of this warp's scores, per query
#pragma unroll
        for (int a = 0; a < AD_QT; ++a) wm[a] = AD_NEG;  // finite: a query without a visible key weighs every key 0
        AD_UNROLL_KEYS
        for (int kb = warp * kpw; kb < nk; kb += slots) {  // uniform per warp
            const int kk = kb + g;
            const bool in_tile = kk < nk;
            float kf[AD_NVL][KILN_VEC];
#pragma unroll
            for (int u = 0; u < AD_NVL; ++u) {
                const int vi = li + u * lpk;
                if (in_tile && vi * KILN_VEC < dp) {
                    kiln_unpack(((const kiln_u4*)(sk + kk * dp))[vi], kf[u], sk);
                } else {
#pragma unroll
                    for (int j = 0; j < KILN_VEC; ++j) kf[u][j] = 0.0f;
                }
            }
            float sc[AD_QT];
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
                float s0 = 0.0f, s1 = 0.0f;  // two chains
#pragma unroll
                for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                    for (int j = 0; j < KILN_VEC; j += 2) {
                        s0 = fmaf(qr[a][u][j], kf[u][j], s0);
                        s1 = fmaf(qr[a][u][j + 1], kf[u][j + 1], s1);
                    }
                sc[a] = s0 + s1;
            }
            for (int off = lpk >> 1; off > 0; off >>= 1) {
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) sc[a] += __shfl_xor_sync(0xffffffffu, sc[a], off);
            }
            const bool vis = in_tile && kk >= qlo && kk < qhi;
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
                const float sv_ = vis ? sc[a] : -KILN_INF;
                wm[a] = fmaxf(wm[a], sv_);
                if (li == 0 && in_tile) s_p[a * kt + kk] = sv_;
            }
        }
        // The warp's max over its key slots (the lanes of a slot hold the same value).
        for (int off = lpk; off < 32; off <<= 1) {
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) wm[a] = fmaxf(wm[a], __shfl_xor_sync(0xffffffffu, wm[a], off));
        }
        if (lane == 0) {
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) s_m[warp][a] = wm[a];
        }
        __syncthreads();  // the scores and the warps' maxima
        KILN_PHASE(3);
        if (swz) {  // uniform: AD_PVW (see above), one query
            float m = AD_NEG, l = 0.0f, o[KILN_VEC];
#pragma unroll
            for (int w = 0; w < AD_WARPS; ++w) m = fmaxf(m, s_m[w][0]);
#pragma unroll
            for (int e = 0; e < KILN_VEC; ++e) o[e] = 0.0f;
            AD_UNROLL_KEYS
            for (int j = lane; j < nk; j += 32) {
                const float p = ad_exp2(s_p[j] - m);  // 0 for an invisible key
                float vf[KILN_VEC];
                kiln_unpack(((const kiln_u4*)(sv + j * dvp))[warp ^ (j & 7)], vf, sv);
                l += p;
#pragma unroll
                for (int e = 0; e < KILN_VEC; ++e) o[e] = fmaf(p, vf[e], o[e]);
            }
            KILN_PHASE(5);
            // The lanes' sums by a reduce-scatter: at offsets 16, 8, ... a lane keeps half
            // of its elements (the upper half where its lane bit is set) and adds its
            // partner's same half, so lane L ends with element L / (32 / KILN_VEC) after
            // log2(KILN_VEC) halvings (KILN_VEC - 1 shuffles, not 5 · KILN_VEC), then the
            // lanes of its group add the rest.
            int off = 16;
#pragma unroll
            for (int h = KILN_VEC / 2; h >= 1; h >>= 1, off >>= 1) {
                const bool up = (lane & off) != 0;
#pragma unroll
                for (int e = 0; e < h; ++e) {
                    const float send = up ? o[e] : o[e + h], keep = up ? o[e + h] : o[e];
                    o[e] = keep + __shfl_xor_sync(0xffffffffu, send, off);
                }
            }
            for (; off > 0; off >>= 1) o[0] += __shfl_xor_sync(0xffffffffu, o[0], off);
#pragma unroll
            for (int s = 16; s > 0; s >>= 1) l += __shfl_xor_sync(0xffffffffu, l, s);
            constexpr int group = 32 / KILN_VEC;
            if (lane % group == 0)
                ad_write(out, out1, out2, row0, warp * KILN_VEC + lane / group, o[0], m, l, ns, split, splits,
                         value_dim);
            KILN_PHASE(4);
        } else {
        {
            const int vi = threadIdx.x % nvv, kg = threadIdx.x / nvv, ng = blockDim.x / nvv;
            float mq[AD_QT], o[AD_QT][KILN_VEC], l[AD_QT];
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
                float m = AD_NEG;
#pragma unroll
                for (int w = 0; w < AD_WARPS; ++w) m = fmaxf(m, s_m[w][a]);
                mq[a] = m;
                l[a] = 0.0f;
#pragma unroll
                for (int e = 0; e < KILN_VEC; ++e) o[a][e] = 0.0f;
            }
            AD_UNROLL_KEYS
            for (int j = kg; j < nk; j += ng) {
                float vf[KILN_VEC];
                kiln_unpack(((const kiln_u4*)(sv + j * dvp))[vi], vf, sv);
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) {
                    const float p = ad_exp2(s_p[a * kt + j] - mq[a]);  // 0 for an invisible key
                    l[a] += p;
#pragma unroll
                    for (int e = 0; e < KILN_VEC; ++e) o[a][e] = fmaf(p, vf[e], o[a][e]);
                }
            }
            KILN_PHASE(5);
            for (int off = nvv; off < 32; off <<= 1) {
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) {
                    l[a] += __shfl_xor_sync(0xffffffffu, l[a], off);
#pragma unroll
                    for (int e = 0; e < KILN_VEC; ++e) o[a][e] += __shfl_xor_sync(0xffffffffu, o[a][e], off);
                }
            }
            if (lane < nvv) {
#pragma unroll
                for (int a = 0; a < AD_QT; ++a)
#pragma unroll
                    for (int e = 0; e < KILN_VEC; ++e) s_o[(warp * AD_QT + a) * dv + vi * KILN_VEC + e] = o[a][e];
            }
            if (lane == 0) {
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) s_l[warp][a] = l[a];
            }
            KILN_PHASE(7);
        }
        __syncthreads();
        KILN_PHASE(4);
        for (int idx = threadIdx.x; idx < AD_QT * dv; idx += blockDim.x) {
            const int a = idx / dv, e = idx - a * dv;
            float o = 0.0f, l = 0.0f, m = AD_NEG;
#pragma unroll
            for (int w = 0; w < AD_WARPS; ++w) {
                o += s_o[(w * AD_QT + a) * dv + e];
                l += s_l[w][a];
                m = fmaxf(m, s_m[w][a]);
            }
            ad_write(out, out1, out2, row0 + a, e, o, m, l, ns, split, splits, value_dim);
        }
        }  // !swz
    } else {
        for (int tt = 0; tt < ntk; ++tt) {
            const int j0 = c0 + tt * kt;
            if (tt + 1 < ntk) {
                const int n0 = j0 + kt, n1 = n0 + kt < c1 ? n0 + kt : c1;
    #ifdef AD_FUSED
                const int m = tnew < n0 ? n0 : (tnew < n1 ? tnew : n1);
                ad_stage((KILN_T*)s_kv[(tt + 1) & 1], kbase, vbase, n0, m, 0, kv_heads, d, dv, dp, dvp, kt, vec, swz);
                kiln_cp_commit();
                ad_new_rows((KILN_T*)s_kv[(tt + 1) & 1], n0, m, n1);
    #else
                ad_stage((KILN_T*)s_kv[(tt + 1) & 1], kbase, vbase, n0, n1, 0, kv_heads, d, dv, dp, dvp, kt, vec, swz);
                kiln_cp_commit();
    #endif
                kiln_cp_wait_all_but_one();
            } else {
                kiln_cp_wait_all();
            }
            __syncthreads();  // tile tt is in shared memory for every thread

            const KILN_T* sk = (const KILN_T*)s_kv[tt & 1];
            const KILN_T* sv = sk + kt * dp;
            const int nk = c1 - j0 < kt ? c1 - j0 : kt;
            const int jr0 = j0 - c0;
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
                const bool vis = in_tile && jr >= qlo && jr < qhi;  // the same for every query of the tile
                // Scores of the slot's key for every query (independent chains: the shuffle
                // reductions of the AD_QT queries overlap).
                float sc[AD_QT];
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) {
                    float s = 0.0f;
#pragma unroll
                    for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                        for (int j = 0; j < KILN_VEC; ++j) s = fmaf(qr[a][u][j], kf[u][j], s);
                    sc[a] = s;
                }
                for (int off = lpk >> 1; off > 0; off >>= 1) {
#pragma unroll
                    for (int a = 0; a < AD_QT; ++a) sc[a] += __shfl_xor_sync(0xffffffffu, sc[a], off);
                }
#pragma unroll
                for (int a = 0; a < AD_QT; ++a) {
                    const float s = vis ? sc[a] : -KILN_INF;
                    const float mn = fmaxf(mx[a], s);
                    const float corr = ad_exp2(mx[a] - mn);  // 0 for the first visible key
                    const float p = ad_exp2(s - mn);         // 0 for an invisible key
                    mx[a] = mn;
                    sm[a] = fmaf(sm[a], corr, p);
#pragma unroll
                    for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                        for (int j = 0; j < KILN_VEC; ++j) acc[a][u][j] = fmaf(acc[a][u][j], corr, p * vf[u][j]);
                }
            }
            __syncthreads();  // every warp is done with this stage before it is refilled
        }

        // Merge the key slots of each warp (lanes li of slots g and g ^ (off / lpk)).
        for (int off = lpk; off < 32; off <<= 1) {
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
                const float mo = __shfl_xor_sync(0xffffffffu, mx[a], off);
                const float so = __shfl_xor_sync(0xffffffffu, sm[a], off);
                const float mn = fmaxf(mx[a], mo);
                const float wa = ad_exp2(mx[a] - mn), wb = ad_exp2(mo - mn);
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

        // Merge the warps through shared memory (the stages are free now) and write: the
        // final output when this is the only split, else this split's partial result.
        // AD_WARPS·AD_QT·dv floats <= AD_WARPS·AD_QT·AD_MAXD·4 bytes <= 2 stages (decode.rs).
        float* s_acc = (float*)s_kv;
        if (lane < lpk) {
#pragma unroll
            for (int a = 0; a < AD_QT; ++a) {
#pragma unroll
                for (int u = 0; u < AD_NVL; ++u)
#pragma unroll
                    for (int j = 0; j < KILN_VEC; ++j) {
                        const int e = (li + u * lpk) * KILN_VEC + j;
                        if (e < dv) s_acc[(warp * AD_QT + a) * dv + e] = acc[a][u][j];
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
            float mn = AD_NEG;
#pragma unroll
            for (int w = 0; w < AD_WARPS; ++w) mn = fmaxf(mn, s_m[w][a]);
            float l = 0.0f, o = 0.0f;
#pragma unroll
            for (int w = 0; w < AD_WARPS; ++w) {
                const float wt = ad_exp2(s_m[w][a] - mn);
                l += s_l[w][a] * wt;
                o += s_acc[(w * AD_QT + a) * dv + e] * wt;
            }
            ad_write(out, out1, out2, row0 + a, e, o, mn, l, ns, split, splits, value_dim);
        }
    }
    KILN_PHASE(6);
    if (ns == 1) return;  // uniform

    // The last of the ns blocks of this (batch, kv head, query tile) merges the splits.
    __threadfence();  // this block's partials are visible device-wide before it counts itself
    __syncthreads();
    const int cidx = (bi * khs + kvh) * ntiles + tile;
    if (threadIdx.x == 0) s_last = atomicAdd(&counters[cidx], 1u) == (unsigned)(ns - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // every other block's partials are visible to this one
    // The (max, sum) pairs of the ns splits for the tile's rows go to shared memory (the
    // stages are free: AD_QT·256·2 floats = 16 KiB at most).
    float* s_ml = (float*)s_kv;
    for (int idx = threadIdx.x; idx < AD_QT * ns; idx += blockDim.x) {
        const int a = idx / ns, sp = idx - a * ns;
        const i64 r = (row0 + a) * splits + sp;
        s_ml[2 * idx] = __ldcg(out2 + 2 * r);
        s_ml[2 * idx + 1] = __ldcg(out2 + 2 * r + 1);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < AD_QT * dv; idx += blockDim.x) {
        const int a = idx / dv, e = idx - a * dv;
        const i64 row = row0 + a;
        const float* ml = s_ml + 2 * a * ns;
        float mn = AD_NEG;
        for (int sp = 0; sp < ns; ++sp) mn = fmaxf(mn, ml[2 * sp]);
        float l = 0.0f, o = 0.0f;
#pragma unroll 4
        for (int sp = 0; sp < ns; ++sp) {
            const float w = ad_exp2(ml[2 * sp] - mn);
            l += ml[2 * sp + 1] * w;
            o += __ldcg(out1 + (row * splits + sp) * value_dim + e) * w;
        }
        kiln_st(out, row * value_dim + e, l > 0.0f ? o * (1.0f / l) : 0.0f);
    }
    if (threadIdx.x == 0) counters[cidx] = 0u;
}
