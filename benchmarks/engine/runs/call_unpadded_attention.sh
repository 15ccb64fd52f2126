#!/bin/bash
# As run at 68b15fb: the change it A/Bs was reverted after it measured no gain, so on later trees
# step 3's `patch -R` no longer applies (the wrapper pads again).
# Device call (issues 18, 19): decode attention that pads its query block itself.
#  1. the attention tests, compiled Triton only (float64 references, cuts, the unpadded rows);
#  2. the summary step at batch 1 and 16 (W4A16, W4A8, bf16, PyTorch tinygemm / cuBLAS), profiled;
#  3. the same W4A16 step with the wrapper's pad and slice put back (patch -R of
#     attention_pad_queries.diff, the commit's change to decode_attention.py): the A/B in one call;
#  4. issue 19's 16 x 32k cell alone in a fresh process (its bf16 cache ran out of memory after the
#     8k cells last time), JAX given 95% of the memory.
# Files under $OUT: run.log, step.json, step_padded.json, hopper_long_context.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
D=benchmarks/engine/runs/attention_pad_queries.diff
{
nvidia-smi --query-gpu=name,memory.total --format=csv
QSPEC_TEST_COMPILED_ONLY=1 timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_decode_attention.py \
  -k "float64 or unpadded or cut or recent"
echo "tests rc=$? (t=${SECONDS}s)"
timeout 200 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic --batches 1,16 \
  --profile --out $OUT/step.json
echo "step rc=$? (t=${SECONDS}s)"
patch -R -p1 < $D && timeout 100 python3 scripts/bench_engine.py --parts step --modes w4a16 --kernels mosaic \
  --batches 1,16 --no-peers --profile --out $OUT/step_padded.json
echo "padded step rc=$? (t=${SECONDS}s)"
patch -p1 < $D
XLA_CLIENT_MEM_FRACTION=0.95 timeout $((585 - SECONDS)) python3 scripts/bench_long_context.py --kernels mosaic \
  --shapes 16x32768 --out $OUT/hopper_long_context.json
echo "long context 16x32768 rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
