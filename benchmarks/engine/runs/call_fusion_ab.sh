#!/bin/bash
# As run at 23911d2 (H200): the reduce_sum switch it names was removed after it measured no change.
# Device call (issue 18): the step's small kernels A/B. W4A16 and W4A8 (Mosaic) at batch 1 and 16,
# each with split-K partials summed by a reduction (reduce_sum: the kernel XLA made at b56cf8d),
# by chained adds (default now), and by adds with XLA's einsum attention (+ token-major for the
# split-1 W4A8 gate_up); CUPTI profiles of every cell, and the optimized HLO of every step program
# (one tar). Then attention at short context, our kernel against the einsum, to place the switch.
# Files under $OUT: run.log, step_ab.json, hlo.tgz, attention_short.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*run.*" timeout 400 python3 scripts/bench_engine.py \
  --parts step --modes w4a16,w4a8 --kernels mosaic --batches 1,16 --no-peers --profile \
  --step-variants reduce_sum,default,tm+xla_attention --out $OUT/step_ab.json
echo "step rc=$? (t=${SECONDS}s)"
(cd /tmp/hlo && ls | grep -c . && tar czf $OUT/hlo.tgz $(ls | grep after_optimizations.txt))
timeout $((580 - SECONDS)) python3 scripts/bench_attention.py --batches 1,16,64 --contexts 512,1024,2048 \
  --variants bf16,xla --out $OUT/attention_short.json
echo "attention rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
