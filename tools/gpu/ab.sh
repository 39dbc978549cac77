#!/usr/bin/env bash
# Runs on the GPU machine: a same-run A/B of one `kiln bench` switch. For every preset,
# `.gpu/kiln bench` runs with and without FLAG, alternating (ROUNDS rounds, default 2, so
# drift shows), and a table of decode tok/s per batch size and both runs is printed last.
#
#   bash tools/gpu/ab.sh FLAG [PRESET...]     # e.g. --no-epilogue-gemv smollm2-135m
#
# Environment: OUT (default /tmp/kiln-gpu), ROUNDS, KILN_ARGS (default
# "--batch 1,8 --prefill 128"). Logs and JSON: $OUT/ab-PRESET-{on,off}-ROUND.{log,json}.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ]; then
    echo "usage: tools/gpu/ab.sh FLAG [PRESET...]" >&2
    exit 2
fi
flag=$1
shift
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(smollm2-135m llama-3.2-1b)
OUT=${OUT:-/tmp/kiln-gpu}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
# CUDA libraries on LD_LIBRARY_PATH.
source tools/gpu/cuda-libs.sh
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-bench}"
if [ ! -x .gpu/kiln ]; then
    echo "ab.sh: .gpu/kiln is missing: run tools/gpu/build.sh and carry .gpu" >&2
    exit 1
fi
echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?') A/B of $flag"
rc=0
for p in "${presets[@]}"; do
    for r in $(seq 1 "$ROUNDS"); do
        for side in on off; do
            extra=()
            # "on" is the default build; "off" passes the switch.
            [ "$side" = off ] && extra=("$flag")
            # shellcheck disable=SC2086
            .gpu/kiln bench --preset "$p" ${KILN_ARGS:---batch 1,8 --prefill 128} "${extra[@]}" \
                --json "$OUT/ab-$p-$side-$r.json" >"$OUT/ab-$p-$side-$r.log" 2>&1 || {
                echo "ab.sh: kiln bench $p ($side, round $r) failed: $OUT/ab-$p-$side-$r.log"
                rc=1
            }
        done
    done
done
python3 - "$OUT" "$ROUNDS" "$flag" "${presets[@]}" <<'EOF'
import json, os, sys
out, rounds, flag, presets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
print(f"\n== decode tok/s: default build vs {flag} (each round's pair ran back to back)")
print(f"{'preset':<16} {'batch':>5} {'round':>5} {'default':>10} {flag:>20} {'ratio':>7} {'launches':>12}")
for p in presets:
    for r in range(1, rounds + 1):
        runs = {}
        for side in ("on", "off"):
            path = os.path.join(out, f"ab-{p}-{side}-{r}.json")
            if os.path.exists(path):
                runs[side] = {d["batch"]: d for d in json.load(open(path))["decode"]}
        if len(runs) < 2:
            print(f"{p:<16} round {r}: missing a run")
            continue
        for b in sorted(runs["on"]):
            a, o = runs["on"][b], runs["off"].get(b)
            if o is None:
                continue
            ta, to = a["tokens_per_s"], o["tokens_per_s"]
            print(f"{p:<16} {b:>5} {r:>5} {ta:>10.1f} {to:>20.1f} {ta / to:>7.3f} "
                  f"{a['launches_per_step']:>5} / {o['launches_per_step']:<5}")
EOF
exit $rc
