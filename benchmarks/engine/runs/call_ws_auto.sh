#!/bin/bash
# Device call (issue 18): after the warp-specialized sweep (call_warp_specialized.sh) and choose_tiles'
# new rule (warp-specialized programs at token tiles of 128 and more):
#   1. qkv at M = 128 and 256 under the new rule and its neighbours, with the peers (the first
#      call's budget ran out before qkv);
#   2. the joined kernel table and the H100 cost table rebuilt from it here, so that
#   3. --gamma auto at batch 64 prices the kernels it runs (the cell the summary lacks);
#   4. M = 64 (the verify pass of batch 16 at gamma 3): the rule beside warp-specialized programs;
#   5. the step at batch 128 (M = 128: the new rule) for W4A16 and W4A8, with the time left.
# Files under $OUT: run.log, qkv/mosaic_sweep.json, hopper_kernels.json, h100_costs.json,
# hopper_auto_b64.json, hopper_auto_summary_b64.json, m64/mosaic_sweep.json, step128.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 110 python3 scripts/bench_mosaic.py --out $OUT/qkv --ms 128,256 --same-as "" --no-peers-at "" \
  --w4a8-ms 128,256 --wide-ms "" --projections qkv --peers xla_bf16,xla_int4 --torch-kinds cublas_bf16 \
  --budget-s 90 --skip-check --ws-only
echo "qkv rc=$? (t=${SECONDS}s)"
python3 scripts/bench_mosaic.py --summary benchmarks/engine/hopper_kernels.json \
  benchmarks/engine/h100_sweep_ws_744a87a.json benchmarks/engine/h100_sweep_ws_decode_744a87a.json \
  $OUT/qkv/mosaic_sweep.json --merged benchmarks/engine/hopper_kernels.json --out /tmp/summary_preview.json > /dev/null
python3 scripts/build_cost_table.py --step benchmarks/engine/hopper_step_costs.json \
  --kernels benchmarks/engine/hopper_kernels.json --out qspec_jax/cost_tables/h100_costs.json
cp benchmarks/engine/hopper_kernels.json qspec_jax/cost_tables/h100_costs.json $OUT/
echo "tables rebuilt (t=${SECONDS}s)"
timeout $((480 - SECONDS)) python3 scripts/bench_throughput.py --issue12 --kernels mosaic --batches 64 \
  --out $OUT/hopper_auto_b64.json --auto-summary $OUT/hopper_auto_summary_b64.json
echo "auto rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_mosaic.py --out $OUT/m64 --ms 64 --same-as "" --no-peers-at "" \
  --w4a8-ms 64 --wide-ms "" --projections gate_up,down,o,qkv --peers xla_bf16,xla_int4 \
  --torch-kinds tinygemm,cublas_bf16 --budget-s $((560 - SECONDS)) --skip-check --ws-only
echo "m64 rc=$? (t=${SECONDS}s)"
timeout $((585 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic \
  --batches 128 --no-peers --out $OUT/step128.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
