// GEMV for batch-1 decode: y[m, n] = Σ_k x[m, k] · w[n, k] (w row-major [n, k], the
// `linear` layout), 1 <= m <= GV_MAX_M, f32 accumulation, y rounded once to its storage
// type. x, w, y are the parameters in0, in1, out. With KILN_RESIDUAL, in2 = r [m, n] (y's
// dtype) and y = round(round(x·wᵀ) + r), like the CPU reference (matmul rounded to the
// output dtype, then the add rounded again).
//
// Work: a block of GV_WARPS warps owns (GV_WARPS / GV_KS)·GV_R consecutive rows of w;
// the GV_KS warps of a row group (warp = group·GV_KS + ks) stream rows row0 .. row0 +
// GV_R, each a share of the columns (split-K: a short n still puts enough warps, and
// loads, in flight), and their partial sums are added in ks order through shared memory.
// x is staged in shared memory as f32, kc columns at a time (kc·m <= GV_XS, kc a
// multiple of 256), shared by the block's warps; with several rows of x 16-byte aligned,
// through 16-byte loads, GV_XL per thread in flight.
//
// Vector path (k % KILN_VEC == 0 and w 16-byte aligned, so every row of w is): the
// row's 16-byte vectors go in slots of 32; slot s belongs to the warp with ks = s % GV_KS
// and lane L reads vector L of it; GV_R·GV_U loads in flight per lane (slots ks, ks +
// GV_KS, ... , GV_U of them per step), through the read-only path without L1 allocation
// (weights are read once); a chunk's first loads are issued before x is staged.
// Staged x element e of row r sits at float4 slot (r·GV_P + (e % KILN_VEC) / 4)·nv +
// e / KILN_VEC (GV_P planes of 4 floats, nv vectors per chunk), so the warp's 16-byte
// shared loads (and the staging stores) for one plane cover 32 consecutive slots: no
// bank conflicts.
// Scalar path (otherwise): lane L reads elements L, L+32, ...; x is staged row-major.
// Each lane accumulates in f32; rows are reduced with warp shuffles; lane 0 stores.
// GV_PROLOGUE (a fused matrix-vector group, kiln_codegen::gemv_prologue): instead of
// reading x, every block computes the rows of x itself from the group's inputs (code
// generated from the group's body, put where x is staged: the prologue's reductions per
// row, then its values stored into the staging with gv_stage; block 0 also writes the
// prologue's outputs). The whole
// rows are staged at once (the host checks m·k fits). GV_W and GV_Y name the weight and
// y parameters (in1 and out for a plain GEMV).
// KILN_MANUAL_ENTRY: the kernel lets the next one be scheduled at once, issues the first
// chunk's weight loads (no kernel writes weights), and only then waits for the previous
// kernel (which writes x) — programmatic dependent launch, see kiln.cuh.
// GV_WARPS (warps per block), GV_R (rows per warp), GV_U (16-byte loads in flight per
// lane and row), GV_MAX_M (rows of x the kernel takes, which size the accumulators)
// and GV_XVEC (16-byte staging of x: kernels for more than one row) come from decode.rs
// (`GemvConfig`), as does GV_XS (floats of x staged per block,
// `GEMV_STAGED_FLOATS`). GV_X names x (in0 for a plain GEMV).
// GV_SCALE (with GV_PROLOGUE, kiln_codegen::gemv_scaled): the prologue factors as
// x = A · S (an RMSNorm: A = γ·h, S = rsqrt(mean(h²) + ε)); every block stages A for its
// one row of x, reduces in the same pass (partials in gv_red, GV_NRED reductions),
// computes S into gv_s after a barrier, and multiplies its dot products by S before
// they are stored (or kept for the epilogue). One tile per block, like a plain GEMV;
// with GV_SCALE_LOOP (the form without an epilogue) the blocks are one wave that loops
// over the row tiles like the prologue form, staging A and computing S once per block.
// GV_EPI (a matrix-vector group with an epilogue, kiln_codegen::gemv_epilogue): the
// block's warps compute the rows of w its epilogue columns need (warp s·GV_EPI_T + t:
// row GV_EPI_OFF(s) + tile·GV_EPI_T + t, see gv_epi_row), keep them (rounded to y's
// type) in gv_ey, and then compute the epilogue of the block's GV_EPI_T columns for every
// row of x (code generated from the group's epilogue, which reads y through
// kiln_epi_y). y is stored for the rows computed: the columns the epilogue reads.
// GV_EPI_WARP (with GV_SCALE_LOOP, one row of x; kiln_codegen::gemv_scaled_epi_warp):
// the epilogue without a barrier. A warp owns one epilogue column per tile (GV_RW
// columns per tile, GV_R = GV_EPI_S): its rows rr are GV_EPI_OFF(rr) + col (gate and
// up of SwiGLU), so after its shuffle reductions it holds every y value its column's
// epilogue reads, and lane 0 computes it (code generated from the group's epilogue,
// reading y through kiln_epi_yw). The warps of a block never wait for each other, so
// the looping blocks keep streaming through the tiles as the plain loop does.
// GV_CHAIN (with GV_EPI_WARP; kiln_codegen::gemv_scaled_epi_warp_chain): the product
// that consumes the epilogue's output runs in the same launch (EngineOptions::mlp_chain,
// on by default: SwiGLU's z, then the down projection y2 = z · w2ᵀ). When a block has
// finished its tiles, a barrier, then thread 0 fences (making the block's stores of z
// visible device-wide) and adds the block to GV_CH_CTR[0]; every warp then issues the
// first loads of its first row of w2 (weights: no kernel writes them), thread 0 spins
// until every block of the launch has counted (then fences), a barrier, and the block
// stages z (coherent loads, as f32, where x was staged) and computes rows
// blockIdx.x + gridDim.x·warp, ... of y2 as the plain one-row GEMV does (lane L takes
// vectors L, L + 32, ...; GV_CH_U loads in flight per lane), so y2 has its bits. The
// last block to finish zeroes the counters for the next launch. Every block must be
// resident at once: the engine launches at most one wave (the kernel's occupancy); a
// spin that lasts about a second traps (kiln_spin_until), failing the launch.
// GV_CH_HELP = H > 0 (with GV_CHAIN; a measurement knob, KILN_CHAIN_HELP=H): helper warps
// for the chained rows. The rows of y2 go to warps blockIdx.x + gridDim.x·warp, so with
// fewer rows than the launch has warps, the second half's warps have none and the first
// half's stream theirs with GV_CH_U loads in flight per lane. A warp of the second half
// without a row whose partner (warp - GV_WARPS / 2) has one copies, before the spin and
// with cp.async, steps 1 .. H (32·GV_CH_U vectors each) of the partner's first row into
// dynamic shared memory (GV_WARPS / 2 · H · 32 · GV_CH_U · 16 bytes, Kernel::dynamic_smem),
// and waits for its copies before the barrier after z is staged. The partner computes
// steps 1 .. H from there in the same order (y2 keeps its bits) and issues step H + 1's
// loads as soon as step 0 is used: the row's first H + 1 steps are loaded during the spin
// and the rest with one round trip less.
// GV_CH_BM (with GV_CHAIN, not with GV_CH_HELP; a measurement knob,
// KILN_CHAIN_BM=1): the rows of y2 block-major, warp w of block b taking rows
// b·GV_WARPS + w, ... (same stride): with fewer rows than the launch has warps, the blocks
// past the rows have none, count themselves and leave without spinning, so the next
// kernel's blocks (the next layer's qkv) can be resident, and load their weights, while
// the others compute y2.
#define GV_P (KILN_VEC / 4)
#define GV_RW (GV_WARPS / GV_KS)  // row groups per block
#define GV_XV (16 / (int)sizeof(KILN_X))  // elements of x in 16 bytes
#define GV_XL 4  // 16-byte loads of x in flight per thread while staging
#ifndef GV_EPI
#define GV_EPI 0
#endif
#ifndef GV_SCALE
#define GV_SCALE 0
#endif
#ifndef GV_SCALE_LOOP
#define GV_SCALE_LOOP 0
#endif
#ifndef GV_EPI_WARP
#define GV_EPI_WARP 0
#endif
#ifndef GV_RA
#define GV_RA 0
#endif
#ifndef GV_RA_BULK
#define GV_RA_BULK 0
#endif
#ifndef GV_ARGMAX
#define GV_ARGMAX 0
#endif
#ifndef GV_CHAIN
#define GV_CHAIN 0
#endif
#ifndef GV_CH_HELP
#define GV_CH_HELP 0
#endif
#ifndef GV_CH_BM
#define GV_CH_BM 0
#endif
#if GV_EPI
#define GV_EPI_T (GV_WARPS / GV_EPI_S)  // epilogue columns per block
// The row of w that warp rw of the block for columns tile·GV_EPI_T.. computes (n: none).
__device__ __forceinline__ i64 gv_epi_row(i64 tile, int rw, i64 n) {
    const int s = rw / GV_EPI_T, t = rw - s * GV_EPI_T;
    const i64 col = tile * GV_EPI_T + t;
    if (s >= GV_EPI_S || col >= GV_EPI_W) return n;
    return GV_EPI_OFF(s) + col;
}
#define GV_ROW0(tile, rw) gv_epi_row((tile), (rw), n)
// y as the epilogue reads it: element `off` of y [m, n] from the block's rows.
struct kiln_epi_y {
    const float* ey;
    i64 n;
    i64 tile;
};
__device__ __forceinline__ float kiln_ld(const kiln_epi_y& e, i64 off) {
    const i64 r = off / e.n, c = off - r * e.n;
    int w = 0;
#pragma unroll
    for (int s = 0; s < GV_EPI_S; ++s) {
        const i64 t = c - GV_EPI_OFF(s) - e.tile * GV_EPI_T;
        if (t >= 0 && t < GV_EPI_T) w = s * GV_EPI_T + (int)t;
    }
    return e.ey[r * GV_WARPS + w];
}
#elif GV_EPI_WARP
// row0 is the warp's epilogue column; its rows are the column's in every slice.
#define GV_ROW0(tile, rw) ((tile) * GV_RW + (rw))
// y as the warp-epilogue reads it: element `off` of y [1, n] from the warp's values v[s]
// (row GV_EPI_OFF(s) + col); every offset the epilogue of column col reads is one of them.
struct kiln_epi_yw {
    const float* v;
    i64 n;
    i64 col;
};
__device__ __forceinline__ float kiln_ld(const kiln_epi_yw& e, i64 off) {
    const i64 c = off % e.n;  // one row of x
    float y = 0.0f;
#pragma unroll
    for (int s = 0; s < GV_EPI_S; ++s)
        if (c == GV_EPI_OFF(s) + e.col) y = e.v[s];
    return y;
}
#else
#define GV_ROW0(tile, rw) (((tile) * GV_RW + (rw)) * GV_R)
#endif

