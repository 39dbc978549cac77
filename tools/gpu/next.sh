#!/usr/bin/env bash
# WIP (branch wip/l2pf), runs on the GPU machine after `bash tools/gpu/build.sh` here on
# this branch (one binary holds every knob). The Llama-3.2-1B measurements planned for
# the next session with a GPU, in calls of under 10 minutes each (every A/B part runs
# the default beside its configurations, ROUNDS rounds, default 2):
#
#   bash tools/gpu/next.sh 1   # where the step goes, per block; the GPU tests with knobs
#   bash tools/gpu/next.sh 2   # L2 prefetch (PF), read-ahead (RA), greedy key / fold
#   bash tools/gpu/next.sh 3   # attention: hoisted producers, 64 KiB stages, fewer splits
#   bash tools/gpu/next.sh 4   # register budgets (wip/residency), with and without PF
#   EXTRA="label=VAR=V,..." bash tools/gpu/next.sh 5   # combinations, and one more
#
# Part 1:
#   - `kiln bench --timeline` with KILN_TRACE_BLOCKS=1: per launch, how many blocks were
#     resident before the previous kernel completed and when its last block started
#     (does gate_up get blocks beside o_proj during attention? when does down start?),
#     then the same with KILN_ATTN_HOIST=1 (its KILN_PHASE marks: where attention's
#     7.5 µs per layer go);
#   - the engine, decode and fused GPU tests with KILN_GEMV_PF=2 KILN_GEMV_RA=8192
#     KILN_ATTN_HOIST=1 KILN_GREEDY_KEY=1, the engine tests with KILN_ATTN_MIN_CHUNK=64 KILN_ATTN_SPLITS=4
#     KILN_EPI_WARP_PER_SM=1, the decode tests with KILN_ATTN_STAGE_KIB=64, the engine
#     tests with KILN_GREEDY_FOLD=1 (the forms compared bit for bit within a run, and
#     against the CPU executor).
# Parts 2-5 (decode tok/s, batch 1, prompt 128, each against the default in the
# same run): KILN_GEMV_PF=1 / 2 (L2 prefetch of the first tiles' rows before the wait);
# KILN_GEMV_RA=8192 (read-ahead: 8 MiB of the next weight product's first rows, prefetched
# by each GEMV's warps as they finish); KILN_GREEDY_KEY=1 (greedy sampling without the
# merge round trip: per-block atomicMax of a 64-bit key, decoded by the step end);
# KILN_GREEDY_FOLD=1 (at batch 1 the LM head's GEMV computes those keys itself: no greedy
# kernel);
# KILN_ATTN_HOIST=1; KILN_ATTN_MIN_CHUNK=64 (4 attention splits at 200 keys, not 1);
# KILN_ATTN_STAGE_KIB=64 (one stage holds 256 keys: the two-pass attention covers the
# whole bench context of 129-256 keys, today only up to 192); KILN_ATTN_SPLITS=1 (no
# launched splits past the context: 32 blocks, not 288 of which 256 return at once) and
# 64-key chunks over exactly 4 splits;
# the register budget of wip/residency (gate_up 4 loads per lane at <= 42 registers,
# down at 48) alone and with PF=1; gate_up in one block per SM (KILN_EPI_WARP_PER_SM=1:
# 64 KiB of loads in flight per SM, half the register file left for a down block that
# prefetches during it) alone and with PF=1; PF=1 with 16 MiB of read-ahead, with 64 KiB
# stages; 64-key chunks.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"
source tools/gpu/cuda-libs.sh
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-bench}"
part=${1:-1}
P=llama-3.2-1b
# 32 steps: the block ring (2^20 entries) holds ~14K blocks per 1B step.
ARGS=(--preset "$P" --batch 1 --prefill 128 --decode-steps 32)
# Same-run A/B of the default against the configurations given (ab_cfg.sh).
ab() {
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=${ROUNDS:-2} bash tools/gpu/ab_cfg.sh "$P" "" "$@"
}
if [ "$part" = 1 ]; then
    echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?') part 1"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    for tag in default hoist; do
        envs=(KILN_TRACE_BLOCKS=1)
        [ "$tag" = hoist ] && envs+=(KILN_ATTN_HOIST=1)
        env "${envs[@]}" timeout 240 .gpu/kiln bench "${ARGS[@]}" --timeline >"$OUT/tl-$tag.log" 2>&1 \
            || echo "timeline $tag failed (rc $?)"
    done
    export KILN_BIN="$PWD/.gpu/kiln"
    K1="KILN_GEMV_PF=2 KILN_GEMV_RA=8192 KILN_ATTN_HOIST=1 KILN_GREEDY_KEY=1"
    for spec in "cuda_engine $K1" "cuda_decode $K1" "cuda_fused $K1" \
        "cuda_engine KILN_ATTN_MIN_CHUNK=64 KILN_ATTN_SPLITS=4 KILN_EPI_WARP_PER_SM=1" \
        "cuda_decode KILN_ATTN_STAGE_KIB=64" "cuda_engine KILN_GREEDY_FOLD=1"; do
        read -r t envs <<<"$spec"
        log="$OUT/knobs-$t-${envs//[ =]/_}.log"
        # shellcheck disable=SC2086
        env $envs timeout 150 ".gpu/$t-test" --test-threads=1 >"$log" 2>&1
        echo "$t with $envs: rc $? $(grep -E '^test result' "$log" | tail -1)"
        grep -E "panicked|FAILED" "$log" | head -5
    done
    for tag in default hoist; do
        echo; echo "== timeline ($tag): critical path per kernel"
        sed -n '/critical path per kernel/,/total, first wait/p' "$OUT/tl-$tag.log" | head -30
        echo "== block residency ($tag)"
        sed -n '/block residency per launch/,/the first launches one by one/p' "$OUT/tl-$tag.log" | head -30
        grep -E "kernel phase" "$OUT/tl-$tag.log" | sed 's/.*kernel phase/kernel phase/' | head -8
        grep -E "decode .*tok/s|^ *1 " "$OUT/tl-$tag.log" | head -3
    done
