#!/usr/bin/env python
"""Run each slow kernel a few times, as a target for Nsight Compute (ncu) on the GPU.

The benchmarks say how long the int4 matmul and quantized attention kernels take; ncu says why
(achieved DRAM throughput, occupancy, registers, what the warps stall on). This script only builds
the inputs (Llama-3-8B shapes, fresh random data) and calls each kernel `--calls` times after one
warm-up, one compiled program per kernel; ncu picks the kernels by name:

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none -k regex:'decode_attention|w4a16|gemv' \\
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
      python scripts/ncu_probe.py --calls 1 > $OUT/ncu.txt

(Without XLA_PYTHON_CLIENT_PREALLOCATE=false, ncu saves and restores JAX's whole preallocated pool on
every replay pass: minutes per kernel instead of seconds.)

  python scripts/ncu_probe.py --list        # the probes, no GPU needed

Probes: decode attention (bf16, INT8, INT4 with the default launch knobs; and the Mosaic GPU bodies v1
and v4 to v8 on INT8 / INT4, and each view's shipped config, attention_mosaic.FASTER: ncu -k
regex:'attention_mosaic') at batch 16 x 8k, and the
W4A16 kernels (Triton, and Mosaic GPU's W4A16 and W4A8: ncu -k regex:'mosaic') on the gate_up and
down projections at M = 1 and 16 (Mosaic W4A8 also at 256), beside XLA's dot on `jnp.int4`-style
weights (dequantized in the graph) at M = 16.

The committed ncu reports (benchmarks/kv/h200_ncu_*.txt) came from this script at commit 09cc211,
when it also probed INT8/INT4 with "channels" value planes and took --attention-configs (launch-knob
changes, then including the measurement-only `prefetch` / `swap` / `ablate`); the kernel now has one
value layout ("tokens") and no such knobs, so both are gone.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_attention import H, HD, attend, make_kv  # noqa: E402
from bench_kernels import make_weights, xla_int4_matmul  # noqa: E402
from pallas_kernels import w4a16_matmul  # noqa: E402
from pallas_kernels import int4_mosaic  # noqa: E402

PROJ = {"gate_up": (4096, 2 * 14336), "down": (14336, 4096)}


def attention_probes(B=16, S=8192):
    """One probe per attention variant, each with its DEFAULTS launch."""
    out = []
    for variant in ("bf16", "int8", "int4"):
        def build(variant=variant):
            key = jax.random.key(0)
            kv, _ = make_kv(key, B, S, variant)
            q = jax.random.normal(jax.random.fold_in(key, 1), (B, 1, H, HD), jnp.bfloat16)
            kv_len = jnp.full((B,), S, jnp.int32)
            fn = jax.jit(lambda q, kv: attend(variant, q, kv, kv_len))
            return fn, (q, kv)

        out.append((f"attention_{variant}_{B}x{S}", build))
    return out


def attention_mosaic_probes(B=16, S=8192, version=1, shipped=False):
    """The Mosaic GPU attention (attention_mosaic.py, body `version`) on the quantized views: one
    decode step (T = 1) as bench_attention_mosaic.py times it, the default splits; with shipped=True
    each view's config as the model runs it (attention_mosaic.FASTER)."""
    from bench_attention_mosaic import attend as attend_partials
    from pallas_kernels import attention_mosaic

    out = []
    for variant in ("int8", "int4"):
        knobs = attention_mosaic.FASTER[variant] if shipped else dict(version=version)

        def build(variant=variant, knobs=knobs):
            key = jax.random.key(0)
            kv, _ = make_kv(key, B, S, variant)
            q = jax.random.normal(jax.random.fold_in(key, 1), (B, 1, H, HD), jnp.bfloat16)
            q_pos, kv_len = jnp.full((B, 1), S - 1, jnp.int32), jnp.full((B,), S, jnp.int32)
            fn = jax.jit(lambda q, kv: attend_partials(attention_mosaic.attention_partials, q, q_pos, kv, kv_len,
                                                       variant, **knobs))
            return fn, (q, kv)

        out.append((f"attention_mosaic_{'shipped' if shipped else f'v{version}'}_{variant}_{B}x{S}", build))
    return out


def matmul_probes():
    out = []
    for proj, (K, N) in PROJ.items():
        for M, method in ((1, "w4a16"), (16, "w4a16"), (16, "xla_int4")):
            def build(K=K, N=N, M=M, method=method):
                key = jax.random.key(K + M)
                (w,) = make_weights(key, K, N, 128, 1, int4=True)
                x = jax.random.normal(jax.random.fold_in(key, 1), (M, K), jnp.bfloat16)
                f = xla_int4_matmul if method == "xla_int4" else w4a16_matmul
                return jax.jit(f), (x, w)

            out.append((f"{method}_{proj}_M{M}", build))
    return out


def mosaic_probes():
    """The Mosaic GPU int4 kernels (sm_90) at their default tiles (choose_tiles), and W4A8 at M = 256
    (a verify pass of 64 rows at gamma 3), where it is no faster than W4A16."""
    out = []
    for proj, (K, N) in PROJ.items():
        for M, mode in [(M, mode) for M in (1, 16) for mode in ("w4a16", "w4a8")] + [(256, "w4a8")]:
            def build(K=K, N=N, M=M, mode=mode):
                key = jax.random.key(K + M)
                (w,) = make_weights(key, K, N, 128, 1, int4=True)
                mw = int4_mosaic.to_mosaic_layout(w)
                x = jax.random.normal(jax.random.fold_in(key, 1), (M, K), jnp.bfloat16)
                return jax.jit(lambda x, mw: int4_mosaic.mosaic_matmul(x, mw, mode)), (x, mw)

            out.append((f"mosaic_{mode}_{proj}_M{M}", build))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2, help="profiled calls per probe after one warm-up")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching probes")
    ap.add_argument("--list", action="store_true", help="print the probe names and exit")
    args = ap.parse_args(argv)
    from pallas_kernels.attention_mosaic import FOLDED, VERSIONS

    bodies = [p for n in VERSIONS if n not in FOLDED for p in attention_mosaic_probes(version=n)]  # v2 / v3: 32 rows
    bodies += attention_mosaic_probes(shipped=True)
    probes = attention_probes() + bodies + matmul_probes() + mosaic_probes()
    if args.only:
        probes = [(n, b) for n, b in probes if any(s in n for s in args.only.split(","))]
    for name, build in probes:
        if args.list:
            print(name)
            continue
        fn, inputs = build()
        jax.block_until_ready(fn(*inputs))  # compile + warm-up
        for _ in range(args.calls):
            jax.block_until_ready(fn(*inputs))
        print(f"probe done: {name}", flush=True)
        del fn, inputs


if __name__ == "__main__":
    main()
