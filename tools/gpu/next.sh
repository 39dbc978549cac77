#!/usr/bin/env bash
# Runs on the GPU machine after `bash tools/gpu/build.sh` here on
# this branch (one binary holds every knob). The Llama-3.2-1B measurements planned for
# the next session with a GPU, in calls of under 10 minutes each (every A/B part runs
# the default beside its configurations, ROUNDS rounds, default 2):
#
#   bash tools/gpu/next.sh 1   # where the step goes, per block; the GPU tests with knobs
#   bash tools/gpu/next.sh 2   # the most promising single knobs (the chained kernels)
#   bash tools/gpu/next.sh 3   # the other single knobs (7: the rest of them)
#   bash tools/gpu/next.sh 4   # register budgets (wip/residency), with and without PF
#   EXTRA="label=VAR=V,..." bash tools/gpu/next.sh 5   # combinations, and one more
#   CFG="label=VAR=V,..." bash tools/gpu/next.sh 6     # SmolLM2 with the chosen knobs
#
# Part 1:
#   - `kiln bench --timeline` with KILN_TRACE_BLOCKS=1: per launch, how many blocks were
#     resident before the previous kernel completed and when its last block started
#     (does gate_up get blocks beside o_proj during attention? when does down start?),
#     then the same with KILN_MLP_CHAIN=0 (the kernels before the chain) and with every
#     chain (its phases); GEMV labels carry their weight's MB;
#   - GPU tests with the knobs on (the forms are compared bit for bit within a run, and
#     against the CPU executor): engine, decode and fused tests with PF=2, RA=8192,
#     GREEDY_KEY; engine tests with MIN_CHUNK=64, SPLITS=4, EPI_WARP_PER_SM=1;
#     decode tests with STAGE_KIB=64; engine tests with GREEDY_FOLD; the chained engine
#     tests (their options switch the chains) with CHAIN_PF=1 (the prefetching form);
#   - a third timeline with MLP_CHAIN=1.
# The knobs (all KILN_*, all off by default: the default build is main's kernels):
#   GEMV_PF=T        GEMV blocks prefetch into L2, before their wait, the rows of their
#                    first T tiles that the first step does not load
#   GEMV_RA=KiB      read-ahead: warps that finish prefetch their share of the next
#                    weight product's first rows
#   GREEDY_KEY=1     greedy sampling without the merge (per-block atomicMax of a 64-bit
#                    key, decoded by the step end); GREEDY_FOLD=1: at batch 1 the LM
#                    head's GEMV makes those keys (no greedy kernel), and the logits'
#                    cast to f32 waits for logits() (one launch fewer again)
#   ATTN_STAGE_KIB=64  one attention stage holds 256 keys (not 192): the two-pass path
#                    covers the bench's whole 129-256-key context, not half of it
#   ATTN_MIN_CHUNK=K, ATTN_SPLITS=N  attention split sizes / a cap on launched splits
#   EPI_WARP_LOADS/_BOUNDS/_PER_SM, GEMV_MAXREG  register budgets (wip/residency)
#   MLP_CHAIN=1      gate_up + SwiGLU and the down projection in one launch (the blocks
#                    spin on a counter between them; at most one wave); =2 also
#                    prefetches the rest of each warp's first down row into L2 before
#                    the spin (with the register loads: the whole down weight requested);
#   OPROJ_CHAIN=1    with MLP_CHAIN: o_proj in the same launch too (before gate_up)
#   QKV_CHAIN=1      with MLP_CHAIN: the next layer's residual add + norm + qkv too
#                    (after down): with OPROJ_CHAIN, 2 launches per layer
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
    for tag in default nochain chain; do
        envs=(KILN_TRACE_BLOCKS=1)
        [ "$tag" = nochain ] && envs+=(KILN_MLP_CHAIN=0)
        [ "$tag" = chain ] && envs+=(KILN_MLP_CHAIN=2 KILN_OPROJ_CHAIN=1 KILN_QKV_CHAIN=1)
        env "${envs[@]}" timeout 240 .gpu/kiln bench "${ARGS[@]}" --timeline >"$OUT/tl-$tag.log" 2>&1 \
            || echo "timeline $tag failed (rc $?)"
    done
    export KILN_BIN="$PWD/.gpu/kiln"
    K1="KILN_GEMV_PF=2 KILN_GEMV_RA=8192 KILN_GREEDY_KEY=1"
    for spec in "cuda_engine $K1" "cuda_decode $K1" "cuda_fused $K1" \
        "cuda_engine KILN_ATTN_MIN_CHUNK=64 KILN_ATTN_SPLITS=4 KILN_EPI_WARP_PER_SM=1" \
        "cuda_decode KILN_ATTN_STAGE_KIB=64" "cuda_engine KILN_GREEDY_FOLD=1" "cuda_engine:chained KILN_CHAIN_PF=1"; do
        # "binary[:filter] envs": the chained tests switch the chains by option (with the
        # knob on for the whole suite, the other switch tests would count its launches too,
        # and they skip); CHAIN_PF=1 makes their chained kernels the prefetching form.
        read -r tf envs <<<"$spec"
        t=${tf%%:*}
        filter=""
        [ "$tf" != "$t" ] && filter=${tf#*:}
        log="$OUT/knobs-$t-${filter}-${envs//[ =]/_}.log"
        # shellcheck disable=SC2086
        env $envs timeout 150 ".gpu/$t-test" $filter --test-threads=1 >"$log" 2>&1
        echo "$t with $envs: rc $? $(grep -E '^test result' "$log" | tail -1)"
        grep -E "panicked|FAILED" "$log" | head -5
    done
    for tag in default nochain chain; do
        echo; echo "== timeline ($tag): critical path per kernel"
        sed -n '/critical path per kernel/,/total, first wait/p' "$OUT/tl-$tag.log" | head -30
        echo "== block residency ($tag)"
        sed -n '/block residency per launch/,/the first launches one by one/p' "$OUT/tl-$tag.log" | head -30
        grep -E "kernel phase" "$OUT/tl-$tag.log" | sed 's/.*kernel phase/kernel phase/' | head -8
        grep -E "decode .*tok/s|^ *1 " "$OUT/tl-$tag.log" | head -3
    done
elif [ "$part" = 2 ]; then
    # The most promising single knobs: the chained kernels, 64 KiB attention stages, the
    # folded greedy sampling.
    ab "stage64=KILN_ATTN_STAGE_KIB=64" "fold=KILN_GREEDY_FOLD=1" "chain=KILN_MLP_CHAIN=1" \
        "chain2=KILN_MLP_CHAIN=2" "chain2+o=KILN_MLP_CHAIN=2,KILN_OPROJ_CHAIN=1" \
        "chain2+o+q=KILN_MLP_CHAIN=2,KILN_OPROJ_CHAIN=1,KILN_QKV_CHAIN=1"
elif [ "$part" = 3 ]; then
    ab "pf1=KILN_GEMV_PF=1" "ra8=KILN_GEMV_RA=8192" "chunk128=KILN_ATTN_MIN_CHUNK=128" \
        "gkey=KILN_GREEDY_KEY=1"
elif [ "$part" = 7 ]; then
    ab "pf2=KILN_GEMV_PF=2" "pf1+ra8=KILN_GEMV_PF=1,KILN_GEMV_RA=8192" "chunk64=KILN_ATTN_MIN_CHUNK=64"
elif [ "$part" = 4 ]; then
    U2="KILN_EPI_WARP_LOADS=4,KILN_EPI_WARP_BOUNDS=3,KILN_EPI_WARP_PER_SM=2,KILN_GEMV_MAXREG=2048x8192=48"
    ab "res=$U2" "res+pf1=$U2,KILN_GEMV_PF=1" "pps1=KILN_EPI_WARP_PER_SM=1" \
        "pps1+pf1=KILN_EPI_WARP_PER_SM=1,KILN_GEMV_PF=1"
elif [ "$part" = 6 ]; then
    # SmolLM2 (its 2,000 tok/s target must hold with whatever becomes the default):
    # CFG="label=VAR=V,..." (default: the combination of part 5).
    KILN_ARGS="--batch 1 --prefill 128" ROUNDS=${ROUNDS:-2} bash tools/gpu/ab_cfg.sh smollm2-135m "" \
        "${CFG:-stage64+pf1+fold=KILN_ATTN_STAGE_KIB=64,KILN_GEMV_PF=1,KILN_GREEDY_FOLD=1}"
else
    ALL="KILN_ATTN_STAGE_KIB=64,KILN_GEMV_PF=1,KILN_GREEDY_FOLD=1"
    ab "stage64+pf1+fold=$ALL" "stage64+pf1+ra8+fold=$ALL,KILN_GEMV_RA=8192" "splits1=KILN_ATTN_SPLITS=1" \
        "stage64+pf1+fold+chain2+o+q=$ALL,KILN_MLP_CHAIN=2,KILN_OPROJ_CHAIN=1,KILN_QKV_CHAIN=1" \
        "chunk64+splits4=KILN_ATTN_MIN_CHUNK=64,KILN_ATTN_SPLITS=4" ${EXTRA:+"$EXTRA"}
fi
