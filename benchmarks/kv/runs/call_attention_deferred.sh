#!/bin/bash
# Device call (issue 19, A1): the Mosaic attention bodies with deferred sums (one reduction across
# the warpgroup a step, the running maximum; the softmax denominators and the values' shift terms
# summed per thread and combined after the last step) and v5 (tenth session: v4 with the codes
# unpacked a 32-bit word at a time, packed_codes.py), at 64- and 128-token steps, beside the Triton
# kernel (the anchor that compares this run with call_attention_v4.sh's), each checked against
# float64 first; batch 16 x 8k, INT8 and INT4; then the PTX of v5 on INT8 and INT4 (about 4 min).
# FULL=1 adds 32k, bf16 and v1 (about 7 min).
# Files under $OUT: run.log, attention_deferred.json, dump.tar.gz.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
if [ -n "$FULL" ]; then
  CELLS=(--contexts 8192,32768 --variants int8,int4,bf16 --v1-configs 2:1,2:1:128)
else
  CELLS=(--contexts 8192 --variants int8,int4 --v1-configs "")
fi
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${BENCH_TIMEOUT:-330} python3 scripts/bench_attention_mosaic.py --out $OUT/attention_deferred.json \
  "${CELLS[@]}" --v2-configs "" --v3-configs "" --v4-configs 2:1,2:1:128 --v5-configs 2:1,2:1:128
echo "bench rc=$? (t=${SECONDS}s)"
bash benchmarks/kv/runs/dump_ptx.sh attention_mosaic_v5
} > $OUT/run.log 2>&1
