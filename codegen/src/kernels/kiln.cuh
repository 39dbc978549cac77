// kiln device prelude: storage types, loads into the f32 (or native integer) compute
// type, rounding stores, NaN-aware helpers and warp reductions. Self-contained: no
// CUDA headers, so NVRTC needs no include path. Prepended to every kernel source.

typedef long long i64;

// 16-bit float storage, as raw bits. Arithmetic always happens in f32.
struct kiln_bf16 { unsigned short bits; };
struct kiln_f16 { unsigned short bits; };

// Shapes and strides passed by value (rank <= 8).
struct Idx8 { i64 d[8]; };

#define KILN_NAN __int_as_float(0x7fffffff)
#define KILN_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float kiln_bf16_to_f32(kiln_bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ kiln_bf16 kiln_f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    kiln_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet
        r.bits = (unsigned short)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    r.bits = (unsigned short)(u >> 16);
    return r;
}
__device__ __forceinline__ float kiln_f16_to_f32(kiln_f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ kiln_f16 kiln_f32_to_f16(float f) {
    kiln_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}
// Round an f32 value to the nearest bf16 / f16 value (the CPU reference rounds every
// float op's result to its logical dtype; fused bodies do the same).
__device__ __forceinline__ float kiln_rnd_bf16(float x) { return kiln_bf16_to_f32(kiln_f32_to_bf16(x)); }
__device__ __forceinline__ float kiln_rnd_f16(float x) { return kiln_f16_to_f32(kiln_f32_to_f16(x)); }

// Loads: storage type -> compute type (f32 for floats, int for 8-bit ints).
__device__ __forceinline__ float kiln_ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float kiln_ld(const kiln_bf16* p, i64 i) { return kiln_bf16_to_f32(p[i]); }
__device__ __forceinline__ float kiln_ld(const kiln_f16* p, i64 i) { return kiln_f16_to_f32(p[i]); }
__device__ __forceinline__ i64 kiln_ld(const i64* p, i64 i) { return p[i]; }
__device__ __forceinline__ int kiln_ld(const int* p, i64 i) { return p[i]; }
__device__ __forceinline__ int kiln_ld(const signed char* p, i64 i) { return p[i]; }
__device__ __forceinline__ int kiln_ld(const unsigned char* p, i64 i) { return p[i]; }
__device__ __forceinline__ bool kiln_ld(const bool* p, i64 i) { return p[i]; }

// Stores: compute type -> storage type (floats round to nearest even, ints wrap).
__device__ __forceinline__ void kiln_st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void kiln_st(kiln_bf16* p, i64 i, float v) { p[i] = kiln_f32_to_bf16(v); }
__device__ __forceinline__ void kiln_st(kiln_f16* p, i64 i, float v) { p[i] = kiln_f32_to_f16(v); }
__device__ __forceinline__ void kiln_st(i64* p, i64 i, i64 v) { p[i] = v; }
__device__ __forceinline__ void kiln_st(int* p, i64 i, int v) { p[i] = v; }
__device__ __forceinline__ void kiln_st(signed char* p, i64 i, int v) { p[i] = (signed char)v; }
__device__ __forceinline__ void kiln_st(unsigned char* p, i64 i, int v) { p[i] = (unsigned char)v; }
__device__ __forceinline__ void kiln_st(bool* p, i64 i, bool v) { p[i] = v; }

// max/min that propagate NaN (like the CPU semantics and torch.maximum).
__device__ __forceinline__ float kiln_fmax(float a, float b) { return (a != a || b != b) ? KILN_NAN : fmaxf(a, b); }
__device__ __forceinline__ float kiln_fmin(float a, float b) { return (a != a || b != b) ? KILN_NAN : fminf(a, b); }

// float -> integer: truncate toward zero, saturate, NaN -> 0 (Rust `as`).
__device__ __forceinline__ float kiln_clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
__device__ __forceinline__ i64 kiln_f2i64(float x) {
    if (x != x) return 0;
    if (x >= 9.2233720368547758e18f) return 0x7fffffffffffffffLL;
    if (x <= -9.2233720368547758e18f) return (i64)(-0x7fffffffffffffffLL - 1);
    return (i64)x;
}
__device__ __forceinline__ int kiln_f2i32(float x) {
    if (x != x) return 0;
    if (x >= 2147483648.0f) return 0x7fffffff;
    if (x <= -2147483648.0f) return (int)(-0x7fffffff - 1);
    return (int)x;
}
__device__ __forceinline__ int kiln_f2i8(float x) { return x != x ? 0 : (int)truncf(kiln_clampf(x, -128.0f, 127.0f)); }
__device__ __forceinline__ int kiln_f2u8(float x) { return x != x ? 0 : (int)truncf(kiln_clampf(x, 0.0f, 255.0f)); }

// "a ranks before b" for argmax/topk: NaN first, then larger values, ties to the lower index.
__device__ __forceinline__ bool kiln_before(float a, i64 ia, float b, i64 ib) {
    bool na = a != a, nb = b != b;
    if (na != nb) return na;
    if (!na && a != b) return a > b;
    return ia < ib;
}
// A 64-bit key of (v, i) whose unsigned order is kiln_before's (so atomicMax of keys
// picks the argmax): v's bits made to order as integers (NaN above everything, -0 as
// +0), then the complement of the index (ties to the lower index; i < 2^32).
__device__ __forceinline__ unsigned long long kiln_argmax_key(float v, i64 i) {
    unsigned int b = v != v ? 0xffffffffu : (v == 0.0f ? 0u : __float_as_uint(v));
    if (v == v) b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)b << 32) | (unsigned long long)(0xffffffffu - (unsigned int)i);
}
template <class T>
__device__ __forceinline__ bool kiln_before(T a, i64 ia, T b, i64 ib) {
    if (a != b) return a > b;
    return ia < ib;
}

