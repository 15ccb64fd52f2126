#!/bin/bash
# Device call (issue 19): does the compiled INT8-KV decode loop copy cache-sized buffers every step?
# On the CPU (tiny model, fifteenth session) XLA's program copied one layer's planes in each branch of
# flush's quantize conditional and in the loop body until each cycle flushed first (now none), and
# it still copies every layer's recent buffers each step (benchmarks/kv/README.md). At 16 x 8k one
# layer's planes are 270 MB and the recent buffers 0.5 GB, so on the GPU such copies would explain
# much of why W4A16 read the INT8 cache no faster than bf16 KV end to end (9.17 / 9.22 ms, f1a5576)
# although its attention kernel is 1.29x faster. Since the sixteenth session the recent buffers are a
# ring (no shift; 12 -> 0-4 copies a step in the CPU's program), not yet run on a GPU: so first the
# ring's attention tests, compiled by Triton on the GPU.
# Then the 16 x 8k cells of call_v8_end_to_end_8k.sh with XLA dumping each decode program's optimized
# HLO, then lists their copies of at least 1 MB (hlo_copies.py). About 4 min.
# Files under $OUT: run.log, long_context_8k.json, copies.txt, hlo.tar.gz.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
{
nvidia-smi --query-gpu=name,memory.total --format=csv
QSPEC_TEST_COMPILED_ONLY=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
  -k "ring_buffer or launch_knobs_with_cut" 2>&1 | tail -5
echo "ring tests rc=${PIPESTATUS[0]} (t=${SECONDS}s)"
XLA_FLAGS="--xla_dump_to=/tmp/hlo_kv --xla_dump_hlo_as_text" timeout ${LIMIT:-200} python3 \
  scripts/bench_long_context.py --kernels mosaic --shapes 16x8192 \
  --cells "16x8192:w4a16_bf16kv,w4a16_int8kv,qspec_w4a8_int8kv_g3" --out $OUT/long_context_8k.json
echo "16x8192 rc=$? (t=${SECONDS}s)"
dumps=$(ls /tmp/hlo_kv/*decode*after_optimizations.txt)
python3 benchmarks/kv/runs/hlo_copies.py $dumps > $OUT/copies.txt 2>&1
(cd /tmp/hlo_kv && ls | grep -E 'decode.*after_optimizations\.txt$' | tar czf $OUT/hlo.tar.gz -T -)
ls -la $OUT/hlo.tar.gz
} > $OUT/run.log 2>&1
