#!/usr/bin/env python
"""Benchmark the int4 matmul kernels against XLA on Llama projection shapes (run on the GPU).

For each projection (K, N) and batch M it times, as compiled programs:
  bf16      XLA dot with bf16 weights
  xla_int4  XLA on int4 weights dequantized in the graph (jnp unpack + convert + scale, then dot)
  w4a16     our W4A16 Pallas kernel (w4a16_kernel / w4a16_dequant: the matmul kernel, or the
            dequantize-then-XLA-dot path, forced at every M)
  w4a4      our W4A4 kernel (4-bit activations);  w4a8: the same with 8-bit activations
Each timing is one jitted lax.fori_loop calling the matmul about `iters` times over a rotating set
of weight copies larger than the 50 MB L2 (separate buffers, called in turn: see time_loop), each
call feeding a tiny fraction of its output back into x so nothing is hoisted; median of `repeats`
runs after a warm-up. The feedback adds one small fused op per call to every method alike.

Per cell: us per call, achieved weight bandwidth (4-bit bytes + scales over time; bf16 bytes for
bf16), the 4-bit weight-byte floor at 3.35 TB/s, ratios vs bf16 and vs w4a16, and each kernel's
relative error vs the reference backend on the same inputs. JSON goes to --out.

  python scripts/bench_kernels.py --out benchmarks/kernels_h100.json           # full (~4 min)
  python scripts/bench_kernels.py --quick --out /tmp/k.json                    # subset
  python scripts/bench_kernels.py --smoke                                      # CPU, tiny, reference

The committed sweeps and probes under benchmarks/kernels/ (h100_tile_sweep.json,
h100_variant_sweep.json, h100_probe_*.json, runs/kernel_probe.py) came from commit 09cc211, when
Tiles still had `atomic` (split-K partial sums added atomically) and `fuse_quant` (W4A4 quantizing
its activations inside the matmul). Neither was ever chosen by choose_tiles and both are gone, so
--sweep no longer tries them; rerun that commit to reproduce those files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from qspec_jax.evaluation import copy_bandwidth, git_commit  # noqa: E402
from pallas_kernels import (  # noqa: E402
    Tiles,
    choose_tiles,
    pack_block,
    quantize_weight,
    unpack_int4,
    w4a4_matmul,
    w4a16_matmul,
)

HBM_BPS = 3.35e12  # H100 SXM peak
L2_BYTES = 50 * 2**20
# Each rotating weight set holds at least this much: cycling through more than the L2 holds
# leaves (nearly) nothing for an LRU cache to hit, and fewer copies mean fewer kernel call sites
# to compile.
ROTATE_BYTES = 64 * 2**20

MODELS = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128),
    "llama2-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128),
    "tiny": dict(hidden=256, inter=512, heads=4, kv_heads=2, head_dim=64),  # --smoke
}
METHODS = ("bf16", "xla_int4", "w4a16", "w4a4", "w4a8")
M_FULL = (1, 8, 16, 32, 64, 128, 256)
M_QUICK = (1, 16, 64, 256)


def projections(cfg: dict, separate: bool) -> list[tuple[str, int, int]]:
    """(name, K, N) of one decoder layer's projections, fused (qkv, gate_up) or separate."""
    d, f, hd = cfg["hidden"], cfg["inter"], cfg["head_dim"]
    q, kv = cfg["heads"] * hd, cfg["kv_heads"] * hd
    if separate:
        return [("q", d, q), ("k", d, kv), ("o", q, d), ("gate", d, f), ("down", f, d)]
    return [("qkv", d, q + 2 * kv), ("o", q, d), ("gate_up", d, 2 * f), ("down", f, d)]


def int4_bytes(K: int, N: int, G: int) -> int:
    return K * N // 2 + G * N * 4


def xla_int4_matmul(x, qw):
    """What plain JAX does with int4 weights: dequantize in the graph, then a bf16 dot."""
    K, N = 2 * qw["packed"].shape[0], qw["packed"].shape[1]
    G = qw["scales"].shape[0]
    q = unpack_int4(qw["packed"], pack_block(K, G)).astype(jnp.bfloat16).reshape(G, K // G, N)
    w = (q * qw["scales"].astype(jnp.bfloat16)[:, None, :]).reshape(K, N)
    return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32).astype(x.dtype)


