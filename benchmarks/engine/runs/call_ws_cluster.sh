#!/bin/bash
# Device call (issue 18), after choose_tiles' warp-specialized rule (744a87a's sweep):
#   1. the float64 / integer checks, clusters of two programs multicasting x included;
#   2. qkv at M = 128 and 256 under the rule and its warp-specialized neighbours (the first call's
#      budget ran out before qkv), and at M = 256 gate_up / down / o under the rule beside clusters of
#      two programs (MosaicTiles.cluster = 2; if a cluster check failed, the rule alone), with peers;
#   3. the joined kernel table and the H100 cost table rebuilt from it, then
#   4. --gamma auto at batch 64 priced by that table, beside the best plain and fixed settings.
# Files under $OUT: run.log, check/ qkv/ c256/ mosaic_sweep.json, hopper_kernels.json,
# h100_costs.json, hopper_auto_b64.json, hopper_auto_summary_b64.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 75 python3 scripts/bench_mosaic.py --out $OUT/check --check-only --check-s 55
echo "check rc=$? (t=${SECONDS}s)"
if python3 -c "
import json, sys
cells = [c for c in json.load(open('$OUT/check/mosaic_sweep.json'))['check'] if 'cluster=2' in c['tiles']]
bad = [c for c in cells if 'error' in c or any(v > 1e-2 or v != v for k, v in c.items() if 'rel_err' in k)]
print('cluster checks:', len(cells), 'bad:', len(bad))
sys.exit(0 if cells and not bad else 1)"; then CL=2; else CL=1; fi
echo "sweeping with --cluster $CL"
SWEEP=(--same-as "" --no-peers-at "" --wide-ms "" --peers xla_bf16,xla_int4 --torch-kinds cublas_bf16 --skip-check
       --ws-only --cluster $CL)
timeout 110 python3 scripts/bench_mosaic.py --out $OUT/qkv --ms 128,256 --w4a8-ms 128,256 --projections qkv \
  --budget-s 95 "${SWEEP[@]}"
echo "qkv rc=$? (t=${SECONDS}s)"
timeout 100 python3 scripts/bench_mosaic.py --out $OUT/c256 --ms 256 --w4a8-ms 256 --projections gate_up,down,o \
  --cluster-only gate_up,down,o --budget-s 85 "${SWEEP[@]}"
echo "c256 rc=$? (t=${SECONDS}s)"
python3 scripts/bench_mosaic.py --summary benchmarks/engine/hopper_kernels.json \
  benchmarks/engine/h100_sweep_ws_744a87a.json benchmarks/engine/h100_sweep_ws_decode_744a87a.json \
  $OUT/qkv/mosaic_sweep.json $OUT/c256/mosaic_sweep.json --merged $OUT/hopper_kernels.json \
  --out /tmp/summary_preview.json > /dev/null
python3 scripts/build_cost_table.py --step benchmarks/engine/hopper_step_costs.json \
  --kernels $OUT/hopper_kernels.json --out qspec_jax/cost_tables/h100_costs.json
cp qspec_jax/cost_tables/h100_costs.json $OUT/
echo "tables rebuilt (t=${SECONDS}s)"
timeout $((590 - SECONDS)) python3 scripts/bench_throughput.py --issue12 --kernels mosaic --batches 64 \
  --out $OUT/hopper_auto_b64.json --auto-summary $OUT/hopper_auto_summary_b64.json
echo "auto rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
