#!/bin/bash
# Device call (issue 19): with v8 switched on (attention_mosaic.FASTER: INT4 at 128-token steps and
# INT8 at 3 splits, 8 query columns), (1) G2 at 16 x 32k: W4A16 on the INT8 cache against QSpec W4A8
# on it; (2) G3 at 4 x 32k: QuantSpec against bf16 (first time with the Mosaic attention there;
# both call_long_context_32k.sh, 200 s a shape); (3) v7 against v8 again, each timed as
# decode_attention now calls it (the real query rows to the Mosaic kernel; the previous call's
# attend_us padded them to 16), with the rest of the call's time (call_attention_v8.sh).
# About 7 min. Files under $OUT: run.log, long_context_32k.json, attention.log,
# attention_v8_int8.json, attention_v8_int4.json.
: "${OUT:?set OUT}"
SHAPES="16x32768 4x32768" LIMIT=200 bash benchmarks/kv/runs/call_long_context_32k.sh
CONFIGS="int8:2:1.5 int4:2:1:128" DEADLINE=$((500 - SECONDS)) LOG=$OUT/attention.log \
  bash benchmarks/kv/runs/call_attention_v8.sh
echo "attention done (t=${SECONDS}s)" >> $OUT/run.log
