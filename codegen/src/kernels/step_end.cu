// End of a decode step, on the device (one block, one thread per sequence):
// history[b, count] = ids[b] for the tokens just sampled, count += 1, and the cached
// length advances: syms[KILN_PAST] += syms[KILN_SEQ]. Nothing returns to the host, so
// steps can be queued (or replayed as a CUDA graph) back to back.
// (ids is in0; history is out; the counter is out1; batch and capacity are n and len.)
KILN_SIGNATURE {
    const i64 b = threadIdx.x;
    const i64 count = out1[0];
    if (b < n && count < len) out[b * len + count] = in0[b];
    __syncthreads();
    if (b == 0) {
        out1[0] = count + 1;
        syms[KILN_PAST] += syms[KILN_SEQ];
    }
}
