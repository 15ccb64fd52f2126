#!/usr/bin/env bash
# The Mosaic kernels' GPU run (issue 18), one call inside a deadline: the decode step on the kernel
# families (STEP_KERNELS, default triton,mosaic), then the kernel sweep beside the peers, then the
# float64 checks, each saved as it goes. Writes under $1; $2 = seconds for the whole run.
out=${1:?usage: scripts/mosaic_run.sh OUTDIR [seconds] [projections]}
deadline=$((SECONDS + ${2:-540})); projections=${3:-gate_up,down,qkv,o}
mkdir -p "$out"; export PYTHONUNBUFFERED=1
timeout $((deadline - SECONDS - ${SWEEP_S:-240})) python3 scripts/bench_engine.py --parts step --modes w4a16,bf16 \
  --kernels ${STEP_KERNELS:-triton,mosaic} --batches ${STEP_BATCHES:-1,16} --repeats 3 --out "$out/step.json" > "$out/step.log" 2>&1
echo "step rc=$?"; grep -E "^step|copy" "$out/step.log" | cut -c1-160
left=$((deadline - SECONDS - 15))
[ $left -lt 40 ] && exit 0
timeout $left python3 scripts/bench_mosaic.py --out "$out" --budget-s $((left - 60)) --check-s 40 \
  --projections "$projections" --torch-kinds tinygemm > "$out/sweep.log" 2>&1
echo "sweep rc=$?"
grep -E "^(gate_up|down|qkv|o) |budget|^check" "$out/sweep.log" | cut -c1-240
