#!/bin/bash
# Device call (issue 19, A1): attention v8 (8 query columns) against v7 as shipped, each variant in
# its own process, each config checked against float64 first, batch 16 x 8k and 32k. (The previous
# call's v8 faulted with a misaligned address: the rows' bounds, a 64-byte pipeline block at tm = 8,
# now load once.) INT4 also at value_tokens=64 (V^T staged 64 tokens at a time: 68 KiB, 3 programs an
# SM, so 1.5x the splits). About 6 min. Files under $OUT: run.log (LOG), attention_v8_int8.json,
# attention_v8_int4.json. CONFIGS (variant:stages:split_factor[:kv_tile[:value_tokens]][,...] ...),
# DEADLINE (seconds) and LOG let another call script run this part (call_v8_and_token_major_b16.sh).
: "${OUT:?set OUT}"
# v7's shipped configs (INT8 at 3 programs an SM), and INT4 with V^T in halves at 3 programs an SM
CONFIGS=${CONFIGS:-"int8:2:1.5 int4:2:1:128,2:1.5:128:64"}
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
NONE=(--v1-configs "" --v2-configs "" --v3-configs "" --v4-configs "" --v5-configs "" --v6-configs "")
{
nvidia-smi --query-gpu=name,memory.total --format=csv
for run in $CONFIGS; do
  variant=${run%%:*}
  share=$([ $variant = int8 ] && echo 2 || echo 1)  # int8 gets half of what is left
  timeout $(( (${DEADLINE:-540} - SECONDS) / share )) python3 scripts/bench_attention_mosaic.py \
    --out $OUT/attention_v8_$variant.json --contexts 8192,32768 --variants $variant "${NONE[@]}" \
    --v7-configs ${run#*:} --v8-configs ${run#*:} ${SMOKE:+--smoke}
  echo "attention $variant rc=$? (t=${SECONDS}s)"
done
} >> ${LOG:-$OUT/run.log} 2>&1  # appended: LOG=/dev/stdout must not truncate the caller's log
