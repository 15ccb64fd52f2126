#!/bin/bash
# Device call (issue 19, A1): v5 with the key scales in f16 (no f32 round trip) and m, l written as
# two outputs, swept over pipeline stages, context splits (choose_splits x 1, 1.5, 2: more programs
# an SM to hide latency) and 64 / 128-token steps, beside the Triton kernel, each checked against
# float64 first; batch 16 x 8k and 32k, INT8 and INT4; every cell also times the call as
# decode_attention makes it (attend_us: rows padded to 16, partials merged); then v5's PTX.
# About 6 min. Files under $OUT: run.log, attention_v5_sweep.json, dump.tar.gz.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${BENCH_TIMEOUT:-420} python3 scripts/bench_attention_mosaic.py --out $OUT/attention_v5_sweep.json \
  --contexts 8192,32768 --variants int8,int4 --v1-configs "" --v2-configs "" --v3-configs "" --v4-configs "" \
  --v5-configs 2:1,2:1.5,2:2,3:1,2:1:128,2:1.5:128
echo "bench rc=$? (t=${SECONDS}s)"
bash benchmarks/kv/runs/dump_ptx.sh attention_mosaic_v5
} > $OUT/run.log 2>&1