// Row rr of a warp whose first row (GV_EPI_WARP: column) is row0; n (no row) past the end.
__device__ __forceinline__ i64 gv_wrow(i64 row0, int rr, i64 n) {
#if GV_EPI_WARP
    return row0 < GV_EPI_W ? GV_EPI_OFF(rr) + row0 : n;
#else
    (void)n;
    return row0 + rr;
#endif
}

// Puts element j of activation row r (f32) where the staging keeps it (see above).
// Branch-free (one store at a selected index), so a generated prologue's unrolled
// column loop stays one basic block whose loads can all be issued first.
__device__ __forceinline__ void gv_stage(float* xs, int r, i64 j, float v, bool vec, int nv, int len) {
    const int iv = ((r * GV_P + (int)((j % KILN_VEC) / 4)) * nv + (int)(j / KILN_VEC)) * 4 + (int)(j % 4);
    const int is = r * len + (int)j;
    xs[vec ? iv : is] = v;
}

// v rounded to y's storage type and back.
__device__ __forceinline__ float gv_round(float v) {
    KILN_Y t[1];
    kiln_st(t, 0, v);
    return kiln_ld((const KILN_Y*)t, 0);
}

// Loads the GV_R·GV_U weight vectors of one step (vectors c0 + u·32·GV_KS + lane of
// this warp's rows, zeros past the end) of the chunk at column k0.
__device__ __forceinline__ void gv_load(kiln_u4 (&wv)[GV_R][GV_U], const KILN_W* __restrict__ w, i64 row0, i64 n,
                                        i64 k, i64 k0, int c0, int nv, int lane) {
#pragma unroll
    for (int rr = 0; rr < GV_R; ++rr) {
#pragma unroll
        for (int u = 0; u < GV_U; ++u) {
            const int c = c0 + u * 32 * GV_KS + lane;
            const i64 row = gv_wrow(row0, rr, n);
            if (row < n && c < nv) {
                wv[rr][u] = kiln_ld16(w + row * k + k0 + (i64)c * KILN_VEC);
            } else {
                wv[rr][u].x = wv[rr][u].y = wv[rr][u].z = wv[rr][u].w = 0u;
            }
        }
    }
}

