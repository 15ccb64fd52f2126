#!/usr/bin/env bash
# The Mosaic kernels' GPU run (issue 18), one call inside a deadline: W4A8 probes (each in its own
# process: a CUDA fault ends only that process), the decode step on both kernel families, the
# kernel sweep beside the peers, then the float64 checks. Writes under $1.
out=${1:?usage: scripts/mosaic_run.sh OUTDIR [seconds] [projections]}
deadline=$((SECONDS + ${2:-540})); projections=${3:-gate_up,down,qkv,o}
mkdir -p "$out"; export PYTHONUNBUFFERED=1
kernels=w4a16; modes=w4a16,bf16; batches=1,16; export QSPEC_MOSAIC_W4A8_PROBE=""
for p in "" via_bf16 a_smem; do
  log="$out/probe_${p:-default}.log"
  timeout 45 python3 scripts/bench_mosaic.py --out "$out" --probe "$p" > "$log" 2>&1
  grep -E "^probe" "$log" || tail -c 200 "$log"
  if grep -q "rel_err" "$log"; then
    kernels=w4a16,w4a8; modes=w4a16,bf16,w4a8; batches=${STEP_BATCHES:-1,16}; export QSPEC_MOSAIC_W4A8_PROBE=$p; break
  fi
done
echo "kernels=$kernels W4A8 probe='$QSPEC_MOSAIC_W4A8_PROBE' ($((deadline - SECONDS)) s left)"
timeout $((deadline - SECONDS - ${SWEEP_S:-200})) python3 scripts/bench_engine.py --parts step --modes "$modes" \
  --kernels ${STEP_KERNELS:-triton,mosaic} --batches $batches --repeats 3 --out "$out/step.json" > "$out/step.log" 2>&1
echo "step rc=$?"; grep -E "^step|copy" "$out/step.log" | cut -c1-160
left=$((deadline - SECONDS - 15))
[ $left -lt 40 ] && exit 0
timeout $left python3 scripts/bench_mosaic.py --out "$out" --budget-s $((left - 60)) --check-s 40 \
  --kernels "$kernels" --projections "$projections" --torch-kinds tinygemm > "$out/sweep.log" 2>&1
echo "sweep rc=$?"
grep -E "^(gate_up|down|qkv|o) |budget|^check" "$out/sweep.log" | cut -c1-240
