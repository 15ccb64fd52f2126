#!/usr/bin/env python
"""Decode attention bandwidth (issue 11): our flash-decoding kernel over bf16, INT8 and INT4 KV.

One decode query per row (T = 1), Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim
128), every row at the full context. Each variant is a compiled loop of `iters` calls over one
layer's cache (a batch-16 cache at 8k tokens is 1 GB in bf16: far beyond L2), each call feeding a
tiny fraction of its output back into q. Bytes = what the variant must read (codes, scales and
minimums; bf16 K and V); fraction = bytes / time / the measured memcpy bandwidth. Beside it, jax's
own `jax.experimental.pallas.ops.gpu.decode_attention.gqa` over the same bf16 KV, and XLA's
attention (the einsum path of qspec_jax.model.attention).

  python scripts/bench_attention.py --out benchmarks/kv/h200_attention.json     # GPU
  python scripts/bench_attention.py --smoke --out /tmp/att.json                 # CPU, reference
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.decode_attention import QuantKV, decode_attention  # noqa: E402
from qspec_jax.evaluation import copy_bandwidth, run_metadata  # noqa: E402
from qspec_jax.model import attention as xla_attention  # noqa: E402

H, KV, HD, GROUP = 32, 8, 128, 128


def make_kv(key, B, S, variant):
    ks = jax.random.split(key, 4)
    if variant in ("bf16", "jax_gqa", "xla"):
        k = jax.random.normal(ks[0], (B, KV, S, HD), jnp.bfloat16)
        v = jax.random.normal(ks[1], (B, KV, S, HD), jnp.bfloat16)
        return (k, v), 2 * k.nbytes
    plane = lambda k: jax.random.randint(k, (B, KV, S, HD // 2), 0, 256, jnp.int32).astype(jnp.uint8)  # noqa: E731
    f16 = lambda shape, val: jnp.full(shape, val, jnp.float16)  # noqa: E731
    kv = QuantKV(plane(ks[0]), plane(ks[1]), f16((B, KV, S // GROUP, HD), 0.05), f16((B, KV, S // GROUP, HD), -0.4),
                 plane(ks[2]), plane(ks[3]), f16((B, KV, S), 0.05), f16((B, KV, S), -0.4))
    scales = kv.k_scale.nbytes + kv.k_min.nbytes + kv.v_scale.nbytes + kv.v_min.nbytes
    codes = kv.k_upper.nbytes + kv.v_upper.nbytes
    return kv, scales + (2 * codes if variant == "int8" else codes)


def attend(variant, q, kv, kv_len):
    B = q.shape[0]
    if variant == "jax_gqa":
        from jax.experimental.pallas.ops.gpu.decode_attention import gqa

        k, v = (a.transpose(0, 2, 1, 3) for a in kv)  # jax's layout: [B, S, KV, hd]
        return gqa(q[:, 0], k, v, kv_seq_len=kv_len)[:, None]
    if variant == "xla":
        S = kv[0].shape[2]
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        out = xla_attention(q, kv[0], kv[1], kv_len[:, None] - 1, pos)
        return out.reshape(q.shape)
    return decode_attention(q, kv_len[:, None] - 1, kv, kv_len, variant=variant)


def time_variant(variant, B, S, iters, repeats, backend_ok=True):
    key = jax.random.key(S + B)
    kv, nbytes = make_kv(key, B, S, variant)
    q = jax.random.normal(jax.random.fold_in(key, 7), (B, 1, H, HD), jnp.bfloat16)
    kv_len = jnp.full((B,), S, jnp.int32)

    @jax.jit
    def run(q, kv):
        def body(_, q):
            return q + (attend(variant, q, kv, kv_len) * 1e-4).astype(q.dtype)

        return jax.lax.fori_loop(0, iters, body, q)

    jax.block_until_ready(run(q, kv))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, kv))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / iters, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--variants", default="bf16,int8,int4,jax_gqa,xla")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = args.variants.split(",")
    if args.smoke:
        batches, contexts, variants, args.iters, args.repeats = [1], [256], ["bf16", "int8", "int4", "xla"], 2, 1
    bw = copy_bandwidth(2**24 if args.smoke else 2**30)
    try:
        import torch_peer

        bw = max(bw, torch_peer.copy_bandwidth())
    except Exception:  # no torch or no CUDA: XLA's copy only
        pass
    out = {"meta": {**run_metadata(), "copy_bytes_per_s": bw, "shape": {"heads": H, "kv_heads": KV, "head_dim": HD},
                    "queries_per_row": 1, "argv": sys.argv[1:]}, "cells": []}
    for B in batches:
        for S in contexts:
            for variant in variants:
                try:
                    sec, nbytes = time_variant(variant, B, S, args.iters, args.repeats)
                except Exception as e:  # a peer that does not run here is reported, not fatal
                    print(f"B={B} S={S} {variant}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                cell = {"batch": B, "context": S, "variant": variant, "us": 1e6 * sec, "bytes": nbytes,
                        "frac_copy_bw": nbytes / sec / bw}
                out["cells"].append(cell)
                print(f"B={B} S={S} {variant}: {1e6 * sec:.1f} us, {nbytes / sec / 1e12:.2f} TB/s "
                      f"({cell['frac_copy_bw']:.2f} of copy)", flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
