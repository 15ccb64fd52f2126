#!/bin/bash
# Device call (issue 18), the session's last device seconds: the decode step at batch 64 (M = 64:
# warp-specialized programs under choose_tiles' new rule) for W4A16 and W4A8, in the compiled
# 32-layer step: the new kernels inside the model, and draft vs verify at batch 64.
# Files under $OUT: run.log, step64.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
timeout 125 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic \
  --batches 64 --no-peers --out $OUT/step64.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