// Decomposes a linear index over `shape` (first `rank` dims, row-major) into an element
// offset through `strides`.
__device__ __forceinline__ i64 kiln_offset(i64 linear, int rank, const Idx8& shape, const Idx8& strides) {
    i64 off = 0;
#pragma unroll
    for (int d = 7; d >= 0; --d) {
        if (d < rank) {
            i64 q = linear / shape.d[d];
            off += (linear - q * shape.d[d]) * strides.d[d];
            linear = q;
        }
    }
    return off;
}

// Programmatic dependent launch (sm_90+). Every kernel starts with kiln_grid_entry():
// it lets the next kernel on the stream be scheduled (launch_dependents) and then waits
// until the previous kernel has completed and its writes are visible (wait), before it
// reads or writes anything another kernel touches. Without a programmatic launch both
// are no-ops. A kernel that marks itself KILN_MANUAL_ENTRY calls the two itself (the
// GEMV issues its first weight loads, which no kernel writes, between them).
//
// Timeline tracing (the engine's `trace` option defines KILN_TRACE_AT, the address of
// a device buffer, before this prelude): thread 0 of block 0 records the global timer
// (ns) when the kernel lets its dependents launch (`which` 0: it is running) and when
// its wait returns (1: the previous kernel is done), each into its own ring of
// KILN_TRACE_N slots after the two event counters. Kernels run in launch order, so
// event i of each ring is launch i.
// With KILN_TRACE_BLOCKS too (a residency diagnostic), thread 0 of every block records
// when the block started (its launch_dependents) and when its wait returned, with its
// multiprocessor and the grid: entry i of a ring of KILN_TRACE_B triples (start, wait,
// smid << 48 | blocks << 24 | block) after the rings above, the phases and a counter, so the host
// sees how many blocks of a launch were resident before the previous kernel completed
// and when its last block started.
#ifdef KILN_TRACE_AT
#define KILN_TRACE_N (1 << 16)
#ifdef KILN_TRACE_BLOCKS
#define KILN_TRACE_B (1 << 20)
__shared__ unsigned long long kiln_trace_t0;  // the block's start (thread 0)
#endif
__device__ __forceinline__ void kiln_trace(int which) {
    if (threadIdx.x != 0 || threadIdx.y != 0 || threadIdx.z != 0) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    unsigned long long* p = (unsigned long long*)(KILN_TRACE_AT);
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        const unsigned long long i = atomicAdd(p + which, 1ull);
        p[2 + which * KILN_TRACE_N + (i % KILN_TRACE_N)] = t;
    }
#ifdef KILN_TRACE_BLOCKS
    if (which == 0) kiln_trace_t0 = t;
    if (which == 1) {
        unsigned int sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        const unsigned long long blocks = (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
        const unsigned long long b = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
        unsigned long long* q = p + 2 + 2 * KILN_TRACE_N + 16;  // after the phases
        const unsigned long long i = atomicAdd(q, 1ull) % KILN_TRACE_B;
        q[1 + 3 * i] = kiln_trace_t0;
        q[2 + 3 * i] = t;
        q[3 + 3 * i] = ((unsigned long long)sm << 48) | ((blocks & 0xffffffull) << 24) | (b & 0xffffffull);
    }
#endif
}
// Phases inside a kernel (a measurement aid): KILN_PHASE_DECL at the top,
// KILN_PHASE_START after the kernel's wait returns, then KILN_PHASE(k) (k < 8) at the
// points to time; thread 0 of block 0 adds the ns since the start to phase k's sum and
// counts it (16 slots after the rings: `kiln bench --timeline` logs the means).
#define KILN_PHASE_DECL unsigned long long kiln_phase_t0 = 0
#define KILN_PHASE_START (kiln_phase_t0 = kiln_now())
#define KILN_PHASE(k) kiln_phase((k), kiln_phase_t0)
__device__ __forceinline__ unsigned long long kiln_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void kiln_phase(int k, unsigned long long t0) {
    if (threadIdx.x == 0 && threadIdx.y == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        unsigned long long* p = (unsigned long long*)(KILN_TRACE_AT) + 2 + 2 * KILN_TRACE_N;
        atomicAdd(p + k, kiln_now() - t0);
        atomicAdd(p + 8 + k, 1ull);
    }
}
#else
__device__ __forceinline__ void kiln_trace(int) {}
#define KILN_PHASE_DECL
#define KILN_PHASE_START
#define KILN_PHASE(k)
#endif
// A prefetch of the 128-byte line holding p into L2: a hint with no effect on any
// result. The host emulation may define KILN_HOST_PREFETCH(p) to see the addresses.
__device__ __forceinline__ void kiln_prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#elif defined(KILN_HOST_PREFETCH)
    KILN_HOST_PREFETCH(p);
#else
    (void)p;
#endif
}
// A bulk prefetch of [p, p + bytes) into L2 (sm_90's cp.async.bulk.prefetch: one
// instruction the copy engine carries out; p and bytes multiples of 16). Elsewhere, and in
// the host emulation, the prefetch of each 128-byte line from p.
__device__ __forceinline__ void kiln_prefetch_l2_bulk(const void* p, unsigned int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
    for (unsigned int i = 0; i < bytes; i += 128) kiln_prefetch_l2((const char*)p + i);
#endif
}
__device__ __forceinline__ void kiln_grid_launch_dependents() {
    kiln_trace(0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void kiln_grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    kiln_trace(1);
}
__device__ __forceinline__ void kiln_grid_entry() {
    kiln_grid_launch_dependents();
    kiln_grid_wait();
}
