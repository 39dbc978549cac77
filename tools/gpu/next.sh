#!/usr/bin/env bash
# Runs on the GPU machine after `bash tools/gpu/build.sh` here (strip the binaries with
# `strip --strip-all .gpu/*` and leave out plan-test / cuda-test if the carried tree
# passes 64 MiB). The measurements planned for the next session with a GPU, each part one
# call of under 10 minutes:
#
#   bash tools/gpu/next.sh 1   # the whole GPU suite, then both presets' decode (2 rounds)
#   bash tools/gpu/next.sh 2   # where the 1B step goes: the timeline with the chained
#                              # kernel's phases, then attention's (chain off)
#   bash tools/gpu/next.sh 3   # attention A/Bs on the 1B and SmolLM2 (warps, chunks)
#   OLD=.gpu/kiln-old bash tools/gpu/next.sh 4   # a kernel change no knob switches: that
#                              # build (BIN=) against .gpu/kiln, both presets, 2 rounds
#   bash tools/gpu/next.sh 5   # session 17's experiments: the A/B, then the knobs' GPU tests
#   bash tools/gpu/next.sh 6   # the decode, fused and engine GPU tests (the default kernels
#                              # changed in session 17: run before any A/B is trusted)
#   bash tools/gpu/next.sh 7   # timelines with the knobs, the block residency
#   bash tools/gpu/next.sh 8   # the early read-ahead's size and its combinations (if part
#                              # 5's ra16e gains), then both presets with the best guess
#
# Knobs (KILN_*, off by default): ATTN_WARPS=4|8|16 (warps of a one-head attention block;
# 16 measured +1.7% on SmolLM2, -1.5% on the 1B, 2026-12-05), ATTN_MIN_CHUNK=K,
# ATTN_SPLITS=N, ATTN_STAGE_KIB=48..96, ATTN_UNROLL=1..8, ATTN_PVW=1, MLP_CHAIN=0|1,
# CHAIN_HELP=1..3 (helper warps' copies of the down rows),
# CHAIN_BM=1 (block-major down rows),
# GEMV_RA=KiB with GEMV_RA_EARLY=1 (and GEMV_RA_SKIP=KiB, GEMV_RA_BULK=1: one bulk
# prefetch per warp), GREEDY_FOLD=0, and the older
# measurement knobs listed in docs/performance-history.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"
source tools/gpu/cuda-libs.sh
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-bench}"
part=${1:-1}
P=llama-3.2-1b
ARGS=(--preset "$P" --batch 1 --prefill 128 --decode-steps 32)
ab() {
    local presets=$1
    shift
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=${ROUNDS:-2} bash tools/gpu/ab_cfg.sh "$presets" "" "$@"
}
echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?') part $part"
if [ "$part" = 1 ]; then
    bash tools/gpu/run.sh | tail -12
    ab "$P,smollm2-135m"
elif [ "$part" = 2 ]; then
    for tag in chain attn; do
        envs=()
        [ "$tag" = attn ] && envs+=(KILN_MLP_CHAIN=0)  # attention's phases share the slots
        env "${envs[@]}" timeout 240 .gpu/kiln bench "${ARGS[@]}" --timeline >"$OUT/tl-$tag.log" 2>&1 \
            || echo "timeline $tag failed (rc $?)"
        echo "== timeline ($tag)"
        sed -n '/critical path per kernel/,/total, first wait/p' "$OUT/tl-$tag.log"
        grep -E "kernel phase" "$OUT/tl-$tag.log" | sed 's/.*kernel phase/kernel phase/'
    done
elif [ "$part" = 5 ]; then
    # Session 17's experiments (measured on an H100 2026-12-05, for an H200), the A/B
    # first (helper warps copying
    # 2 steps of each down row; block-major down rows, the blocks without rows leaving
    # early so the next layer's qkv blocks can be resident; combinations; attention's p·v
    # with one value vector per warp; early read-ahead: o_proj's blocks prefetch 16 MiB of
    # gate_up into L2 while attention runs, from the heads of its gate and up halves, or
    # past the first wave's columns (4,224 rows of 4 KiB per half, what the chained
    # kernel's blocks load first themselves), or as bulk prefetches (sm_90's copy engine,
    # one per warp); attention's loop unrolling and warps; qkv in
    # 128 blocks of 24 rows, one per multiprocessor, instead of 192 of 16), then the GPU
    # tests of the knobs' kernels (the same bits as the kernels they replace).
    export KILN_BIN="$PWD/.gpu/kiln"
    # (no run starts after 380 s, so the table prints and the tests run too)
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=2 AB_SECONDS=${AB5:-380} bash tools/gpu/ab_cfg.sh "$P" "" \
        "help2=KILN_CHAIN_HELP=2" "bm=KILN_CHAIN_BM=1" \
        "pvw=KILN_ATTN_PVW=1" "ra16e=KILN_GEMV_RA=16384,KILN_GEMV_RA_EARLY=1" \
        "ra16s=KILN_GEMV_RA=16384,KILN_GEMV_RA_EARLY=1,KILN_GEMV_RA_SKIP=16896" \
        "ra16eb=KILN_GEMV_RA=16384,KILN_GEMV_RA_EARLY=1,KILN_GEMV_RA_BULK=1" \
        "u4=KILN_ATTN_UNROLL=4" "w4=KILN_ATTN_WARPS=4" "q24=KILN_GEMV_CFG=3072x2048=w12r2u4"
    for e in KILN_CHAIN_HELP=2 KILN_CHAIN_BM=1; do
        echo "== chained down projection, $e"
        env "$e" KILN_CACHE=/tmp/kiln-cache-tests timeout 60 .gpu/cuda_engine-test --test-threads=1 \
            the_chained_down_projection >"$OUT/chain-test-${e%%=*}.log" 2>&1
        grep -E "panicked|FAILED|^test result|skipping" "$OUT/chain-test-${e%%=*}.log" | head -8
    done
    echo "== decode attention, KILN_ATTN_PVW=1"
    KILN_ATTN_PVW=1 KILN_CACHE=/tmp/kiln-cache-tests timeout 45 .gpu/cuda_decode-test --test-threads=1 \
        attention_decode >"$OUT/pvw-decode.log" 2>&1
    KILN_ATTN_PVW=1 KILN_CACHE=/tmp/kiln-cache-tests timeout 60 .gpu/cuda_engine-test --test-threads=1 \
        fused_attention >"$OUT/pvw-engine.log" 2>&1
    grep -hE "panicked|FAILED|^test result" "$OUT/pvw-decode.log" "$OUT/pvw-engine.log" | head -8
