#!/bin/bash
# The next session's first device call (issue 18), written before it could run: the step with and
# without the token-major store (split-1 kernels), attention at short context (our kernel against
# XLA's einsum, then its launch knobs at batch 16 and 64), and W4A8 gate_up at split 2.
# Six files under $OUT. Issue 19's end to end is its own call: benchmarks/kv/runs/call_long_context.sh.
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
{
for tm in "" "--token-major"; do
  timeout 100 python3 scripts/bench_engine.py --parts step --modes w4a16 --kernels mosaic --batches 1,16 \
    --no-peers --profile $tm --out $OUT/step${tm:+_tm}.json
done
timeout 90 python3 scripts/bench_attention.py --batches 1,16,64 --contexts 512,1024 --variants bf16,xla \
  --out $OUT/attention_short.json
for b in 16 64; do
  timeout 70 python3 scripts/bench_attention.py --sweep --batches $b --contexts 512 --variants bf16 \
    --configs '[{"splits": 1}, {"splits": 2}, {"block_k": 64}, {"block_k": 64, "splits": 2}, {"block_k": 32}, {"programs_per_sm": 6}]' \
    --out $OUT/attention_short_sweep_b$b.json
done
timeout 90 python3 benchmarks/engine/probes/wide_loads.py --out $OUT/structure.json --ms 1,16 --projections gate_up
echo "done (t=${SECONDS}s)"
} > $OUT/run.log 2>&1
