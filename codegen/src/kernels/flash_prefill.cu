// Tiled tensor-core ("FlashAttention-2") attention for prefill: many query rows over a
// KV cache.
//
// Semantics of Op::Attention, as in flash_decode.cu: softmax(scale · q kᵀ + mask) v with
// grouped KV heads; q [b, s, h, d] (in0), out [b, s, h, d] (storage dtype, rounded once);
// query row i sits at position t - s + i; mask_kind 0 none, 1 causal, 2 causal sliding
// window of `window` keys. The key count t = KILN_KEYS is read from the device symbol
// table `syms` (not an argument). Keys and values are read from caches (in1, in2) whose
// batch entries are k_batch_stride / v_batch_stride elements apart; inside an entry,
// position j of kv head g is the row (j·kv_heads + g)·d. Keys at positions >= t are
// never read. A row without any visible key is written as zeros (like the CPU reference).
//
// Block x ↦ (query tile, batch, head), head fastest and query tiles last to first (the
// causal mask gives later tiles more keys: they start first). A block owns PF_BQ = 64
// query rows of one (batch, head): PF_WARPS warps of PF_MW·16 rows each. It streams the
// keys any of its rows may see, [lo(first row), hi(last row)), in tiles of PF_BK = 64
// keys through shared memory (cp.async, 16 bytes per copy; plain loads when a pointer or
// batch stride is not 16-byte aligned): K tile i+1 is copied during P·V of tile i, V tile
// i during q·kᵀ of tile i. Rows are PF_D + 8 elements apart in shared memory, so the 8
// row addresses of one ldmatrix fall in distinct banks. Key rows past the tile's end are
// zero-filled (never read from global memory) and masked.
//
// Per warp and tile: S = Q Kᵀ with mma.m16n8k16 (Q fragments kept in registers, K
// fragments by ldmatrix), S·scale·log2(e) masked to -inf outside each row's keys, online
// softmax in base 2 in f32 (row max over the quad by shuffles; running max m, partial sum
// l per thread), P rounded to the storage type as the A operand of O += P V (V fragments
// by ldmatrix.trans), f32 accumulation. A warp skips tiles none of its rows sees and the
// mask where every key of the tile is visible to all its rows. O / l is rounded once.
//
// PF_STAGES 2 (head dims up to 80: four tiles in 48 KiB) instead: K and V tile i+1 are
// copied into a second stage during all of tile i's work, one barrier per tile.
//
// PF_D (head dim, a multiple of 16, at most 128), PF_WARPS, PF_MW (PF_WARPS·PF_MW·16 =
// PF_BQ), PF_STAGES, PF_F16 (0: bf16, 1: f16) come from prefill.rs.
#define PF_BQ 64
#define PF_BK 64
#define PF_LD (PF_D + 8)
#define PF_CH (PF_D / 8)
#define PF_LOG2E 1.4426950408889634f

struct alignas(16) pf_u4 { unsigned x, y, z, w; };

// kiln_key_range, kiln_smem_addr, kiln_cp16 and the cp.async group helpers:
// cache_attention.cuh.