def method_fn(method: str, backend: str, tiles=None):
    if method == "noop":  # only the loop and the feedback op: the per-call overhead floor
        return lambda x, w: x
    if method == "bf16":
        return lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if method == "xla_int4":
        return xla_int4_matmul
    if method == "w4a16":
        return lambda x, w: w4a16_matmul(x, w, backend=backend, tiles=tiles)
    if method in ("w4a16_kernel", "w4a16_dequant"):  # each W4A16 path forced, whatever the M
        def fn(x, w):
            K, N, G = 2 * w["packed"].shape[0], w["packed"].shape[1], w["scales"].shape[0]
            t = tiles or choose_tiles(x.shape[0], N, K, pack_block(K, G), "w4a16")
            t = dataclasses.replace(t, dequant=method == "w4a16_dequant")
            return w4a16_matmul(x, w, backend=backend, tiles=t)
        return fn
    bits = 4 if method == "w4a4" else 8
    return lambda x, w: w4a4_matmul(x, w, act_bits=bits, backend=backend, tiles=tiles)


def sweep_tiles(M: int, K: int, N: int, pb: int, kind: str) -> list[Tiles]:
    """Candidate launch configurations around the default choice (first), for --sweep."""
    auto = choose_tiles(M, N, K, pb, kind)
    nblocks = K // pb
    rep = dataclasses.replace
    cands = [auto]
    cands += [rep(auto, unroll=unroll) for unroll in (1, 2, 4)]
    for split in (2 * auto.split, 4 * auto.split):
        cands += [rep(auto, split=split), rep(auto, split=split, unroll=2)]
    cands += [rep(auto, unroll=2, num_stages=st) for st in (2, 5)]
    cands += [rep(auto, unroll=2, bn=bn) for bn in (64, 256) if bn != auto.bn]
    if M > 16:
        cands += [rep(auto, unroll=2, bm=bm, num_warps=8 if bm >= 128 else 4)
                  for bm in (16, 32, 64, 128) if bm != auto.bm and bm <= max(16, M)]
    if kind == "w4a16":
        cands += [rep(auto, swap=True), rep(auto, swap=True, unroll=2)]
        # bit-built dequantization, and gemlite's decode configs (16x64 tiles, deep split-K, 1 stage)
        cands += [rep(auto, bias_dequant=True), rep(auto, bias_dequant=True, unroll=2)]
        cands += [rep(auto, bm=16, bn=64, split=s, num_stages=1, bias_dequant=b)
                  for s in (8, 16) for b in (False, True) if M <= 16]
    out = []
    for t in cands:
        if t in out or nblocks % t.split or (nblocks // t.split) % t.unroll:
            continue
        out.append(t)
    return out


def run_sweep(args, models, ms, backend, key, rotate) -> list[dict]:
    """Time w4a16 and w4a4 over sweep_tiles for each cell; print the best few."""
    rows = []
    for model in models:
        for proj, K, N in projections(MODELS[model], args.separate):
            if args.projs and proj not in args.projs.split(","):
                continue
            G = 1 if args.group_size == -1 else K // args.group_size
            pb = pack_block(K, G)
            wbytes = int4_bytes(K, N, G)
            copies = max(2, math.ceil(rotate / wbytes))
            ws = make_weights(jax.random.fold_in(key, K * 7 + N), K, N, args.group_size, copies,
                              True)
            for M in ms:
                x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
                noop = time_loop(method_fn("noop", backend), x, ws, args.iters, args.repeats)
                for m in args.kinds.split(","):
                    res = []
                    cands = sweep_tiles(M, K, N, pb, m)
                    for t in cands:
                        try:
                            sec = time_loop(method_fn(m, backend, t), x, ws, args.iters,
                                            args.repeats)
                        except Exception as e:  # a config the compiler rejects
                            print(f"  {t}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                            continue
                        res.append((sec * 1e6, t))
                        rows.append({"model": model, "proj": proj, "K": K, "N": N, "M": M,
                                     "method": m, "us": sec * 1e6, "noop_us": noop * 1e6,
                                     "tiles": dataclasses.asdict(t), "default": t == cands[0]})
                    res.sort(key=lambda r: r[0])
                    default_us = next((u for u, t in res if t == cands[0]), float("nan"))
                    print(f"{model} {proj} K={K} N={N} M={M} {m}: default {default_us:.1f} us, "
                          f"noop {noop * 1e6:.1f} us, floor {wbytes / HBM_BPS * 1e6:.1f} us",
                          flush=True)
                    for u, t in res[:5]:
                        print(f"    {u:7.1f} us  {t}", flush=True)
                    if args.out:  # after every cell: a cut-off run keeps its data
                        write_json(args.out, {"sweep": rows})
            del ws
    return rows


def make_weights(key, K: int, N: int, group_size: int, copies: int, int4: bool) -> list:
    """`copies` separate random weights: bf16 [K, N] arrays or int4 dicts."""
    quant = jax.jit(quantize_weight, static_argnums=1)
    ws = []
    for i in range(copies):
        w = jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.float32) * 0.02
        ws.append(quant(w, group_size) if int4 else w.astype(jnp.bfloat16))
        del w
    return ws


COMPILE_S = [0.0]  # seconds spent in first calls (compile + one run), for the report


def time_loop(fn, x0, weights: list, iters: int, repeats: int) -> float:
    """Median seconds per call of fn inside one compiled fori_loop over the rotating weights.

    The weights are separate buffers called in turn by a static Python loop inside the loop body:
    indexing a stacked array with the loop counter (dynamic_index_in_dim) makes XLA copy the
    selected weight into a fresh buffer before a custom call or a cuBLAS dot can read it, which
    triples the weight traffic and swamps what is measured.
    """
    copies = len(weights)
    outer = max(1, round(iters / copies))
    K = x0.shape[1]

    @jax.jit
    def run(x, ws):
        def body(_, x):
            for w in ws:
                y = fn(x, w)
                n = min(K, y.shape[1])
                x = x.at[:, :n].add((y[:, :n] * 1e-4).astype(x.dtype))  # serial dependence
            return x

        return lax.fori_loop(0, outer, body, x)

    t = time.perf_counter()
    run(x0, weights).block_until_ready()  # compile and warm up
    COMPILE_S[0] += time.perf_counter() - t
    run(x0, weights).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x0, weights).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / (outer * copies)


