#!/bin/bash
# One device call: the step for issue 18's summary (batch 1 and 16, W4A16 / W4A8 / bf16 beside
# PyTorch, the measured gate_up tiles), then the INT8-KV cost table's steps for issue 19.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
timeout 200 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16 --profile --out $OUT/step.json
for c in 512 8192; do
  timeout 190 python3 scripts/bench_engine.py --parts step --kv int8 --kernels mosaic \
    --modes w4a16,w4a8,w4a4 --batches 1,16 --no-peers --context $c --out $OUT/h100_step_int8kv_ctx$c.json
  echo "context $c rc=$? (t=${SECONDS}s)"
done
echo "done"
} > $OUT/run.log 2>&1