elif [ "$part" = 2 ]; then
    ab "pf1=KILN_GEMV_PF=1" "pf2=KILN_GEMV_PF=2" "ra8=KILN_GEMV_RA=8192" "pf1+ra8=KILN_GEMV_PF=1,KILN_GEMV_RA=8192" \
        "gkey=KILN_GREEDY_KEY=1" "fold=KILN_GREEDY_FOLD=1"
elif [ "$part" = 3 ]; then
    ab "hoist=KILN_ATTN_HOIST=1" "stage64=KILN_ATTN_STAGE_KIB=64" "splits1=KILN_ATTN_SPLITS=1" \
        "chunk64+splits4=KILN_ATTN_MIN_CHUNK=64,KILN_ATTN_SPLITS=4"
elif [ "$part" = 4 ]; then
    U2="KILN_EPI_WARP_LOADS=4,KILN_EPI_WARP_BOUNDS=3,KILN_EPI_WARP_PER_SM=2,KILN_GEMV_MAXREG=2048x8192=48"
    ab "res=$U2" "res+pf1=$U2,KILN_GEMV_PF=1" "pps1=KILN_EPI_WARP_PER_SM=1" \
        "pps1+pf1=KILN_EPI_WARP_PER_SM=1,KILN_GEMV_PF=1"
else
    ab "pf1+ra16=KILN_GEMV_PF=1,KILN_GEMV_RA=16384" "pf1+stage64=KILN_GEMV_PF=1,KILN_ATTN_STAGE_KIB=64" \
        "chunk64=KILN_ATTN_MIN_CHUNK=64" ${EXTRA:+"$EXTRA"}
fi
