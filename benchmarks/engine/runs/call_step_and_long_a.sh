#!/bin/bash
# Device call (issues 18, 19), the session's last minutes: the summary step at batch 1 (W4A16, W4A8,
# bf16 and PyTorch's tinygemm / cuBLAS; the default dispatch: the online-transform kernel with 16
# columns a program at one row, the only change since 77660be, whose batch 16 stands), then as much of issue 19's long-context run as fits
# (part A of ../../kv/runs/call_long_context.sh: 16 x 8k and 16 x 32k; the file is written after
# every mode). Files under $OUT: run.log, step.json, hopper_long_context.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 130 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1 --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
XLA_CLIENT_MEM_FRACTION=0.95 timeout $((370 - SECONDS)) python3 scripts/bench_long_context.py --kernels mosaic \
  --shapes 16x8192,16x32768 --out $OUT/hopper_long_context.json
echo "long context A rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