// GV_RA > 0 (a measurement knob, KILN_GEMV_RA): read-ahead. When a warp has finished its
// last tile, it prefetches into L2 its share of what the next weight product of the
// decode step reads first, so the memory system stays busy while this kernel drains and
// the next one is not yet resident. The engine writes the table into these module
// globals after loading: kiln_ra_n entries of 5 words (this kernel's weight, then two
// (address, bytes) ranges of the next weight: its first rows, one range per slice of an
// epilogue). Line i of a range goes to block i % gridDim.x, then warp, then lane, so
// every line is prefetched once by the launch. A weight not in the table: nothing.
// GV_RA = 2 (KILN_GEMV_RA_EARLY=1): a plain GEMV reads ahead before its wait instead, once
// its first weight loads are issued (the memory system is idle while the kernel before
// it, decode attention before o_proj, runs); the prologue forms read nothing ahead.
// GV_RA_BULK (KILN_GEMV_RA_BULK=1): each warp's lane 0 prefetches its share of a range in
// one bulk prefetch (sm_90's copy engine) instead of the lanes' line-by-line prefetches.
#if GV_RA > 0
__device__ const unsigned long long* kiln_ra_tab;
__device__ int kiln_ra_n;
__device__ __forceinline__ void gv_readahead(const void* w) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (int)(blockDim.x >> 5);
    const unsigned long long* t = kiln_ra_tab;
    int hit = -1;
    for (int i = lane; i < kiln_ra_n; i += 32)
        if (t[5 * i] == (unsigned long long)w) hit = i;
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        const int o = __shfl_xor_sync(0xffffffffu, hit, s);
        hit = o > hit ? o : hit;
    }
    if (hit < 0) return;
    const i64 per = (i64)gridDim.x * nw * 32;  // lines per round of the launch
