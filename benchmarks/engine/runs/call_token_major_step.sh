#!/bin/bash
# One device call (issue 18): the token-major epilogue checked against float64, the step with and
# without it, the step with the kernel attention (640-slot cache) beside bf16 and PyTorch, and
# Nsight Compute on the Mosaic matmuls at decode sizes. Everything lands under $OUT.
export PYTHONPATH=$PWD
cd "$(dirname "$0")/../../.." || exit 1
{
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv
timeout 150 python3 scripts/bench_mosaic.py --check-only --token-major --out $OUT/check_tm
timeout 170 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic --batches 1,16 \
  --no-peers --token-major --profile --out $OUT/step_tm.json
timeout 200 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16,64 --profile --out $OUT/step.json
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 70 ncu --clock-control none -k regex:'mosaic' \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis \
  python3 scripts/ncu_probe.py --calls 1 --only mosaic_w4a16_gate_up,mosaic_w4a16_down_M1 > $OUT/ncu_mosaic.txt 2>&1
echo "done"
} > $OUT/run.log 2>&1
