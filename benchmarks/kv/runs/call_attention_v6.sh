#!/bin/bash
# Device call (issue 19, A1): v6 (v5 with the mask only on tiles some real query row sees in part)
# and v7 (v6 with exp as ex2.approx) against v5, each at 64- and 128-token steps, beside the Triton
# kernel, each checked against float64 first; batch 16 x 8k and 32k. Then v6 / v7's PTX, and the
# long-context decode at 16 x 8k (W4A16 and QSpec W4A8 on the INT8 cache) with the attention as
# shipped (v5) and with the sweep's fastest config per variant at 8k (by attend_us), two processes
# on this host. About 8 min.
# Files under $OUT: run.log, attention_v6_sweep.json, dump.tar.gz, long_context_v5.json,
# long_context_best.json.
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE
CELLS=${CELLS:-"16x8192:w4a16_int8kv,qspec_w4a8_int8kv_g3"}
{
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 270 python3 scripts/bench_attention_mosaic.py --out $OUT/attention_v6_sweep.json \
  --contexts 8192,32768 --variants int8,int4 --v1-configs "" --v2-configs "" --v3-configs "" --v4-configs "" \
  --v5-configs 2:1,2:1:128 --v6-configs 2:1,2:1:128 --v7-configs 2:1,2:1:128
echo "bench rc=$? (t=${SECONDS}s)"
BEST=$(python3 - $OUT/attention_v6_sweep.json <<'PY'
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["kernel"] == "mosaic" and c.get("attend_us")
         and c["context"] == 8192]
specs = []
for variant in ("int8", "int4"):
    mine = [c for c in cells if c["variant"] == variant]
    if mine:
        k = min(mine, key=lambda c: c["attend_us"])["config"]
        specs.append(f"{variant}={k['version']}:{k['stages']}:{k.get('kv_tile', 64)}")
print(",".join(specs))
PY
)
echo "fastest at 8k: ${BEST:-none}"
bash benchmarks/kv/runs/dump_ptx.sh attention_mosaic_v6,attention_mosaic_v7
for run in "v5:int8=5:2,int4=5:2:128" "best:${BEST:-int8=5:2,int4=5:2:128}"; do
  name=${run%%:*}
  share=$([ $name = v5 ] && echo 2 || echo 1)  # v5 gets half of what is left
  echo "== long context, $name attention (${run#*:}, t=${SECONDS}s)"
  XLA_CLIENT_MEM_FRACTION=0.95 timeout $(( (585 - SECONDS) / share )) \
    python3 scripts/bench_long_context.py --kernels mosaic --mosaic-attention "${run#*:}" \
    --out $OUT/long_context_$name.json --cells "$CELLS"
  echo "$name rc=$? (t=${SECONDS}s)"
done
} > $OUT/run.log 2>&1
