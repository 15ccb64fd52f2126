#!/bin/bash
# Device call (issues 18 and 19): (1) the batch-16 decode step with the token-major epilogue
# (split-K's partials as two 16-bit halves: int4_mosaic.f32_halves) against out^T + XLA's transpose,
# two processes on this host (W4A16, and our bf16 step beside the token-major one; the previous
# call's token-major process died in PyTorch's CUDA-graph capture before batch 16, so no peers here);
# (2) attention v8 (8 query columns) against v7 as shipped, each variant in its own process, each
# config checked against float64 first, batch 16 x 8k and 32k (call_attention_v8.sh at v7's configs
# of the time: INT8 at 2 splits). About 7 min.
# Files under $OUT: run.log, step_tm_b16.json, step_out_t_b16.json, attention_v8_int8.json,
# attention_v8_int4.json.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 140 python3 scripts/bench_engine.py --parts step --modes w4a16,bf16 --kernels mosaic --batches 16 \
  --no-peers --token-major --profile --out $OUT/step_tm_b16.json
echo "step token-major rc=$? (t=${SECONDS}s)"
timeout 110 python3 scripts/bench_engine.py --parts step --modes w4a16 --kernels mosaic --batches 16 \
  --no-peers --profile --out $OUT/step_out_t_b16.json
echo "step out^T rc=$? (t=${SECONDS}s)"
CONFIGS="int8:2:1 int4:2:1:128" DEADLINE=$((580 - SECONDS)) LOG=/dev/stdout \
  bash benchmarks/kv/runs/call_attention_v8.sh
} > $OUT/run.log 2>&1
