// softmax(scale · q kᵀ + mask) v with grouped KV heads: one warp per (batch, query,
// head), online softmax over the allowed keys. q [b, s, h, d], k [b, t, kh, d],
// v [b, t, kh, dv], out [b, s, h, dv]; query i sits at position t - s + i.
// (q, k, v are the parameters in0, in1, in2.)
// mask_kind: 0 none, 1 causal, 2 causal sliding window of `window` keys.
// Each lane owns elements lane, lane+32, ... of the head dims (d, dv <= KILN_MAX_D).
#define KILN_MAX_D 256
#define KILN_PER_LANE (KILN_MAX_D / 32)
KILN_SIGNATURE {
    const int lane = threadIdx.x & 31;
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w >= batch * seq * heads) return;  // uniform per warp
    const i64 hi = w % heads;
    const i64 qi = (w / heads) % seq;
    const i64 bi = w / (heads * seq);
    const i64 kvh = hi / (heads / kv_heads);
    const i64 pos = keys - seq + qi;
    i64 lo = 0, end = keys;
    if (mask_kind >= 1) end = pos + 1;
    if (mask_kind == 2) lo = pos + 1 > window ? pos + 1 - window : 0;

    float qr[KILN_PER_LANE], acc[KILN_PER_LANE];
#pragma unroll
    for (int c = 0; c < KILN_PER_LANE; ++c) {
        const i64 e = lane + 32 * c;
        qr[c] = e < head_dim ? kiln_ld(in0, w * head_dim + e) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -KILN_INF, l = 0.0f;
    for (i64 j = lo; j < end; ++j) {
        const i64 kv = (bi * keys + j) * kv_heads + kvh;
        float p = 0.0f;
#pragma unroll
        for (int c = 0; c < KILN_PER_LANE; ++c) {
            const i64 e = lane + 32 * c;
            if (e < head_dim) p += qr[c] * kiln_ld(in1, kv * head_dim + e);
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) p += __shfl_xor_sync(0xffffffffu, p, s);
        const float sc = p * scale;
        const float m_new = fmaxf(m, sc);
        const float corr = expf(m - m_new);
        const float pe = expf(sc - m_new);
        l = l * corr + pe;
#pragma unroll
        for (int c = 0; c < KILN_PER_LANE; ++c) {
            const i64 e = lane + 32 * c;
            if (e < value_dim) acc[c] = acc[c] * corr + pe * kiln_ld(in2, kv * value_dim + e);
        }
        m = m_new;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int c = 0; c < KILN_PER_LANE; ++c) {
        const i64 e = lane + 32 * c;
        if (e < value_dim) kiln_st(out, w * value_dim + e, acc[c] * inv);
    }
}
