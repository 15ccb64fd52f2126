#!/usr/bin/env python
"""The Mosaic kernels' step structure on the GPU (issue 18): 1, 2 or 4 weight groups per pipeline
step (`MosaicTiles.groups`) and split-K around them, W4A16 on every Llama-3-8B projection and W4A8
at decode sizes. Checks variants against float64 at a small shape first. CUPTI times over rotating
weight copies larger than L2. (At b2b3e53 it also compared W4A16's byte-wise weight loads with
32-bit ones, an `int4_mosaic.WIDE_WEIGHT_LOADS` switch since removed: the committed
benchmarks/engine/h100_step_structure.json rows carry "wide".)

  python benchmarks/engine/probes/wide_loads.py --out $OUT/wide_loads.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_mosaic as bm  # noqa: E402
from pallas_kernels.int4_mosaic import (  # noqa: E402
    MosaicTiles, choose_tiles, supported, w4a8_mosaic, w4a16_mosaic,
)
from pallas_kernels.w4a4 import w4a4_reference  # noqa: E402


def candidates(M, N, K):
    """The rule's tiles at 1, 2 and 4 groups a step, twice the split at 2 groups, and the carried
    body (M >= 64) at 1 and 2."""
    base = choose_tiles(M, N, K, K // bm.GROUP)
    cands = [dataclasses.replace(base, groups=g) for g in (1, 2, 4)]
    cands.append(dataclasses.replace(base, split=base.split * 2, groups=2))
    if M >= 64:
        cands += [dataclasses.replace(base, carry=True, groups=g) for g in (1, 2)]
    return [t for i, t in enumerate(cands) if t not in cands[:i] and not supported(M, N, K, K // bm.GROUP, t)]


def record(out, row, K, N):
    row["weight_bytes"] = K * N // 2 + (K // bm.GROUP) * N * 4
    if "kernel_us" in row:
        row["frac_copy_bw"] = row["weight_bytes"] / (row["kernel_us"] * 1e-6) / out["meta"]["copy_bw_Bps"]
    out["cells"].append(row)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,16,64,128")
    ap.add_argument("--projections", default="gate_up,down,qkv,o")
    args = ap.parse_args()
    import torch_peer

    out = {"meta": {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "copy_bw_Bps": torch_peer.copy_bandwidth(), "timing": "cupti"},
           "check": [], "cells": [], "errors": {}}
    print(out["meta"], flush=True)
    key = jax.random.key(0)
    # float64 checks at a small shape, every body
    for M, tiles in ((1, MosaicTiles()), (5, MosaicTiles(split=2, groups=2)), (33, MosaicTiles(stages=2)),
                     (128, MosaicTiles(stages=2, carry=True, groups=2))):
        K, N = 1024, 512
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, M), 3)
        q = jax.random.randint(k1, (K, N), -8, 8, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(k2, (K // bm.GROUP, N), jnp.float32, 0.5, 1.5) / 64
        x = jax.random.normal(k3, (M, K), jnp.bfloat16)
        mw = {"w": q.T.astype(jnp.int4), "scales": s}
        try:
            err = bm.rel_err(w4a16_mosaic(x, mw, tiles=tiles), bm.reference64(x, q, s))
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:200]}"
        out["check"].append({"M": M, "tiles": str(tiles), "rel_err": err})
        print(out["check"][-1], flush=True)
    for proj in args.projections.split(","):
        K, N = bm.PROJECTIONS[proj]
        copies = max(2, -(-2 * bm.L2_BYTES // (K * N // 2)))
        both = bm.make_weights(jax.random.fold_in(key, K + N), K, N, copies)
        ws, ws_packed = [w["mosaic"] for w in both], [w["packed"] for w in both]
        del both
        for M in map(int, args.ms.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            ref = np.asarray(bm.device_reference(x, ws[0]), np.float64)
            for t in candidates(M, N, K):
                fn = lambda x, w, t=t: w4a16_mosaic(x, w, tiles=t)  # noqa: E731
                row = {"proj": proj, "M": M, "mode": "w4a16", "tiles": str(t),
                       **bm.time_kernel(out, fn, x, ws, ref)}
                record(out, row, K, N)
            if M <= 16 and proj in ("gate_up", "down"):  # the draft's kernel: 1 and 2 groups a step, split x 2
                ref8 = np.asarray(w4a4_reference(x, ws_packed[0], act_bits=8).astype(jnp.float32), np.float64)
                base = choose_tiles(M, N, K, K // bm.GROUP, 1)
                tried = [base, dataclasses.replace(base, groups=2),
                         dataclasses.replace(base, split=2 * base.split, groups=2)]
                for t in [t for i, t in enumerate(tried) if t not in tried[:i]
                          and not supported(M, N, K, K // bm.GROUP, t, 1)]:
                    fn = lambda x, w, t=t: w4a8_mosaic(x, w, tiles=t)  # noqa: E731
                    row = {"proj": proj, "M": M, "mode": "w4a8", "tiles": str(t),
                           **bm.time_kernel(out, fn, x, ws, ref8)}
                    record(out, row, K, N)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
