#!/bin/bash
# Device call (issue 18, K2 / K3 at M = 128 / 256): after choose_tiles' warp-specialized rule,
#   1. the float64 / integer checks, clusters of two programs multicasting x included;
#   2. M = 128 and 256: qkv under the rule and its warp-specialized neighbours (the first call's
#      budget ran out before qkv), every projection under the rule beside clusters of two programs
#      (MosaicTiles.cluster = 2; if a cluster check failed, the rule alone), with the peers;
#   3. the joined kernel table and the H100 cost table rebuilt from it (for the --gamma auto run);
#   4. M = 64 (the verify pass of batch 16 at gamma 3): the rule beside warp-specialized programs.
# Files under $OUT: run.log, check/, wide/, m64/ mosaic_sweep.json, hopper_kernels.json, h100_costs.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 100 python3 scripts/bench_mosaic.py --out $OUT/check --check-only --check-s 75
echo "check rc=$? (t=${SECONDS}s)"
if python3 -c "
import json, sys
cells = [c for c in json.load(open('$OUT/check/mosaic_sweep.json'))['check'] if 'cluster=2' in c['tiles']]
bad = [c for c in cells if 'error' in c or any(v > 1e-2 or v != v for k, v in c.items() if 'rel_err' in k)]
print('cluster checks:', len(cells), 'bad:', len(bad))
sys.exit(0 if cells and not bad else 1)"; then CL=2; else CL=1; fi
echo "sweeping with --cluster $CL"
timeout 330 python3 scripts/bench_mosaic.py --out $OUT/wide --ms 128,256 --same-as "" --no-peers-at "" \
  --w4a8-ms 128,256 --wide-ms "" --projections qkv,gate_up,down,o --peers xla_bf16,xla_int4 \
  --torch-kinds cublas_bf16 --budget-s 300 --skip-check --ws-only --cluster $CL --cluster-only gate_up,down,o
echo "wide rc=$? (t=${SECONDS}s)"
python3 scripts/bench_mosaic.py --summary benchmarks/engine/hopper_kernels.json \
  benchmarks/engine/h100_sweep_ws_744a87a.json benchmarks/engine/h100_sweep_ws_decode_744a87a.json \
  $OUT/wide/mosaic_sweep.json --merged $OUT/hopper_kernels.json --out /tmp/summary_preview.json > /dev/null
python3 scripts/build_cost_table.py --step benchmarks/engine/hopper_step_costs.json \
  --kernels $OUT/hopper_kernels.json --out $OUT/h100_costs.json
echo "tables rebuilt (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_mosaic.py --out $OUT/m64 --ms 64 --same-as "" --no-peers-at "" \
  --w4a8-ms 64 --wide-ms "" --projections gate_up,down,o,qkv --peers xla_bf16,xla_int4 \
  --torch-kinds tinygemm,cublas_bf16 --budget-s $((560 - SECONDS)) --skip-check --ws-only
echo "m64 rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
