#!/usr/bin/env python
"""Decode attention bandwidth (issue 11): our flash-decoding kernel over bf16, INT8 and INT4 KV.

One decode query per row (T = 1), Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim
128), every row at the full context. Each variant is a compiled loop of `iters` calls over one
layer's cache (a batch-16 cache at 8k tokens is 1 GB in bf16: far beyond L2), each call feeding a
tiny fraction of its output back into q. Bytes = what the variant must read (codes, scales and
minimums; bf16 K and V); fraction = bytes / time / the measured memcpy bandwidth. Beside it, jax's
own `jax.experimental.pallas.ops.gpu.decode_attention.gqa` over the same bf16 KV, and XLA's
attention (the einsum path of qspec_jax.kv_cache.attention). INT8 / INT4 planes are built in the layout
the hierarchical cache stores (value planes transposed, `decode_attention.V_LAYOUT`).

  python scripts/bench_attention.py --out benchmarks/kv/h200_attention.json     # GPU
  python scripts/bench_attention.py --smoke --out /tmp/att.json                 # CPU, reference

--sweep times our kernel's launch knobs instead (block_k, programs per SM, warps, stages, how codes
are unpacked; pallas_kernels/decode_attention.py DEFAULTS): a one-factor-at-a-time
grid around one center per quantized variant plus the current defaults, and a few bf16 cells, every
config at every context (default batch 16 x 8k and 32k). Each cell records its config, us and
frac_copy_bw; "best" keeps the fastest config per variant and context and by geometric mean over
the contexts (the DEFAULTS candidate). With --smoke it runs two configs per variant in interpret
mode on CPU (a path check: its times mean nothing).

  python scripts/bench_attention.py --sweep --out $OUT/attention_sweep.json     # GPU, ~3 min
  python scripts/bench_attention.py --sweep --smoke --out /tmp/sweep.json       # CPU path check

The committed results under benchmarks/kv/ (h200_attention*.json, h200_attention_sweep.json, the
--diagnose and --vlayout runs) came from this script at commit 09cc211, when the kernel still had the
measurement-only knobs `prefetch`, `swap`, `ablate` and a "channels" value layout, and this script
the modes --diagnose (stage ablations, swapped dot operands) and --vlayout (channels vs tokens value
planes). Those knobs and modes are gone: the measured winners (no prefetch, no swap, "tokens") are the
kernel's only form. Rerun that commit to reproduce those files.
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

from pallas_kernels.decode_attention import DEFAULTS, V_LAYOUT, QuantKV, decode_attention  # noqa: E402
from bandwidth import best_copy_bandwidth  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402
from qspec_jax.kv_cache import attention as xla_attention  # noqa: E402

H, KV, HD, GROUP = 32, 8, 128, 128


def make_kv(key, B, S, variant):
    """(kv, bytes the variant reads); quantized value planes are [B, KV, hd/2, S] (V_LAYOUT)."""
    ks = jax.random.split(key, 4)
    if variant in ("bf16", "jax_gqa", "xla"):
        k = jax.random.normal(ks[0], (B, KV, S, HD), jnp.bfloat16)
        v = jax.random.normal(ks[1], (B, KV, S, HD), jnp.bfloat16)
        return (k, v), 2 * k.nbytes
    def plane(k, shape=(B, KV, S, HD // 2)):
        return jax.random.randint(k, shape, 0, 256, jnp.int32).astype(jnp.uint8)

    v_shape = (B, KV, HD // 2, S)
    f16 = lambda shape, val: jnp.full(shape, val, jnp.float16)  # noqa: E731
    kv = QuantKV(plane(ks[0]), plane(ks[1]), f16((B, KV, S // GROUP, HD), 0.05), f16((B, KV, S // GROUP, HD), -0.4),
                 plane(ks[2], v_shape), plane(ks[3], v_shape), f16((B, KV, S), 0.05), f16((B, KV, S), -0.4))
    scales = kv.k_scale.nbytes + kv.k_min.nbytes + kv.v_scale.nbytes + kv.v_min.nbytes
    codes = kv.k_upper.nbytes + kv.v_upper.nbytes
    return kv, scales + (2 * codes if variant == "int8" else codes)


def attend(variant, q, kv, kv_len, **knobs):
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
    return decode_attention(q, kv_len[:, None] - 1, kv, kv_len, variant=variant, **knobs)


def time_variant(variant, B, S, iters, repeats, kv=None, knobs=None):
    """(seconds per call, bytes read) of one variant; kv: (planes, bytes) from make_kv to reuse."""
    key = jax.random.key(S + B)
    knobs = dict(knobs or {})
    if kv is None:
        kv = make_kv(key, B, S, variant)
    kv, nbytes = kv
    q = jax.random.normal(jax.random.fold_in(key, 7), (B, 1, H, HD), jnp.bfloat16)
    kv_len = jnp.full((B,), S, jnp.int32)

    @jax.jit
    def run(q, kv):
        def body(_, q):
            return q + (attend(variant, q, kv, kv_len, **knobs) * 1e-4).astype(q.dtype)

        return jax.lax.fori_loop(0, iters, body, q)

    jax.block_until_ready(run(q, kv))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, kv))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / iters, nbytes


# The sweep: one center per quantized variant (bigger blocks, more programs, PTX unpacking), each
# knob moved alone from it, one cell with smaller blocks and a deeper pipeline, and the current
# DEFAULTS as the baseline. (At commit 09cc211 the center also prefetched into registers.)
CENTER = dict(block_k=256, programs_per_sm=4, num_warps=4, num_stages=2, unpack="asm")
AXES = [("block_k", (128, 512)), ("programs_per_sm", (2, 8)), ("num_warps", (8,)), ("num_stages", (1, 3)),
        ("unpack", ("bits", "convert"))]
PIPELINER = [dict(num_stages=3, block_k=128)]


def sweep_configs(variant):
    """The launch configs (decode_attention keyword arguments) the sweep times for a variant."""
    base = dict(DEFAULTS[variant])
    if variant == "bf16":
        configs = [base, {**base, "programs_per_sm": 4}, {**base, "num_stages": 3}, {**base, "num_warps": 8}]
    else:
        configs = [base, dict(CENTER)] + [{**CENTER, name: v} for name, values in AXES for v in values]
        configs += [{**CENTER, **change} for change in PIPELINER]
    unique = []
    for c in configs:
        if c not in unique:
            unique.append(c)
    return unique


def sweep(args, bw, out):
    """Time every sweep config of bf16 / int8 / int4 at every (batch, context); record the best."""
    B = [int(b) for b in args.batches.split(",")][0]
    contexts = [int(c) for c in args.contexts.split(",")]
    variants, extra = ["bf16", "int8", "int4"], {}
    if args.smoke:  # interpret mode on CPU, two configs per variant: the path runs, times mean nothing
        B, contexts, args.iters, args.repeats, extra = 1, [256], 1, 1, {"backend": "interpret"}
    if args.configs:  # changes to DEFAULTS, timed for the kernel variants --variants names
        variants = [v for v in ("bf16", "int8", "int4") if v in args.variants.split(",")]
        plan = {v: [{**DEFAULTS[v], **c} for c in [{}] + json.loads(args.configs)] for v in variants}
    else:
        plan = {v: sweep_configs(v) for v in variants}
    plan = {v: c[: 2 if args.smoke else None] for v, c in plan.items()}
    total, done = len(contexts) * sum(len(c) for c in plan.values()), 0
    out["meta"]["sweep"] = {"center": CENTER, "defaults": DEFAULTS}
    for S in contexts:
        for variant in variants:
            kv = make_kv(jax.random.key(S + B), B, S, variant)
            for config in plan[variant]:
                done += 1
                label = f"[{done}/{total}] B={B} S={S} {variant} {config}"
                try:
                    sec, nbytes = time_variant(variant, B, S, args.iters, args.repeats, kv=kv,
                                               knobs={**config, **extra})
                except Exception as e:  # a config that does not compile is reported, not fatal
                    print(f"{label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                cell = {"batch": B, "context": S, "variant": variant, "config": config, "us": 1e6 * sec,
                        "bytes": nbytes, "frac_copy_bw": nbytes / sec / bw}
                out["cells"].append(cell)
                print(f"{label}: {cell['us']:.1f} us, {cell['frac_copy_bw']:.2f} of copy", flush=True)
                out["best"] = best_configs(out["cells"], contexts)
                write(args.out, out)
            del kv
    for variant, best in out.get("best", {}).items():
        print(f"best {variant}: {best}", flush=True)
    return out


def best_configs(cells, contexts):
    """Per variant: the fastest config at each context, and the one with the smallest geometric
    mean time over all contexts (among configs that ran at every context)."""
    best = {}
    for variant in sorted({c["variant"] for c in cells}):
        mine = [c for c in cells if c["variant"] == variant]
        entry = {f"S={S}": min((c for c in mine if c["context"] == S), key=lambda c: c["us"], default=None)
                 for S in contexts}
        entry = {k: {"config": c["config"], "us": c["us"], "frac_copy_bw": c["frac_copy_bw"]}
                 for k, c in entry.items() if c is not None}
        scores = []
        for config in [c["config"] for c in mine if c["context"] == contexts[0]]:
            us = [c["us"] for c in mine if c["config"] == config]
            if len(us) == len(contexts):
                scores.append((float(np.exp(np.mean(np.log(us)))), config))
        if scores:
            geo, config = min(scores, key=lambda s: s[0])
            entry["geomean"] = {"config": config, "us_geomean": geo}
        best[variant] = entry
    return best


def write(path, out):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--variants", default="bf16,int8,int4,jax_gqa,xla")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time our kernel's launch knobs (module docstring)")
    ap.add_argument("--configs", help="with --sweep: a JSON list of changes to DEFAULTS (e.g. '[{\"num_warps\": 8}]'), "
                    "timed with the defaults instead of the built-in grid, for the kernel variants of --variants "
                    "(bf16, int8, int4; `splits` and `block_k` are keys too)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = args.variants.split(",")
    if args.smoke and not args.sweep:
        batches, contexts, variants, args.iters, args.repeats = [1], [256], ["bf16", "int8", "int4", "xla"], 2, 1
    bw, _ = best_copy_bandwidth(args.smoke)
    out = {"meta": {**run_metadata(), "copy_bytes_per_s": bw, "shape": {"heads": H, "kv_heads": KV, "head_dim": HD},
                    "queries_per_row": 1, "quantized_v_layout": V_LAYOUT, "argv": sys.argv[1:] if argv is None else argv}, "cells": []}
    if args.sweep:
        return sweep(args, bw, out)
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
                write(args.out, out)
    return out


if __name__ == "__main__":
    main()
