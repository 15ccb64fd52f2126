#!/bin/bash
# Device call (issue 19, A1): what bounds the Mosaic attention body, and two changes to it.
#   1. the PTX / SASS / ptxas report of the v1 and v4 bodies on INT8 (Mosaic GPU's dump switches):
#      which instructions a 64-token step runs (conversions, shuffles, barriers), tarred;
#   2. v1 and v4 (v1 in f16 with the codes built from bits: no int -> float conversion per element)
#      at 64- and 128-token pipeline steps (kv_tile), and v4 at twice the splits (more programs per SM),
#      beside the Triton kernel, checked against float64
#      first, batch 16 x 8k;
#   3. Nsight Compute on the Triton kernel and the v1 / v4 bodies on INT8 (pipes, stalls, occupancy).
# Files under $OUT: run.log, dump.tar.gz, attention_v4.json, ncu.txt.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
mkdir -p $OUT/dump
MOSAIC_GPU_DUMP_TO=$OUT/dump MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTXAS=1 \
  timeout 90 python3 scripts/ncu_probe.py --calls 1 --only attention_mosaic_v1_int8,attention_mosaic_v4_int8
echo "dump rc=$? (t=${SECONDS}s)"
tar czf $OUT/dump.tar.gz -C $OUT dump && rm -rf $OUT/dump
timeout ${BENCH_TIMEOUT:-330} python3 scripts/bench_attention_mosaic.py --out $OUT/attention_v4.json --contexts 8192 \
  --variants int8,int4,bf16 --v1-configs 2:1,2:1:128 --v2-configs "" --v3-configs "" --v4-configs 2:1,2:1:128,2:2
echo "bench rc=$? (t=${SECONDS}s)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((570 - SECONDS)) ncu --clock-control none \
  -k regex:'decode_attention_int8|attention_mosaic_int8' --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 scripts/ncu_probe.py --calls 1 --only attention_int8,attention_mosaic_v1_int8,attention_mosaic_v4_int8 \
  > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
