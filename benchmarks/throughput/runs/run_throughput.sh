#!/bin/bash
# Device run: end-to-end throughput (llama3-8b, generated weights, acceptance replayed from SmolLM2).
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout ${LIMIT:-560} python scripts/bench_throughput.py --presets llama3-8b --batches 1,8,16,32,64 \
  --modes w4a16,w4a4,bf16 --gammas 3 --drafts w4a4 --gamma-sweep 16:1,5,7 --context-sweep 8:2048 \
  --out $OUT/h100_llama3-8b.json 2>&1 | grep -v -i warn | tee $OUT/h100_llama3-8b.log | tail -60
