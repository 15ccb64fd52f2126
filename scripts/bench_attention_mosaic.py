#!/usr/bin/env python
"""Check and time the Mosaic GPU decode attention (pallas_kernels/attention_mosaic.py) beside the
Triton kernel (decode_attention.attention_partials) on the Llama-3-8B attention shape (GPU).

One run does, in order, writing everything to --out (JSON, rewritten after every cell):
  check   every variant (bf16, int8, int4) and every Mosaic config the timing will use, at the real
          head shape (32 query heads, 8 kv heads, head_dim 128) on a 2-row, 4k-token cache, decode
          (T = 1) and verify (T = 5, with the hierarchical cut and a recent buffer for the quantized
          views), merged partials against a float64 NumPy reference computed on the host (max-abs
          error; NaN fails); the Triton kernel is checked the same way;
  time    per context (default 8192 and 32768) and variant, at --batch rows, every row at the full
          context: the Triton launch (its DEFAULTS, pick_splits) and each Mosaic config (version,
          pipeline stages, splits, kv_tile: --v1-configs ... --v7-configs; v2 to v7 are
          quantized paths, so bf16 runs v1 only), timed by CUPTI (jax.experimental.mosaic.gpu.profiler.measure,
          aggregate=False): each kernel's own time, so the wrapper's small XLA ops (padding Q, the
          mask bounds) are reported apart from the attention kernel; attend_us times the call as
          decode_attention makes it (the partials merged; the Triton kernel's query rows padded to
          16), all kernels. A batch-16 cache is 0.27 GB (INT4) to 1 GB (bf16) at 8k tokens: far
          beyond the 50 MB L2, so one copy suffices.
          v2/v3's key bias (q . min per key group) and v3's int4 bitcast and interleaved key scales
          are XLA ops in the wrapper: in `us`, not in kernel_us (`kernels` names every kernel).
Bytes are what a variant must read (codes, scales and minimums; bf16 K and V); frac_copy_bw = bytes /
kernel time / the best measured copy bandwidth (scripts/bandwidth.py).

  python scripts/bench_attention_mosaic.py --out $OUT/attention_mosaic.json          # GPU
  python scripts/bench_attention_mosaic.py --smoke --out /tmp/attention_mosaic.json  # CPU path check

--smoke runs the check and one timing cell on a tiny cache under the interpreters (Mosaic GPU's and
Triton's) on CPU: a path check, its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bandwidth import best_copy_bandwidth  # noqa: E402
from pallas_kernels import attention_mosaic  # noqa: E402
from pallas_kernels.common import pow2_at_least  # noqa: E402
from pallas_kernels.decode_attention import QuantKV, merge_partials  # noqa: E402
from pallas_kernels.decode_attention import attention_partials as triton_partials  # noqa: E402
from pallas_kernels.kv_cut import cut_position  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402

H, KV, HD, GROUP = 32, 8, 128, 128
CUT = (GROUP, GROUP // 2)  # the hierarchical cache's (G, D) defaults
VARIANTS = ("bf16", "int8", "int4")


def make_kv(key, B, S, variant):
    """(kv, bytes the variant reads): random bf16 K, V or INT8/INT4 planes with f16 scales in the
    hierarchical cache's layout (value planes [B, KV, hd/2, S])."""
    ks = jax.random.split(key, 8)
    if variant == "bf16":
        k = jax.random.normal(ks[0], (B, KV, S, HD), jnp.bfloat16)
        v = jax.random.normal(ks[1], (B, KV, S, HD), jnp.bfloat16)
        return (k, v), 2 * k.nbytes

    def plane(k, shape):
        return jax.random.randint(k, shape, 0, 256, jnp.int32).astype(jnp.uint8)

    def uniform(k, shape, lo, hi):
        return jax.random.uniform(k, shape, jnp.float32, lo, hi).astype(jnp.float16)

    k_shape, v_shape, g_shape = (B, KV, S, HD // 2), (B, KV, HD // 2, S), (B, KV, S // GROUP, HD)
    kv = QuantKV(plane(ks[0], k_shape), plane(ks[1], k_shape), uniform(ks[2], g_shape, 0.02, 0.15),
                 uniform(ks[3], g_shape, -1.2, -0.8), plane(ks[4], v_shape), plane(ks[5], v_shape),
                 uniform(ks[6], (B, KV, S), 0.02, 0.15), uniform(ks[7], (B, KV, S), -1.2, -0.8))
    scales = kv.k_scale.nbytes + kv.k_min.nbytes + kv.v_scale.nbytes + kv.v_min.nbytes
    codes = kv.k_upper.nbytes + kv.v_upper.nbytes
    return kv, scales + (2 * codes if variant == "int8" else codes)


def dequant64(kv, variant):
    """float64 (k, v) [B, KV, S, hd] from the planes, decoded here (module docstring of
    decode_attention: byte i holds channel i low, i + hd/2 high)."""
    def codes(p):
        p = np.asarray(p).astype(np.int64)
        return np.concatenate([p & 15, p >> 4], axis=-1)

    def value(u, l, s, m):
        if variant == "int4":
            return codes(u) * s + m
        return (16 * codes(u) + codes(l) - 8) * s / 16 + m

    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    if variant == "bf16":
        return f64(kv[0]), f64(kv[1])
    G = kv.k_upper.shape[2] // kv.k_scale.shape[2]
    ks, km = (np.repeat(f64(x), G, axis=2) for x in (kv.k_scale, kv.k_min))
    k = value(kv.k_upper, kv.k_lower, ks, km)
    v = value(np.swapaxes(np.asarray(kv.v_upper), -1, -2), np.swapaxes(np.asarray(kv.v_lower), -1, -2),
              f64(kv.v_scale)[..., None], f64(kv.v_min)[..., None])
    return k, v


def rows_of(q, q_pos):
    """decode_attention's query blocks: q [B, T, H, hd] -> [B, KV, rep*T, hd], positions [B, rep*T]."""
    B, T = q_pos.shape
    rep = H // KV
    q_rows = q.reshape(B, T, KV, rep, HD).transpose(0, 2, 3, 1, 4).reshape(B, KV, rep * T, HD)
    return q_rows, jnp.tile(q_pos, (1, rep))


def attend(partials, q, q_pos, kv, kv_len, variant, recent=None, recent_start=None, **knobs):
    """[B, T, H, hd] attention with `partials` (either kernel's attention_partials) for the main
    cache and, with a recent buffer, for the buffer too; a cut when the buffer is there. The query
    rows as decode_attention passes them: padded to 16 for the Triton kernel, the real rows to the
    Mosaic kernel (which pads them itself: to 8 from v8)."""
    B, T = q_pos.shape
    q_rows, row_pos = rows_of(q, q_pos)
    rows = q_rows.shape[2]
    if partials is triton_partials:
        M = max(16, pow2_at_least(rows))
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, M - rows), (0, 0)))
        row_pos = jnp.pad(row_pos, ((0, 0), (0, M - rows)), constant_values=-1)
    cut = CUT if recent is not None else None
    run = lambda *a, **k: partials(q_rows, row_pos, *a, sm_scale=1 / math.sqrt(HD), cut=cut, **k)  # noqa: E731
    parts = [run(kv, kv_len, jnp.zeros((B,), jnp.int32), variant=variant, cut_side="below" if cut else None, **knobs)]
    if recent is not None:
        R = recent[0].shape[2]
        parts.append(run(recent, jnp.full((B,), R, jnp.int32), recent_start, variant="bf16", splits=1,
                         cut_side="from", **{k: v for k, v in knobs.items() if k in ("interpret",)}))
    rep = H // KV
    out = merge_partials([(o[..., :rows, :], m[..., :rows], l[..., :rows]) for o, m, l in parts])
    return out.reshape(B, KV, rep, T, HD).transpose(0, 3, 1, 2, 4).reshape(B, T, H, HD)


