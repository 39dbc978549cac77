#!/usr/bin/env bash
# Runs on the GPU machine: the CUDA tests that tools/gpu/build.sh put in .gpu/, with the
# full log written to $OUT/cuda-test.log, and a short table printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"
LOG="$OUT/cuda-test.log"

# CUDA libraries on LD_LIBRARY_PATH.
source tools/gpu/cuda-libs.sh
# The CLI for the tests that run it (their build-time path does not exist here).
export KILN_BIN="$PWD/.gpu/kiln"
# A fresh kernel cache for this run (the cache test uses its own temp dir too).
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-$$}"

{
    echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1
    for l in libcuda.so libnvrtc.so libcublas.so; do
        found=$(ldconfig -p 2>/dev/null | grep -m1 "$l" | awk '{print $NF}')
        [ -z "$found" ] && found=$(for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d/$l"* 2>/dev/null; done | head -1)
        echo "$l: ${found:-not found}"
    done
} 2>&1 | tee "$LOG"

if ! ls .gpu/*-test >/dev/null 2>&1; then
    echo "run.sh: no test executables in .gpu/: run tools/gpu/build.sh and carry .gpu" | tee -a "$LOG"
    exit 1
fi
start=$(date +%s%N)
rc=0
for t in .gpu/*-test; do
    echo "== $t" >>"$LOG"
    # One at a time: the engine and timing tests share the GPU.
    "$t" --show-output --test-threads=1 "$@" >>"$LOG" 2>&1 || rc=1
done
end=$(date +%s%N)

# The tail of the log (failures show here), then the table.
grep -E "panicked|FAILED" "$LOG" | head -40
echo
echo "== per-check results (worst error per test) =="
grep -P "^kiln-check\t" "$LOG" | awk -F'\t' '
    { t=$2; n[t]++; for (i=6;i<=NF;i++) if ($i ~ /^(max_rel|rel_l2)=/) { split($i,a,"="); if (a[2]+0 > w[t]+0) { w[t]=a[2]; what[t]=$3" "$4 } } }
    END { printf "%-40s %6s %12s  %s\n", "test", "checks", "worst_rel", "(output dtype)"; for (t in n) printf "%-40s %6d %12s  %s\n", t, n[t], w[t]==""?"0":w[t], what[t] }' | sort
echo
echo "== timings and info =="
grep -P "^kiln-(time|info)\t" "$LOG" | tr '\t' ' '
grep -E "^device: " "$LOG" | head -1
echo
echo "== tests =="
grep -E "^test .* \.\.\. " "$LOG" | sed 's/^test //' | sort
grep -E "^test result:" "$LOG"
echo "wall $(( (end - start) / 1000000 )) ms, exit $rc"
exit $rc
