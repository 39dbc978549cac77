// Helpers shared by the attention kernels over a resident KV cache (flash_decode.cu,
// flash_prefill.cu): the keys a query may see, and cp.async copies into shared memory.

// The keys [lo, hi) that query position `pos` may see among t keys: mask_kind 0 none,
// 1 causal, 2 causal sliding window of `window` keys. I is int or i64.
template <typename I>
__device__ __forceinline__ void kiln_key_range(int mask_kind, i64 window, I pos, I t, I& lo, I& hi) {
    lo = 0;
    hi = t;
    if (mask_kind >= 1) hi = pos + 1;
    if (mask_kind == 2) lo = (i64)pos + 1 > window ? (I)((i64)pos + 1 - window) : (I)0;
    if (hi > t) hi = t;
    if (hi < 0) hi = 0;
    if (lo < 0) lo = 0;
    if (lo > hi) lo = hi;
}

#if defined(__CUDA_ARCH__)
// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned kiln_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 kiln_sa; cvta.to.shared.u64 kiln_sa, %1; cvt.u32.u64 %0, kiln_sa; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, asynchronously (both 16-byte aligned).
__device__ __forceinline__ void kiln_cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(kiln_smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void kiln_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void kiln_cp_wait_all_but_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void kiln_cp_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
#else
// Compiled for a host (the tests' emulation): a copy is done at once.
__device__ __forceinline__ void kiln_cp16(void* dst, const void* src) {
    const unsigned* s = (const unsigned*)src;
    unsigned* d = (unsigned*)dst;
    d[0] = s[0];
    d[1] = s[1];
    d[2] = s[2];
    d[3] = s[3];
}
__device__ __forceinline__ void kiln_cp_commit() {}
__device__ __forceinline__ void kiln_cp_wait_all_but_one() {}
__device__ __forceinline__ void kiln_cp_wait_all() {}
#endif
