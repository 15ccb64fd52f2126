#!/usr/bin/env python
"""Check and time the Mosaic GPU W4A16 kernel beside its peers on Llama projection shapes (GPU).

One run does, in order, writing everything under --out:
  check   every config the sweep will time, at small and real shapes, against a float64 reference
          computed on the host (relative error; NaN fails);
  sweep   each (projection, M) over MosaicTiles configs, timed by CUPTI
          (jax.experimental.mosaic.gpu.profiler.measure, aggregate=False: every kernel's own time),
          over rotating weight copies larger than the 50 MB L2;
  peers   in the same run: XLA's bf16 dot, XLA on `jnp.int4` weights (per-channel scale after the
          dot), our Triton W4A16 kernel (w4a16_matmul's default dispatch), and our own XLA path
          (dequantize, then XLA's bf16 dot: mosaic_matmul's fallback, not a peer).
A call's time is the sum of its kernels (pad, kernel, split-K sum), so every method pays its whole
op; the Mosaic kernel's own time is recorded beside it.

  python scripts/bench_mosaic.py --out /tmp/mosaic            # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
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

from pallas_kernels import int4_mosaic  # noqa: E402
from pallas_kernels.int4_mosaic import (  # noqa: E402
    MosaicTiles, choose_tiles, dequantize_mosaic, supported, w4a8_mosaic, w4a16_mosaic,
)
from pallas_kernels.packing import pack_block, pack_int4  # noqa: E402
from pallas_kernels.w4a4 import w4a4_reference  # noqa: E402
from pallas_kernels.w4a16 import w4a16_matmul  # noqa: E402
from qspec_jax.evaluation import git_commit  # noqa: E402

PROJECTIONS = {  # llama3-8b: name -> (K, N)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
L2_BYTES = 50 * 2**20
GROUP = 128


def make_weights(key, K, N, copies):
    """`copies` random int4 weights in both layouts: packed (Triton) and Mosaic, plus bf16 and
    the per-channel jnp.int4 weight a plain JAX user would hold."""
    out = []
    for i in range(copies):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        q = jax.random.randint(k1, (K, N), -7, 8, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(k2, (K // GROUP, N), jnp.float32, 0.5, 1.5) / 64
        out.append(dict(
            packed={"packed": pack_int4(q, GROUP), "scales": s},
            mosaic={"w": q.T.astype(jnp.int4), "scales": s},
            bf16=dequantize_mosaic({"w": q.T.astype(jnp.int4), "scales": s}, jnp.bfloat16),
            int4=(q.astype(jnp.int4), s[0]),
        ))
    return out


def reference64(x, q, s):
    """float64 y = x @ (q * s) on the host."""
    x = np.asarray(x.astype(jnp.float32), np.float64)
    q = np.asarray(q, np.float64)
    s = np.asarray(s, np.float64)
    G = s.shape[0]
    w = (q.reshape(G, -1, q.shape[1]) * s[:, None]).reshape(q.shape)
    return x @ w


@jax.jit
def device_reference(x, mw):
    """f32 y = x @ (q * s) on the device at full f32 precision (the sweep's sanity check; the
    float64 check runs on the host at small shapes)."""
    return jnp.dot(x.astype(jnp.float32), dequantize_mosaic(mw, jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)


def rel_err(y, ref):
    y = np.asarray(y.astype(jnp.float32), np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    return float(err) if np.isfinite(err) else float("inf")


def cupti(fn, x, ws, iterations=5):
    """(us per call: all kernels of one call, us of the largest kernel per call) over the copies."""
    from jax.experimental.mosaic.gpu import profiler

    f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    _, timings = profiler.measure(f, aggregate=False, iterations=iterations)(x, ws)
    per_iter = [sum(t for _, t in it) for it in timings]
    names = {}
    for it in timings:
        for name, t in it:
            names.setdefault(name, []).append(t)
    main = max(names, key=lambda n: sum(names[n]))
    n = len(ws)
    return (1e3 * statistics.median(per_iter) / n,
            1e3 * statistics.median(names[main]) * len(names[main]) / len(timings) / n, main)


def configs(K, N, M, x_bytes=2, wide=False, consumers=1, ws_only=False, cluster=1, cluster_only=False):
    """The sweep's MosaicTiles for one shape: int4_mosaic.choose_tiles' rule and its neighbours
    (twice the split; `wide`: half the split, deeper pipelines, 128-row programs; M >= 64: the
    carried-accumulator body; consumers 2: warp-specialized programs of two consumer warpgroups;
    ws_only: the rule and the warp-specialized configs only; cluster 2: warp-specialized pairs of
    programs multicasting x; cluster_only: the rule and those pairs), those that fit."""
    base = choose_tiles(M, N, K, K // GROUP, x_bytes)
    cands = [base, dataclasses.replace(base, split=base.split * 2)]
    if ws_only:  # the rule, and the warp-specialized configs beside it
        cands, wide = [base], False
    if wide:
        cands += [dataclasses.replace(base, stages=base.stages + 2), dataclasses.replace(base, stages=8),
                  dataclasses.replace(base, rows=128)]
        if base.split > 1:
            cands.insert(1, dataclasses.replace(base, split=base.split // 2))
    if M >= 64 and x_bytes == 2 and not ws_only:  # wide token tiles: both bodies, one carried accumulator (W4A16 only) or two
        cands += [dataclasses.replace(base, carry=not base.carry, rows=64 if base.carry else base.rows)]
        cands += [dataclasses.replace(base, rows=128, stages=n, carry=True) for n in (4, 3, 2)][:1 + (M > 64)]
    if base.consumers > 1:  # the rule is warp-specialized: beside it one warpgroup (64 rows, twice the split)
        cands += [dataclasses.replace(base, rows=64, consumers=1, cluster=1, split=base.split * 2)]
    if consumers > 1 and N % 128 == 0:  # warp-specialized: two consumer warpgroups of 64 rows each
        ws = dataclasses.replace(base, rows=128, consumers=2)
        cands += [ws, dataclasses.replace(ws, split=max(1, ws.split // 2)),
                  dataclasses.replace(ws, split=ws.split * 2)]
        if M >= 128:  # shallower pipelines leave room for 256-token x tiles; the memory warpgroup runs ahead
            cands += [dataclasses.replace(ws, stages=n) for n in (2, 3)]
        if x_bytes == 2 and 64 <= M <= 128:  # the other W4A16 body (at 256 tokens the carried one won)
            cands += [dataclasses.replace(ws, carry=not ws.carry)]
        if cluster_only:
            cands = [base]
        if (cluster > 1 or ws.cluster > 1) and M >= 128:  # with / without pairs of programs sharing x (TMA multicast)
            other = dataclasses.replace(ws, cluster=3 - ws.cluster)
            cands += [other, dataclasses.replace(other, split=other.split * 2)]
        if x_bytes == 1 and M > 128:  # W4A8 256-token tiles beside two 128-token chunks
            other = 128 if ws.max_tokens > 128 else 256
            for split in (ws.split, ws.split * 2 if other == 256 else max(1, ws.split // 2)):
                fits = [dataclasses.replace(ws, max_tokens=other, split=split, stages=n) for n in (4, 3, 2)]
                cands += [t for t in fits if not supported(M, N, K, K // GROUP, t, x_bytes)][:1]
    out = []
    for t in cands:
        if t not in out and not supported(M, N, K, K // GROUP, t, x_bytes):
            out.append(t)
    return out


def record_error(results, exc_text, e):
    msg = f"{type(e).__name__}: {str(e)[:150]}"
    if msg not in results["errors"]:
        results["errors"][msg] = exc_text[-3000:]
        print(exc_text[-2000:], flush=True)
    return msg


def time_kernel(results, fn, x, ws, ref):
    """{'us', 'kernel_us', 'rel_err'} of one method, or {'error'}."""
    try:
        call_us, kern_us, _ = cupti(fn, x, ws)
        return {"us": call_us, "kernel_us": kern_us, "rel_err": rel_err(fn(x, ws[0]), ref)}
    except Exception as e:  # noqa: BLE001 - record and go on
        return {"error": record_error(results, traceback.format_exc(), e)}


def sweep(results, fn_of, tiles, x, ws, ref):
    """Time every config; return (rows, best row with rel_err < 1e-2)."""
    rows, best = [], None
    for t in tiles:
        row = {"tiles": str(t), **time_kernel(results, fn_of(t), x, ws, ref)}
        rows.append(row)
        if row.get("rel_err", 1) < 1e-2 and (best is None or row["us"] < best["us"]):
            best = row
    return rows, best


PEERS = ("xla_bf16", "xla_int4", "torch_tinygemm", "torch_cublas_bf16")


def join_sweeps(runs: list) -> dict:
    """One sweep from several runs on one device kind: every run's cells, each with its run's
    index, copy bandwidth and commit (a shape measured twice keeps both); meta is the first run's."""
    devices = {run["meta"]["device"] for run in runs}
    if len(devices) > 1:
        raise ValueError(f"sweeps from different devices: {sorted(devices)}")
    # a cell already joined (an earlier join's file) keeps its own run, bandwidth and commit; a new
    # run takes the next index after every run seen
    cells, next_run = [], 1 + max((c["run"] for run in runs for c in run["sweep"] if "run" in c), default=-1)
    for run in runs:
        fresh = any("run" not in c for c in run["sweep"])
        cells += [{"run": next_run, "copy_bw_Bps": run["meta"].get("copy_bw_Bps"),
                   "commit": run["meta"].get("commit"), **c} for c in run["sweep"]]
        next_run += fresh
    return {"meta": runs[0]["meta"], "sweep": cells,
            "errors": {k: v for run in runs for k, v in run.get("errors", {}).items()}}


