#!/usr/bin/env python
"""The engine against its floors and its peers (issue 10), one run on one GPU.

Parts (each writes into one JSON, saved after every part):
  kernels  our W4A16 / W4A8 matmuls on Llama-3-8B projections at M = 1..256 beside XLA's bf16 dot,
           XLA with `jnp.int4` weights (per-channel scale after the dot: what a plain JAX user
           writes), PyTorch tinygemm int4 and cuBLAS bf16; each a compiled loop over rotating
           weight copies larger than L2 (JAX: scripts/bench_kernels.time_loop; PyTorch: CUDA-graph
           replays). The JAX harness's own per-call cost (a no-op through the same loop) is reported.
  gemv     the W4A16 GEMV kernel's launch plans at M <= 8 (pallas_kernels/w4a16_gemv.py).
  step     one decode step of the whole model (16 steps in one compiled fori_loop, per-layer
           weight buffers, a bf16 KV cache holding `context` positions) in each mode, beside a
           PyTorch decode step of the same shapes (tinygemm int4 and cuBLAS bf16 linears, SDPA,
           one CUDA graph), against the floor: weights + scales + the KV prefix attention reads,
           over the measured memcpy bandwidth (datasheet figure beside it).

  python scripts/bench_engine.py --parts kernels,gemv --out benchmarks/engine/h200_kernels.json
  python scripts/bench_engine.py --parts step --out benchmarks/engine/h200_step.json
  python scripts/bench_engine.py --smoke --out /tmp/engine.json       # CPU: tiny shapes, reference
  python scripts/bench_engine.py --summary A.json B.json --out benchmarks/engine/h200_summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_kernels import MODELS, int4_bytes, make_weights, projections, time_loop  # noqa: E402
from pallas_kernels import choose_tiles, pack_block, w4a4_matmul, w4a16_matmul
from pallas_kernels import int4_mosaic, tiling  # noqa: E402
from pallas_kernels.w4a16_gemv import GemvTiles, w4a16_gemv  # noqa: E402
from qspec_jax import checkpoint, kv_cache, model, quantize, rotation  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from bandwidth import best_copy_bandwidth  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402
from qspec_jax.kernel_choice import arrange_weights  # noqa: E402
from qspec_jax.model import forward, fuse_projections, unstack_layers  # noqa: E402
from qspec_jax.speculative import cache_slots  # noqa: E402
from bench_long_context import build_cache, step_bytes  # noqa: E402
from qspec_jax.spec import KV_GROUP, KV_WINDOW  # noqa: E402

DATASHEET_BPS = {"H200": 4.8e12, "H100": 3.35e12}
KERNEL_MS = (1, 4, 8, 16, 64, 128, 256)
NO_PEERS = [False]  # --no-peers: time ours only (a re-run of variants beside an earlier full run)


def xla_int4_channel(x, w):
    """A plain JAX user's int4 linear: `jnp.int4` weights, one scale per output column after the dot."""
    y = jnp.dot(x, w["q"].astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w["scale"]).astype(x.dtype)


def int4_channel_weights(key, K, N, copies):
    out = []
    for i in range(copies):
        q = jax.random.randint(jax.random.fold_in(key, i), (K, N), -7, 8, jnp.int32).astype(jnp.int4)
        out.append({"q": q, "scale": jnp.full((N,), 0.01, jnp.float32)})
    return out


def default_tiles(x, w):
    """The tensor-core kernel's default tiles for x @ w (what choose_tiles picks for this shape)."""
    K, N, G = 2 * w["packed"].shape[0], w["packed"].shape[1], w["scales"].shape[0]
    return choose_tiles(x.shape[0], N, K, pack_block(K, G))


def ours(method, tiles=None):
    if method == "w4a16":
        return lambda x, w: w4a16_matmul(x, w, tiles=tiles)
    if method == "w4a16_mma":  # the tensor-core kernel forced at any M (decode sizes use the GEMV)
        return lambda x, w: w4a16_matmul(x, w, tiles=default_tiles(x, w))
    if method == "w4a16_gemv":
        return lambda x, w: w4a16_gemv(x, w, tiles=tiles)
    if method == "w4a16_asm":  # the tensor-core kernel with inline-PTX nibble conversion, any M
        return lambda x, w: w4a16_matmul(
            x, w, tiles=dataclasses.replace(default_tiles(x, w), asm_dequant=True, dequant=False))
    bits = 4 if method == "w4a4" else 8
    return lambda x, w: w4a4_matmul(x, w, act_bits=bits)


