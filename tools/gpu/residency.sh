#!/usr/bin/env bash
# WIP (branch wip/residency), runs on the GPU machine after `bash tools/gpu/build.sh` here:
# same-run A/B of register budgets that let the down GEMV's blocks be resident (and issue
# their first weight loads) while the gate_up GEMV runs. Today gate_up's two 512-thread
# blocks of 64 registers fill an SM's register file, so down's blocks only arrive as
# gate_up's retire. Configurations:
#   u2b3   gate_up with 4 loads in flight per lane, at most 42 registers (launch bounds
#          3 blocks), still 2 blocks per SM: 40K registers, 24K left
#   +d48   down's GEMV capped at 48 registers (512 threads: 24K): fits beside gate_up
#   +d8    down with 8-warp blocks (16K registers at 64)
#   q24    qkv in blocks of 24 rows (12 warps × 2 rows: 128 blocks, one per SM, all
#          resident beside down; today 192 tiles of 16 rows leave 60 SMs with two)
set -uo pipefail
cd "$(dirname "$0")/../.."
U2="KILN_EPI_WARP_LOADS=4,KILN_EPI_WARP_BOUNDS=3,KILN_EPI_WARP_PER_SM=2"
ROUNDS=${ROUNDS:-2} bash tools/gpu/ab_cfg.sh llama-3.2-1b "" \
    "u2b3=$U2" \
    "u2b3+d48=$U2,KILN_GEMV_MAXREG=2048x8192=48" \
    "u2b3+d8=$U2,KILN_GEMV_CFG=2048x8192=w8r1u8" \
    "d48=KILN_GEMV_MAXREG=2048x8192=48" \
    "q24=KILN_GEMV_CFG=3072x2048=w12r2u4"
