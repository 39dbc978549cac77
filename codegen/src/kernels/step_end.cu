// End of a decode step, on the device (one block, one thread per sequence):
// history[b, count] = ids[b] for the tokens just sampled, count += 1, and the cached
// length advances: syms[KILN_PAST] += syms[KILN_SEQ]. Nothing returns to the host, so
// steps can be queued (or replayed as a CUDA graph) back to back.
// (ids is in0; history is out; the counter is out1; batch and capacity are n and len.)
// KILN_STEP_KEY (resident::step_end_key): the sampled ids come as greedy_key's keys
// (out3, u64 [n]): ids (out2) = the index in each key (0 for a row without any), and the
// keys are zeroed for the next step's atomicMax.
KILN_SIGNATURE {
    const i64 b = threadIdx.x;
    const i64 count = out1[0];
#if KILN_STEP_KEY
    i64 id = 0;
    if (b < n) {
        const unsigned long long key = out3[b];
        id = key == 0ull ? 0 : (i64)(0xffffffffu - (unsigned int)(key & 0xffffffffull));
        out2[b] = id;
        out3[b] = 0ull;
    }
#else
    const i64 id = b < n ? in0[b] : 0;
#endif
    if (b < n && count < len) out[b * len + count] = id;
    __syncthreads();
    if (b == 0) {
        out1[0] = count + 1;
        syms[KILN_PAST] += syms[KILN_SEQ];
    }
}
