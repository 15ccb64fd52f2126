#!/bin/bash
# Device call (issue 18): with choose_tiles' warp-specialized rule and the H100 cost table rebuilt
# from the sweeps that measured it (h100_sweep_*_744a87a.json, h100_sweep_*_47411f8.json),
#   1. --gamma auto at batch 64 beside the best plain and the best fixed setting (the cell the auto
#      summary lacks: at 5c69a58 plain W4A8's prefill ran out of memory);
#   2. the step at batch 64 and 128 (warp-specialized programs from M = 64: the kernels inside the
#      compiled 32-layer step) for W4A16 and W4A8, with the time left.
# Files under $OUT: run.log, hopper_auto_b64.json, hopper_auto_summary_b64.json, step.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 400 python3 scripts/bench_throughput.py --issue12 --kernels mosaic --batches 64 \
  --out $OUT/hopper_auto_b64.json --auto-summary $OUT/hopper_auto_summary_b64.json
echo "auto rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic \
  --batches 64,128 --no-peers --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
