#!/usr/bin/env bash
# Builds the CUDA test binaries and the `kiln` CLI (release) on this machine and copies them
# into .gpu/ (git-ignored), ready to be carried to the GPU machine: `run` with carry
# [".gpu"], command `bash tools/gpu/run.sh` (tests) or `bash tools/gpu/bench.sh PRESET…`
# (benchmarks). The build needs no CUDA: cudarc loads the libraries at run time.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
# Every GPU test executable (package, test target): each skips with a printed reason
# where there is no GPU, and runs everything where there is one.
tests=("kiln-runtime cuda" "kiln-runtime cuda_decode" "kiln-runtime cuda_fused" "kiln-runtime cuda_prefill"
       "kiln cuda_engine" "kiln plan")
for spec in "${tests[@]}"; do
    read -r pkg name <<<"$spec"
    rm -f ".gpu/$name-test"
    exe=$(cargo test --release --no-run -p "$pkg" --test "$name" --message-format=json \
        | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])
' "$name")
    if [ -z "$exe" ]; then
        echo "build.sh: no test executable found for $pkg --test $name" >&2
        exit 1
    fi
    cp "$exe" ".gpu/$name-test"
done
# The CLI (for `kiln bench`).
rm -f .gpu/kiln
cargo build --release --bin kiln
cp target/release/kiln .gpu/kiln
# Debug info is not needed there; keep the carried tree small.
strip --strip-debug .gpu/*-test .gpu/kiln 2>/dev/null || true
git rev-parse --short HEAD > .gpu/commit 2>/dev/null || true
ls -la .gpu
