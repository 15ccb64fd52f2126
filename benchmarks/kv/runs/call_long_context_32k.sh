#!/bin/bash
# Device call (issue 19, G2 / G3 at 32k): the long-context decode with the attention as shipped
# (attention_mosaic.FASTER on sm_90), QuantSpec against bf16 at 4 x 32k first (G3's cell, until the
# fourteenth session measured with the Triton attention only), then W4A16 on the INT8 cache against
# QSpec W4A8 on it at 16 x 32k (G2), two processes into one file (the 80 GB card holds the bf16
# weights or the batch-16 cache). About 6 min. Files under $OUT: run.log (LOG), long_context_32k.json.
# SHAPES (their order), LIMIT (seconds a shape; default 270 for the first, the rest of 560 for the
# second) and LOG let another call script run this part (call_v8_end_to_end_32k.sh).
: "${OUT:?set OUT}"
CELLS=${CELLS:-"4x32768:bf16_bf16kv,quantspec_g3;16x32768:w4a16_int8kv,qspec_w4a8_int8kv_g3"}
SHAPES=${SHAPES:-"4x32768 16x32768"}
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
first=1
for shape in $SHAPES; do
  echo "== $shape (t=${SECONDS}s)"
  limit=${LIMIT:-$([ $first = 1 ] && echo 270 || echo $((560 - SECONDS)))}
  first=0
  XLA_CLIENT_MEM_FRACTION=0.95 timeout $limit python3 scripts/bench_long_context.py \
    --kernels mosaic --cells "$CELLS" --shapes $shape --append --out $OUT/long_context_32k.json
  echo "$shape rc=$? (t=${SECONDS}s)"
done
} >> ${LOG:-$OUT/run.log} 2>&1  # appended: a caller's log is not truncated
