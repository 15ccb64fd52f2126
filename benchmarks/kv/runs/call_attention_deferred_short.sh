#!/bin/bash
# Device call (issue 19, A1), the short form of call_attention_deferred.sh for a lease of about 4
# minutes: v4 with deferred sums at 64- and 128-token steps beside the Triton kernel (the anchor that
# compares this run with call_attention_v4.sh's), INT8 and INT4 at batch 16 x 8k, checked first.
# Files under $OUT: run.log, attention_deferred.json.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${BENCH_TIMEOUT:-150} python3 scripts/bench_attention_mosaic.py --out $OUT/attention_deferred.json \
  --contexts 8192 --variants int8,int4 --v1-configs "" --v2-configs "" --v3-configs "" --v4-configs 2:1,2:1:128
echo "bench rc=$? (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