def reference64(q, q_pos, k, v, k_pos, visible):
    """float64 masked attention: q [B, T, H, hd]; k, v [B, KV, S', hd]; visible [B, T, S'] bools."""
    B, T = q_pos.shape
    qg = np.asarray(q, np.float64).reshape(B, T, KV, H // KV, HD)
    s = np.einsum("btgrd,bgsd->btgrs", qg, k) / math.sqrt(HD)
    s = np.where(visible[:, :, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("btgrs,bgsd->btgrd", p, v).reshape(B, T, H, HD)


def check_case(key, variant, S, T, interpret):
    """(inputs, float64 reference) of one check: 2 rows at different lengths; T > 1 quantized cases
    run the hierarchical cut with a recent buffer of 256 slots."""
    B, R = 2, 256
    kv, _ = make_kv(key, B, S, variant)
    q = jax.random.normal(jax.random.fold_in(key, 1), (B, T, H, HD), jnp.float32)
    lens = np.array([S - T, S // 2 + 37])
    use_cut = variant != "bf16" and T > 1
    q_pos = lens[:, None] + np.arange(T)
    k64, v64 = dequant64(kv, variant)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    if not use_cut:
        kv_len = lens + T
        visible = (k_pos[:, None, :] < kv_len[:, None, None]) & (k_pos[:, None, :] <= q_pos[:, :, None])
        want = reference64(q, q_pos, k64, v64, k_pos, visible)
        return dict(kv=kv, kv_len=jnp.asarray(kv_len, jnp.int32)), q, q_pos, want
    G = CUT[0]
    kv_len = lens // G * G  # the planes hold whole groups; the buffer holds [r_start, ...)
    c = np.asarray(cut_position(jnp.asarray(q_pos), *CUT))  # [B, T]
    assert (c[:, -1] <= kv_len).all()
    r_start = np.minimum(c[:, 0], kv_len)  # the buffer holds [c(p_0), c(p_0) + R): every query's [c(p), p]
    rk, rv = (jax.random.normal(jax.random.fold_in(key, 2 + i), (B, KV, R, HD), jnp.bfloat16) for i in range(2))
    r_pos = r_start[:, None] + np.arange(R)
    k_all = np.concatenate([k64, np.asarray(rk.astype(jnp.float32), np.float64)], axis=2)
    v_all = np.concatenate([v64, np.asarray(rv.astype(jnp.float32), np.float64)], axis=2)
    pos_all = np.concatenate([k_pos, r_pos], axis=1)
    in_planes = np.arange(S + R) < S
    visible = np.where(in_planes[None, None, :],
                       (pos_all[:, None, :] < np.minimum(kv_len[:, None, None], c[:, :, None])),
                       (pos_all[:, None, :] >= c[:, :, None]) & (pos_all[:, None, :] <= q_pos[:, :, None]))
    want = reference64(q, q_pos, k_all, v_all, pos_all, visible)
    return dict(kv=kv, kv_len=jnp.asarray(kv_len, jnp.int32), recent=(rk, rv),
                recent_start=jnp.asarray(r_start, jnp.int32)), q, q_pos, want


KERNELS = {"triton": triton_partials, "mosaic": attention_mosaic.attention_partials}


def cupti_us(fn, *args, iterations=5):
    """(us per call over all kernels, us of the kernels named "*attention*", the kernel names)."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(jax.jit(fn), aggregate=False, iterations=iterations)(*args)
    total = statistics.median(sum(t for _, t in it) for it in timings)
    kernel = statistics.median(sum(t for name, t in it if "attention" in name) for it in timings)
    names = sorted({name for it in timings for name, _ in it})
    return 1e3 * total, 1e3 * kernel, names


E2E_KEYS = ("qspec_int8kv_vs_w4a16_bf16kv", "qspec_int8kv_vs_w4a16_int8kv", "quantspec_vs_bf16")


def summarize(runs: list, quality: dict, quality_source: str) -> dict:
    """benchmarks/kv/hopper_summary.json (issue 19's keys) from attention runs on one device: per
    variant and context the attention the model runs, its kernel and Mosaic's best beside it. The
    model's kernel is the one whose call as decode_attention makes it (attend_us: attend's rows,
    partials merged) is fastest, from the newest run that timed that call, else the one with the
    higher fraction. The end-to-end ratios are null until bench_long_context.py runs on this device;
    the quality keys are the CPU measurements."""
    best, called = {}, {}
    for run in runs:
        for c in run["cells"]:
            if "kernel_us" not in c:
                continue
            key = (c["variant"], str(c["context"]), c["kernel"])
            if key not in best or c["kernel_us"] < best[key]["kernel_us"]:
                best[key] = c
        timed = [c for c in run["cells"] if c.get("attend_us")]
        for key in {(c["variant"], str(c["context"])) for c in timed}:  # a newer run replaces an older one
            called[key] = min((c for c in timed if (c["variant"], str(c["context"])) == key),
                              key=lambda c: c["attend_us"])
    frac, kernel, mosaic = {}, {}, {}
    for (variant, ctx, name), c in sorted(best.items()):
        mosaic.setdefault(variant, {})
        if name == "mosaic":
            mosaic[variant][ctx] = c["frac_copy_bw"]
        if (variant, ctx) not in called and c["frac_copy_bw"] > frac.get(variant, {}).get(ctx, -1):
            frac.setdefault(variant, {})[ctx] = c["frac_copy_bw"]
            kernel.setdefault(variant, {})[ctx] = name
    for (variant, ctx), c in sorted(called.items()):
        frac.setdefault(variant, {})[ctx] = c["frac_copy_bw"]
        kernel.setdefault(variant, {})[ctx] = c["kernel"]
    meta = runs[0]["meta"]
    return {"device": meta["device"], "jax": meta["jax"], "commit": [r["meta"].get("commit") for r in runs],
            "timing": "cupti", "attention_frac_copy_bw": frac, "attention_kernel": kernel,
            "attention_frac_copy_bw_mosaic": mosaic, **{k: None for k in E2E_KEYS},
            "int8kv_ppl_ratio": quality["perplexity"]["int8_over_bf16"],
            "int4kv_w4a8_acceptance": next(
                r["acceptance_rate"] for r in quality["acceptance"]["runs"]
                if (r["system"], r["draft"], r["kv"], r["batch"]) == ("qspec", "w4a8", "int8", "short")),
            "notes": ["attention: batch 16, 32 query heads, 8 kv heads, hd 128, T = 1, each kernel's own "
                      "time over the run's copy bandwidth; the kernel is the one decode_attention's call ran "
                      "fastest with (attend_us) where a run timed that call", "end-to-end keys: not measured on this device",
                      f"quality keys: {quality_source} (CPU, SmolLM2-135M)"]}


# Mosaic configs timed per body unless --vN-configs says otherwise: v2 / v3 take 64-token steps only
DEFAULT_CONFIGS = {1: "2:1", 2: "2:1,3:1,2:2", 3: "2:1,3:1,2:2", 4: "2:1,2:1:128", 5: "2:1,2:1:128",
                   6: "2:1,2:1:128", 7: "2:1,2:1:128", 8: "2:1,2:1:128"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", nargs="+", metavar="RUN_JSON",
                    help="write issue 19's summary of these runs (and --quality) to --out and exit")
    ap.add_argument("--quality", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                      "benchmarks", "kv", "kv_quality.json"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    for n in attention_mosaic.VERSIONS:  # --v1-configs ... one per body
        ap.add_argument(f"--v{n}-configs", default=DEFAULT_CONFIGS[n],
                        help=f"Mosaic v{n} configs stages:split_factor[:kv_tile] (splits = choose_splits x "
                             "factor, rounded; kv_tile 64 when left out), comma-separated")
    ap.add_argument("--T", type=int, default=1, help="query positions per row in the timed step")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreters, tiny shapes (a path check)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.summary:
        summary = summarize([json.load(open(p)) for p in args.summary], json.load(open(args.quality)),
                            os.path.relpath(args.quality))
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))
        return summary
    variants = args.variants.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    B, check_S, interpret = args.batch, 4096, args.smoke
    def parse(text, version):  # "stages:factor[:kv_tile],..." -> [(version, stages, factor, kv_tile)]
        out = []
        for c in filter(None, text.split(",")):
            st, f, *tile = c.split(":")
            out.append((version, int(st), float(f), int(tile[0]) if tile else attention_mosaic.TILE))
        return out

    configs = [c for n in attention_mosaic.VERSIONS for c in parse(getattr(args, f"v{n}_configs"), n)]
    if args.smoke:
        B, contexts, check_S = 1, [256], 512
        configs = [next(c for c in configs if c[0] == n) for n in attention_mosaic.VERSIONS
                   if any(c[0] == n for c in configs)]
    bw, _ = best_copy_bandwidth(args.smoke)
    out = {"meta": {**run_metadata(), "copy_bytes_per_s": bw, "batch": B, "T": args.T,
                    "shape": {"heads": H, "kv_heads": KV, "head_dim": HD, "group": GROUP},
                    "argv": sys.argv[1:] if argv is None else argv},
           "check": [], "cells": [], "errors": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    def mosaic_configs(S, variant=None):
        """Mosaic configs at context S (all variants' when variant is None): bf16 runs v1 only."""
        out = []
        for version, st, f, kv_tile in configs:
            base = attention_mosaic.choose_splits(B, KV, S, kv_tile)
            c = dict(version=version, stages=st, splits=min(S // kv_tile, max(1, round(base * f))))
            if kv_tile != attention_mosaic.TILE:  # the key only where it differs: older files stay comparable
                c["kv_tile"] = kv_tile
            if c in out or (variant == "bf16" and version > 1):
                continue
            # the verify check's rows (T = 5: 20 query rows) bound the shared memory
            if attention_mosaic.supported("int8", 20, HD, S, GROUP, c["splits"], st, version, kv_tile) is None:
                out.append(c)
        return out

    def record_error(e):
        msg = f"{type(e).__name__}: {str(e)[:200]}"
        out["errors"].setdefault(msg, traceback.format_exc()[-3000:])
        print(msg, flush=True)
        return msg

    key = jax.random.key(0)
    check_configs = [("triton", {})]
    for S in contexts:  # every Mosaic config any context will time
        check_configs += [("mosaic", c) for c in mosaic_configs(S) if ("mosaic", c) not in check_configs]
    for variant in variants:  # check
        for T in (1, 5):
            inputs, q, q_pos, want = check_case(jax.random.fold_in(key, T), variant, check_S, T, interpret)
            for name, config in check_configs:
                if variant == "bf16" and config.get("version", 1) > 1:
                    continue
                fn = KERNELS[name]
                row = {"variant": variant, "T": T, "cut": "recent" in inputs, "kernel": name, "config": config}
                try:
                    got = attend(fn, q, jnp.asarray(q_pos, jnp.int32), inputs["kv"], inputs["kv_len"], variant,
                                 inputs.get("recent"), inputs.get("recent_start"), interpret=interpret, **config)
                    err = float(np.abs(np.asarray(got, np.float64) - want).max())
                    row["max_abs_err"] = err if np.isfinite(err) else float("inf")
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["error"] = record_error(e)
                out["check"].append(row)
                print("check", row, flush=True)
                save()
    ok = {(r["variant"], r["kernel"], json.dumps(r["config"])) for r in out["check"]
          if r.get("max_abs_err", 1) < 2e-2}
    for S in contexts:  # time
        for variant in variants:
            kv, nbytes = make_kv(jax.random.fold_in(key, S), B, S, variant)
            q = jax.random.normal(jax.random.fold_in(key, S + 1), (B, args.T, H, HD), jnp.bfloat16)
            q_pos = jnp.broadcast_to(S - args.T + jnp.arange(args.T, dtype=jnp.int32), (B, args.T))
            q_rows, row_pos = rows_of(q, q_pos)
            kv_len = jnp.full((B,), S, jnp.int32)
            zero = jnp.zeros((B,), jnp.int32)
            for name, config in [("triton", {})] + [("mosaic", c) for c in mosaic_configs(S, variant)]:
                cell = {"context": S, "variant": variant, "kernel": name, "config": config, "bytes": nbytes,
                        "checked": (variant, name, json.dumps(config)) in ok}
                fn = KERNELS[name]
                run = lambda q_rows, kv: fn(q_rows, row_pos, kv, kv_len, zero, variant=variant,  # noqa: E731
                                            sm_scale=1 / math.sqrt(HD), interpret=interpret, **config)
                try:
                    if args.smoke:
                        t0 = time.perf_counter()
                        jax.block_until_ready(run(q_rows, kv))
                        cell.update(us=1e6 * (time.perf_counter() - t0), kernel_us=None)
                    else:
                        total, kern, names = cupti_us(run, q_rows, kv, iterations=args.iterations)
                        cell.update(us=total, kernel_us=kern, kernels=names,
                                    frac_copy_bw=nbytes / (kern * 1e-6) / bw)
                        # decode_attention's call as the model makes it (attend: its rows, merged)
                        whole = lambda q, kv: attend(fn, q, q_pos, kv, kv_len, variant, **config)  # noqa: E731
                        cell["attend_us"], _, _ = cupti_us(whole, q, kv, iterations=args.iterations)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    cell["error"] = record_error(e)
                out["cells"].append(cell)
                print("time", {k: v for k, v in cell.items() if k != "kernels"}, flush=True)
                save()
            del kv
    save()
    return out


if __name__ == "__main__":
    main()
