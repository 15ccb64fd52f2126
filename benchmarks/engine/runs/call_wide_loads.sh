#!/bin/bash
# One device call (issue 18): the W4A16 kernel's 32-bit weight loads against byte loads (checked
# against float64, then timed at every projection), then the step with them (batch 1 and 16,
# beside bf16 and PyTorch, with per-kernel profiles). Everything lands under $OUT.
export PYTHONPATH=$PWD
{
timeout 260 python3 benchmarks/engine/probes/wide_loads.py --out $OUT/wide_loads.json --ms 1,16,64
timeout 200 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8,bf16 --kernels mosaic \
  --batches 1,16 --profile --out $OUT/step.json
echo "done"
} > $OUT/run.log 2>&1