// 16 bytes (8 elements) global -> shared: cp.async when `vec`, plain 2-byte loads
// otherwise; zeros when `src` is null.
__device__ __forceinline__ void pf_copy16(unsigned short* dst, const unsigned short* src, bool vec) {
    if (src == 0) {
        *(pf_u4*)dst = pf_u4{0u, 0u, 0u, 0u};
    } else if (vec) {
        kiln_cp16(dst, src);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
}

// Rows [0, n) of a PF_BQ/PF_BK-row tile: row r from `base + r·stride` (elements), rows
// >= n zero-filled.
__device__ __forceinline__ void pf_load_tile(unsigned short* s, const unsigned short* base, i64 stride, int n, bool vec) {
    for (int idx = threadIdx.x; idx < PF_BK * PF_CH; idx += PF_WARPS * 32) {
        const int r = idx / PF_CH, c = idx - r * PF_CH;
        pf_copy16(s + r * PF_LD + c * 8, r < n ? base + r * stride + c * 8 : (const unsigned short*)0, vec);
    }
}

__device__ __forceinline__ void pf_ldsm_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void pf_ldsm_x4_t(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c (16x8 f32) += a (16x16) · b (16x8), operands in the storage type.
__device__ __forceinline__ void pf_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if PF_F16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two f32 rounded to the storage type, `lo` in the low half.
__device__ __forceinline__ unsigned pf_pack(float lo, float hi) {
    unsigned r;
#if PF_F16
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float pf_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

KILN_SIGNATURE {
    __shared__ __align__(16) unsigned short s_k[PF_STAGES * PF_BK * PF_LD];
    __shared__ __align__(16) unsigned short s_v[PF_STAGES * PF_BK * PF_LD];  // Q is staged in the last stage first
    if (head_dim != PF_D || value_dim != PF_D || kv_heads < 1 || heads % kv_heads != 0 || batch < 1 || seq < 1)
        return;  // uniform: the host checks these
    const i64 t = KILN_KEYS;
    const i64 nqt = (seq + PF_BQ - 1) / PF_BQ;
    i64 x = blockIdx.x;
    const i64 head = x % heads;
    x /= heads;
    const i64 bi = x % batch;
    x /= batch;
    if (x >= nqt) return;
    const i64 q0 = (nqt - 1 - x) * PF_BQ;
    const int nq = (int)(seq - q0 < PF_BQ ? seq - q0 : PF_BQ);
    const i64 group = heads / kv_heads, kvh = head / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const float scale2 = scale * PF_LOG2E;

    // Keys of the block: [klo, khi) (lo and hi grow with the position).
    i64 klo, khi, unused;
    kiln_key_range(mask_kind, window, t - seq + q0, t, klo, unused);
    kiln_key_range(mask_kind, window, t - seq + q0 + nq - 1, t, unused, khi);
    if (khi < klo) khi = klo;
    const int nkeys = (int)(khi - klo);
    const int ntiles = (nkeys + PF_BK - 1) / PF_BK;

    // This thread's rows (relative to q0): w0 + mi·16 + g (+ 8); their visible keys
    // relative to klo, and the warp's: any row sees keys in [wlo, whi), every row sees
    // [wall_lo, wall_hi).
    const int w0 = warp * PF_MW * 16;
    int rlo[PF_MW][2], rhi[PF_MW][2];
#pragma unroll
    for (int mi = 0; mi < PF_MW; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int r = w0 + mi * 16 + g + 8 * hr;
            i64 lo = klo, hi = klo;
            if (r < nq) kiln_key_range(mask_kind, window, t - seq + q0 + r, t, lo, hi);
            rlo[mi][hr] = (int)(lo - klo);
            rhi[mi][hr] = (int)(hi - klo);
        }
    int wlo = 0, whi = 0, wall_lo = 0, wall_hi = 0;
    if (w0 < nq) {
        const int wl = (w0 + PF_MW * 16 < nq ? w0 + PF_MW * 16 : nq) - 1;
        i64 lo, hi;
        kiln_key_range(mask_kind, window, t - seq + q0 + w0, t, lo, hi);
        wlo = (int)(lo - klo);
        wall_hi = (int)(hi - klo);
        kiln_key_range(mask_kind, window, t - seq + q0 + wl, t, lo, hi);
        wall_lo = (int)(lo - klo);
        whi = (int)(hi - klo);
    }

    const bool vec = k_batch_stride % 8 == 0 && v_batch_stride % 8 == 0 &&
                     ((((unsigned long long)in0) | ((unsigned long long)in1) | ((unsigned long long)in2) |
                       ((unsigned long long)out)) &
                      15ull) == 0;
    const unsigned short* qbase = (const unsigned short*)in0 + ((bi * seq + q0) * heads + head) * PF_D;
    const unsigned short* kbase = (const unsigned short*)in1 + bi * k_batch_stride + (klo * kv_heads + kvh) * PF_D;
    const unsigned short* vbase = (const unsigned short*)in2 + bi * v_batch_stride + (klo * kv_heads + kvh) * PF_D;
    const i64 qstride = heads * PF_D, kvstride = kv_heads * PF_D;

    // Q tile -> the last V stage, K tile 0 -> s_k (and V tile 0 -> s_v with 2 stages); Q
    // fragments into registers.
    const unsigned short* s_q = s_v + (PF_STAGES - 1) * PF_BK * PF_LD;
    pf_load_tile((unsigned short*)s_q, qbase, qstride, nq, vec);
    kiln_cp_commit();
    if (ntiles > 0) {
        pf_load_tile(s_k, kbase, kvstride, nkeys < PF_BK ? nkeys : PF_BK, vec);
#if PF_STAGES == 2
        pf_load_tile(s_v, vbase, kvstride, nkeys < PF_BK ? nkeys : PF_BK, vec);
#endif
    }
    kiln_cp_commit();
    kiln_cp_wait_all_but_one();
    __syncthreads();
    unsigned qf[PF_MW][PF_D / 16][4];
    const unsigned sk_addr = kiln_smem_addr(s_k), sv_addr = kiln_smem_addr(s_v), sq_addr = kiln_smem_addr(s_q);
#pragma unroll
    for (int mi = 0; mi < PF_MW; ++mi)
#pragma unroll
        for (int kk = 0; kk < PF_D / 16; ++kk) {
            const int row = w0 + mi * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
            const int col = kk * 16 + 8 * (lane >> 4);
            pf_ldsm_x4(qf[mi][kk], sq_addr + (row * PF_LD + col) * 2);
        }

    float o[PF_MW][PF_D / 8][4], m[PF_MW][2], l[PF_MW][2];
#pragma unroll
    for (int mi = 0; mi < PF_MW; ++mi) {
#pragma unroll
        for (int n = 0; n < PF_D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][n][e] = 0.0f;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            m[mi][hr] = -KILN_INF;
            l[mi][hr] = 0.0f;
        }
    }

    for (int it = 0; it < ntiles; ++it) {
        const int j0 = it * PF_BK;  // relative to klo
        const int nk = nkeys - j0 < PF_BK ? nkeys - j0 : PF_BK;
#if PF_STAGES == 2
        // One barrier per tile: tile it + 1 is copied into the other stage during all of
        // tile it's work.
        const int st = it & 1;
        kiln_cp_wait_all();
        __syncthreads();  // tile `it` is in stage st; every warp is done with stage st ^ 1 (tile it - 1, or Q)
        if (it + 1 < ntiles) {
            const int n1 = nkeys - j0 - PF_BK < PF_BK ? nkeys - j0 - PF_BK : PF_BK;
            pf_load_tile(s_k + (st ^ 1) * PF_BK * PF_LD, kbase + (i64)(j0 + PF_BK) * kvstride, kvstride, n1, vec);
            pf_load_tile(s_v + (st ^ 1) * PF_BK * PF_LD, vbase + (i64)(j0 + PF_BK) * kvstride, kvstride, n1, vec);
            kiln_cp_commit();
        }
        const unsigned skt = sk_addr + st * PF_BK * PF_LD * 2, svt = sv_addr + st * PF_BK * PF_LD * 2;
#else
        kiln_cp_wait_all();
        __syncthreads();  // K tile `it` is in s_k; every warp is done with s_v (Q or V tile it - 1)
        pf_load_tile(s_v, vbase + (i64)j0 * kvstride, kvstride, nk, vec);
        kiln_cp_commit();
        const unsigned skt = sk_addr, svt = sv_addr;
#endif

        const bool active = j0 < whi && j0 + nk > wlo;                          // uniform per warp
        const bool full = j0 >= wall_lo && j0 + PF_BK <= wall_hi;               // no mask needed
        unsigned p[PF_MW][PF_BK / 16][4];
        if (active) {
            float s[PF_MW][PF_BK / 8][4];
#pragma unroll
            for (int mi = 0; mi < PF_MW; ++mi)
#pragma unroll
                for (int n = 0; n < PF_BK / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mi][n][e] = 0.0f;
#pragma unroll
            for (int nb = 0; nb < PF_BK / 16; ++nb)
#pragma unroll
                for (int kk = 0; kk < PF_D / 16; ++kk) {
                    unsigned b[4];
                    const int row = nb * 16 + (lane & 7) + 8 * (lane >> 4);
                    const int col = kk * 16 + 8 * ((lane >> 3) & 1);
                    pf_ldsm_x4(b, skt + (row * PF_LD + col) * 2);
#pragma unroll
                    for (int mi = 0; mi < PF_MW; ++mi) {
                        pf_mma(s[mi][2 * nb], qf[mi][kk], b[0], b[1]);
                        pf_mma(s[mi][2 * nb + 1], qf[mi][kk], b[2], b[3]);
                    }
                }
#pragma unroll
            for (int mi = 0; mi < PF_MW; ++mi) {
                float mx[2] = {-KILN_INF, -KILN_INF};
#pragma unroll
                for (int n = 0; n < PF_BK / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float v = s[mi][n][e] * scale2;
                        if (!full) {
                            const int kr = j0 + n * 8 + 2 * t4 + (e & 1);
                            if (kr < rlo[mi][e >> 1] || kr >= rhi[mi][e >> 1]) v = -KILN_INF;
                        }
                        s[mi][n][e] = v;
                        mx[e >> 1] = fmaxf(mx[e >> 1], v);
                    }
                float mu[2];
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
                    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
                    const float mn = fmaxf(m[mi][hr], mx[hr]);
                    mu[hr] = mn == -KILN_INF ? 0.0f : mn;  // no key yet: every p is 0
                    const float corr = pf_exp2(m[mi][hr] - mu[hr]);
                    m[mi][hr] = mn;
                    l[mi][hr] *= corr;
#pragma unroll
                    for (int n = 0; n < PF_D / 8; ++n) {
                        o[mi][n][2 * hr] *= corr;
                        o[mi][n][2 * hr + 1] *= corr;
                    }
                }
#pragma unroll
                for (int n = 0; n < PF_BK / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float pe = pf_exp2(s[mi][n][e] - mu[e >> 1]);
                        s[mi][n][e] = pe;
                        l[mi][e >> 1] += pe;
                    }
                // P as A fragments of 16 keys: (row g, keys 2t4..), (row g + 8, ..),
                // (row g, keys 8 + 2t4..), (row g + 8, ..).
#pragma unroll
                for (int ks = 0; ks < PF_BK / 16; ++ks) {
                    p[mi][ks][0] = pf_pack(s[mi][2 * ks][0], s[mi][2 * ks][1]);
                    p[mi][ks][1] = pf_pack(s[mi][2 * ks][2], s[mi][2 * ks][3]);
                    p[mi][ks][2] = pf_pack(s[mi][2 * ks + 1][0], s[mi][2 * ks + 1][1]);
                    p[mi][ks][3] = pf_pack(s[mi][2 * ks + 1][2], s[mi][2 * ks + 1][3]);
                }
            }
        }
#if PF_STAGES == 1
        __syncthreads();  // every warp is done with s_k
        if (it + 1 < ntiles) {
            const int n1 = nkeys - j0 - PF_BK < PF_BK ? nkeys - j0 - PF_BK : PF_BK;
            pf_load_tile(s_k, kbase + (i64)(j0 + PF_BK) * kvstride, kvstride, n1, vec);
            kiln_cp_commit();
            kiln_cp_wait_all_but_one();
        } else {
            kiln_cp_wait_all();
        }
        __syncthreads();  // V tile `it` is in s_v
#endif
        if (active) {
#pragma unroll
            for (int ks = 0; ks < PF_BK / 16; ++ks)
#pragma unroll
                for (int db = 0; db < PF_D / 16; ++db) {
                    unsigned b[4];
                    const int row = ks * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                    const int col = db * 16 + 8 * (lane >> 4);
                    pf_ldsm_x4_t(b, svt + (row * PF_LD + col) * 2);
#pragma unroll
                    for (int mi = 0; mi < PF_MW; ++mi) {
                        pf_mma(o[mi][2 * db], p[mi][ks], b[0], b[1]);
                        pf_mma(o[mi][2 * db + 1], p[mi][ks], b[2], b[3]);
                    }
                }
        }
    }

    // out = O / l, rounded once; rows without keys (l = 0) are zeros.
#pragma unroll
    for (int mi = 0; mi < PF_MW; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float ls = l[mi][hr];
            ls += __shfl_xor_sync(0xffffffffu, ls, 1);
            ls += __shfl_xor_sync(0xffffffffu, ls, 2);
            const float inv = ls > 0.0f ? 1.0f / ls : 0.0f;
            const int r = w0 + mi * 16 + g + 8 * hr;
            if (r < nq) {
                KILN_T* orow = out + ((bi * seq + q0 + r) * heads + head) * PF_D;
#pragma unroll
                for (int n = 0; n < PF_D / 8; ++n) {
                    const int c = n * 8 + 2 * t4;
                    const float a = o[mi][n][2 * hr] * inv, b = o[mi][n][2 * hr + 1] * inv;
                    if (vec) {
                        *(unsigned*)(orow + c) = pf_pack(a, b);
                    } else {
                        kiln_st(orow, c, a);
                        kiln_st(orow, c + 1, b);
                    }
                }
            }
        }
}
