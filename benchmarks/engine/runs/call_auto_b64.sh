#!/bin/bash
# Device call (issue 18): --gamma auto at batch 64 beside the best plain and the best fixed setting
# (the cell the auto summary lacks: at 5c69a58 plain W4A8's prefill ran out of memory), with the
# H100 cost table rebuilt from the warp-specialized sweeps. (Nsight Compute moved to
# call_ncu_bounds.sh; the batch-64 / 128 steps ran in call_w4a8_convert.sh.)
# Files under $OUT: run.log, hopper_auto_b64.json, hopper_auto_summary_b64.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 570 python3 scripts/bench_throughput.py --issue12 --kernels mosaic --batches 64 \
  --out $OUT/hopper_auto_b64.json --auto-summary $OUT/hopper_auto_summary_b64.json
echo "auto rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
