#!/usr/bin/env bash
# The Mosaic kernels' GPU run (issue 18): W4A8 probes (each in its own process: a CUDA fault ends
# only that process), then the check + sweep with the W4A8 variant that ran. Writes under $1.
out=${1:?usage: scripts/mosaic_run.sh OUTDIR [budget_s]}; budget=${2:-450}
mkdir -p "$out"; export PYTHONUNBUFFERED=1
kernels=w4a16; w4a8_probe=""
for p in "" a_smem no_xs; do
  timeout 90 python3 scripts/bench_mosaic.py --out "$out" --probe "$p" > "$out/probe_${p:-default}.log" 2>&1
  grep -E "^probe" "$out/probe_${p:-default}.log" || tail -c 300 "$out/probe_${p:-default}.log"
  if [ "$kernels" = w4a16 ] && grep -q "rel_err" "$out/probe_${p:-default}.log" && [ "$p" != no_xs ]; then
    kernels=w4a16,w4a8; w4a8_probe=$p
  fi
done
echo "sweep: kernels=$kernels w4a8_probe='$w4a8_probe'"
timeout $((budget + 60)) python3 scripts/bench_mosaic.py --out "$out" --budget-s "$budget" \
  --kernels "$kernels" --w4a8-probe "$w4a8_probe" > "$out/sweep.log" 2>&1
echo "rc=$?"
grep -E "^check|^(gate_up|down|qkv|o) |budget" "$out/sweep.log" | cut -c1-330
