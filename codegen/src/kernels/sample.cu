// Token sampling on the GPU: one block of SP_THREADS threads per row of in0 [n, len]
// (logits in their storage dtype, read as f32). Writes the chosen id to out [n] (i64)
// and its log-probability to out1 [n] (f32).
//
// Semantics. x_i = logit_i · (1 / temperature) in f32 (-0 read as +0), M = max x,
// Z = Σ exp(x_i − M).
// * A NaN or +inf logit in the row: the greedy pick below; logprob NaN.
// * temperature <= 0 (or NaN), greedy: the largest logit, the lowest index on ties;
//   logprob = log_softmax(logits)[id] (temperature 1). Every logit -inf: id = 0 (the
//   same rule), logprob -inf.
// * Otherwise the kept set is filtered, top-k first, then top-p:
//   1. top_k (0 < top_k < len): keep x >= the top_k-th largest x. Every token tied with
//      it stays too (Hugging Face TopKLogitsWarper), so more than top_k may stay.
//   2. top_p (< 1): among those, with Z_k their Σ exp(x − M), keep x >= τ where τ is the
//      largest value with Σ_{kept, x >= τ} exp(x − M) >= (top_p − 1e-6)·Z_k: the smallest
//      set of most likely tokens reaching top_p, plus every token tied with its least
//      likely member (top_p <= 0 keeps the maximum and its ties).
//   3. u in [0, 1) from the counter-based hash below; the token is the first kept index
//      (index order) at which the running Σ exp(x − M) over kept tokens exceeds
//      u · Σ_kept exp(x − M). Zero-mass tokens are never picked; if rounding leaves the
//      target at or above the running total, the last kept token with nonzero mass.
//   logprob = x_id − M − log Z: under the temperature-scaled full (unfiltered) distribution.
// * Randomness: one atomicAdd(step, 1) per block; step_of_launch = (value before) / n,
//   so *step advances by n per launch (by one for one row) and every row of a launch sees
//   the same value. u = (h >> 40) / 2^24 with h = mix(mix(mix(seed) ^ step_of_launch) ^ row),
//   mix = SplitMix64's finalizer of z + 0x9e3779b97f4a7c15. The same seed and counter
//   give the same tokens; a replayed CUDA graph draws a fresh u every launch.
//
// Thresholds without sorting: the largest key τ (keys: the order-preserving u32 image of
// x) whose count (top-k) or mass (top-p) of keys >= τ reaches the target is narrowed in
// passes over the row, each building a 256-bin histogram (counts and masses, SP_COPIES
// shared copies to spread atomics) of the keys in the current window [lo, hi] and keeping
// the bin where the running sum from the top reaches the target. The first pass bins
// values linearly over [min, max]; later passes split the key range in 256 equal parts,
// so a selection takes at most 5 passes. The pick narrows [0, len) by 16 contiguous
// parts per level (one warp each, summing their kept mass), then scans the last <= 64
// elements in one warp.
#define SP_THREADS KILN_THREADS  // the block size, from decode.rs
#define SP_WARPS (SP_THREADS / 32)
#define SP_BINS 256
#define SP_COPIES 8

__device__ __forceinline__ unsigned sp_key(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float sp_val(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ unsigned long long sp_mix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float sp_x(const KILN_L* row, i64 i, float inv_t) {
    return kiln_ld(row, i) * inv_t + 0.0f;
}
// Merges online-softmax states (max, Σ exp(x − max)).
__device__ __forceinline__ void sp_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -KILN_INF) return;
    s = (m == -KILN_INF ? 0.0f : s * expf(m - mn)) + (m2 == -KILN_INF ? 0.0f : s2 * expf(m2 - mn));
    m = mn;
}

// A pass's bin of an in-window key: linear in value, or (key − lo) >> shift. Monotone
// in the key either way.
struct SpBins {
    bool linear;
    float vlo, vscale;
    unsigned lo;
    int shift;
};
__device__ __forceinline__ int sp_bin(const SpBins& b, float x, unsigned kx) {
    if (b.linear) {
        const int v = (int)((x - b.vlo) * b.vscale);
        return v < SP_BINS - 1 ? v : SP_BINS - 1;
    }
    return (int)((kx - b.lo) >> b.shift);
}

