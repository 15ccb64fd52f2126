#!/bin/bash
# Device call (issue 19, A1): attention v8 (8 query columns) against v7 as shipped, each variant in
# its own process, each config checked against float64 first, batch 16 x 8k and 32k. (The previous
# call's v8 faulted with a misaligned address: the rows' bounds, a 64-byte pipeline block at tm = 8,
# now load once.) At 04fe9f2 INT4 also ran value_tokens=64 (V^T staged 64 tokens at a time, 3
# programs an SM: "int4:2:1:128,2:1.5:128:64"; no gain, since reverted). About 3.5 min. Files under
# $OUT: run.log (LOG), attention_v8_int8.json, attention_v8_int4.json. CONFIGS
# (variant:stages:split_factor[:kv_tile][,...] ...), DEADLINE (seconds) and LOG let another call
# script run this part (call_step_and_attention_v8.sh, call_v8_end_to_end_32k.sh).
: "${OUT:?set OUT}"
CONFIGS=${CONFIGS:-"int8:2:1.5 int4:2:1:128"}  # the shipped configs (INT8 at 3 programs an SM)
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
