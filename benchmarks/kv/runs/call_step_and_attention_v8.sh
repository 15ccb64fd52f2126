#!/bin/bash
# Device call (issues 18 and 19) in one start, the device being scarce: (1) the summary step at
# batch 1 and 16 with PyTorch's peers (../../engine/runs/call_summary_step.sh, about 100 s); (2)
# attention v8 against v7 as shipped, batch 16 x 8k and 32k, each config checked against float64
# first (call_attention_v8.sh, with the rest of the call's 580 s; at 04fe9f2 it also ran INT4 at
# value_tokens=64, since reverted). Both write $OUT/run.log, the second appending. Files under $OUT:
# run.log, step.json, attention_v8_int8.json, attention_v8_int4.json.
: "${OUT:?set OUT}"
bash benchmarks/engine/runs/call_summary_step.sh
DEADLINE=$((580 - SECONDS)) bash benchmarks/kv/runs/call_attention_v8.sh