#pragma unroll 1
    for (int r = 0; r < 2; ++r) {
        const char* base = (const char*)t[5 * hit + 1 + 2 * r];
#if GV_RA_BULK
        // Lane 0 of warp g = block + grid · warp: one bulk prefetch of the g-th of the
        // launch's equal shares (whole lines) of the range.
        (void)per;
        const i64 bytes = (i64)t[5 * hit + 2 + 2 * r] & ~(i64)15, parts = (i64)gridDim.x * nw;
        const i64 share = ((bytes + parts - 1) / parts + 127) / 128 * 128;
        const i64 a = ((i64)blockIdx.x + (i64)gridDim.x * warp) * share;
        if (lane == 0 && a < bytes)
            kiln_prefetch_l2_bulk(base + a, (unsigned int)(bytes - a < share ? bytes - a : share));
#else
        const i64 lines = ((i64)t[5 * hit + 2 + 2 * r] + 127) / 128;
#pragma unroll 1
        for (i64 i = (i64)blockIdx.x + (i64)gridDim.x * (warp + (i64)nw * lane); i < lines; i += per)
            kiln_prefetch_l2(base + i * 128);
#endif
    }
}
#endif

#if GV_CH_HELP
// blockIdx.x and gridDim.x, read where they are used: volatile reads are not hoisted out
// of the tile loop into registers live across it (the Llama-3.2-1B chained kernel spills
// 56 bytes at its 64-register bound with plain reads; none with these, NVRTC sm_90).
__device__ __forceinline__ void gv_sreg(unsigned int& bx, unsigned int& gx) {
#if defined(__CUDA_ARCH__)
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(bx));
    asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(gx));
#else
    bx = blockIdx.x;
    gx = gridDim.x;
#endif
}
#endif

#if GV_CH_HELP
// A warp's part in GV_CH_HELP for rows of y2 blockIdx.x + gridDim.x·warp, ... (n rows): 1
// a helper (second half, no row, its partner has one), -1 a helped warp, 0 neither. From
// volatile reads of the special registers (see gv_sreg), so nothing stays live across the
// spin.
__device__ __forceinline__ int gv_help_role(int warp, i64 n) {
    unsigned int bx, gx;
    gv_sreg(bx, gx);
    const int h = GV_WARPS / 2, w = warp < h ? warp : warp - h;
    const bool lo = (i64)bx + (i64)gx * w < n, hi = (i64)bx + (i64)gx * (w + h) < n;
    return lo && !hi ? (warp < h ? -1 : 1) : 0;
}
#endif