// Narrows the key window [lo, hi] (`total`: the mass of the row's keys >= lo, none of
// them above hi) to the largest key τ whose count (by_count) or mass of keys >= τ
// reaches the target (the lowest key of the window if none does). Returns τ and the
// mass of the keys >= τ. Called by every thread of the block.
__device__ void sp_select(const KILN_L* row, i64 len, float inv_t, float M, bool by_count, i64 target_c,
                          float target_m, unsigned lo, unsigned hi, float total, unsigned& tau, float& kept,
                          unsigned (*cnt)[SP_BINS], float (*mass)[SP_BINS], unsigned* s_u, float* s_f, i64* s_i) {
    const int tid = threadIdx.x, copy = (tid >> 5) & (SP_COPIES - 1);
    float above = 0.0f, sel_mass = total;
    i64 above_c = 0;
    bool first = true;
    while (lo < hi) {
        SpBins bk;
        bk.lo = lo;
        bk.linear = false;
        bk.vlo = 0.0f;
        bk.vscale = 0.0f;
        const int bits = 32 - __clz((int)(hi - lo));
        bk.shift = bits > 8 ? bits - 8 : 0;
        if (first) {
            const float vlo = sp_val(lo), vhi = sp_val(hi);
            const float sc = (float)SP_BINS / (vhi - vlo);
            if (vlo > -KILN_INF && vhi < KILN_INF && sc > 0.0f && sc < KILN_INF) {
                bk.linear = true;
                bk.vlo = vlo;
                bk.vscale = sc;
            }
        }
        first = false;
        for (int i = tid; i < SP_COPIES * SP_BINS; i += SP_THREADS) {
            cnt[i / SP_BINS][i % SP_BINS] = 0u;
            mass[i / SP_BINS][i % SP_BINS] = 0.0f;
        }
        __syncthreads();
        for (i64 i = tid; i < len; i += SP_THREADS) {
            const float x = sp_x(row, i, inv_t);
            const unsigned kx = sp_key(x);
            if (kx < lo || kx > hi) continue;
            const int b = sp_bin(bk, x, kx);
            atomicAdd(&cnt[copy][b], 1u);
            atomicAdd(&mass[copy][b], expf(x - M));
        }
        __syncthreads();
        for (int b = tid; b < SP_BINS; b += SP_THREADS) {
            unsigned c = cnt[0][b];
            float ms = mass[0][b];
            for (int cp = 1; cp < SP_COPIES; ++cp) {
                c += cnt[cp][b];
                ms += mass[cp][b];
            }
            cnt[0][b] = c;
            mass[0][b] = ms;
        }
        __syncthreads();
        if (tid == 0) {
            i64 cc = above_c, pc = above_c;
            float cm = above, pm = above;
            int sel = -1, low = -1;
            for (int b = SP_BINS - 1; b >= 0; --b) {
                if (cnt[0][b] == 0u) continue;
                pc = cc;
                pm = cm;
                cc += cnt[0][b];
                cm += mass[0][b];
                low = b;
                if (by_count ? cc >= target_c : cm >= target_m) {
                    sel = b;
                    break;
                }
            }
            if (sel < 0) sel = low;  // the window is never empty; pc, pm are the sums above `low`
            unsigned nlo, nhi;
            if (bk.linear) {
                unsigned a = lo, z = hi;
                while (a < z) {
                    const unsigned mid = a + (z - a) / 2u;
                    if (sp_bin(bk, sp_val(mid), mid) >= sel) z = mid;
                    else a = mid + 1u;
                }
                nlo = a;
                a = lo;
                z = hi;
                while (a < z) {
                    const unsigned mid = (unsigned)((unsigned long long)a + ((unsigned long long)(z - a) + 1ull) / 2ull);
                    if (sp_bin(bk, sp_val(mid), mid) <= sel) a = mid;
                    else z = mid - 1u;
                }
                nhi = a;
            } else {
                nlo = lo + ((unsigned)sel << bk.shift);
                const unsigned long long e = (unsigned long long)nlo + ((1ull << bk.shift) - 1ull);
                nhi = e < (unsigned long long)hi ? (unsigned)e : hi;
            }
            s_u[0] = nlo;
            s_u[1] = nhi;
            s_f[0] = pm;
            s_f[1] = mass[0][sel];
            s_i[0] = pc;
        }
        __syncthreads();
        lo = s_u[0];
        hi = s_u[1];
        above = s_f[0];
        sel_mass = s_f[1];
        above_c = s_i[0];
        // s_u, s_f, s_i are written again only after the next pass's barriers.
    }
    tau = lo;
    kept = above + sel_mass;
}

