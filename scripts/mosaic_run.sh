#!/usr/bin/env bash
# The Mosaic kernels' GPU run (issue 18), one call: W4A8 probes (each in its own process: a CUDA
# fault ends only that process), the decode step on both kernel families, then the kernel check +
# sweep with what time is left. Writes under $1; $2 = sweep budget in seconds.
out=${1:?usage: scripts/mosaic_run.sh OUTDIR [sweep_budget_s] [projections]}
budget=${2:-300}; projections=${3:-gate_up,down,qkv,o}
mkdir -p "$out"; export PYTHONUNBUFFERED=1
kernels=w4a16; w4a8_probe=""; modes=w4a16,bf16
for p in "" a_smem via_bf16 no_xs; do
  log="$out/probe_${p:-default}.log"
  timeout 90 python3 scripts/bench_mosaic.py --out "$out" --probe "$p" > "$log" 2>&1
  grep -E "^probe" "$log" || tail -c 300 "$log"
  if [ "$kernels" = w4a16 ] && grep -q "rel_err" "$log" && [ "$p" != no_xs ]; then
    kernels=w4a16,w4a8; w4a8_probe=$p
  fi
done
[ "$kernels" = w4a16,w4a8 ] && [ -z "$w4a8_probe" ] && modes=w4a16,bf16,w4a8
echo "step modes=$modes; sweep kernels=$kernels w4a8_probe='$w4a8_probe'"
if [ "${SKIP_STEP:-0}" != 1 ]; then
  timeout 330 python3 scripts/bench_engine.py --parts step --modes "$modes" --kernels triton,mosaic \
    --batches 1,16,64,128 --out "$out/step.json" > "$out/step.log" 2>&1
  echo "step rc=$?"; grep -E "^step|copy|Error" "$out/step.log" | cut -c1-200
fi
timeout $((budget + 60)) python3 scripts/bench_mosaic.py --out "$out" --budget-s "$budget" \
  --kernels "$kernels" --w4a8-probe "$w4a8_probe" --projections "$projections" > "$out/sweep.log" 2>&1
echo "sweep rc=$?"
grep -E "^(gate_up|down|qkv|o) |budget" "$out/sweep.log" | cut -c1-330
