#!/usr/bin/env bash
# Runs on the GPU machine: decode tok/s of `kiln bench` under several environments, same
# run, ROUNDS rounds (default 2) of every configuration back to back, a table last.
#
#   bash tools/gpu/ab_cfg.sh PRESETS "LABEL=VAR=V,VAR=V" ...   # "" for the default
#
# An entry BIN=PATH runs that binary instead of .gpu/kiln (e.g. a build of the previous
# commit, for kernels that no knob switches).
#
# PRESETS: comma-separated presets. Environment: OUT, ROUNDS, KILN_ARGS (default
# "--batch 1 --prefill 128"), AB_SECONDS (start no run after that many seconds, so the
# table still prints within a call's time limit; 0, the default: no limit).
set -uo pipefail
cd "$(dirname "$0")/../.."
IFS=, read -r -a presets <<<"$1"
shift
cfgs=("$@")
OUT=${OUT:-/tmp/kiln-gpu}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
source tools/gpu/cuda-libs.sh
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-bench}"
echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?')"
for p in "${presets[@]}"; do
    for r in $(seq 1 "$ROUNDS"); do
        for i in "${!cfgs[@]}"; do
            if [ "${AB_SECONDS:-0}" -gt 0 ] && [ "$SECONDS" -ge "$AB_SECONDS" ]; then
                echo "ab_cfg.sh: ${AB_SECONDS} s passed: ${cfgs[$i]:-default} $p (round $r) not run"
                continue
            fi
            spec=${cfgs[$i]#*=}
            envs=()
            [ "$spec" != "${cfgs[$i]}" ] && IFS=, read -r -a envs <<<"$spec"
            bin=.gpu/kiln
            for j in "${!envs[@]}"; do
                [ "${envs[$j]#BIN=}" != "${envs[$j]}" ] && { bin=${envs[$j]#BIN=}; unset "envs[$j]"; }
            done
            # shellcheck disable=SC2086
            env "${envs[@]}" "$bin" bench --preset "$p" ${KILN_ARGS:---batch 1 --prefill 128} \
                --json "$OUT/cfg-$p-$i-$r.json" >"$OUT/cfg-$p-$i-$r.log" 2>&1 || {
                echo "ab_cfg.sh: ${cfgs[$i]} $p (round $r) failed:"; tail -3 "$OUT/cfg-$p-$i-$r.log"; }
        done
    done
done
python3 - "$OUT" "$ROUNDS" "$(IFS=,; echo "${presets[*]}")" "${cfgs[@]}" <<'EOF'
import json, os, sys
out, rounds, presets, cfgs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
labels = [c.split("=", 1)[0] or "default" for c in cfgs]
print("\n== decode tok/s (each round's configurations back to back)")
for i, c in enumerate(cfgs):
    print(f"  [{i}] {labels[i]}: {c.split('=', 1)[1] if '=' in c else '(default)'}")
print(f"{'preset':<16} {'batch':>5} {'round':>5} " + " ".join(f"{'['+str(i)+']':>9}" for i in range(len(cfgs))))
for p in presets:
    for r in range(1, rounds + 1):
        runs = []
        for i in range(len(cfgs)):
            path = os.path.join(out, f"cfg-{p}-{i}-{r}.json")
            runs.append({d["batch"]: d for d in json.load(open(path))["decode"]} if os.path.exists(path) else {})
        batches = sorted({b for x in runs for b in x})
        for b in batches:
            cells = " ".join(f"{x[b]['tokens_per_s']:>9.1f}" if b in x else f"{'-':>9}" for x in runs)
            print(f"{p:<16} {b:>5} {r:>5} {cells}")
EOF
