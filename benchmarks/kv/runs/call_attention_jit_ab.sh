#!/bin/bash
# Device call (issue 19, G2): does jitting the Mosaic attention slow QSpec? The long-context decode
# at 16 x 8k, W4A16 on the INT8 cache and QSpec W4A8 on it, with the attention as shipped
# (--attention-jit on) and called inline (off), two processes on this host. After the jit (a75d3e8),
# QSpec / W4A16 read 0.98-0.99 on two hosts, against 1.04 before it (8eca226) on a third. About 5 min.
# Files under $OUT: run.log, long_context_jit_on.json, long_context_jit_off.json.
: "${OUT:?set OUT}"
CELLS=${CELLS:-"16x8192:w4a16_int8kv,qspec_w4a8_int8kv_g3"}
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
for jit in off on; do
  echo "== attention jit $jit (t=${SECONDS}s)"
  limit=$([ $jit = off ] && echo 330 || echo $((585 - SECONDS)))
  XLA_CLIENT_MEM_FRACTION=0.95 timeout $limit python3 scripts/bench_long_context.py --kernels mosaic \
    --attention-jit $jit --out $OUT/long_context_jit_$jit.json --cells "$CELLS"
  echo "jit $jit rc=$? (t=${SECONDS}s)"
done
} > $OUT/run.log 2>&1
