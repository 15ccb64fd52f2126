#!/bin/bash
# Device call (issue 18, K3 and QSpec's draft at batch): W4A8's int32 partial sums made f32 by an
# integer add and a float subtraction (int4_mosaic.exact_f32, the default now) instead of a
# conversion instruction each, beside the conversion at the same tiles in the same run:
#   1. the integer-reference checks of every W4A8 body (the new conversion compiled);
#   2. W4A8 at M = 1..256 on every projection, each (projection, M)'s best tiles also timed with
#      int_to_float="convert" (method mosaic_w4a8_convert), cuBLAS / XLA bf16 beside;
#   3. with the time left, the W4A16 and W4A8 steps at batch 64 and 128 (draft against verifier).
# Files under $OUT: run.log, check/, w4a8/mosaic_sweep.json, step.json.
# Ran at b2fe4e0 (H100): no gain (h100_sweep_w4a8_convert_b2fe4e0.json), so exact_f32, the kernels'
# int_to_float option and bench_mosaic's --w4a8-convert were removed after it; this script is the record.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 100 python3 scripts/bench_mosaic.py --out $OUT/check --check-only --check-s 80 --kernels w4a8
echo "check rc=$? (t=${SECONDS}s)"
timeout 300 python3 scripts/bench_mosaic.py --out $OUT/w4a8 --ms 1,16,64,128,256 --same-as "" --no-peers-at "" \
  --w4a8-ms 1,16,64,128,256 --wide-ms "" --kernels w4a8 --projections gate_up,down,o,qkv --peers xla_bf16 \
  --torch-kinds cublas_bf16 --budget-s 260 --skip-check --ws-only --w4a8-convert
echo "w4a8 rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic \
  --batches 64,128 --no-peers --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
