#!/bin/bash
# Device call (issue 19, A1): the Mosaic attention body v1 with 128-token pipeline steps (kv_tile 128:
# two 64-row MMA groups a step, half the steps, so the per-step work that does not scale with the
# bytes, the softmax reductions across the warpgroup and the MMA waits, is paid half as often) beside
# 64-token steps and the Triton kernel, checked against float64 first, at batch 16 x 8k and 32k.
# Files under $OUT: run.log, attention_tiles.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${TILES_TIMEOUT:-540} python3 scripts/bench_attention_mosaic.py --out $OUT/attention_tiles.json \
  --variants int8,int4,bf16 --v1-configs 2:1,2:1:128,3:1:128,2:2:128 --v2-configs "" --v3-configs ""
echo "tiles rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
