#!/bin/bash
# Device run 1: compiled kernel-variant tests, tile/variant sweep, one end-to-end throughput probe.
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/gpu.txt 2>&1
timeout 100 python -m pytest -q -x tests/test_kernels.py -k "variants" -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc=$?" >> $OUT/tests.log
timeout 250 python scripts/bench_kernels.py --sweep --models llama3-8b --ms 16,64,256 --projs qkv,gate_up,down \
  --iters 40 --repeats 3 --out $OUT/sweep.json > $OUT/sweep.log 2>&1
echo "sweep rc=$?" >> $OUT/sweep.log
timeout 200 python scripts/bench_throughput.py --presets llama3-8b --batches 16 --modes w4a16,w4a4 --gammas 3 \
  --out $OUT/tp_probe.json > $OUT/tp_probe.log 2>&1
echo "probe rc=$?" >> $OUT/tp_probe.log
tail -3 $OUT/tests.log; grep -c "us  Tiles" $OUT/sweep.log; cat $OUT/tp_probe.log | tail -8