#if GV_CHAIN
// acc += x · w over the 16-byte weight vector wv, vector c of a row (x staged in xs4 as
// the plain GEMV stages it: plane-major, nv vectors per row), in element order.
__device__ __forceinline__ void gv_chain_fma(float& acc, const kiln_u4& wv, const kiln_f4* xs4, int nv, int c,
                                             const KILN_W* w) {
    float wf[KILN_VEC], xf[KILN_VEC];
    kiln_unpack(wv, wf, w);
#pragma unroll
    for (int p = 0; p < GV_P; ++p) {
        const kiln_f4 q = xs4[p * nv + c];
        xf[4 * p + 0] = q.x;
        xf[4 * p + 1] = q.y;
        xf[4 * p + 2] = q.z;
        xf[4 * p + 3] = q.w;
    }
#pragma unroll
    for (int j = 0; j < KILN_VEC; ++j) acc = fmaf(xf[j], wf[j], acc);
}
// Steps c0 = from, from + 32·GV_CH_U, ... of a row (wr: its first element; lane L takes
// vectors c0 + L, c0 + L + 32, ...) into acc, in order; cw already holds step `from` when
// `loaded`.
__device__ __forceinline__ void gv_chain_steps(float& acc, kiln_u4 (&cw)[GV_CH_U], const KILN_W* wr, int nv, int from,
                                               bool loaded, int lane, const kiln_f4* xs4) {
    for (int c0 = from; c0 < nv; c0 += 32 * GV_CH_U) {
        if (c0 > from || !loaded) {
#pragma unroll
            for (int u = 0; u < GV_CH_U; ++u) {
                const int c = c0 + u * 32 + lane;
                if (c < nv) cw[u] = kiln_ld16(wr + (i64)c * KILN_VEC);
            }
        }
#pragma unroll
        for (int u = 0; u < GV_CH_U; ++u) {
            const int c = c0 + u * 32 + lane;
            if (c < nv) gv_chain_fma(acc, cw[u], xs4, nv, c, wr);
        }
    }
}
// The chained product (GV_CHAIN): rows first, first + gridDim.x·GV_WARPS, ...
// of y = x · wᵀ for one row of x staged in xs4 as the plain GEMV stages it (plane-major,
// nv 16-byte vectors per row of w), as the plain one-row GEMV computes them (lane L
// takes vectors L, L + 32, ..., f32 sums, one rounding); cw holds the first row's first
// step, already issued; hs (GV_CH_HELP): a helped warp's copied steps, else null.
template <class TY>
__device__ __forceinline__ void gv_chain_rows(kiln_u4 (&cw)[GV_CH_U], const KILN_W* w, TY* y, i64 n, int nv, i64 first,
                                              int lane, const kiln_f4* xs4, const kiln_u4* hs) {
#if GV_CH_HELP
    if (hs != nullptr) {
        // A helped warp (GV_CH_HELP): its one row (the helper's has none, so neither has
        // a second), steps 1 .. GV_CH_HELP from hs, the step after them loaded as soon as
        // step 0 is used; the sums in the order of the loop below.
        const KILN_W* wr = w + first * nv * KILN_VEC;
        float acc = 0.0f;
#pragma unroll
        for (int u = 0; u < GV_CH_U; ++u) {
            const int c = u * 32 + lane;
            if (c < nv) gv_chain_fma(acc, cw[u], xs4, nv, c, w);
        }
        const int c1 = (GV_CH_HELP + 1) * 32 * GV_CH_U;
#pragma unroll
        for (int u = 0; u < GV_CH_U; ++u) {
            const int c = c1 + u * 32 + lane;
            if (c < nv) cw[u] = kiln_ld16(wr + (i64)c * KILN_VEC);
        }
        for (int i = 0; i < GV_CH_HELP * GV_CH_U; ++i) {
            const int c = 32 * GV_CH_U + i * 32 + lane;
            if (c < nv) gv_chain_fma(acc, hs[i * 32 + lane], xs4, nv, c, w);
        }
        gv_chain_steps(acc, cw, wr, nv, c1, true, lane, xs4);
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
        if (lane == 0) kiln_st(y, first, acc);
        return;
    }
#else
    (void)hs;
#endif
    for (i64 row = first; row < n; row += (i64)gridDim.x * GV_WARPS) {
        float acc = 0.0f;
        gv_chain_steps(acc, cw, w + row * nv * KILN_VEC, nv, 0, row == first, lane, xs4);
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
        if (lane == 0) kiln_st(y, row, acc);
    }
}
// The first step of row `row` of w (rows of nv vectors) into cw (nothing past n).
__device__ __forceinline__ void gv_chain_first(kiln_u4 (&cw)[GV_CH_U], const KILN_W* w, i64 n, int nv, i64 row,
                                               int lane) {
#pragma unroll
    for (int u = 0; u < GV_CH_U; ++u) {
        const int c = u * 32 + lane;
        if (row < n && c < nv) cw[u] = kiln_ld16(w + row * nv * KILN_VEC + (i64)c * KILN_VEC);
    }
}
// One row of x (nv 16-byte vectors of KILN_W's type at x, written earlier in this launch:
// L2 loads) into xs4, as the plain GEMV stages it, L loads in flight per thread (a
// 1,024-vector row in one round trip with 512 threads).
__device__ __forceinline__ void gv_chain_stage(kiln_f4* xs4, const KILN_W* x, int nv) {
    constexpr int L = 2;
    const int nt = (int)blockDim.x;
    for (int c0 = threadIdx.x; c0 < nv; c0 += L * nt) {
        kiln_u4 v[L];
#pragma unroll
        for (int u = 0; u < L; ++u) {
            const int c = c0 + u * nt;
            if (c < nv) v[u] = kiln_ld16_cg(x + (i64)c * KILN_VEC);
        }
#pragma unroll
        for (int u = 0; u < L; ++u) {
            const int c = c0 + u * nt;
            if (c < nv) {
                float f[KILN_VEC];
                kiln_unpack(v[u], f, x);
#pragma unroll
                for (int p = 0; p < GV_P; ++p) {
                    kiln_f4 q;
                    q.x = f[4 * p];
                    q.y = f[4 * p + 1];
                    q.z = f[4 * p + 2];
                    q.w = f[4 * p + 3];
                    xs4[p * nv + c] = q;
                }
            }
        }
    }
}
#endif

// Stores y[r, row] = v (plus the residual).
__device__ __forceinline__ void gv_store(KILN_Y* y, const KILN_Y* res, i64 n, int r, i64 row, float v) {
#if KILN_RESIDUAL
    kiln_st(y, (i64)r * n + row, gv_round(v) + kiln_ld(res, (i64)r * n + row));
#else
    kiln_st(y, (i64)r * n + row, v);
#endif
}

