#!/bin/bash
# Device call: the column-paired layout probe, then the compiled kernel tests (round-half-even fix).
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 330 python benchmarks/kernels/runs/paired_probe.py $OUT/h100_probe_4.json 2>&1 | grep -v -i warn | tail -120
timeout 230 python -m pytest -q -p no:cacheprovider -rf tests/test_kernels.py -k "not lowering" \
  > $OUT/h100_kernel_tests.log 2>&1; tail -5 $OUT/h100_kernel_tests.log