def best_cells(cells: list, method: str, with_peers: bool = False) -> dict:
    """{(proj, M): the cell where `method` was fastest}: where runs measured a shape again (other
    configurations), each ratio is read off one run, the one with our best configuration, and
    compares it with that run's own peers. with_peers: only cells that timed a peer (a run of our
    kernels alone, e.g. a tile probe, counts for the kernel's own bandwidth, not against peers)."""
    best = {}
    for c in cells:
        t = c["methods"].get(method, {}).get("us")
        if with_peers and not any(p in c["methods"] for p in PEERS):
            continue
        key = (c["proj"], c["M"])
        if t is not None and (key not in best or t < best[key]["methods"][method]["us"]):
            best[key] = c
    return best


def merge_steps(steps: list) -> dict:
    """One step file from several (`bench_engine.py --parts step`) of one device kind: a (batch,
    mode) measured again in a later file replaces the earlier cell, so every ratio of one batch
    comes from one run; meta is the last file's, with each batch's commit in `batch_commits`."""
    devices = {st["meta"].get("device") for st in steps}
    if len(devices) > 1:
        raise ValueError(f"step files from different devices: {sorted(map(str, devices))}")
    by_batch = {}
    for st in steps:
        for b in {c["batch"] for c in st["step"]}:
            by_batch[b] = ([c for c in st["step"] if c["batch"] == b], st["meta"])
    meta = {**steps[-1]["meta"], "batch_commits": {str(b): m.get("commit") for b, (_, m) in sorted(by_batch.items())},
            "batch_copy_bytes_per_s": {str(b): m.get("copy_bytes_per_s") for b, (_, m) in sorted(by_batch.items())}}
    return {"meta": meta, "step": [c for b in sorted(by_batch) for c in by_batch[b][0]]}


