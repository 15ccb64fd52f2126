"""GPU check and timing of a rotated model's online transform: the one-launch Pallas Triton kernel
(pallas_kernels.hadamard) against XLA's two GEMMs, at Llama-3-8B's o_proj (4096) and down_proj
(14336) inputs and decode / verify row counts. Each path is checked against the dense float64
matrix and timed by CUPTI (every kernel of one call, summed; median of iterations).

    python benchmarks/engine/probes/hadamard.py --out $OUT/hadamard.json

Exits 1 if the kernel fails or misses float64 by more than bf16 rounding, so a device script can
fall back to the XLA path (bench_engine.py --step-variants xla_rotation) for the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import hadamard  # noqa: E402
from qspec_jax import rotation  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402


def cupti_us(fn, x, iterations=20):
    """(us of one call, all its kernels summed; kernel launches per call), median over iterations."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(jax.jit(fn), aggregate=False, iterations=iterations)(x)
    return 1e3 * statistics.median(sum(t for _, t in it) for it in timings), len(timings[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="4096,14336")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {"meta": {**run_metadata(), "timing": "cupti, kernels of one call summed"}, "cells": []}
    ok, default_bc = True, hadamard.BLOCK_COLS
    for n in map(int, args.widths.split(",")):
        r = jnp.asarray(rotation.small_factor(n))
        dense = rotation.online_matrix(n, r).astype(np.float64)
        for rows in map(int, args.rows.split(",")):
            x = jax.random.normal(jax.random.key(rows * n), (rows, n), jnp.bfloat16)
            want = np.asarray(x, np.float64) @ dense
            cell = {"n": n, "rows": rows}
            for path, backend, bc in (("kernel", "auto", hadamard.BLOCK_COLS), ("kernel_bc32", "auto", 32),
                                      ("kernel_bc16", "auto", 16), ("xla", "reference", None)):
                rotation.KERNEL_BACKEND = backend
                hadamard.BLOCK_COLS = bc or hadamard.BLOCK_COLS
                fn = lambda x: rotation.online_transform(x, r)  # noqa: E731 - traced under this backend
                try:
                    y = np.asarray(jax.jit(fn)(x), np.float64)
                    err = float(np.abs(y - want).max() / np.abs(want).max())
                    us, launches = cupti_us(fn, x)
                    cell[path] = {"us": us, "launches": launches, "rel_err": err}
                    ok &= not path.startswith("kernel") or err < 1e-2
                except Exception as e:  # noqa: BLE001 - record and go on
                    traceback.print_exc()
                    cell[path] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    ok &= not path.startswith("kernel")
            rotation.KERNEL_BACKEND, hadamard.BLOCK_COLS = "auto", default_bc
            out["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
