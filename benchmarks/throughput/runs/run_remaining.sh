#!/bin/bash
# The runs issue 5 still misses (each part writes its JSON as it goes); one call per part:
#   PART=main|context|llama2-13b bash benchmarks/throughput/runs/run_remaining.sh
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
part=${PART:-main}
if [[ $part == main ]]; then  # the 256-token batch sweep with clipped traces and the dequant prefill (~8 min)
  timeout 560 python scripts/bench_throughput.py --presets llama3-8b --batches 1,8,16,32,64 --gammas 3 \
    --drafts w4a4,w4a8 --gamma-sweep 16:1,2,3,5,7 --out $OUT/h100_llama3-8b_v2.json 2>&1 | grep -v -i warn | tail -40
fi
if [[ $part == context ]]; then  # batch 32 x 8192: the 33 GB cache fits since timed() drops old results
  timeout 560 python scripts/bench_throughput.py --presets llama3-8b --batches "" --gammas 3 \
    --context-sweep 32:8192 --prefill-chunk 512 --modes w4a16 --reps 1 \
    --out $OUT/h100_llama3-8b_context_b32_p8192.json 2>&1 | grep -v -i warn | tail -20
fi
if [[ $part == llama2-13b ]]; then
  timeout 560 python scripts/bench_throughput.py --presets llama2-13b --batches 8,16,32 --gammas 3 \
    --drafts w4a8 --modes w4a16 --out $OUT/h100_llama2-13b.json 2>&1 | grep -v -i warn | tail -30
fi