def tile_probe_run(probe: dict) -> dict:
    """A sweep run (our kernels only) from benchmarks/engine/probes/wide_loads.py's output: each
    (proj, M)'s fastest W4A16 and W4A8 rows that matched the reference."""
    cells = {}
    for r in probe["cells"]:
        if "kernel_us" not in r or r.get("rel_err", 1) >= 1e-2:
            continue
        c = cells.setdefault((r["proj"], r["M"]), {
            "proj": r["proj"], "M": r["M"], "weight_bytes_int4": r["weight_bytes"], "methods": {}})
        name = f"mosaic_{r['mode']}"
        if name not in c["methods"] or r["us"] < c["methods"][name]["us"]:
            c["methods"][name] = {k: r[k] for k in ("us", "kernel_us", "rel_err", "tiles")}
    return {"meta": {**probe["meta"]}, "sweep": list(cells.values()), "errors": probe.get("errors", {})}


def summarize(sweep: dict, step: dict | None) -> dict:
    """benchmarks/engine/hopper_summary.json (issue 18's keys) from sweep and step files (a sweep
    may hold several runs' cells, all from one device: `join_sweeps`, `best_cells`)."""
    meta = sweep["meta"]
    bw = meta["copy_bw_Bps"]
    s = {"commit": meta.get("commit"), "device": meta["device"], "jax": meta["jax"], "timing": "cupti",
         "copy_bw_Bps": bw, "kernel_frac_copy_bw": {}, "kernel_vs_best_peer": {},
         "verify_flatness": {}, "w4a8_vs_cublas_bf16": {}}
    for (proj, M), c in sorted(best_cells(sweep["sweep"], "mosaic_w4a16").items()):
        if proj in ("gate_up", "down") and M <= 16:  # the kernel's own time (the pad and the
            # output's transpose are separate small ops around it)
            kern = c["methods"]["mosaic_w4a16"]["kernel_us"]
            s["kernel_frac_copy_bw"].setdefault(proj, {})[str(M)] = (
                c["weight_bytes_int4"] / (kern * 1e-6) / (c.get("copy_bw_Bps") or bw))
    ours16 = best_cells(sweep["sweep"], "mosaic_w4a16", with_peers=True)
    for (proj, M), c in sorted(ours16.items()):
        t = {k: v["us"] for k, v in c["methods"].items() if "us" in v}
        s["kernel_vs_best_peer"].setdefault(proj, {})[str(M)] = min(t[p] for p in PEERS if p in t) / t["mosaic_w4a16"]
    for (proj, M), c in sorted(best_cells(sweep["sweep"], "mosaic_w4a8", with_peers=True).items()):
        t = {k: v["us"] for k, v in c["methods"].items() if "us" in v}
        cublas = t.get("torch_cublas_bf16", t.get("xla_bf16"))  # XLA's bf16 dot is a cuBLAS call too
        if M in (128, 256) and proj in ("gate_up", "down") and cublas:
            s["w4a8_vs_cublas_bf16"].setdefault(proj, {})[str(M)] = cublas / t["mosaic_w4a8"]
    for proj in ("gate_up", "down"):
        a, b = ours16.get((proj, 16)), ours16.get((proj, 64))
        if a and b:
            s["verify_flatness"][proj] = b["methods"]["mosaic_w4a16"]["us"] / a["methods"]["mosaic_w4a16"]["us"]
    if step:
        by = {(c["batch"], c["mode"]): c for c in step["step"]}
        step_bw = step["meta"].get("batch_copy_bytes_per_s", {})
        s["commit"] = step["meta"].get("commit", s["commit"])  # the step's tree; kernel cells keep their own
        if "batch_commits" in step["meta"]:
            s["step_commits"] = step["meta"]["batch_commits"]
        s.update({"step_over_floor": {"w4a16": {}}, "w4a16_vs_torch_peer": {}, "bf16_vs_torch_bf16": {},
                  "w4a16_vs_bf16_step": {}, "draft_vs_verify_step": {}})
        for b in sorted({b for b, _ in by}):
            ours = by.get((b, "w4a16_mosaic"))
            if ours:  # the floor at the copy bandwidth of the step's own run
                run_bw = step_bw.get(str(b)) or step["meta"].get("copy_bytes_per_s") or bw
                s["step_over_floor"]["w4a16"][str(b)] = ours["step_ms"] * 1e-3 * run_bw / (
                    ours["weight_bytes"] + ours["kv_bytes_read"])
                torch_int4 = [by[(b, m)]["step_ms"] for m in ("torch_tinygemm",) if (b, m) in by]
                if torch_int4:
                    s["w4a16_vs_torch_peer"][str(b)] = min(torch_int4) / ours["step_ms"]
                if (b, "bf16") in by:
                    s["w4a16_vs_bf16_step"][str(b)] = by[(b, "bf16")]["step_ms"] / ours["step_ms"]
                if (b, "w4a8_mosaic") in by:
                    s["draft_vs_verify_step"][str(b)] = ours["step_ms"] / by[(b, "w4a8_mosaic")]["step_ms"]
            if (b, "bf16") in by and (b, "torch_cublas_bf16") in by:
                s["bf16_vs_torch_bf16"][str(b)] = by[(b, "torch_cublas_bf16")]["step_ms"] / by[(b, "bf16")]["step_ms"]
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,4,16,64,128,256", help="batch sizes (peers and sweep)")
    ap.add_argument("--same-as", default="4:1,8:1", help="M:M0 pairs timed with M0's best config "
                    "(M <= 8 pads to the same 8-token kernel)")
    ap.add_argument("--no-peers-at", default="8", help="batch sizes timed for our kernels only")
    ap.add_argument("--w4a8-ms", default="1,16,128,256", help="batch sizes of the W4A8 sweep")
    ap.add_argument("--projections", default="gate_up,down,qkv,o")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop sweeping after this long")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="run the float64 checks only")
    ap.add_argument("--wide-ms", default="1,16", help="batch sizes swept over more configs "
                    "(deeper pipelines, 128-row programs)")
    ap.add_argument("--torch-kinds", default="tinygemm,cublas_bf16", help="PyTorch linears timed beside")
    ap.add_argument("--peers", default="all", help="JAX methods timed beside (comma list, or all)")
    ap.add_argument("--check-s", type=float, default=60.0, help="seconds the float64 checks may add")
    ap.add_argument("--kernels", default="w4a16,w4a8", help="which Mosaic kernels to check and sweep")
    ap.add_argument("--summary", nargs="+", metavar="SWEEP_JSON",
                    help="write the summary of sweep JSONs (later files win a repeated cell) and "
                         "--step to --out and exit")
    ap.add_argument("--probe", nargs="*", default=[], metavar="PROBE_JSON",
                    help="with --summary: tile-probe runs (probes/wide_loads.py) joined as sweeps "
                         "of our kernels alone (they count for kernel bandwidth, not peer ratios)")
    ap.add_argument("--step", nargs="+", help="bench_engine.py --parts step JSONs for --summary "
                    "(a batch in a later file replaces the earlier one)")
    ap.add_argument("--merged", help="with --summary: also write the joined sweep here")
    ap.add_argument("--consumers", type=int, default=2, choices=(1, 2),
                    help="2: also sweep warp-specialized configs (MosaicTiles.consumers)")
    ap.add_argument("--cluster", type=int, default=1, choices=(1, 2),
                    help="2: also sweep warp-specialized clusters of two programs (MosaicTiles.cluster)")
    ap.add_argument("--cluster-only", default="", help="projections swept with --ws-only --cluster 2 "
                    "over the rule and the clusters only")
    ap.add_argument("--ws-only", action="store_true",
                    help="sweep choose_tiles' rule and the warp-specialized configs only")
    ap.add_argument("--token-major", nargs="?", const="on", choices=("on", "off"),
                    help="the kernels write y [M, N] themselves (on) or out^T for XLA to transpose (off); "
                         "default: int4_mosaic.TRANSPOSED_STORE")
    args = ap.parse_args()
    if args.summary:
        sweep_run = join_sweeps([json.load(open(p)) for p in args.summary]
                                + [tile_probe_run(json.load(open(p))) for p in args.probe])
        if args.merged:
            with open(args.merged, "w") as f:
                json.dump(sweep_run, f, indent=1)
        step = merge_steps([json.load(open(p)) for p in args.step]) if args.step else None
        summary = summarize(sweep_run, step)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.token_major:
        int4_mosaic.TRANSPOSED_STORE = args.token_major == "on"
    args.token_major = int4_mosaic.TRANSPOSED_STORE
    t_start = time.time()
    dev = jax.devices()[0]
    meta = {"device": dev.device_kind, "jax": jax.__version__, "platform": dev.platform,
            "timing": "cupti", "group_size": GROUP, "commit": git_commit(), "token_major": args.token_major}
    try:
        import torch_peer

        meta["copy_bw_Bps"] = torch_peer.copy_bandwidth()
    except Exception as e:  # noqa: BLE001
        torch_peer = None
        meta["torch_error"] = str(e)[:200]
    print(meta, flush=True)
    key = jax.random.key(0)
    results = {"meta": meta, "check": [], "sweep": [], "errors": {}}
    path = os.path.join(args.out, "mosaic_sweep.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if args.check_only:
        run_checks(results, key, args.kernels, deadline=t_start + args.check_s)
        save()
        return

    same_as = dict(tuple(map(int, p.split(":"))) for p in args.same_as.split(",") if p)
    ms = sorted(set(map(int, args.ms.split(","))) | set(same_as))
    for proj in args.projections.split(","):
        K, N = PROJECTIONS[proj]
        copies = max(2, -(-2 * L2_BYTES // (K * N // 2)))
        ws = make_weights(jax.random.fold_in(key, K + N), K, N, copies)
        best_of = {}
        for M in ms:
            if time.time() - t_start > args.budget_s:
                print("budget spent", flush=True)
                break
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            ref = np.asarray(device_reference(x, ws[0]["mosaic"]), np.float64)
            ref8 = np.asarray(w4a4_reference(x, ws[0]["packed"], act_bits=8).astype(jnp.float32),
                              np.float64)
            cell = {"proj": proj, "K": K, "N": N, "M": M, "copies": copies,
                    "weight_bytes_int4": K * N // 2 + (K // GROUP) * N * 4, "methods": {}}
            peers = {
                "xla_bf16": (lambda x, w: x @ w["bf16"]),
                "xla_int4": (lambda x, w: (jnp.dot(x, w["int4"][0].astype(jnp.bfloat16),
                                                   preferred_element_type=jnp.float32)
                                           * w["int4"][1]).astype(jnp.bfloat16)),
                "triton_w4a16": (lambda x, w: w4a16_matmul(x, w["packed"])),
                # our own XLA path (mosaic_matmul's fallback): the same function as the kernel
                "xla_dequant_w4a16": (lambda x, w: jnp.dot(x, dequantize_mosaic(w["mosaic"], x.dtype),
                                                           preferred_element_type=jnp.float32).astype(x.dtype)),
            }
            peers = {k: v for k, v in peers.items() if args.peers == "all" or k in args.peers.split(",")}
            no_peers = str(M) in args.no_peers_at.split(",")
            for name, fn in peers.items():
                if no_peers:
                    break
                cell["methods"][name] = time_kernel(results, fn, x, ws, ref8 if "w4a8" in name else ref)
            cell["methods"].get("xla_int4", {}).pop("rel_err", None)  # per-channel: another function
            if torch_peer is not None and not no_peers:
                for kind in filter(None, args.torch_kinds.split(",")):
                    try:
                        us = torch_peer.time_linear("tinygemm" if kind == "tinygemm" else "bf16", M, K, N)
                        cell["methods"]["torch_" + kind] = {"us": us}
                    except Exception as e:  # noqa: BLE001
                        cell["methods"]["torch_" + kind] = {"error": record_error(
                            results, traceback.format_exc(), e)}
            for kind, fn_of, x_bytes, r in (
                ("mosaic_w4a16", lambda t: (lambda x, w: w4a16_mosaic(x, w["mosaic"], tiles=t)), 2, ref),
                ("mosaic_w4a8", lambda t: (lambda x, w: w4a8_mosaic(x, w["mosaic"], tiles=t)), 1, ref8),
            ):
                if kind.split("_")[1] not in args.kernels:
                    continue
                if kind == "mosaic_w4a8" and str(M) not in args.w4a8_ms.split(","):
                    continue
                if M in same_as and (kind, same_as[M]) in best_of:
                    tiles = [best_of[(kind, same_as[M])]]
                else:
                    tiles = configs(K, N, M, x_bytes, wide=str(M) in args.wide_ms.split(","),
                                    consumers=args.consumers, ws_only=args.ws_only, cluster=args.cluster,
                                    cluster_only=proj in args.cluster_only.split(","))
                rows, best = sweep(results, fn_of, tiles, x, ws, r)
                cell[kind + "_sweep"] = rows
                if best:
                    cell["methods"][kind] = best
                    best_of[(kind, M)] = eval(best["tiles"])  # noqa: S307 - our own repr
            results["sweep"].append(cell)
            line = " ".join(f"{k}={v['us']:.1f}" for k, v in cell["methods"].items() if "us" in v)
            print(f"{proj:8s} M={M:4d} {line}", flush=True)
            save()
    if not args.skip_check:  # small shapes against float64, with the time left
        run_checks(results, key, args.kernels, deadline=t_start + args.budget_s + args.check_s)
    save()


def run_checks(results, key, kernels="w4a16,w4a8", deadline=float("inf")):
    """Small shapes, both scale kinds, odd M (x is read past its last row: TMA's zero fill), one
    and several K ranges and groups a step, the carried body (W4A16 only), warp-specialized
    programs and clusters: each kernel against float64 on the host."""
    for (K, N, M, gs), t in itertools.product(
        [(512, 256, 1, 128), (512, 256, 5, 128), (512, 256, 33, -1), (1152, 576, 7, 64),
         (4096, 1024, 200, 128)],
        [MosaicTiles(rows=128, split=2, stages=2), MosaicTiles(rows=64, split=3, stages=3),
         MosaicTiles(rows=64, split=1, stages=4), MosaicTiles(rows=64, split=2, stages=3, groups=2),
         MosaicTiles(rows=128, split=1, stages=2, carry=True),
         MosaicTiles(rows=128, split=2, stages=3, consumers=2),
         MosaicTiles(rows=128, split=1, stages=2, carry=True, consumers=2),
         MosaicTiles(rows=128, split=2, stages=3, consumers=2, cluster=2),
         MosaicTiles(rows=128, split=1, stages=2, carry=True, consumers=2, cluster=2)],
    ):
        if time.time() > deadline:
            break
        G = 1 if gs == -1 else K // gs
        if supported(M, N, K, G, t):
            continue
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, K * M + N), 3)
        q = jax.random.randint(k1, (K, N), -7, 8, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(k2, (G, N), jnp.float32, 0.5, 1.5)
        x = jax.random.normal(k3, (M, K), jnp.bfloat16)
        mw = {"w": q.T.astype(jnp.int4), "scales": s}
        cell = {"K": K, "N": N, "M": M, "group": gs, "tiles": str(t)}
        try:
            cell["w4a16_rel_err"] = rel_err(w4a16_mosaic(x, mw, tiles=t), reference64(x, q, s))
            packed = {"packed": pack_int4(q, pack_block(K, G)), "scales": s}
            for bits in ((8, 4) if "w4a8" in kernels and not t.carry else ()):
                ref = np.asarray(w4a4_reference(x.astype(jnp.float32), packed, act_bits=bits), np.float64)
                y = w4a8_mosaic(x.astype(jnp.float32), mw, act_bits=bits, tiles=t)
                cell[f"w4a{bits}_rel_err_vs_jnp"] = rel_err(y, ref)
        except Exception as e:  # noqa: BLE001 - record and go on
            cell["error"] = record_error(results, traceback.format_exc(), e)
        results["check"].append(cell)
        print("check", cell, flush=True)


if __name__ == "__main__":
    main()
