#!/bin/bash
# Device call (issue 18) on an H200, when no H100 would start: the same-run comparisons that decide
# choose_tiles' rule at 64-256 tokens (the H100 summary and cost table need an H100 run):
#   1. the float64 / integer checks, clusters of two programs multicasting x and one-tile
#      256-token W4A8 (two column blocks) included;
#   2. M = 128 and 256, every projection: the rule beside warp-specialized neighbours, clusters
#      (if their check passed) and one-tile W4A8, with the peers;
#   3. M = 64 (the verify pass of batch 16 at gamma 3): the rule beside warp-specialized programs.
# Files under $OUT: run.log, check/ wide/ m64/ mosaic_sweep.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 75 python3 scripts/bench_mosaic.py --out $OUT/check --check-only --check-s 55
echo "check rc=$? (t=${SECONDS}s)"
if python3 benchmarks/engine/runs/checks_pass.py $OUT/check/mosaic_sweep.json cluster=2; then CL=2; else CL=1; fi
echo "sweeping with --cluster $CL"
SWEEP=(--same-as "" --no-peers-at "" --wide-ms "" --peers xla_bf16,xla_int4 --skip-check --ws-only)
timeout 330 python3 scripts/bench_mosaic.py --out $OUT/wide --ms 256,128 --w4a8-ms 128,256 \
  --projections gate_up,down,o,qkv --torch-kinds cublas_bf16 --budget-s 300 --cluster $CL "${SWEEP[@]}"
echo "wide rc=$? (t=${SECONDS}s)"
timeout $((520 - SECONDS)) python3 scripts/bench_mosaic.py --out $OUT/m64 --ms 64 --w4a8-ms 64 \
  --projections gate_up,down,o,qkv --torch-kinds tinygemm,cublas_bf16 --budget-s $((490 - SECONDS)) "${SWEEP[@]}"
echo "m64 rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
