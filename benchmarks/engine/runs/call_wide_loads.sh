#!/bin/bash
# One device call (issue 18): the Mosaic kernels' step structure (W4A16's 32-bit weight loads
# against byte loads; 1, 2, 4 weight groups per pipeline step), checked against float64 and timed
# at every projection; then the step at 1 and 2 groups a step (batch 1 and 16). Under $OUT.
export PYTHONPATH=$PWD
{
timeout 290 python3 benchmarks/engine/probes/wide_loads.py --out $OUT/wide_loads.json --ms 1,16,64
for g in 1 2; do
timeout 120 python3 scripts/bench_engine.py --parts step --modes w4a16,w4a8 --kernels mosaic \
  --batches 1,16 --no-peers --mosaic-groups $g --out $OUT/step_g$g.json
done
echo "done"
} > $OUT/run.log 2>&1
