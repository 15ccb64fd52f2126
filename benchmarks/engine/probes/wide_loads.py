#!/usr/bin/env python
"""The Mosaic kernels' step structure on the GPU (issue 18): W4A16's int4 tile read into registers a
byte at a time (what layout inference chose) against 32-bit words (`int4_mosaic.WIDE_WEIGHT_LOADS`),
and 1, 2 or 4 weight groups per pipeline step (`MosaicTiles.groups`), W4A16 on every Llama-3-8B
projection and W4A8 at decode sizes. Checks variants against float64 at a small shape first. CUPTI
times over rotating weight copies larger than L2.

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
from pallas_kernels import int4_mosaic  # noqa: E402
from pallas_kernels.int4_mosaic import (  # noqa: E402
    MosaicTiles, choose_tiles, supported, w4a8_mosaic, w4a16_mosaic,
)
from pallas_kernels.w4a4 import w4a4_reference  # noqa: E402


def candidates(M, N, K):
    """(wide loads, tiles): the rule's tiles with byte loads, then with word loads at 1, 2 and 4
    groups a step, twice the split at 2 groups, and the carried body (M >= 64) at 1 and 2."""
    base = choose_tiles(M, N, K, K // bm.GROUP)
    cands = [(False, base), (True, base)]
    cands += [(True, dataclasses.replace(base, groups=g)) for g in (2, 4)]
    cands.append((True, dataclasses.replace(base, split=base.split * 2, groups=2)))
    if M >= 64:
        cands += [(True, dataclasses.replace(base, carry=True, groups=g)) for g in (1, 2)]
    return [(w, t) for i, (w, t) in enumerate(cands)
            if (w, t) not in cands[:i] and not supported(M, N, K, K // bm.GROUP, t)]


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
    for wide in (False, True):  # float64 checks at a small shape, every body
        int4_mosaic.WIDE_WEIGHT_LOADS = wide
        jax.clear_caches()
        for M, tiles in ((1, MosaicTiles()), (5, MosaicTiles(split=2, groups=2)), (33, MosaicTiles(stages=2)),
                         (128, MosaicTiles(rows=128, stages=2, carry=True, groups=2))):
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
            out["check"].append({"wide": wide, "M": M, "tiles": str(tiles), "rel_err": err})
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
            for wide, t in candidates(M, N, K):
                if int4_mosaic.WIDE_WEIGHT_LOADS != wide:
                    int4_mosaic.WIDE_WEIGHT_LOADS = wide
                    jax.clear_caches()
                fn = lambda x, w, t=t: w4a16_mosaic(x, w, tiles=t)  # noqa: E731
                row = {"proj": proj, "M": M, "mode": "w4a16", "wide": wide, "tiles": str(t),
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
