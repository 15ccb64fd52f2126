#!/bin/bash
export PYTHONPATH=$PWD
# One device call on an 80 GB H100 (issue 19, G1-G3): the long-context end to end with the Mosaic
# weight kernels, decode only (scripts/bench_long_context.py), every default cell, into one file.
# The 16 x 32k bf16 cache (69 GB) and the bf16 weights that the bf16 / QuantSpec modes need (16 GB)
# do not fit one H100 together (84.6 GiB: `bench_long_context.py --dry-run`), so two processes:
#   A  the batch-16 cells (int4 weights only; peak 69.7 GiB at 16 x 32k bf16 KV), JAX given 95% of
#      the memory (the default 75% pool, 59 GiB, would not hold that cache);
#   B  1 x 8k and 4 x 32k (bf16 + int4 weights, peak 36.4 GiB), --append into A's file.
# Run from the repo root: bash benchmarks/kv/runs/call_long_context.sh. Files under $OUT (2):
# run.log, hopper_long_context.json. Budget: A 300 s, B the rest up to 570 s (estimates: A ~190 s,
# B ~160 s; each file is written after every mode, so a cut run keeps what it measured).
# Afterwards on the CPU: benchmarks/kv/README.md, "The H100 end to end: after the call".
: "${OUT:?set OUT}"
[ -f scripts/bench_long_context.py ] || { echo "run from the repository root"; exit 1; }
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE  # one name for the fraction; the pool preallocated
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
echo "== A: 16x8192, 16x32768 (t=${SECONDS}s)"
XLA_CLIENT_MEM_FRACTION=0.95 timeout 300 python3 scripts/bench_long_context.py --kernels mosaic \
  --shapes 16x8192,16x32768 --out $OUT/hopper_long_context.json
echo "A rc=$? (t=${SECONDS}s)"
echo "== B: 1x8192, 4x32768"
timeout $((570 - SECONDS)) python3 scripts/bench_long_context.py --kernels mosaic \
  --shapes 1x8192,4x32768 --append --out $OUT/hopper_long_context.json
echo "B rc=$? (t=${SECONDS}s)"
echo "done"
} > $OUT/run.log 2>&1
