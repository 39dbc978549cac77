#!/usr/bin/env bash
# Runs on the GPU machine: `kiln bench` (the .gpu/kiln that tools/gpu/build.sh put there)
# and right after it the HF transformers baseline (tools/bench_hf.py) for every preset
# given, logs and JSON in $OUT, a summary table printed last.
#
#   bash tools/gpu/bench.sh [PRESET...]        # default: smollm2-135m llama-3.2-1b
#
# Environment: OUT (default /tmp/kiln-gpu), KILN_ARGS (more `kiln bench` flags, e.g.
# "--batch 1,8 --no-cuda-graphs"), HF_COMPILE=1 (also the static-cache + torch.compile
# decode, which can take minutes per preset), HF_ARGS (more bench_hf.py flags), SKIP_HF=1.
# Files: $OUT/kiln-PRESET.{json,log}, $OUT/hf-PRESET.{json,log}, $OUT/bench-summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"

# CUDA libraries on LD_LIBRARY_PATH.
source tools/gpu/cuda-libs.sh
# One kernel cache for the whole run (presets share kernels).
export KILN_CACHE="${KILN_CACHE:-/tmp/kiln-cache-bench}"

if [ ! -x .gpu/kiln ]; then
    echo "bench.sh: .gpu/kiln is missing: run tools/gpu/build.sh and carry .gpu" >&2
    exit 1
fi
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(smollm2-135m llama-3.2-1b)

echo "== $(date -u +%FT%TZ) commit $(cat .gpu/commit 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1
rc=0
for p in "${presets[@]}"; do
    echo "== kiln bench --preset $p"
    # shellcheck disable=SC2086
    .gpu/kiln bench --preset "$p" --json "$OUT/kiln-$p.json" ${KILN_ARGS:-} 2>&1 | tee "$OUT/kiln-$p.log"
    krc=${PIPESTATUS[0]}
    [ "$krc" -ne 0 ] && { echo "bench.sh: kiln bench $p failed (exit $krc)"; rc=1; }
    if [ "${SKIP_HF:-0}" != 1 ]; then
        echo "== tools/bench_hf.py --preset $p"
        kjson=()
        [ -s "$OUT/kiln-$p.json" ] && kjson=(--kiln-json "$OUT/kiln-$p.json")
        compile=()
        [ "${HF_COMPILE:-0}" = 1 ] && compile=(--compile)
        # shellcheck disable=SC2086
        python3 tools/bench_hf.py --preset "$p" "${kjson[@]}" "${compile[@]}" --json "$OUT/hf-$p.json" \
            ${HF_ARGS:-} 2>&1 | tee "$OUT/hf-$p.log"
        hrc=${PIPESTATUS[0]}
        [ "$hrc" -ne 0 ] && { echo "bench.sh: bench_hf.py $p failed (exit $hrc)"; rc=1; }
    fi
done

echo
echo "== summary (tokens/s; ratio = kiln / transformers)"
python3 - "$OUT" "${presets[@]}" <<'EOF' | tee "$OUT/bench-summary.txt"
import json, os, sys

out, presets = sys.argv[1], sys.argv[2:]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def num(x):
    return "-" if x is None else f"{x:,.0f}"


def get(rows, key, value, field="tokens_per_s"):
    for r in rows or []:
        if r.get(key) == value:
            return r.get(field)
    return None


cols = ["preset", "prefill128", "prefill2048", "dec b1", "b8", "b64", "%roofline", "launches", "hf eager b1",
        "hf compiled b1", "kiln/hf eager", "kiln/hf compiled"]
print(" | ".join(cols))
for p in presets:
    k, h = load(f"kiln-{p}.json") or {}, load(f"hf-{p}.json") or {}
    kb1 = get(k.get("decode"), "batch", 1)
    he = get(h.get("decode_loop"), "batch", 1)
    hg = (h.get("decode_generate") or {}).get("tokens_per_s")
    hc = get(h.get("decode_compiled"), "batch", 1)
    eager = max([x for x in (he, hg) if x], default=None)
    roof = (k.get("roofline_batch1") or {}).get("percent")
    row = [p, num(get(k.get("prefill"), "tokens", 128)), num(get(k.get("prefill"), "tokens", 2048)), num(kb1),
           num(get(k.get("decode"), "batch", 8)), num(get(k.get("decode"), "batch", 64)),
           "-" if roof is None else f"{roof:.1f}%", str(k.get("launches_per_decode_step", "-")), num(eager), num(hc),
           f"{kb1 / eager:.2f}x" if kb1 and eager else "-", f"{kb1 / hc:.2f}x" if kb1 and hc else "-"]
    print(" | ".join(row))
bw = [load(f"kiln-{p}.json") for p in presets]
bw = [b["copy_bandwidth_bytes_per_s"] for b in bw if b and "copy_bandwidth_bytes_per_s" in b]
if bw:
    print(f"copy bandwidth: {bw[0] / 1e9:,.0f} GB/s (read + write)")
print("hf eager b1 = the faster of generate (prefill excluded) and the manual loop")
EOF
exit $rc
