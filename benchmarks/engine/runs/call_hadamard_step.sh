#!/bin/bash
# Device call (issue 18): the one-launch online transform (pallas_kernels.hadamard) checked against
# float64 and timed beside XLA's GEMMs, then the summary step: W4A16, W4A8 and bf16 beside PyTorch
# (tinygemm int4, cuBLAS bf16) at batch 1 and 16, the quantized modes with the kernel (default) and
# with XLA's transform (xla_rotation), CUPTI profiles. If the kernel fails its check, the step runs
# xla_rotation only. Files under $OUT: run.log, hadamard.json, step.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 120 python3 benchmarks/engine/probes/hadamard.py --out $OUT/hadamard.json
rc=$?
if [ $rc = 0 ]; then V=default,xla_rotation; else V=xla_rotation; fi
echo "hadamard rc=$rc variants=$V (t=${SECONDS}s)"
timeout $((590 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16 --profile --step-variants $V --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