def torch_available():
    if NO_PEERS[0]:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def kernel_cells(args, rotate, cells, save):
    """Per projection and M: microseconds of every method (ours and the peers), appended to cells."""
    key = jax.random.key(0)
    cfg = MODELS[args.model]
    use_torch = torch_available()
    for proj, K, N in projections(cfg, separate=False):
        G = K // args.group_size
        wbytes = int4_bytes(K, N, G)
        q4 = make_weights(jax.random.fold_in(key, K + N), K, N, args.group_size, max(2, math.ceil(rotate / wbytes)), True)
        bf = make_weights(jax.random.fold_in(key, K + N), K, N, args.group_size, max(2, math.ceil(rotate / (2 * K * N))), False)
        i4 = int4_channel_weights(jax.random.fold_in(key, K * N), K, N, max(2, math.ceil(rotate / (K * N // 2))))
        for M in args.ms:
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            us = {}
            us["noop"] = 1e6 * time_loop(lambda x, w: x, x, q4, args.iters, args.repeats)
            for m in args.methods:
                if m == "w4a16_mma" and M > tiling.GEMV_MAX_M:
                    continue  # the same kernel as w4a16 there
                us[m] = 1e6 * time_loop(ours(m), x, q4, args.iters, args.repeats)
            if not NO_PEERS[0]:
                us["xla_bf16"] = 1e6 * time_loop(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
                                                 x, bf, args.iters, args.repeats)
                us["xla_int4_channel"] = 1e6 * time_loop(xla_int4_channel, x, i4, args.iters, args.repeats)
                if use_torch:
                    import torch_peer

                    for kind in ("tinygemm", "cublas_bf16"):
                        try:
                            us[f"torch_{kind}"] = torch_peer.time_linear(kind, M, K, N, args.group_size)
                        except Exception as e:  # a peer that does not run here is reported, not fatal
                            print(f"  torch {kind} M={M}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            cell = {"proj": proj, "K": K, "N": N, "M": M, "weight_bytes_int4": wbytes, "us": us}
            cells.append(cell)
            save()
            print(f"{proj:8} M={M:4d} " + " ".join(f"{k}={v:.1f}" for k, v in us.items()), flush=True)
        del q4, bf, i4


def gemv_plans(M, N, K, pb):
    nblocks = K // pb
    plans = []
    for bn in (128, 256):
        for split in (4, 8, 16):
            if nblocks % split or nblocks // split < 2 or N % bn:
                continue
            for reduce_each in ((True, False) if M == 1 else (True,)):
                for warps in (4, 8):
                    plans.append(GemvTiles(bn=bn, split=split, num_warps=warps, num_stages=3, reduce_each_block=reduce_each))
    return plans


def gemv_sweep(args, rotate, rows, save):
    key = jax.random.key(1)
    for proj, K, N in projections(MODELS[args.model], separate=False):
        if proj not in ("gate_up", "down"):
            continue
        G = K // args.group_size
        wbytes = int4_bytes(K, N, G)
        q4 = make_weights(jax.random.fold_in(key, K + N), K, N, args.group_size, max(2, math.ceil(rotate / wbytes)), True)
        for M in (1, 4, 8):
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            for t in gemv_plans(M, N, K, pack_block(K, G)):
                try:
                    u = 1e6 * time_loop(ours("w4a16_gemv", t), x, q4, args.iters, args.repeats)
                except Exception as e:
                    print(f"  {t}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                rows.append({"proj": proj, "K": K, "N": N, "M": M, "us": u, "tiles": t._asdict()})
            save()
            top = sorted((r for r in rows if r["proj"] == proj and r["M"] == M), key=lambda r: r["us"])[:3]
            for r in top:
                print(f"gemv {proj} M={M}: {r['us']:.1f} us {r['tiles']}", flush=True)
        del q4


def kv_view(mode: str) -> str:
    """What a step in `mode` reads of the hierarchical cache: drafts its INT4 view, the rest both planes."""
    return "int4" if mode in ("w4a8", "w4a4") else "int8"


def make_cache(config, kv: str, batch: int, max_len: int, context: int):
    """The step's cache: bf16 (zeros), or the hierarchical INT8 cache as a prefill of `context`
    random tokens per row leaves it (bench_long_context.build_cache)."""
    if kv == "bf16":
        return KVCache.create(config, batch, max_len, jnp.bfloat16)
    return build_cache(config, "int8", batch, context, max_len, key=jax.random.key(0), group=KV_GROUP,
                       window=KV_WINDOW, headroom=1, dtype=jnp.bfloat16)


def step_cache_slots(context: int) -> int:
    """The step's cache slots: what generate allocates for `context` positions and 63 new tokens
    at gamma 0 (context + 64, rounded up: speculative.cache_slots), so attention runs the
    flash-decoding kernel it runs there; at 520 slots (before 2026-12-06) KVCache.attend fell back
    to XLA's einsum attention (the kernel needs a multiple of 16 slots)."""
    return cache_slots(context, 63, 0)


def step_program(config, mode, batch, max_len, context, steps, donate=True):
    """A compiled loop of `steps` decode steps; the cache holds `context` positions per row. The
    steps overwrite the last `steps` positions (a hierarchical cache's recent buffer holds them),
    so the cache never grows and, on the INT8 cache, no group completes: the amortized cost of
    quantizing a group every 128 tokens (`flush`) is not in the time."""

    def run(params, cache, tok):
        def body(i, carry):
            cache, tok = carry
            pos = jnp.full((batch, 1), context - steps, jnp.int32) + i
            logits, cache = forward(params, tok[:, None], pos, cache, config=config, mode=mode,
                                    kv_view=kv_view(mode))
            return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tok))

    return jax.jit(run, donate_argnums=1 if donate else ())


def kernel_profile(config, mode, batch, max_len, context, params, top=40, kv="bf16"):
    """One decode step's kernels by CUPTI (each kernel's own time, summed by name, us, and the
    number of launches: XLA reuses one compiled kernel for identical fusions), without
    donation so the profiler can call it repeatedly: the cache is written to a new buffer, a copy
    a donated step does not make (it shows as its own kernel)."""
    from jax.experimental.mosaic.gpu import profiler

    prog = step_program(config, mode, batch, max_len, context, 1, donate=False)
    cache = make_cache(config, kv, batch, max_len, context)
    tok = jnp.zeros((batch,), jnp.int32) + 3
    _, timings = profiler.measure(prog, aggregate=False)(params, cache, tok)
    by_name = {}
    for name, ms in timings:
        us, n = by_name.get(name, (0.0, 0))
        by_name[name] = (us + 1e3 * ms, n + 1)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"total_us": sum(us for us, _ in by_name.values()), "kernels": len(timings),
            "top_us": [[name[:120], round(us, 2), n] for name, (us, n) in ranked[:top]]}


# Changes a step variant may make to the quantized modes' dispatch, read at trace time by the kernels' wrappers.
VARIANT_PARTS = {
    "asm": "Triton: inline-PTX int4 conversion (tiling.ASM_DEQUANT)",
    "mma1": "Triton: the tensor-core kernel at M = 1 too (tiling.GEMV_MAX_M = 0)",
    "tm": "Mosaic: the kernels write y [M, N] at split 1 (int4_mosaic.TRANSPOSED_STORE)",
    "xla_attention": "attention by XLA's einsum over every slot (kv_cache.KERNEL_ATTENTION_BACKEND)",
    "xla_rotation": "a rotated model's online transform as XLA's GEMMs (rotation.KERNEL_BACKEND)",
    "residual_norm": "Mosaic: residual add + RMSNorm in one Triton launch on split-K partials (model.FUSED_RESIDUAL_NORM)",
}


def apply_variant(variant: str, token_major: bool = False):
    """Set the module switches of a step variant ("default", or parts of VARIANT_PARTS joined by '+';
    the old names asm / asm_mma1 stay: asm, asm+mma1)."""
    parts = set() if variant == "default" else set(variant.replace("asm_mma1", "asm+mma1").split("+"))
    unknown = parts - set(VARIANT_PARTS)
    if unknown:
        raise ValueError(f"unknown step variant parts {sorted(unknown)}; known: {sorted(VARIANT_PARTS)}")
    tiling.ASM_DEQUANT = "asm" in parts
    tiling.GEMV_MAX_M = 0 if "mma1" in parts else 1
    int4_mosaic.TRANSPOSED_STORE = token_major or "tm" in parts
    kv_cache.KERNEL_ATTENTION_BACKEND = "reference" if "xla_attention" in parts else "auto"
    rotation.KERNEL_BACKEND = "reference" if "xla_rotation" in parts else "auto"
    model.FUSED_RESIDUAL_NORM = "residual_norm" in parts


def step_cells(args, copy_bps, cells: list, save=lambda: None):
    """Time the decode step of every (batch, mode, variant) into `cells`, calling `save` after each
    cell, so a run cut by its time limit keeps what it measured."""
    config = get_preset(args.preset)
    t0 = time.perf_counter()
    fparams = checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16)
    qparams = unstack_layers(fuse_projections(quantize.quantize_params(fparams, config, group_size=args.group_size,
                                                                       dtype=jnp.bfloat16)))
    fparams = unstack_layers(fuse_projections(fparams))
    jax.block_until_ready((fparams, qparams))
    print(f"weights ready in {time.perf_counter() - t0:.0f} s", flush=True)
    max_len, ctx, steps = step_cache_slots(args.context), args.context, 16
    runs = [(m, v) for m in args.modes for v in (args.step_variants if m != "bf16" else ["default"])]
    # the quantized modes once per kernel family (qspec_jax/kernel_choice.py): mode "w4a16_mosaic"
    # etc.; with both families, the Triton drafts are left out (the earlier runs hold them)
    runs = [(m, v, k) for m, v in runs for k in (args.kernels if m != "bf16" else ["triton"])
            if k != "triton" or m in ("w4a16", "bf16") or args.kernels == ["triton"]]
    arranged = {k: arrange_weights(qparams, k) for k in args.kernels}
    jax.block_until_ready(arranged)
    for batch in args.batches:
        for mode, variant, kernels in runs:
            if batch > 16 and (mode == "bf16" or kernels != "mosaic"):
                continue  # large batches: the Mosaic draft-vs-verify pair only
            apply_variant(variant, args.token_major)
            params = fparams if mode == "bf16" else arranged[kernels]
            prog = step_program(config, mode, batch, max_len, ctx, steps)
            cache = make_cache(config, args.kv, batch, max_len, ctx)
            tok = jnp.zeros((batch,), jnp.int32) + 3
            t0 = time.perf_counter()
            compiled = prog.lower(params, cache, tok).compile()
            compile_s = time.perf_counter() - t0
            cache, _ = jax.block_until_ready(compiled(params, cache, tok))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                cache, _ = jax.block_until_ready(compiled(params, cache, tok))
                times.append(time.perf_counter() - t0)
            step_s = float(np.median(times)) / steps
            wbytes, kv_read = step_bytes(fparams if mode == "bf16" else qparams, config, batch, ctx,
                                         "bf16" if args.kv == "bf16" else kv_view(mode))
            floor = (wbytes + kv_read) / copy_bps
            label = mode if variant == "default" else f"{mode}_{variant}"
            label = label if kernels == "triton" or mode == "bf16" else f"{label}_{kernels}"
            cell = {"batch": batch, "mode": label, "step_ms": 1e3 * step_s, "compile_s": compile_s,
                    "weight_bytes": wbytes, "kv_bytes_read": kv_read, "floor_ms": 1e3 * floor,
                    "over_floor": step_s / floor, "tokens_per_s": batch / step_s}
            cells.append(cell)
            print(f"step B={batch} {cell['mode']}: {1e3 * step_s:.2f} ms (floor {1e3 * floor:.2f}, "
                  f"{step_s / floor:.2f}x), compile {compile_s:.0f} s", flush=True)
            del cache, compiled
            if args.profile:
                try:
                    cell["profile"] = kernel_profile(config, mode, batch, max_len, ctx, params, kv=args.kv)
                except Exception as e:  # noqa: BLE001 - a step time stands without its profile
                    cell["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print("  profile failed:", cell["profile"]["error"], flush=True)
                else:
                    print(f"  profile: {cell['profile']['total_us']:.0f} us in {cell['profile']['kernels']} kernels; "
                          + "; ".join(f"{n[:40]} {us:.0f}/{k}" for n, us, k in cell["profile"]["top_us"][:12]),
                          flush=True)
            save()
        if torch_available() and batch <= 16 and not args.no_peers and args.kv == "bf16":
            import torch_peer

            for kind in ("tinygemm", "cublas_bf16"):
                try:
                    s = torch_peer.time_decode_step(config, batch, ctx, ctx - 1, kind)
                    cells.append({"batch": batch, "mode": f"torch_{kind}", "step_ms": 1e3 * s, "tokens_per_s": batch / s})
                    print(f"step B={batch} torch {kind}: {1e3 * s:.2f} ms", flush=True)
                    save()
                except Exception as e:
                    print(f"  torch {kind} step B={batch}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def summarize(results: list, commit: str | None) -> dict:
    """The issue-10 summary keys from kernel and step results."""
    kern = [c for r in results for c in r.get("kernels", [])]
    steps = [c for r in results for c in r.get("step", [])]
    meta = next(r["meta"] for r in results if "meta" in r)
    bw = max(r["meta"]["copy_bytes_per_s"] for r in results if "meta" in r)
    peers = ("xla_bf16", "xla_int4_channel", "torch_tinygemm", "torch_cublas_bf16")
    s = {"commit": commit or meta["commit"], "device": meta["device"], "jax": meta["jax"], "copy_bw_Bps": bw,
         "step_over_floor": {"w4a16": {}}, "w4a16_vs_torch_peer": {}, "bf16_vs_torch_bf16": {},
         "kernel_frac_copy_bw": {"gate_up": {}, "down": {}}, "kernel_vs_best_peer": {}, "verify_flatness": {}}
    for c in kern:
        us = c["us"]
        best_peer = min(us[p] for p in peers if p in us)
        s["kernel_vs_best_peer"].setdefault(c["proj"], {})[str(c["M"])] = best_peer / us["w4a16"]
        if c["proj"] in ("gate_up", "down") and c["M"] <= 16:
            s["kernel_frac_copy_bw"][c["proj"]][str(c["M"])] = c["weight_bytes_int4"] / (us["w4a16"] * 1e-6) / bw
    for proj in ("gate_up", "down"):
        t = {c["M"]: c["us"]["w4a16"] for c in kern if c["proj"] == proj}
        if 16 in t and 64 in t:
            s["verify_flatness"][proj] = t[64] / t[16]
    by = {(c["batch"], c["mode"]): c for c in steps}
    for b in sorted({c["batch"] for c in steps}):
        if (b, "w4a16") in by:
            ours16 = by[(b, "w4a16")]
            s["step_over_floor"]["w4a16"][str(b)] = ours16["step_ms"] * 1e-3 * bw / (ours16["weight_bytes"] + ours16["kv_bytes_read"])
            if (b, "torch_tinygemm") in by:
                s["w4a16_vs_torch_peer"][str(b)] = by[(b, "torch_tinygemm")]["step_ms"] / ours16["step_ms"]
        if (b, "bf16") in by and (b, "torch_cublas_bf16") in by:
            s["bf16_vs_torch_bf16"][str(b)] = by[(b, "torch_cublas_bf16")]["step_ms"] / by[(b, "bf16")]["step_ms"]
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kernels,gemv,step")
    ap.add_argument("--model", default="llama3-8b", help="kernel shapes (bench_kernels.MODELS)")
    ap.add_argument("--preset", default="llama3-8b", help="model preset of the decode step")
    ap.add_argument("--ms", default=",".join(map(str, KERNEL_MS)))
    ap.add_argument("--methods", default="w4a16,w4a16_mma,w4a8")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--modes", default=None, help="step modes (default w4a16,bf16,w4a8,w4a4; --smoke: w4a16,bf16)")
    ap.add_argument("--step-variants", default="default",
                    help="dispatch variants of the quantized modes' step, each 'default' or '+'-joined changes "
                         f"to it ({', '.join(VARIANT_PARTS)}), e.g. tm+xla_attention")
    ap.add_argument("--kernels", default="triton", help="int4 kernel families of the step, e.g. triton,mosaic")
    ap.add_argument("--context", type=int, default=456, help="KV positions attention reads in the step")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, one M, reference kernels")
    ap.add_argument("--no-peers", action="store_true", help="time our kernels and modes only")
    ap.add_argument("--profile", action="store_true", help="step: also each kernel's own time in one step (CUPTI)")
    ap.add_argument("--kv", default="bf16", choices=("bf16", "int8"),
                    help="step: the KV cache (int8: QuantSpec's hierarchical cache; drafts read its INT4 view): "
                         "the runs behind an INT8-KV cost table (scripts/build_cost_table.py --kv int8)")
    ap.add_argument("--token-major", nargs="?", const="on", choices=("on", "off"),
                    help="Mosaic kernels write y [M, N] themselves (on) or out^T for XLA to transpose (off); "
                         "default: int4_mosaic.TRANSPOSED_STORE")
    ap.add_argument("--mosaic-groups", type=int, default=int4_mosaic.GROUPS_PER_STEP,
                    help="weight groups per pipeline step in the Mosaic kernels' tile rule "
                         "(int4_mosaic.GROUPS_PER_STEP)")
    ap.add_argument("--summary", nargs="*", help="result JSONs to merge into the issue-10 summary at --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.summary:
        results = [json.load(open(p)) for p in args.summary]
        summary = summarize(results, None)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))
        return summary
    args.ms = [int(m) for m in args.ms.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    modes_given = args.modes is not None
    args.modes = (args.modes or "w4a16,bf16,w4a8,w4a4").split(",")
    args.methods = args.methods.split(",")
    args.step_variants = args.step_variants.split(",")
    args.kernels = args.kernels.split(",")
    NO_PEERS[0] = args.no_peers
    if args.token_major:
        int4_mosaic.TRANSPOSED_STORE = args.token_major == "on"
    args.token_major = int4_mosaic.TRANSPOSED_STORE
    int4_mosaic.GROUPS_PER_STEP = args.mosaic_groups
    rotate = 256 * 2**20
    if args.smoke:
        args.model, args.preset, args.ms, args.batches, args.context = "tiny", "tiny", [1], [2], 24
        args.methods, args.group_size, args.iters, args.repeats = ["w4a16"], 64, 2, 1
        args.modes = args.modes if modes_given else ["w4a16", "bf16"]
        rotate = 2**16
    parts = args.parts.split(",")
    if args.smoke:
        parts = [p for p in parts if p != "gemv"]  # the GEMV kernel runs only through Triton
    dev = jax.devices()[0].device_kind
    # the floor's bandwidth does not depend on --no-peers: PyTorch's memcpy whenever it runs (on an
    # H200 XLA's own copy loop read 3.06 TB/s against PyTorch's 4.25 in the same call)
    bw, bw_xla = best_copy_bandwidth(args.smoke)
    datasheet = next((v for k, v in DATASHEET_BPS.items() if k in dev), None)
    meta = {**run_metadata(), "copy_bytes_per_s": bw, "xla_copy_bytes_per_s": bw_xla,
            "datasheet_bytes_per_s": datasheet, "group_size": args.group_size, "argv": sys.argv[1:],
            "weights": "generated (speed only)", "timing": "median of repeats; compiled loops (JAX), CUDA graphs (PyTorch)",
            "mosaic_token_major": args.token_major,
            "mosaic_groups_per_step": args.mosaic_groups, "context": args.context, "kv": args.kv,
            "cache_slots": step_cache_slots(args.context)}
    print(f"{dev}: copy {bw / 1e12:.2f} TB/s (XLA's own copy {bw_xla / 1e12:.2f})", flush=True)
    out = {"meta": meta}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    if "gemv" in parts:
        out["gemv"] = []
        gemv_sweep(args, rotate, out["gemv"], save)
    if "kernels" in parts:
        out["kernels"] = []
        kernel_cells(args, rotate, out["kernels"], save)
    if "step" in parts:
        out["step"] = []
        step_cells(args, bw, out["step"], save)
    save()
    return out


if __name__ == "__main__":
    main()
