#!/bin/bash
# Device call (issue 19, G1-G3): the long-context decode end to end with the quantized cache's
# attention on the Triton kernel (--mosaic-attention triton) and then as shipped (attention_mosaic.FASTER:
# v5 on INT8 and INT4 on sm_90), same device, same cells, two processes (weights regenerated from the
# same seed). Cells: batch 16 x 8k, W4A16 on bf16 and INT8 KV and QSpec W4A8 on the INT8 cache (G1,
# G2); batch 1 x 8k, bf16 against QuantSpec (G3). About 7 min.
# Files under $OUT: run.log, long_context_triton.json, long_context_mosaic.json.
: "${OUT:?set OUT}"
CELLS=${CELLS:-"16x8192:w4a16_bf16kv,w4a16_int8kv,qspec_w4a8_int8kv_g3;1x8192:bf16_bf16kv,quantspec_g3"}
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
echo "== Triton attention (t=${SECONDS}s)"
XLA_CLIENT_MEM_FRACTION=0.95 timeout 285 python3 scripts/bench_long_context.py --kernels mosaic \
  --mosaic-attention triton --out $OUT/long_context_triton.json --cells "$CELLS"
echo "triton rc=$? (t=${SECONDS}s)"
echo "== Mosaic attention (attention_mosaic.FASTER)"
XLA_CLIENT_MEM_FRACTION=0.95 timeout $((585 - SECONDS)) python3 scripts/bench_long_context.py --kernels mosaic \
  --out $OUT/long_context_mosaic.json --cells "$CELLS"
echo "mosaic rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
