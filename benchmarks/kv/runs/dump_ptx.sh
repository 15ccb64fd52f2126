#!/bin/bash
# Part of a device call: the PTX and ptxas report of the kernels ncu_probe.py's probes matching $1
# (e.g. attention_mosaic_v5), packed as $OUT/dump.tar.gz; read it with scripts/ptx_mix.py.
mkdir -p $OUT/dump
MOSAIC_GPU_DUMP_TO=$OUT/dump MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 \
  timeout 60 python3 scripts/ncu_probe.py --calls 1 --only "$1"
echo "dump rc=$? (t=${SECONDS}s)"
rm -f $OUT/dump/*mlir-passes.log
tar czf $OUT/dump.tar.gz -C $OUT dump && rm -rf $OUT/dump
