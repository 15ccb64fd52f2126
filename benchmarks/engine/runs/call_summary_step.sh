#!/bin/bash
# Device call (issue 18): the summary step at batch 1 and 16 in one run (E1 / E2: W4A16, the W4A8
# draft, our bf16 step, PyTorch's tinygemm int4 and cuBLAS bf16, each step a compiled 16-step loop),
# on the token-major default (the PyTorch graphs now capture in thread_local mode: a global capture
# died with cudaErrorStreamCaptureInvalidated after token-major JAX steps). With NCU=1, then Nsight
# Compute on W4A8 at M = 256 (what bounds K3: the per-group f32 rescale; read at ae75b9f). About
# 5 min (7 with NCU). Files under $OUT: run.log, step.json (ncu.txt).
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 200 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16 --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
if [ -n "$NCU" ]; then
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((560 - SECONDS)) ncu --clock-control none -k regex:'w4a8_mosaic' \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats \
  --section Occupancy --section LaunchStats python3 scripts/ncu_probe.py --calls 1 --only M256 > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
fi
} > $OUT/run.log 2>&1
