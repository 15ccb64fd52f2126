#!/bin/bash
# Device call (issues 18 and 19): Nsight Compute on the kernels whose per-element work bounds them:
# the Triton attention and the Mosaic attention body v1 on INT8 / INT4 at 16 x 8k (issue 19: which
# pipe is busy), and the W4A8 kernel at M = 256, no faster than W4A16 there (issue 18).
# NCU_ONLY (ncu_probe.py --only) and NCU_TIMEOUT narrow it for a short lease.
# Files under $OUT: run.log, ncu.txt.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${NCU_TIMEOUT:-280} ncu --clock-control none \
  -k regex:'decode_attention_int|attention_mosaic|w4a8_mosaic' --section SpeedOfLight \
  --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section Occupancy \
  --section LaunchStats --section MemoryWorkloadAnalysis --section SchedulerStats python3 scripts/ncu_probe.py --calls 1 \
  --only ${NCU_ONLY:-attention_int8,attention_int4,attention_mosaic,M256} > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
