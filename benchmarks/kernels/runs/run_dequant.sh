#!/bin/bash
# Device call: the dequantize-then-dot W4A16 path against the matmul kernel at prefill-size M.
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 90 python -m pytest -q -p no:cacheprovider -rf tests/test_kernels.py -k "dequant and not lowering" \
  > $OUT/h100_dequant_tests.log 2>&1; tail -3 $OUT/h100_dequant_tests.log
timeout 330 python scripts/bench_kernels.py --models llama3-8b --ms 64,128,256,512,1024,2048,4096 \
  --methods bf16,w4a16_kernel,w4a16_dequant --iters 30 --out $OUT/h100_dequant.json 2>&1 | grep -v -i warn | tail -40
