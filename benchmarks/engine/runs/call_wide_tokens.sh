#!/bin/bash
# Device call (issue 18, K2 / K3): the kernels at M = 256 (the verify pass of batch 64 at gamma 3)
# after choose_tiles' rule change (W4A16 256-token tiles carry one accumulator; int8 activations run
# 128-token chunks), each beside the rule it replaces (two accumulators; one 256-token int8 tile)
# and the peers (XLA bf16 / jnp.int4, PyTorch cuBLAS bf16; tinygemm is never the fastest there),
# the worst cells first, then the float64 checks with the time left. Sized for a short lease
# (about 3.5 minutes); M = 128 (already in MEASURED for gate_up / down) is left for later.
# Files under $OUT: run.log, mosaic_sweep.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 215 python3 scripts/bench_mosaic.py --out $OUT --ms 256 --same-as "" --no-peers-at "" \
  --w4a8-ms 256 --wide-ms "" --projections down,o,qkv,gate_up --peers xla_bf16,xla_int4 \
  --torch-kinds cublas_bf16 --budget-s 150 --check-s 20
echo "sweep rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