def rel_errors(x, w, backend: str) -> dict:
    """Each kernel vs the reference backend on the same inputs (relative Frobenius error)."""

    @jax.jit
    def errs(x, w):
        out = {}
        for m in ("w4a16", "w4a4", "w4a8"):
            y = method_fn(m, backend)(x, w).astype(jnp.float32)
            r = method_fn(m, "reference")(x, w).astype(jnp.float32)
            out[m] = jnp.linalg.norm(y - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30)
        return out

    return {k: float(v) for k, v in errs(x, w).items()}


def write_json(path: str, payload: dict) -> None:
    """Write payload with the device, jax version and commit beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    head = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "commit": git_commit()}
    with open(path, "w") as f:
        json.dump({**head, **payload}, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="JSON result path")
    p.add_argument("--quick", action="store_true", help="llama3-8b only, M in 1,16,64,256")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, reference backend")
    p.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    p.add_argument("--ms", default=None, help="comma list of batch sizes M")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--group-size", type=int, default=128, help="-1: per channel")
    p.add_argument("--separate", action="store_true", help="q, k, o, gate, down unfused")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="kernel backend (auto: triton on GPU)")
    p.add_argument("--check-all", action="store_true",
                   help="kernel-vs-reference errors for every M (default: the smallest M only; each check\n"
                        "compiles one more program, ~5 s on the H100)")
    p.add_argument("--sweep", action="store_true",
                   help="time w4a16/w4a4 over candidate tiles instead of the method table")
    p.add_argument("--projs", default=None, help="with --sweep: comma list of projection names")
    p.add_argument("--kinds", default="w4a16,w4a4", help="with --sweep: kernels to sweep")
    args = p.parse_args(argv)

    backend, rotate = args.backend, ROTATE_BYTES
    if args.smoke:
        models, ms = ["tiny"], (1, 5)
        backend, rotate = "reference", 2**18
        args.iters, args.repeats = 5, 2
    else:
        models = ["llama3-8b"] if args.quick else ["llama3-8b", "llama2-7b"]
        ms = M_QUICK if args.quick else M_FULL
    if args.models:
        models = args.models.split(",")
    if args.ms:
        ms = tuple(int(m) for m in args.ms.split(","))
    methods = args.methods.split(",")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"kernel backend {backend}, group_size {args.group_size}", flush=True)
    t_start = time.perf_counter()
    copy_bps = copy_bandwidth(2**24 if args.smoke else 2**30)
    print(f"device copy bandwidth (read+write): {copy_bps / 1e12:.2f} TB/s", flush=True)

    key = jax.random.key(0)
    if args.sweep:
        return run_sweep(args, models, ms, backend, key, rotate)
    results = []
    for model in models:
        for proj, K, N in projections(MODELS[model], args.separate):
            G = 1 if args.group_size == -1 else K // args.group_size
            wbytes = int4_bytes(K, N, G)
            floor_us = wbytes / HBM_BPS * 1e6
            stacks = {}
            for int4 in (False, True):
                per_copy = wbytes if int4 else 2 * K * N
                copies = max(2, math.ceil(rotate / per_copy))
                stacks[int4] = make_weights(jax.random.fold_in(key, K * 7 + N), K, N,
                                            args.group_size, copies, int4)
            for M in ms:
                x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
                cell = {"model": model, "proj": proj, "K": K, "N": N, "M": M,
                        "group_size": args.group_size, "weight_bytes_int4": wbytes,
                        "floor_us": floor_us, "us": {}, "gbps": {}}
                if any(m.startswith("w4") for m in methods):
                    t = choose_tiles(M, N, K, pack_block(K, G))
                    cell["tiles"] = {f: getattr(t, f) for f in t.__dataclass_fields__}
                for m in methods:
                    int4 = m != "bf16"
                    sec = time_loop(method_fn(m, backend), x, stacks[int4], args.iters,
                                    args.repeats)
                    cell["us"][m] = sec * 1e6
                    cell["gbps"][m] = (wbytes if int4 else 2 * K * N) / sec / 1e9
                us = cell["us"]
                cell["vs_bf16"] = {m: us[m] / us["bf16"] for m in us if "bf16" in us}
                cell["vs_w4a16"] = {m: us[m] / us["w4a16"] for m in us if "w4a16" in us}
                if any(m.startswith("w4") for m in methods) and (
                        args.check_all or M == min(ms)):
                    cell["rel_err_vs_reference"] = rel_errors(x, stacks[True][0], backend)
                cell["elapsed_s"] = time.perf_counter() - t_start
                results.append(cell)
                print_row(cell, methods)
                if args.out:  # partial results survive a run cut off by its time limit
                    write_json(args.out, {"partial": True, "results": results})
            del stacks

    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.0f} s, of which {COMPILE_S[0]:.0f} s in first calls (compiles)",
          flush=True)
    report = {
        "device": dev.device_kind,
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "commit": git_commit(),
        "kernel_backend": backend,
        "hbm_bytes_per_s_assumed": HBM_BPS,
        "copy_bytes_per_s_measured": copy_bps,
        "iters": args.iters,
        "repeats": args.repeats,
        "rotating_bytes_min": rotate,
        "group_size": args.group_size,
        "models": {m: MODELS[m] for m in models},
        "elapsed_s": elapsed,
        "first_call_s": COMPILE_S[0],
        "results": results,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


_HEADER_DONE = [False]


def print_row(c: dict, methods) -> None:
    if not _HEADER_DONE[0]:
        cols = "".join(f"{m:>9}" for m in methods)
        print(f"{'model':10}{'proj':>8}{'K':>6}{'N':>6}{'M':>5} |{cols} | {'floor':>6}"
              f" {'a16GB/s':>8} {'a16/bf':>6} {'a4/a16':>6} {'a8/a16':>6} | max_err elapsed")
        _HEADER_DONE[0] = True
    us = c["us"]
    cols = "".join(f"{us.get(m, float('nan')):9.1f}" for m in methods)
    r = lambda d, k: f"{d.get(k, float('nan')):6.2f}"  # noqa: E731
    errs = c.get("rel_err_vs_reference")
    err = f"{max(errs.values()):.1e}" if errs else "-"
    print(f"{c['model']:10}{c['proj']:>8}{c['K']:6d}{c['N']:6d}{c['M']:5d} |{cols} | "
          f"{c['floor_us']:6.1f} {c['gbps'].get('w4a16', float('nan')):8.0f} "
          f"{r(c['vs_bf16'], 'w4a16')} {r(c['vs_w4a16'], 'w4a4')} {r(c['vs_w4a16'], 'w4a8')} | "
          f"{err:>7} {c.get('elapsed_s', 0):5.0f}s", flush=True)


if __name__ == "__main__":
    main()
