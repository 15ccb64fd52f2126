#!/bin/bash
# Device call (issue 18, E1 / E2): the token-major epilogue on every decode projection, split-K's f32
# partials stored as two 16-bit halves (int4_mosaic.f32_halves), so no transpose kernel follows a
# matmul. The kernels against float64 first, then the step with it (W4A16, the W4A8 draft, our
# bf16 step and PyTorch's, batch 1 and 16: the summary's step keys from one run), then W4A16
# without it in the same call (the A/B). About 6 min. Files under $OUT: run.log, check_tm/,
# step_tm.json, step_out_t.json.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 150 python3 scripts/bench_mosaic.py --check-only --token-major --check-s 90 --out $OUT/check_tm
echo "check rc=$? (t=${SECONDS}s)"
timeout 230 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16 --token-major --profile --out $OUT/step_tm.json
echo "step token-major rc=$? (t=${SECONDS}s)"
timeout $((570 - SECONDS)) python3 scripts/bench_engine.py --parts step --modes w4a16 --kernels mosaic \
  --batches 1,16 --no-peers --profile --out $OUT/step_out_t.json
echo "step out^T rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
