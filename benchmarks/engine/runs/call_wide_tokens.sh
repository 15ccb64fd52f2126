#!/bin/bash
# Device call (issue 18, K2 / K3): the kernels at M = 128 and 256 after choose_tiles' rule change
# (W4A16 token tiles of 128 / 256 carry one accumulator in 128- / 64-row programs; int8 activations
# in 128-token chunks), each beside the rule it replaces (two accumulators; one 256-token int8 tile)
# and the peers (XLA bf16 / jnp.int4, PyTorch tinygemm / cuBLAS bf16), every projection, then the
# float64 checks with the time left. Files under $OUT: run.log, mosaic_sweep.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 390 python3 scripts/bench_mosaic.py --out $OUT --ms 128,256 --same-as "" --no-peers-at "" \
  --w4a8-ms 128,256 --wide-ms "" --projections gate_up,down,qkv,o --peers xla_bf16,xla_int4 \
  --budget-s 280 --check-s 40
echo "sweep rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
