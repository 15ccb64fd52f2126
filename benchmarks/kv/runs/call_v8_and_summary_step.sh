#!/bin/bash
# Device call (issues 19 and 18): (1) attention v8 (8 query columns) against v7 as shipped, batch
# 16 x 8k and 32k, each config checked against float64 first (call_attention_v8.sh); (2) the summary
# step at batch 1 and 16 with the token-major epilogue as default (W4A16, the W4A8 draft, our bf16
# step, PyTorch's tinygemm int4 and cuBLAS bf16 in the same process; the PyTorch graphs now capture
# in thread_local mode, after the previous call's cudaErrorStreamCaptureInvalidated). About 9 min.
# Files under $OUT: run.log, attention_v8_int8.json, attention_v8_int4.json, step.json.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
DEADLINE=250 LOG=/dev/stdout bash benchmarks/kv/runs/call_attention_v8.sh
timeout $((585 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 \
  --kernels mosaic --batches 1,16 --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
