#!/bin/bash
# Device call (issue 19, A1): the Mosaic attention with its output's buffers moved out of the
# pipeline's lifetime (75 -> 66 KiB on INT8, 59 -> 50 KiB on INT4 at 64-token steps, 2 stages), so
# an SM holds 3 INT8 / 4 INT4 programs where it held 2 / 3. v7 at the wave-sized splits of 2, 3 and
# 4 programs an SM (split factors 1, 1.5, 2 at batch 16), at 64-token steps, and INT4 at 128-token
# steps as shipped, beside the Triton kernel, each checked against float64; batch 16 x 8k and 32k.
# Then Nsight Compute on v7 (shared memory and occupancy as the GPU reads them). About 5 min.
# Files under $OUT: run.log, attention_residency_sweep.json, ncu.txt.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 420 python3 scripts/bench_attention_mosaic.py --out $OUT/attention_residency_sweep.json \
  --contexts 8192,32768 --variants int8,int4 --v1-configs "" --v2-configs "" --v3-configs "" --v4-configs "" \
  --v5-configs "" --v6-configs "" --v7-configs 2:1,2:1.5,2:2,2:1:128
echo "bench rc=$? (t=${SECONDS}s)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 ncu --clock-control none -k regex:'attention_mosaic' \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  python3 scripts/ncu_probe.py --calls 1 --only attention_mosaic_v7 > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
