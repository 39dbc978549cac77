// Streaming GEMV for one row of x: y[n] = Σ_k x[k] · w[n, k] (w row-major [n, k], the
// `linear` layout), f32 accumulation, y rounded once to its storage type. x, w, y are
// the parameters in0, in1, out; k is fixed at GS_K (the weight's row length).
//
// Persistent blocks of GS_WARPS warps, at most one per multiprocessor: global warp gw of
// G owns rows gw, gw + G, ... and streams them as items of GS_CH 16-byte vectors per
// row (a row is ceil(k / (8·GS_CH)) items in bf16), lane L copying vectors L, L + 32, ...
// of each item with cp.async into its warp's ring of GS_S items in shared memory. A
// lane only reads back the vectors it copied, so its own cp.async.wait_group is the
// only synchronization the ring needs: GS_S items per warp are always in flight.
// The first GS_S items are issued before the kernel waits for the previous one
// (weights are never written: programmatic dependent launch, KILN_MANUAL_ENTRY); then x
// is staged once per block as f32 in shared memory, and each item is consumed (its
// vectors against x) and its slot refilled with item + GS_S. After a row's last item
// the warp reduces with shuffles and lane 0 stores y.
// Needs k % KILN_VEC == 0 and w 16-byte aligned (the host checks; see decode.rs).
// GS_SCALE (kiln_codegen::gemv_stream_scaled): x = A · S as for gemv.cu's GV_SCALE; the
// generated staging (put in below, the same code as the scaled GEMV's) puts A into the
// staging with gv_stage, reduces through gv_red and computes S into gv_s, once per
// block; block 0 writes the prologue's outputs; every row's sum is scaled by S.
// GS_X, GS_W, GS_Y name x, w and y (in0, in1, out for a plain GEMV).
//
// Shared memory (dynamic): the rings, GS_WARPS · GS_S · GS_CH · 16 bytes, then x,
// GS_K floats: element e of vector v at float4 (e / 4)·nv + v, component e % 4, so a
// warp's 16-byte reads of one plane for consecutive vectors are conflict-free.
#define GS_U ((GS_CH + 31) / 32)  // vectors per lane and item, at most
#define GS_P (KILN_VEC / 4)         // planes of 4 floats per vector of x
#ifndef GS_SCALE
#define GS_SCALE 0
#endif
#if GS_SCALE
#define GV_WARPS GS_WARPS
// Puts element j of x's one row where the staging keeps it (the layout above; the
// signature is gemv.cu's, which the generated staging calls).
__device__ __forceinline__ void gv_stage(float* xs, int, i64 j, float v, bool, int nv, int) {
    xs[(((int)(j % KILN_VEC) / 4) * nv + (int)(j / KILN_VEC)) * 4 + (int)(j % 4)] = v;
}
#endif

// Waits until at most GS_S - 1 of this thread's copy groups are in flight: the oldest,
// the item about to be read, has landed.
__device__ __forceinline__ void gs_wait_ahead() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;" ::"n"(GS_S - 1) : "memory");
#endif
}

// KILN_MANUAL_ENTRY: the first items are issued between launch_dependents and the wait.
KILN_SIGNATURE {
    extern __shared__ kiln_u4 gs_dyn[];
#if GS_SCALE
    __shared__ float gv_red[GV_NRED * GS_WARPS];  // the warps' partial reductions
    float gv_s[1];                               // S, computed where x is staged
#endif
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    kiln_u4* ring = gs_dyn + (size_t)warp * GS_S * GS_CH;
    kiln_f4* xs4 = (kiln_f4*)(gs_dyn + (size_t)GS_WARPS * GS_S * GS_CH);
    float* xs = (float*)xs4;
    const int nv = GS_K / KILN_VEC;                 // vectors per row
    const i64 G = (i64)gridDim.x * GS_WARPS;
    const i64 gw = (i64)blockIdx.x * GS_WARPS + warp;

    // The issue cursor: the next item to copy (row, first vector, slot). Items go out in
    // the order they are read, so the read cursor below meets the same slots. Plain
    // counters, no divisions per item.
    i64 row_is = gw;
    int c_is = 0, s_is = 0;
    // Copies the next item into its slot: this lane's vectors only. Always one commit
    // group, possibly empty (past the warp's last row).
    auto issue = [&]() {
        if (row_is < n) {
            kiln_u4* slot = ring + s_is * GS_CH;
            const KILN_W* src = GS_W + row_is * (i64)GS_K + (i64)c_is * KILN_VEC;
#pragma unroll
            for (int u = 0; u < GS_U; ++u) {
                const int v = u * 32 + lane;
                if (v < GS_CH && c_is + v < nv) kiln_cp16(slot + v, src + (i64)v * KILN_VEC);
            }
            c_is += GS_CH;
            if (c_is >= nv) {
                c_is = 0;
                row_is += G;
            }
            s_is = s_is + 1 == GS_S ? 0 : s_is + 1;
        }
        kiln_cp_commit();
    };

    kiln_grid_launch_dependents();
    if (m != 1 || k != GS_K) {  // uniform: the host checks both
        kiln_grid_wait();
        return;
    }
    for (int s = 0; s < GS_S; ++s) issue();
    kiln_grid_wait();  // x is written by the previous kernel
#if GS_SCALE
    {
        const bool vec = true;
        const int len = GS_K;
        (void)vec;
        (void)len;
KILN_PROLOGUE
    }
#else
    for (int j = threadIdx.x; j < GS_K; j += blockDim.x) {
        const int v = j / KILN_VEC, e = j - v * KILN_VEC;
        xs[((e / 4) * nv + v) * 4 + (e & 3)] = kiln_ld(GS_X, j);
    }
#endif
    __syncthreads();

    float acc = 0.0f;
    i64 row = gw;
    int c0 = 0, sl = 0;  // the read cursor
    while (row < n) {
        gs_wait_ahead();  // this item's copies (this lane's) have landed
        const kiln_u4* slot = ring + sl * GS_CH;
#pragma unroll
        for (int u = 0; u < GS_U; ++u) {
            const int v = u * 32 + lane;
            if (v < GS_CH && c0 + v < nv) {
                float wf[KILN_VEC];
                kiln_unpack(slot[v], wf, GS_W);
#pragma unroll
                for (int p = 0; p < GS_P; ++p) {
                    const kiln_f4 xv = xs4[p * nv + c0 + v];
                    acc = fmaf(wf[4 * p], xv.x, acc);
                    acc = fmaf(wf[4 * p + 1], xv.y, acc);
                    acc = fmaf(wf[4 * p + 2], xv.z, acc);
                    acc = fmaf(wf[4 * p + 3], xv.w, acc);
                }
            }
        }
        issue();  // into the slot just read: this lane's reads of it are done
        sl = sl + 1 == GS_S ? 0 : sl + 1;
        c0 += GS_CH;
        if (c0 >= nv) {  // the row's last item: uniform per warp
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
#if GS_SCALE
            acc *= gv_s[0];
#endif
            if (lane == 0) kiln_st(GS_Y, row, acc);
            acc = 0.0f;
            c0 = 0;
            row += G;
        }
    }
    kiln_cp_wait_all();
}