KILN_SIGNATURE {
    __shared__ unsigned s_cnt[SP_COPIES][SP_BINS];
    __shared__ float s_mass[SP_COPIES][SP_BINS];
    __shared__ float s_bv[SP_WARPS], s_om[SP_WARPS], s_os[SP_WARPS];
    __shared__ i64 s_bi[SP_WARPS];
    __shared__ unsigned s_kmin[SP_WARPS], s_kmax[SP_WARPS];
    __shared__ unsigned s_u[2];
    __shared__ float s_f[2];
    __shared__ i64 s_i[3];
    __shared__ int s_last;
    __shared__ unsigned long long s_step;

    const i64 r = blockIdx.x;
    if (r >= n) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) s_step = atomicAdd((unsigned long long*)step, 1ull) / (unsigned long long)n;
    const KILN_L* row = in0 + r * len;
    const bool greedy = !(temperature > 0.0f);
    const float inv_t = greedy ? 1.0f : 1.0f / temperature;

    // ---- pass A: argmax (kiln_before order), online max/sum of x, key range ----
    float bv = 0.0f, om = -KILN_INF, os = 0.0f;
    i64 bi = -1;
    unsigned kmin = 0xffffffffu, kmax = 0u;
    for (i64 i = tid; i < len; i += SP_THREADS) {
        const float l = kiln_ld(row, i);
        if (bi < 0 || kiln_before(l, i, bv, bi)) {
            bv = l;
            bi = i;
        }
        const float x = l * inv_t + 0.0f;
        const unsigned kx = sp_key(x);
        kmin = kx < kmin ? kx : kmin;
        kmax = kx > kmax ? kx : kmax;
        if (x > om) {
            os = os * expf(om - x) + 1.0f;
            om = x;
        } else if (x != -KILN_INF) {
            os += expf(x - om);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const i64 oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (oi >= 0 && (bi < 0 || kiln_before(ov, oi, bv, bi))) {
            bv = ov;
            bi = oi;
        }
        const float m2 = __shfl_xor_sync(0xffffffffu, om, off);
        const float s2 = __shfl_xor_sync(0xffffffffu, os, off);
        sp_merge(om, os, m2, s2);
        const unsigned a = __shfl_xor_sync(0xffffffffu, kmin, off);
        const unsigned b = __shfl_xor_sync(0xffffffffu, kmax, off);
        kmin = a < kmin ? a : kmin;
        kmax = b > kmax ? b : kmax;
    }
    if (lane == 0) {
        s_bv[warp] = bv;
        s_bi[warp] = bi;
        s_om[warp] = om;
        s_os[warp] = os;
        s_kmin[warp] = kmin;
        s_kmax[warp] = kmax;
    }
    __syncthreads();
    bv = s_bv[0];
    bi = s_bi[0];
    om = s_om[0];
    os = s_os[0];
    kmin = s_kmin[0];
    kmax = s_kmax[0];
    for (int w = 1; w < SP_WARPS; ++w) {
        if (s_bi[w] >= 0 && (bi < 0 || kiln_before(s_bv[w], s_bi[w], bv, bi))) {
            bv = s_bv[w];
            bi = s_bi[w];
        }
        sp_merge(om, os, s_om[w], s_os[w]);
        kmin = s_kmin[w] < kmin ? s_kmin[w] : kmin;
        kmax = s_kmax[w] > kmax ? s_kmax[w] : kmax;
    }
    const float M = om, Z = os;
    __syncthreads();

    if (bi < 0 || bv != bv || bv == KILN_INF || greedy || M == -KILN_INF) {
        if (tid == 0) {
            out[r] = bi;
            float lp = KILN_NAN;
            if (bi >= 0 && bv == bv && bv != KILN_INF) lp = M == -KILN_INF ? -KILN_INF : bv * inv_t - M - logf(Z);
            out1[r] = lp;
        }
        return;
    }

    // ---- thresholds: top-k, then top-p ----
    unsigned tau = kmin;
    float kept = Z;
    if (top_k > 0 && top_k < len) {
        sp_select(row, len, inv_t, M, true, top_k, 0.0f, kmin, kmax, Z, tau, kept, s_cnt, s_mass, s_u, s_f, s_i);
    }
    if (top_p < 1.0f) {
        const float target = (top_p - 1e-6f) * kept;
        sp_select(row, len, inv_t, M, false, 0, target, tau, kmax, kept, tau, kept, s_cnt, s_mass, s_u, s_f, s_i);
    }

    // ---- the draw ----
    const unsigned long long h =
        sp_mix(sp_mix(sp_mix((unsigned long long)seed) ^ s_step) ^ (unsigned long long)r);
    const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    float tgt = u * kept;
    bool last = false;
    i64 start = 0, end = len;
    while (end - start > 64) {
        const i64 sub = (end - start + SP_WARPS - 1) / SP_WARPS;
        const i64 p0 = start + warp * sub, p1 = p0 + sub < end ? p0 + sub : end;
        float part = 0.0f;
        for (i64 i = p0 + lane; i < p1; i += 32) {
            const float x = sp_x(row, i, inv_t);
            if (sp_key(x) >= tau) part += expf(x - M);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        if (lane == 0) s_bv[warp] = part;
        __syncthreads();
        if (tid == 0) {
            float cum = 0.0f;
            int sel = -1, lastpos = -1;
            for (int w = 0; w < SP_WARPS; ++w) {
                const float v = s_bv[w];
                if (!(v > 0.0f)) continue;
                lastpos = w;
                if (!last && cum + v > tgt) {
                    sel = w;
                    break;
                }
                cum += v;
            }
            s_last = last ? 1 : 0;
            if (sel < 0) {
                sel = lastpos;  // >= 0: the range holds kept mass
                s_last = 1;
            }
            s_f[0] = tgt - cum;
            s_i[0] = start + sel * sub;
            s_i[1] = s_i[0] + sub < end ? s_i[0] + sub : end;
        }
        __syncthreads();
        tgt = s_f[0];
        last = s_last != 0;
        start = s_i[0];
        end = s_i[1];
    }
    if (warp == 0) {
        float run = 0.0f;
        i64 found = -1, lastk = -1;
        for (i64 i0 = start; i0 < end; i0 += 32) {
            const i64 i = i0 + lane;
            float e = 0.0f;
            if (i < end) {
                const float x = sp_x(row, i, inv_t);
                if (sp_key(x) >= tau) e = expf(x - M);
            }
            float incl = e;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const float o = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += o;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, !last && e > 0.0f && run + incl > tgt);
            const unsigned pos = __ballot_sync(0xffffffffu, e > 0.0f);
            if (pos != 0u) lastk = i0 + 31 - __clz((int)pos);
            if (hit != 0u) {
                found = i0 + __ffs((int)hit) - 1;
                break;
            }
            run += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (found < 0) found = lastk;
        if (lane == 0) {
            out[r] = found;
            out1[r] = sp_x(row, found, inv_t) - M - logf(Z);
        }
    }
}
