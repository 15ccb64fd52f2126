#!/bin/bash
# Device call (issues 18 and 19), about 8 minutes:
# 1. The fused residual add + RMSNorm (model.FUSED_RESIDUAL_NORM) checked on the Mosaic kernels' real
#    split-K halves (check_residual_norm.py): kernel outputs against XLA's, and a 2-layer model's
#    logits with it off and on.
# 2. The W4A16 step at batch 1 and 16, default against the "residual_norm" variant, in one process
#    with each step's CUPTI profile, XLA dumping each compiled step's optimized HLO: which ops the
#    small fusions hold (about 9 a layer, 0.65 ms at batch 16) and whether fusing the adds and
#    norms gives back their launches (E1).
# 3. Nsight Compute on each attention view's shipped Mosaic config (attention_mosaic.FASTER).
# Files under $OUT: run.log, check_residual_norm.json, step.json, hlo.tar.gz, ncu.txt.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 150 python3 benchmarks/engine/runs/check_residual_norm.py $OUT/check_residual_norm.json
echo "check rc=$? (t=${SECONDS}s)"
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" timeout 240 python3 scripts/bench_engine.py \
  --parts step --modes w4a16 --kernels mosaic --batches 1,16 --step-variants default,residual_norm \
  --no-peers --profile --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
(cd /tmp/hlo && ls | grep -E 'jit_run.*after_optimizations\.txt$' | tar czf $OUT/hlo.tar.gz -T -)
ls -la $OUT/hlo.tar.gz
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((${NCU_DEADLINE:-540} - SECONDS)) ncu --clock-control none \
  -k regex:'attention_mosaic' --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats \
  --section MemoryWorkloadAnalysis --section SchedulerStats python3 scripts/ncu_probe.py --calls 1 \
  --only attention_mosaic_shipped > $OUT/ncu.txt 2>&1
echo "ncu rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