elif [ "$part" = 7 ]; then
    # Where the step goes with the knobs: timelines (the chain's phases with the block
    # residency, default and block-major; attention's with the chain off).
    for tag in chain bm attn; do
        envs=(KILN_TRACE_BLOCKS=0)
        [ "$tag" = chain ] && envs=(KILN_TRACE_BLOCKS=1)
        [ "$tag" = bm ] && envs=(KILN_TRACE_BLOCKS=1 KILN_CHAIN_BM=1)
        [ "$tag" = attn ] && envs=(KILN_MLP_CHAIN=0)
        env "${envs[@]}" timeout 100 .gpu/kiln bench "${ARGS[@]}" --timeline >"$OUT/tl-$tag.log" 2>&1 \
            || echo "timeline $tag failed (rc $?)"
        echo "== timeline ($tag)"
        sed -n '/critical path per kernel/,/total, first wait/p' "$OUT/tl-$tag.log" | head -30
        grep -E "kernel phase" "$OUT/tl-$tag.log" | sed 's/.*kernel phase/kernel phase/'
    done
    for tag in chain bm; do
        echo "== block residency ($tag)"
        grep -A30 "block residency per launch" "$OUT/tl-$tag.log" | head -40
    done
elif [ "$part" = 8 ]; then
    # The early read-ahead (o_proj's blocks prefetch the head of gate_up into L2 during
    # attention): how much, line by line or in bulk, with the chain's knobs; then SmolLM2
    # (it must stay over 2,000 tok/s) and the engine tests with it.
    E=KILN_GEMV_RA_EARLY=1
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=2 AB_SECONDS=300 bash tools/gpu/ab_cfg.sh "$P" "" \
        "ra8=KILN_GEMV_RA=8192,$E" "ra16=KILN_GEMV_RA=16384,$E" "ra24=KILN_GEMV_RA=24576,$E" \
        "ra32=KILN_GEMV_RA=32768,$E" \
        "ra16help=KILN_GEMV_RA=16384,$E,KILN_CHAIN_HELP=2" "ra16b=KILN_GEMV_RA=16384,$E,KILN_GEMV_RA_BULK=1" \
        "ra32b=KILN_GEMV_RA=32768,$E,KILN_GEMV_RA_BULK=1"
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=2 AB_SECONDS=100 bash tools/gpu/ab_cfg.sh smollm2-135m "" \
        "ra16=KILN_GEMV_RA=16384,$E" "ra16b=KILN_GEMV_RA=16384,$E,KILN_GEMV_RA_BULK=1"
    echo "== engine tests with the early bulk read-ahead (KILN_GEMV_RA=16384)"
    KILN_GEMV_RA=16384 KILN_GEMV_RA_EARLY=1 KILN_GEMV_RA_BULK=1 KILN_CACHE=/tmp/kiln-cache-tests timeout 120 \
        .gpu/cuda_engine-test --test-threads=1 >"$OUT/ra-engine.log" 2>&1
    grep -E "panicked|FAILED|^test result" "$OUT/ra-engine.log" | head -8
elif [ "$part" = 6 ]; then
    # Validation of the decode kernels (after kernel-source changes): the decode, fused and
    # engine GPU tests, one at a time.
    export KILN_BIN="$PWD/.gpu/kiln"
    for t in cuda_decode cuda_fused cuda_engine; do
        echo "== $t"
        KILN_CACHE=/tmp/kiln-cache-tests timeout 180 ".gpu/$t-test" --test-threads=1 >"$OUT/$t.log" 2>&1
        grep -E "panicked|FAILED|^test result" "$OUT/$t.log" | head -8
    done
elif [ "$part" = 3 ]; then
    ab "$P,smollm2-135m" "w16=KILN_ATTN_WARPS=16" "w4=KILN_ATTN_WARPS=4" "chunk128=KILN_ATTN_MIN_CHUNK=128"
else
    ab "$P,smollm2-135m" "old=BIN=${OLD:-.gpu/kiln-old}"
fi