KILN_SIGNATURE {
    __shared__ kiln_f4 xs4[GV_XS / 4];
#if GV_EPI
    __shared__ float gv_ey[GV_MAX_M * GV_WARPS];  // the block's y values, row-major by warp
#endif
#if GV_KS > 1
    __shared__ float gv_part[GV_WARPS][GV_MAX_M * GV_R];  // the warps' row sums
#endif
#if GV_SCALE
    __shared__ float gv_red[GV_NRED * GV_WARPS];  // the warps' partial reductions (one row of x)
#endif
#if GV_CH_HELP
    extern __shared__ kiln_u4 gv_help[];  // GV_WARPS / 2 · GV_CH_HELP steps of 32 · GV_CH_U vectors
#endif
    float* xs = (float*)xs4;
#if GV_CHAIN
    // With `kiln bench --timeline`, block 0's phases of a chained launch (µs after its
    // wait): 2 its tiles, 3 z complete, 4 its rows of y2.
    KILN_PHASE_DECL;
#endif
    kiln_grid_launch_dependents();
    if (m < 1 || m > GV_MAX_M) {
        kiln_grid_wait();
        return;  // uniform: the host checks m
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rw = warp / GV_KS, ks = warp - rw * GV_KS;  // row group, share of the columns
    const bool vec = (k % KILN_VEC) == 0 && (((unsigned long long)GV_W) & 15ull) == 0;
#if !GV_PROLOGUE
    // x in 16-byte vectors too: every row of x starts 16-byte aligned. GV_XVEC is 0 for
    // a one-row kernel: its x is one short row, and the loads in flight would cost it 30
    // registers (40 → 70 for w16r1u4 in bf16), a third of its resident blocks (the
    // decode step measured 18% slower).
    const bool xvec = GV_XVEC && (k % GV_XV) == 0 && (((unsigned long long)GV_X) & 15ull) == 0;
#endif
    const int kc = (GV_XS / (int)m) & ~255;
    const int mm = (int)m;
    if (GV_PROLOGUE && kc < k) {
        kiln_grid_wait();
        return;  // uniform: the host stages whole rows only when they fit
    }

    // Tiles of GV_WARPS·GV_R rows of w: one per block for a plain GEMV; a grid-stride
    // loop for the prologue form, whose blocks compute (and stage) x once for all their
    // tiles (the host launches fewer blocks than tiles).
#if GV_EPI_WARP
    const i64 ntiles = (GV_EPI_W + GV_RW - 1) / GV_RW;
#else
    const i64 ntiles = (n + GV_RW * GV_R - 1) / (GV_RW * GV_R);
#endif
    const i64 tile_end = (GV_PROLOGUE && (!GV_SCALE || GV_SCALE_LOOP)) ? ntiles : (i64)blockIdx.x + 1;
#if GV_SCALE
    float gv_s[GV_MAX_M];  // each row's scale S, computed where x is staged (gemv_scaled)
#endif
#if GV_ARGMAX
    // The warp's best (y as stored, row) over its rows, for greedy sampling folded into
    // the product (kiln_codegen::gemv_scaled_argmax: one row of x, no split-K).
    float gv_bv = 0.0f;
    i64 gv_bi = -1;
#endif
    if (k <= 0) kiln_grid_wait();  // no chunk: wait here
    for (i64 tile = blockIdx.x; tile < tile_end; tile += gridDim.x) {
    const i64 row0 = GV_ROW0(tile, rw);
#define GV_FIRST_TILE (tile == (i64)blockIdx.x)
    float acc[GV_MAX_M][GV_R];
#pragma unroll
    for (int r = 0; r < GV_MAX_M; ++r)
#pragma unroll
        for (int rr = 0; rr < GV_R; ++rr) acc[r][rr] = 0.0f;

    kiln_u4 wv[GV_R][GV_U];
    for (i64 k0 = 0; k0 < k; k0 += kc) {
        const int len = (int)(k - k0 < (i64)kc ? k - k0 : (i64)kc);
        // The chunk's first weight loads go out before x is staged, so they overlap.
        if (vec) gv_load(wv, GV_W, row0, n, k, k0, ks * 32, len / KILN_VEC, lane);
        if (!GV_PROLOGUE || GV_FIRST_TILE) {  // uniform: stage this chunk of x
#if GV_RA == 2 && !GV_PROLOGUE
        // Early read-ahead: after the first weight loads, before the wait (see GV_RA).
        if (k0 == 0 && m >= 1 && m <= GV_MAX_M) gv_readahead(GV_W);  // uniform
#endif
        if (k0 == 0) kiln_grid_wait();  // x is written by the previous kernel
#if GV_CHAIN
        if (k0 == 0) KILN_PHASE_START;
#endif
        __syncthreads();  // every warp is done with the previous chunk
#if GV_PROLOGUE
        {
            const int nv = len / KILN_VEC;
KILN_PROLOGUE
        }
#else
        if (vec && xvec) {
            // 16-byte loads of x (GV_XV elements each), GV_XL per thread issued before
            // any is stored, so a chunk of x arrives in one or two round trips; each
            // 4-element group is one float4 of the staging.
            const int nv = len / KILN_VEC, nq = len / GV_XV, total = mm * nq;
            for (int q0 = threadIdx.x; q0 < total; q0 += blockDim.x * GV_XL) {
                kiln_u4 xv[GV_XL];
#pragma unroll
                for (int u = 0; u < GV_XL; ++u) {
                    const int q = q0 + u * (int)blockDim.x;
                    if (q < total) {
                        const int r = q / nq, c = q - r * nq;
                        xv[u] = *(const kiln_u4*)(GV_X + (i64)r * k + k0 + (i64)c * GV_XV);
                    }
                }
#pragma unroll
                for (int u = 0; u < GV_XL; ++u) {
                    const int q = q0 + u * (int)blockDim.x;
                    if (q < total) {
                        const int r = q / nq, c = q - r * nq;
                        float f[GV_XV];
                        kiln_unpack(xv[u], f, (const KILN_X*)0);
#pragma unroll
                        for (int g = 0; g < GV_XV / 4; ++g) {
                            const int j = c * GV_XV + 4 * g;
                            kiln_f4 v;
                            v.x = f[4 * g];
                            v.y = f[4 * g + 1];
                            v.z = f[4 * g + 2];
                            v.w = f[4 * g + 3];
                            xs4[(r * GV_P + (j % KILN_VEC) / 4) * nv + j / KILN_VEC] = v;
                        }
                    }
                }
            }
        } else if (vec) {
            // One float4 slot per thread and step: consecutive threads, consecutive slots.
            const int nv = len / KILN_VEC;
            for (int r = 0; r < mm; ++r) {
#pragma unroll
                for (int p = 0; p < GV_P; ++p) {
                    for (int c = threadIdx.x; c < nv; c += blockDim.x) {
                        const i64 e = (i64)r * k + k0 + (i64)c * KILN_VEC + 4 * p;
                        kiln_f4 v;
                        v.x = kiln_ld(GV_X, e);
                        v.y = kiln_ld(GV_X, e + 1);
                        v.z = kiln_ld(GV_X, e + 2);
                        v.w = kiln_ld(GV_X, e + 3);
                        xs4[(r * GV_P + p) * nv + c] = v;
                    }
                }
            }
        } else {
            for (int r = 0; r < mm; ++r) {
                for (int e = threadIdx.x; e < len; e += blockDim.x) {
                    xs[r * len + e] = kiln_ld(GV_X, (i64)r * k + k0 + e);
                }
            }
        }
#endif
        __syncthreads();
        }

        if (vec) {
            const int nv = len / KILN_VEC;
            for (int c0 = ks * 32; c0 < nv; c0 += 32 * GV_KS * GV_U) {
                if (c0 > ks * 32) gv_load(wv, GV_W, row0, n, k, k0, c0, nv, lane);
#pragma unroll
                for (int u = 0; u < GV_U; ++u) {
                    const int c = c0 + u * 32 * GV_KS + lane;
                    if (c < nv) {
                        float wf[GV_R][KILN_VEC];
#pragma unroll
                        for (int rr = 0; rr < GV_R; ++rr) kiln_unpack(wv[rr][u], wf[rr], GV_W);
#pragma unroll
                        for (int r = 0; r < GV_MAX_M; ++r) {
                            if (r < mm) {
                                float xf[KILN_VEC];
#pragma unroll
                                for (int p = 0; p < GV_P; ++p) {
                                    const kiln_f4 q = xs4[(r * GV_P + p) * nv + c];
                                    xf[4 * p + 0] = q.x;
                                    xf[4 * p + 1] = q.y;
                                    xf[4 * p + 2] = q.z;
                                    xf[4 * p + 3] = q.w;
                                }
#pragma unroll
                                for (int rr = 0; rr < GV_R; ++rr) {
#pragma unroll
                                    for (int j = 0; j < KILN_VEC; ++j) acc[r][rr] = fmaf(xf[j], wf[rr][j], acc[r][rr]);
                                }
                            }
                        }
                    }
                }
            }
        } else {
            for (int e = ks * 32 + lane; e < len; e += 32 * GV_KS) {
                float wf[GV_R];
#pragma unroll
                for (int rr = 0; rr < GV_R; ++rr) {
                    const i64 row = gv_wrow(row0, rr, n);
                    wf[rr] = row < n ? kiln_ld(GV_W, row * k + k0 + e) : 0.0f;
                }
#pragma unroll
                for (int r = 0; r < GV_MAX_M; ++r) {
                    if (r < mm) {
                        const float xv = xs[r * len + e];
#pragma unroll
                        for (int rr = 0; rr < GV_R; ++rr) acc[r][rr] = fmaf(xv, wf[rr], acc[r][rr]);
                    }
                }
            }
        }
    }

#if GV_EPI_WARP
    float gv_wy[GV_R];  // the warp's y values (rounded to y's type), for its epilogue
#endif
#pragma unroll
    for (int r = 0; r < GV_MAX_M; ++r) {
        if (r < mm) {
#pragma unroll
            for (int rr = 0; rr < GV_R; ++rr) {
                float v = acc[r][rr];
#pragma unroll
                for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
#if GV_SCALE
                v *= gv_s[r];
#endif
                const i64 row = gv_wrow(row0, rr, n);
#if GV_EPI_WARP
                gv_wy[rr] = gv_round(v);
#endif
#if GV_ARGMAX
                if (row < n) {
                    const float yv = gv_round(v);
                    if (gv_bi < 0 || kiln_before(yv, row, gv_bv, gv_bi)) {
                        gv_bv = yv;
                        gv_bi = row;
                    }
                }
#endif
#if GV_KS > 1
                if (lane == 0) gv_part[warp][r * GV_R + rr] = v;
#else
                if (lane == 0 && row < n) gv_store(GV_Y, GV_RES, n, r, row, v);
#if GV_EPI
                if (lane == 0) gv_ey[r * GV_WARPS + warp] = gv_round(v);
#endif
#endif
            }
        }
    }
#if GV_EPI_WARP
    if (lane == 0 && row0 < GV_EPI_W) {  // one row of x: the host checks m == 1
KILN_WARP_EPILOGUE
    }
#endif
#if GV_KS > 1
    // The first warp of each row group adds its group's partial sums, in ks order.
    __syncthreads();
    if (ks == 0) {
        for (int i = lane; i < mm * GV_R; i += 32) {
            const int r = i / GV_R, rr = i - r * GV_R;
            const i64 row = row0 + rr;
            float v = gv_part[warp][i];
#pragma unroll
            for (int s = 1; s < GV_KS; ++s) v += gv_part[warp + s][i];
            if (row < n) gv_store(GV_Y, GV_RES, n, r, row, v);
        }
    }
    __syncthreads();  // gv_part is free for the next tile
#endif
#if GV_EPI
    __syncthreads();  // gv_ey is complete
    {
KILN_EPILOGUE
    }
#endif
    }  // tiles
#if GV_CHAIN
    {
        // ---- the chained product (see GV_CHAIN above) ----
        if ((i64)blockIdx.x >= ntiles) kiln_grid_wait();  // no tile: this block has not waited
        KILN_PHASE(2);
        __syncthreads();  // this block's stores of z, then thread 0's fence and count (as above)
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(GV_CH_CTR, 1u);
        }
        const int nv2 = (int)(GV_EPI_W / KILN_VEC);  // 16-byte vectors of a row of w2 (and of z)
#if GV_CH_BM
        const i64 first = (i64)blockIdx.x * GV_WARPS + warp;  // block-major (see GV_CH_BM)
#else
        const i64 first = (i64)blockIdx.x + (i64)gridDim.x * warp;
#endif
        kiln_u4 cw[GV_CH_U];
        gv_chain_first(cw, GV_CH_W, GV_CH_N, nv2, first, lane);  // weights: before the spin
#if GV_CH_HELP
        // Helper warps (see GV_CH_HELP): a warp of the second half without a row copies
        // steps 1 .. GV_CH_HELP of its partner's (warp - GV_WARPS / 2) first row.
        if (gv_help_role(warp, GV_CH_N) > 0) {
            const KILN_W* src = GV_CH_W + (first - (i64)gridDim.x * (GV_WARPS / 2)) * nv2 * KILN_VEC;
            kiln_u4* dst = gv_help + (warp - GV_WARPS / 2) * (GV_CH_HELP * 32 * GV_CH_U);
#pragma unroll
            for (int i = 0; i < GV_CH_HELP * GV_CH_U; ++i) {
                const int c = 32 * GV_CH_U + i * 32 + lane;  // from step 1
                if (c < nv2) kiln_cp16(dst + i * 32 + lane, src + (i64)c * KILN_VEC);
            }
            kiln_cp_commit();
        }
#endif
#if GV_CH_BM
        if ((i64)blockIdx.x * GV_WARPS < GV_CH_N) {  // uniform: a block without rows leaves now
#endif
        if (threadIdx.x == 0) {
            kiln_spin_until(GV_CH_CTR, gridDim.x);
            __threadfence();
            KILN_PHASE(3);
        }
        __syncthreads();
        gv_chain_stage(xs4, GV_CH_X, nv2);  // z: written by every block of this launch
#if GV_CH_HELP
        if (gv_help_role(warp, GV_CH_N) > 0) kiln_cp_wait_all();  // the copies are complete before the barrier
#endif
        __syncthreads();
        const kiln_u4* hs = nullptr;  // a helped warp's copies (GV_CH_HELP)
#if GV_CH_HELP
        if (gv_help_role(warp, GV_CH_N) < 0) hs = gv_help + warp * (GV_CH_HELP * 32 * GV_CH_U);
#endif
        gv_chain_rows(cw, GV_CH_W, GV_CH_Y, GV_CH_N, nv2, first, lane, xs4, hs);
        KILN_PHASE(4);
#if GV_CH_BM
        }
#endif
        // The last block out zeroes the counters (every block has counted, and passed its
        // spin where it has one).
        __syncthreads();
        if (threadIdx.x == 0 && atomicAdd(GV_CH_CTR + 32, 1u) == gridDim.x - 1) {
            GV_CH_CTR[0] = 0u;
            GV_CH_CTR[32] = 0u;
        }
    }
#endif
#if GV_ARGMAX
    {
        // The block's best pair, then atomicMax of its key (GV_KEY: u64 [1], zero before
        // the launch; the step end decodes and zeroes it).
        __shared__ float gv_am_v[GV_WARPS];
        __shared__ i64 gv_am_i[GV_WARPS];
        if (lane == 0) {
            gv_am_v[warp] = gv_bv;
            gv_am_i[warp] = gv_bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float bv = 0.0f;
            i64 bi = -1;
            for (int w = 0; w < GV_WARPS; ++w)
                if (gv_am_i[w] >= 0 && (bi < 0 || kiln_before(gv_am_v[w], gv_am_i[w], bv, bi))) {
                    bv = gv_am_v[w];
                    bi = gv_am_i[w];
                }
            if (bi >= 0) atomicMax(GV_KEY, kiln_argmax_key(bv, bi));
        }
    }
#endif
#if GV_RA == 1
    if (m >= 1 && m <= GV_MAX_M && k > 0) gv_readahead(GV_W);  // uniform
#endif
}
