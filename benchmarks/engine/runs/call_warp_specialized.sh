#!/bin/bash
# Device call (issue 18, K1 / K2 / K3): warp-specialized Mosaic programs (MosaicTiles.consumers = 2:
# a memory warpgroup issuing the TMA loads, two consumer warpgroups of 64 rows each converting and
# multiplying against the shared x tile) beside choose_tiles' rule, in one process per part so a
# fault ends only its part:
#   1. the float64 / integer checks of every body, the warp-specialized ones included;
#   2. M = 128 and 256 on every projection (W4A16 and W4A8), with the peers that win there;
#   3. M = 1 and 16 (W4A16), with the decode peers.
# If a warp-specialized check fails, parts 2-3 time the rule alone (still the M = 128 rule's first
# run on qkv / o). Files under $OUT: run.log, check/, wide/ and decode/mosaic_sweep.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 110 python3 scripts/bench_mosaic.py --out $OUT/check --check-only --check-s 90
echo "check rc=$? (t=${SECONDS}s)"
if python3 benchmarks/engine/runs/checks_pass.py $OUT/check/mosaic_sweep.json consumers=2; then WS="--consumers 2"; else WS="--consumers 1"; fi
echo "sweeping with $WS"
timeout 330 python3 scripts/bench_mosaic.py --out $OUT/wide --ms 128,256 --same-as "" --no-peers-at "" \
  --w4a8-ms 128,256 --wide-ms "" --projections gate_up,down,o,qkv --peers xla_bf16,xla_int4 \
  --torch-kinds cublas_bf16 --budget-s 280 --skip-check --ws-only $WS
echo "wide rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_mosaic.py --out $OUT/decode --ms 1,16 --same-as "" \
  --no-peers-at "" --wide-ms "" --kernels w4a16 --projections gate_up,down,qkv,o --peers xla_int4 \
  --torch-kinds tinygemm,cublas_bf16 --budget-s $((540 - SECONDS)) --skip-check --ws-only $WS
echo "decode rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
