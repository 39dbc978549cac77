#!/usr/bin/env bash
# Builds the CUDA test binary and the `kiln` CLI (release) on this machine and copies them
# into .gpu/ (git-ignored), ready to be carried to the GPU machine: `run` with carry
# [".gpu"], command `bash tools/gpu/run.sh` (tests) or `bash tools/gpu/bench.sh PRESET…`
# (benchmarks). The build needs no CUDA: cudarc loads the libraries at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
rm -f .gpu/cuda-test
exe=$(cargo test --release --no-run -p kiln-runtime --test cuda --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda" and m.get("executable"):
        print(m["executable"])
')
if [ -z "$exe" ]; then
    echo "build.sh: no test executable found" >&2
    exit 1
fi
cp "$exe" .gpu/cuda-test
# The CLI (for `kiln bench`).
rm -f .gpu/kiln
cargo build --release --bin kiln
cp target/release/kiln .gpu/kiln
# Debug info is not needed there; keep the carried tree small.
strip --strip-debug .gpu/cuda-test .gpu/kiln 2>/dev/null || true
git rev-parse --short HEAD > .gpu/commit 2>/dev/null || true
ls -la .gpu
