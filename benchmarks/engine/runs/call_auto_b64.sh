#!/bin/bash
# Device call (issues 18 and 19), after call_w4a8_convert.sh:
#   1. Nsight Compute on the kernels whose per-element work bounds them: the Triton attention and
#      the Mosaic attention body v1 on INT8 / INT4 at 16 x 8k (issue 19: which pipe is busy), and
#      the W4A8 kernel at M = 256, no faster than W4A16 there (issue 18: which pipe is busy).
#   2. --gamma auto at batch 64 beside the best plain and the best fixed setting (the cell the auto
#      summary lacks: at 5c69a58 plain W4A8's prefill ran out of memory), with the H100 cost table
#      rebuilt from the warp-specialized sweeps;
# Files under $OUT: run.log, hopper_auto_b64.json, hopper_auto_summary_b64.json, ncu.txt.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 190 ncu --clock-control none \
  -k regex:'decode_attention_int|attention_mosaic|w4a8_mosaic' --section SpeedOfLight \
  --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section Occupancy \
  --section LaunchStats python3 scripts/ncu_probe.py --calls 1 \
  --only attention_int8,attention_int4,attention_mosaic,M256 > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_throughput.py --issue12 --kernels mosaic --batches 64 \
  --out $OUT/hopper_auto_b64.json --auto-summary $OUT/hopper_auto_summary_b64.json
echo "auto rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
