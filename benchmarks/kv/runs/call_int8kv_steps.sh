#!/bin/bash
export PYTHONPATH=$PWD
# One device call on an H100 (issue 19): the decode steps the INT8-KV cost table is built from
# (bench_engine.py --parts step --kv int8: the drafts read the cache's INT4 view), Mosaic kernels,
# modes w4a16 / w4a8 / w4a4 at batch 1 and 16, at contexts 512 and 8192 (one file each; peak
# about 40 GB). Run from the repo root: bash benchmarks/kv/runs/call_int8kv_steps.sh.
# Files under $OUT (3): run.log, h100_step_int8kv_ctx512.json, h100_step_int8kv_ctx8192.json.
# Budget: 280 s, then the rest up to 570 s (estimate ~120 s each).
# Afterwards on the CPU: scripts/build_cost_table.py --kv int8 (its docstring; benchmarks/kv/README.md).
: "${OUT:?set OUT}"
[ -f scripts/bench_engine.py ] || { echo "run from the repository root"; exit 1; }
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
for c in 512 8192; do
  [ $c = 512 ] && limit=280 || limit=$((570 - SECONDS))
  echo "== context $c (t=${SECONDS}s, limit ${limit}s)"
  timeout $limit python3 scripts/bench_engine.py --parts step --kv int8 --kernels mosaic \
    --modes w4a16,w4a8,w4a4 --batches 1,16 --no-peers --context $c --out $OUT/h100_step_int8kv_ctx$c.json
  echo "context $c rc=$? (t=${SECONDS}s)"
done
echo "done"
} > $OUT/run.log 2>&1
