#!/bin/bash
# Device call (issue 19, G1 / G2 at 16 x 8k) with v8 switched on: W4A16 on bf16 KV and on the INT8
# cache against QSpec W4A8 on the INT8 cache, one process (the session's last 4.5 device minutes).
# About 2.5 min. Files under $OUT: run.log, long_context_8k.json.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${LIMIT:-160} python3 scripts/bench_long_context.py --kernels mosaic --shapes 16x8192 \
  --cells "16x8192:w4a16_bf16kv,w4a16_int8kv,qspec_w4a8_int8kv_g3" --out $OUT/long_context_8k.json
echo "16x8192 rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
