"""Long-context decode speed per mode and KV cache (issue 11): QSpec on the hierarchical INT8/INT4
cache, QuantSpec, and the plain baselines, on Llama-3-8B shapes with generated weights.

A 32k-token prefill of a batch of 16 takes far longer than its decode, and its time is not part of
the decode ratio the issue asks for, so each mode's cache is built directly as a prefill would
leave it (random K/V for the context's positions; the int8 cache quantized from them by the same
`hierarchical_kv.prefill` a real prefill ends with) and only the decode loop is timed:
`speculative.decode_jit`, the while loop `generate` runs after its prefill, compiled ahead of time,
one warm-up call, then the median of `reps` calls, each on a freshly built cache (the call donates
it). Acceptance is replayed per cycle from traces recorded on the real SmolLM2 (`scripts/replay.py`):
QSpec on the int8 cache and QuantSpec from benchmarks/kv/traces_int8kv.json
(scripts/measure_kv_quality.py: the drafts read the INT4 view there too), QSpec on bf16 KV from
benchmarks/acceptance/traces.json. The real model's context is 8192 tokens (its traces are from
prompts under 8k), so acceptance at 32k is the same replayed traces.

Modes (name: weights, verify / draft, cache):
  w4a16_bf16kv, w4a16_int8kv   int4, plain W4A16 decoding
  bf16_bf16kv, bf16_int8kv     bf16, plain bf16 decoding
  qspec_{w4a8,w4a4}_{bf16,int8}kv_g{G}   int4, W4A16 verifies, the draft mode drafts G tokens
  qspec_w4a16_int8kv_g{G}      int4, W4A16 verifies on INT8 and drafts on the INT4 view (the KV cache alone)
  quantspec_g{G}               bf16 verifies on INT8, W4A16 on int4 weights drafts on the INT4 view
  MODE+einsum                  MODE with XLA's einsum attention over a bf16 cache instead of the kernel

    python scripts/bench_long_context.py --out benchmarks/kv/h200_long_context.json   # GPU
    python scripts/bench_long_context.py --smoke --out /tmp/lc.json                    # CPU, tiny
    python scripts/bench_long_context.py --dry-run                  # CPU: each mode's cache and the weights, in GB

On an 80 GB GPU (H100) the 16 x 32k bf16 cache (69 GB) and the bf16 weights (16 GB) that the
bf16 / QuantSpec modes need do not fit together: run the cells as two processes into one file,
the batch-16 cells first (int4 weights only; give JAX 95% of the memory), then the others:

    XLA_CLIENT_MEM_FRACTION=0.95 python scripts/bench_long_context.py --shapes 16x8192,16x32768 --out R.json
    python scripts/bench_long_context.py --shapes 1x8192,4x32768 --append --out R.json
    python scripts/bench_long_context.py --summarize benchmarks/kv/h200_long_context.json \\
        --summary benchmarks/kv/h200_summary.json --plot benchmarks/kv/h200_long_context.png
                                                          # the issue's ratio maps and plot from a results file
    python scripts/bench_long_context.py --summarize A.json B.json:16x8192 --summary S.json
                                                          # cell by cell: A's cells, B's ratios at 16 x 8k over A's
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import best_copy_bandwidth  # noqa: E402
from pallas_kernels import attention_mosaic  # noqa: E402
from pallas_kernels.common import is_hopper  # noqa: E402
from qspec_jax import checkpoint, hierarchical_kv, kv_cache, quantize, speculative  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402
from qspec_jax.hierarchical_kv import HierarchicalKVCache  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402
from qspec_jax.kernel_choice import KERNELS, arrange_weights, resolve_kernels  # noqa: E402
from qspec_jax.model import fuse_projections, unstack_layers  # noqa: E402
from qspec_jax.acceptance import Greedy  # noqa: E402
from qspec_jax.spec import KV_GROUP, KV_WINDOW, GenerationSpec  # noqa: E402
from replay import Replay  # noqa: E402

# The issue's target cells (batch x context): G1/G2 at batch 16, G3 at 1 x 8k and 4 x 32k.
DEFAULT_CELLS = "16x8192:w4a16_bf16kv,w4a16_int8kv,qspec_w4a8_int8kv_g3,qspec_w4a4_int8kv_g3,qspec_w4a16_int8kv_g3;" \
                "1x8192:bf16_bf16kv,quantspec_g3,w4a16_bf16kv,qspec_w4a8_int8kv_g3;" \
                "16x32768:w4a16_bf16kv,w4a16_int8kv,qspec_w4a8_int8kv_g3,qspec_w4a4_int8kv_g3,qspec_w4a16_int8kv_g3;" \
                "4x32768:bf16_bf16kv,quantspec_g3,w4a16_bf16kv,qspec_w4a8_int8kv_g3"


def parse_mode(name: str) -> dict:
    """The generation settings behind a mode name (module docstring)."""
    if name.endswith("+einsum"):  # the same mode with XLA's einsum attention over a bf16 cache
        return {**parse_mode(name[: -len("+einsum")]), "einsum": True}
    parts = name.split("_")
    if name in ("w4a16_bf16kv", "w4a16_int8kv", "bf16_bf16kv", "bf16_int8kv"):
        return dict(weights="bf16" if parts[0] == "bf16" else "int4", verify_mode=parts[0], draft_mode=parts[0],
                    gamma=0, kv=parts[1][:-2], trace=None)
    # the W4A16 draft differs from its verifier only on the int8 cache (it reads the INT4 view there)
    if parts[0] == "qspec" and len(parts) == 4 and (parts[1] in ("w4a8", "w4a4") and parts[2] in ("bf16kv", "int8kv")
                                                    or parts[1:3] == ["w4a16", "int8kv"]):
        gamma = int(parts[3][1:])
        return dict(weights="int4", verify_mode="w4a16", draft_mode=parts[1], gamma=gamma, kv=parts[2][:-2],
                    trace=(parts[2][:-2], f"{parts[1]}_g{gamma}"))
    if parts[0] == "quantspec" and len(parts) == 2:
        gamma = int(parts[1][1:])
        return dict(weights="bf16", verify_mode="bf16", draft_mode="w4a16", gamma=gamma, kv="int8",
                    trace=("int8", f"quantspec_w4a16_g{gamma}"))
    raise ValueError(f"unknown mode {name!r} (see the module docstring)")


def parse_cells(text: str) -> list:
    """"BxS:mode,mode;BxS:..." -> [(batch, context, [modes])]."""
    cells = []
    for item in filter(None, text.split(";")):
        shape, modes = item.split(":")
        b, s = (int(x) for x in shape.lower().split("x"))
        cells.append((b, s, [m for m in modes.split(",") if m]))
        for m in cells[-1][2]:
            parse_mode(m)  # fail before any GPU time is spent
    return cells


def build_cache(config, kind, batch, context, max_len, *, key, group, window, headroom, dtype):
    """A cache as a prefill of `context` tokens per row leaves it: random K/V (unit normal, the
    scale of real post-RoPE keys does not change the bytes read), one layer at a time."""
    shape = (batch, config.num_kv_heads, context, config.head_dim)
    lengths = jnp.full((batch,), context, jnp.int32)
    ks, vs = [], []
    for i in range(config.num_layers):
        k, v = _random_kv(jax.random.fold_in(key, i), shape, max_len if kind == "bf16" else context, dtype)
        if kind == "int8":
            k, v = _quantized_layer(k, v, lengths, max_len=max_len, group=group, window=window,
                                    headroom=headroom, kv_heads=config.num_kv_heads), None
        ks.append(k)
        vs.append(v)
    if kind == "int8":
        return HierarchicalKVCache(layers=tuple(ks), lengths=lengths)
    return KVCache(k=tuple(ks), v=tuple(vs), lengths=lengths)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _random_kv(key, shape, slots, dtype):
    """Random k, v [B, KV, slots, hd]: an eighth of the slots drawn and tiled, so the generator's
    temporaries are an eighth of a layer's (repeated keys read the same bytes). The 16 x 32k bf16
    cache (69 GB) still runs out of memory on an 80 GB card this way (benchmarks/kv/README.md)."""
    k1, k2 = jax.random.split(key)
    reps = 8 if slots % 8 == 0 else 1
    part = shape[:2] + (slots // reps,) + shape[3:]
    draw = lambda k: jnp.tile(jax.random.normal(k, part, dtype), (1, 1, reps, 1))  # noqa: E731
    return draw(k1), draw(k2)


@partial(jax.jit, static_argnames=("max_len", "group", "window", "headroom", "kv_heads"))
def _quantized_layer(k, v, lengths, *, max_len, group, window, headroom, kv_heads):
    cache = hierarchical_kv.create(k.shape[0], kv_heads, k.shape[3], max_len, group=group, window=window,
                                   dtype=k.dtype)
    return hierarchical_kv.prefill(cache, k, v, lengths, headroom)


def load_traces(path, required):
    if not os.path.exists(path):
        if required:
            raise SystemExit(f"no acceptance traces at {path} (scripts/measure_kv_quality.py / measure_acceptance.py)")
        return None
    with open(path) as f:
        return json.load(f)


def replay_rule(traces, kind, key, batch, fallback):
    """The rule replaying the [batch, cycles] counts recorded at this setting, rows cycled; (rule, where
    the trace came from)."""
    data = traces.get(kind)
    if data is None or key not in data["traces"]:
        if fallback is None or key.split("_g")[-1] not in ("1", "2", "3", "4"):
            raise SystemExit(f"no trace {key!r} for the {kind} cache (have {sorted(data['traces']) if data else []})")
        data, source = fallback, f"FALLBACK {fallback['path']}:w4a8_g{key.split('_g')[-1]} (smoke only)"
        key = f"w4a8_g{key.split('_g')[-1]}"
    else:
        source = f"{data['path']}:{key}"
    t = np.asarray(data["traces"][key], np.int32)
    return Replay.of(t[np.arange(batch) % t.shape[0]]), source


def _nbytes(x) -> int:
    """Bytes of an array as stored: two int4 values a byte (the Mosaic layout's `jnp.int4`, whose
    nbytes counts a byte a value)."""
    return x.size // 2 if x.dtype in (jnp.int4, jnp.uint4) else x.size * jnp.dtype(x.dtype).itemsize


KV_VALUE_BYTES = {"bf16": 2, "int8": 1, "int4": 0.5}  # int8: both 4-bit planes; int4: the upper one


def step_bytes(params, config, batch, context, view):
    """Bytes a decode step must read: the weights (not the embedding table) and the KV prefix
    attention reads in `view` (bf16 K/V; the hierarchical cache's INT8 view, both planes, or its
    INT4 view, the upper plane; their scales and the recent buffer left out)."""
    weights = sum(_nbytes(leaf) for name, tree in params.items() if name != "embed" for leaf in jax.tree.leaves(tree))
    if "lm_head" not in params:
        weights += _nbytes(params["embed"])
    elems = 2 * config.num_layers * batch * config.num_kv_heads * context * config.head_dim
    return weights, int(elems * KV_VALUE_BYTES[view])


def plan_mode(name, weights, config, batch, context, new_tokens, traces, fallback, group, window) -> dict:
    """Everything one mode's timing needs, with its decode program lowered (not yet compiled)."""
    s = parse_mode(name)
    params, draft_params = (weights["bf16"], weights["int4"]) if s["weights"] == "bf16" else (weights["int4"], None)
    if name.startswith("bf16_"):
        draft_params = None
    max_len = (speculative.cache_length if s["kv"] == "int8" else speculative.cache_slots)(context, new_tokens, s["gamma"])
    key = jax.random.key(batch * 7919 + context)
    first = jax.random.randint(key, (batch,), 3, config.vocab_size, jnp.int32)
    rule, source = replay_rule(traces, *s["trace"], batch, fallback) if s["trace"] is not None else (Greedy(), None)
    spec = GenerationSpec(config=config, max_new_tokens=new_tokens, gamma=s["gamma"], draft_mode=s["draft_mode"],
                          verify_mode=s["verify_mode"], rule=rule, eos_ids=(), separate_draft=draft_params is not None)
    plan = {"name": name, "settings": s, "batch": batch, "context": context, "new_tokens": new_tokens,
            "source": source,
            "cache": lambda: build_cache(config, s["kv"], batch, context, max_len, key=key, group=group,
                                         window=window, headroom=s["gamma"] + 1, dtype=jnp.bfloat16),
            "args": lambda c: (params, c, first, jax.random.key(1), draft_params, None)}  # no adaptive arrays
    kernel_t = kv_cache.KERNEL_ATTENTION_MAX_T
    kv_cache.KERNEL_ATTENTION_MAX_T = 0 if s.get("einsum") else kernel_t  # read when the forward is traced
    speculative.decode_jit.clear_cache()  # so the flag's value, not a cached trace, decides
    try:
        plan["lowered"] = speculative.decode_jit.lower(*plan["args"](jax.eval_shape(plan["cache"])), spec=spec)
    finally:
        kv_cache.KERNEL_ATTENTION_MAX_T = kernel_t
        speculative.decode_jit.clear_cache()
    return plan


def weight_shapes(config) -> dict:
    """{"bf16", "int4"}: the shapes of the generated weights a run holds (no device work); fusing and
    unstacking them moves no bytes."""
    fparams = jax.eval_shape(lambda: checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16))
    return {"bf16": fparams,
            "int4": jax.eval_shape(lambda p: quantize.quantize_params(p, config, dtype=jnp.bfloat16), fparams)}


def memory_plan(config, cells, new_tokens, group, window) -> list:
    """Device bytes each selected mode holds while it runs, from shapes alone (no device work): its
    cache and the weights the whole run keeps (int4, plus bf16 when any mode of the run needs them).
    Decode temporaries (per-layer attention partials, logits) come on top and are small."""
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    weights = {kind: nbytes(tree) for kind, tree in weight_shapes(config).items()}
    kept = weights["int4"] + (weights["bf16"] if any(parse_mode(m)["weights"] == "bf16"
                                                     for _, _, modes in cells for m in modes) else 0)
    rows = []
    for batch, context, modes in cells:
        for name in modes:
            s = parse_mode(name)
            max_len = (speculative.cache_length if s["kv"] == "int8" else speculative.cache_slots)(
                context, new_tokens, s["gamma"])
            cache = nbytes(jax.eval_shape(lambda: build_cache(  # noqa: B023 - called at once
                config, s["kv"], batch, context, max_len, key=jax.random.key(0), group=group, window=window,
                headroom=s["gamma"] + 1, dtype=jnp.bfloat16)))
            rows.append({"batch": batch, "context": context, "mode": name, "cache_bytes": cache,
                         "weights_bytes": kept, "total_bytes": cache + kept})
    return rows


def compile_all(plans, threads):
    """Compile the lowered programs, several at once (XLA compiles outside the GIL); adds
    plan["compiled"] and plan["compile_s"] (each program's own wall time, overlapping the others)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(plan):
        t0 = time.perf_counter()
        try:
            plan["compiled"] = plan["lowered"].compile()
        except Exception as e:  # noqa: BLE001 - recorded with the mode
            plan["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        plan["compile_s"] = time.perf_counter() - t0
        return plan

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, plans))


def measure(plan, reps) -> dict:
    """Median decode seconds of a compiled plan over `reps` calls after a warm-up, each on a fresh cache."""
    s, compiled, new_tokens, batch = plan["settings"], plan["compiled"], plan["new_tokens"], plan["batch"]
    times, result = [], None
    for _ in range(reps + 1):  # the first call warms up
        c = jax.block_until_ready(plan["cache"]())
        result = None
        t0 = time.perf_counter()
        result, c = jax.block_until_ready(compiled(*plan["args"](c)))
        times.append(time.perf_counter() - t0)
        del c  # the final cache (the donated input's buffers)
    summ = result.summary()
    seconds = float(np.median(times[1:]))
    return {
        "mode": plan["name"], **{k: v for k, v in s.items() if k != "trace"}, "seconds": seconds,
        "bf16_cache_attention": "einsum" if s.get("einsum") or jax.default_backend() != "gpu" else "kernel",
        "ms_per_token": 1e3 * seconds / (new_tokens - 1), "tokens_per_s": batch * (new_tokens - 1) / seconds,
        "compile_s": plan["compile_s"], "cycles": int(np.max(np.asarray(result.cycles))),
        "acceptance_rate": summ["acceptance_rate"], "tokens_per_cycle": summ["tokens_per_cycle"],
        "acceptance_source": plan["source"], "all_times_s": times,
    }


# The issue's cells of each ratio map: null in the summary until measured.
ISSUE_CELLS = {"qspec_int8kv_vs_w4a16_bf16kv": ("16x8192", "16x32768"),
               "qspec_int8kv_vs_w4a16_int8kv": ("16x8192", "16x32768"),
               "quantspec_vs_bf16": ("1x8192", "4x32768")}
# Beside the issue's maps: the W4A16 draft on the INT4 view (mode qspec_w4a16_int8kv_g*).
KV_DRAFT_MAPS = ("w4a16_int4view_draft_vs_w4a16_bf16kv", "w4a16_int4view_draft_vs_w4a16_int8kv")


def summarize(results: dict) -> dict:
    """The issue's ratio maps (decode only): each a map from "BxS" to baseline time / mode time
    (None for an issue cell not measured)."""
    maps = {name: dict.fromkeys(cells) for name, cells in ISSUE_CELLS.items()}
    maps.update({name: {} for name in KV_DRAFT_MAPS})
    best = {}
    for cell in results["cells"]:
        key = f"{cell['batch']}x{cell['context']}"
        t = {m["mode"]: m["seconds"] for m in cell["modes"] if "error" not in m}
        # QSpec proper (W4A8 / W4A4 drafts) and, beside it, the W4A16 draft on the INT4 view
        # (speculation through the cache alone), each against the same baselines
        kinds = {"qspec_int8kv": {m: v for m, v in t.items() if m.startswith(("qspec_w4a8_int8kv", "qspec_w4a4_int8kv"))},
                 "w4a16_int4view_draft": {m: v for m, v in t.items() if m.startswith("qspec_w4a16_int8kv")}}
        quant = {m: v for m, v in t.items() if m.startswith("quantspec_")}
        for kind, modes in kinds.items():
            if not modes:
                continue
            name = min(modes, key=modes.get)
            best.setdefault(key, {})[kind] = name
            for base in ("w4a16_bf16kv", "w4a16_int8kv"):
                if base in t:
                    maps[f"{kind}_vs_{base}"][key] = t[base] / modes[name]
        if quant and "bf16_bf16kv" in t:
            name = min(quant, key=quant.get)
            best.setdefault(key, {})["quantspec"] = name
            maps["quantspec_vs_bf16"][key] = t["bf16_bf16kv"] / quant[name]
    return {**maps, "best_setting": best}


def floor_bounds(results: dict) -> dict:
    """The issue's ratio maps with every pass at its copy-bandwidth floor (the bytes each pass must
    read: `step_bytes`, at the run's copy bandwidth) and each speculative mode's measured tokens per
    cycle: the most each ratio can be at that acceptance, whatever the kernels. A draft step reads
    the int4 weights and the INT4 view, a verify pass the verifier's weights and the INT8 view (the
    same bytes for gamma + 1 queries as for one). QSpec's W4A8 / W4A4 drafts and QuantSpec only
    (a W4A16 draft is not QSpec); the best mode of a cell gives its bound."""
    config = get_preset(results["meta"]["preset"])
    bw = results["meta"]["copy_bytes_per_s"]
    weights = weight_shapes(config)

    def floor(kind, batch, context, view):
        w, kv = step_bytes(weights[kind], config, batch, context, view)
        return (w + kv) / bw

    maps = {name: dict.fromkeys(cells) for name, cells in ISSUE_CELLS.items()}
    for cell in results["cells"]:
        b, c = cell["batch"], cell["context"]
        key = f"{b}x{c}"
        for m in cell["modes"]:
            if "error" in m or not m.get("gamma"):
                continue
            s = parse_mode(m["mode"])
            if s["kv"] != "int8" or s["draft_mode"] == s["verify_mode"]:
                continue
            draft = floor("int4", b, c, "int4")
            verify = floor(s["weights"], b, c, "int8")
            per_token = (s["gamma"] * draft + verify) / m["tokens_per_cycle"]
            if s["verify_mode"] == "bf16":
                maps["quantspec_vs_bf16"][key] = floor("bf16", b, c, "bf16") / per_token
            else:
                for base, name in (("bf16", "qspec_int8kv_vs_w4a16_bf16kv"), ("int8", "qspec_int8kv_vs_w4a16_int8kv")):
                    bound = floor("int4", b, c, base) / per_token
                    maps[name][key] = max(bound, maps[name].get(key) or 0)
    return maps


def plot(results: dict, path: str):
    """Speedup vs context per batch (decode only): each ratio map of `summarize`, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {k: {c: r for c, r in v.items() if r is not None} for k, v in summarize(results).items()
            if k != "best_setting"}
    batches = sorted({int(cell.split("x")[0]) for m in maps.values() for cell in m})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name, m in maps.items():
            pts = sorted((int(c.split("x")[1]), r) for c, r in m.items() if int(c.split("x")[0]) == b)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"batch {b}", xlabel="context (tokens)", ylabel="decode speedup (baseline time / mode time)")
        ax.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"{meta.get('device')} - {meta.get('preset')} - commit {str(meta.get('commit'))[:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_run(text: str) -> tuple[str, set | None]:
    """--summarize's FILE[:BxS,BxS...] -> (path, the cells it gives, None for all of its cells)."""
    path, _, cells = text.partition(":")
    return path, set(cells.lower().split(",")) if cells else None


def merge_maps(runs: list) -> tuple[dict, dict]:
    """The issue's ratio maps and floor bounds of several results files, cell by cell. runs:
    [(source, results, cells or None)] in order; each ratio of a cell is the last run's that measured
    it among the runs giving that cell, so every ratio still comes from one process. Returns the maps
    (with "floor_bound") and {BxS: [the runs giving the cell]}."""
    givers = {}
    for source, results, cells in runs:
        for cell in results["cells"]:
            key = f"{cell['batch']}x{cell['context']}"
            if cells is None or key in cells:
                givers.setdefault(key, []).append(source)
    missing = {c for _, _, cells in runs for c in cells or ()} - set(givers)
    if missing:
        raise SystemExit(f"--summarize: no run holds the cells {sorted(missing)}")
    maps, bounds = {}, {}
    for source, results, _ in runs:
        for into, part in ((maps, summarize(results)), (bounds, floor_bounds(results))):
            for name, m in part.items():
                out = into.setdefault(name, {})
                for key, value in m.items():  # the issue's cells stay as keys, None where unmeasured
                    if value is not None and source in givers.get(key, ()):
                        out[key] = value
                    else:
                        out.setdefault(key, None)
    return {**maps, "floor_bound": bounds}, givers


def write_summary(runs: list, path: str):
    """Merge the ratio maps of `runs` ([(source, results, cells or None)], merge_maps) into the
    summary JSON at `path`, keeping its other measured keys."""
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    metas = [results["meta"] for _, results, _ in runs]
    for (source, _, _), meta in zip(runs, metas):
        if summary.setdefault("device", meta.get("device")) != meta.get("device"):
            raise SystemExit(f"{path} holds {summary['device']} numbers; {source} is from {meta.get('device')}")
    maps, givers = merge_maps(runs)
    summary.update(maps)
    used = {src for sources in givers.values() for src in sources}  # the runs that give a cell
    commits = [str(m.get("commit"))[:7] for (src, _, _), m in zip(runs, metas) if src in used and m.get("commit")]
    summary["e2e"] = {"source": {key: givers[key] for key in sorted(givers)}, "device": metas[-1].get("device"),
                      "kernels": sorted({str(m.get("kernels")) for m in metas}),
                      "attention": {src: m.get("attention") for (src, _, _), m in zip(runs, metas) if src in used},
                      "commit": sorted(set(commits), key=commits.index),
                      "ratios": "decode only (module docstring of scripts/bench_long_context.py); median seconds "
                                "of the baseline over the mode's, both from the last run of the cell's sources "
                                "that measured them"}
    if isinstance(summary.get("notes"), list):  # the e2e note is this writer's: replace any earlier one
        summary["notes"] = [n for n in summary["notes"] if not n.startswith("end-to-end keys")] + [
            "end-to-end keys: " + "; ".join(f"{k} from {' then '.join(givers[k])}" for k in sorted(givers))
            + " (each ratio from the last of a cell's runs that measured it), decode only"]
    if isinstance(summary.get("commit"), list):  # the runs' commits (attention's, ...)
        summary["commit"] += [c for c in dict.fromkeys(commits) if c not in summary["commit"]]
    summary.setdefault("jax", metas[-1].get("jax"))
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def append_to(results: dict, path: str) -> dict:
    """`results` (a fresh run's, no cells yet) continued from the results file at `path`: its cells
    and meta kept, this run's argv, commit and copy bandwidth listed in meta["appended"]. Refused
    unless the two runs time the same thing (device, preset, tokens, reps, kernels, KV settings)."""
    with open(path) as f:
        prev = json.load(f)
    same = ("device", "preset", "new_tokens", "reps", "kernels", "attention", "kv_group", "kv_window")
    diff = {k: (prev["meta"].get(k), results["meta"].get(k)) for k in same if prev["meta"].get(k) != results["meta"].get(k)}
    if diff:
        raise SystemExit(f"--append: {path} was run with other settings (there, here): {diff}")
    meta = dict(prev["meta"])
    meta["appended"] = meta.get("appended", []) + [
        {k: results["meta"].get(k) for k in ("argv", "commit", "copy_bytes_per_s")}]
    return {"meta": meta, "cells": prev["cells"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--cells", help="BxS:mode,mode;BxS:... (modes: module docstring); default: the issue's "
                    "cells (DEFAULT_CELLS), with --smoke one tiny cell")
    ap.add_argument("--shapes", help="run only the cells of --cells with these BxS shapes, e.g. 16x8192,16x32768 "
                                     "(several processes into one file with --append)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's cells to the results already in --out (a run of the same device, preset, "
                         "tokens, reps, kernels and KV settings, else refused) instead of starting it afresh")
    ap.add_argument("--dry-run", action="store_true",
                    help="print each selected mode's cache bytes and the weights the run keeps, then exit "
                         "(shapes only: no device work)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per row, the first one included")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--compile-threads", type=int, default=8, help="programs compiled at once")
    ap.add_argument("--kv-group", type=int, default=KV_GROUP)
    ap.add_argument("--kv-window", type=int, default=KV_WINDOW)
    ap.add_argument("--traces-int8", default="benchmarks/kv/traces_int8kv.json")
    ap.add_argument("--traces-bf16", default="benchmarks/acceptance/traces.json")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, short contexts: CPU check that it runs")
    ap.add_argument("--kernels", default="auto", choices=KERNELS,
                    help="int4 kernels (qspec_jax.kernel_choice): auto = Mosaic GPU on Hopper, else Triton")
    ap.add_argument("--mosaic-attention", default="",
                    help="'triton' (the Triton kernel for every variant) or "
                         "variant=version:stages[:kv_tile[:programs_per_sm]],... : run the quantized cache's attention on the "
                         "Mosaic GPU kernel with these configs (sets attention_mosaic.FASTER; default: as measured)")
    ap.add_argument("--attention-jit", choices=("on", "off"), default="on",
                    help="decode_attention calls the Mosaic attention jitted (on, as shipped) or inline (off): "
                         "attention_mosaic.JIT, an A/B switch")
    ap.add_argument("--out", help="results JSON (written after every mode)")
    ap.add_argument("--summary", help="merge the issue's ratio maps into this summary JSON")
    ap.add_argument("--summarize", nargs="+", metavar="FILE[:BxS,...]",
                    help="only rebuild --summary (and --plot, from the last file) from these results JSONs: a "
                         "file gives its cells, or only those named after it; each ratio of a cell comes from the "
                         "last file giving the cell that measured it")
    ap.add_argument("--plot", help="PNG of the speedup maps vs context, one panel per batch")
    args = ap.parse_args(argv)
    if args.summarize:
        runs = []
        for text in args.summarize:
            source, cells = parse_run(text)
            with open(source) as f:
                runs.append((source, json.load(f), cells))
        if args.summary:
            print(json.dumps(write_summary(runs, args.summary), indent=1))
        if args.plot:
            plot(runs[-1][1], args.plot)
        return
    if not args.out and not args.dry_run:
        ap.error("--out is required")
    if args.smoke:
        args.preset, args.new_tokens, args.reps, args.kv_group, args.kv_window = "tiny", 6, 1, 16, 32
        args.cells = args.cells or \
            "2x48:w4a16_bf16kv,w4a16_bf16kv+einsum,w4a16_int8kv,qspec_w4a8_int8kv_g3,qspec_w4a16_int8kv_g3,bf16_bf16kv," \
            "quantspec_g3"
    cells = parse_cells(args.cells or DEFAULT_CELLS)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
        missing = [s for s in shapes if s not in {(b, c) for b, c, _ in cells}]
        if missing:
            raise SystemExit(f"--shapes {missing} not among the cells {[(b, c) for b, c, _ in cells]}")
        cells = [cell for cell in cells if (cell[0], cell[1]) in shapes]
    traces = {"bf16": load_traces(args.traces_bf16, True), "int8": load_traces(args.traces_int8, not args.smoke)}
    for kind, path in (("bf16", args.traces_bf16), ("int8", args.traces_int8)):
        if traces[kind] is not None:
            traces[kind]["path"] = path
    fallback = traces["bf16"] if args.smoke else None
    config = get_preset(args.preset)
    if args.dry_run:
        rows = memory_plan(config, cells, args.new_tokens, args.kv_group, args.kv_window)
        for batch, context, modes in cells:  # the replayed traces each mode needs are there
            for name in modes:
                if parse_mode(name)["trace"] is not None:
                    replay_rule(traces, *parse_mode(name)["trace"], batch, fallback)
        for r in rows:
            print(f"{r['batch']}x{r['context']} {r['mode']}: cache {r['cache_bytes'] / 1e9:.1f} GB + weights "
                  f"{r['weights_bytes'] / 1e9:.1f} GB = {r['total_bytes'] / 2**30:.1f} GiB")
        return rows
    if args.mosaic_attention == "triton":  # the Triton kernel for every variant
        attention_mosaic.FASTER.clear()
    for spec in filter(None, args.mosaic_attention.split(",") if args.mosaic_attention != "triton" else []):
        variant, knobs = spec.split("=")  # not `config`: the model's config below
        version, stages, *rest = knobs.split(":")
        attention_mosaic.FASTER[variant] = dict(version=int(version), stages=int(stages))
        if rest:
            attention_mosaic.FASTER[variant]["kv_tile"] = int(rest[0])
        if rest[1:]:
            attention_mosaic.FASTER[variant]["programs_per_sm"] = float(rest[1])
    attention_mosaic.JIT = args.attention_jit == "on"
    bandwidth, _ = best_copy_bandwidth(args.smoke)
    t0 = time.perf_counter()
    fparams = checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16)
    weights = {"int4": arrange_weights(unstack_layers(fuse_projections(
        quantize.quantize_params(fparams, config, dtype=jnp.bfloat16))), args.kernels)}
    if any(parse_mode(m)["weights"] == "bf16" for _, _, modes in cells for m in modes):
        weights["bf16"] = unstack_layers(fuse_projections(fparams))
    del fparams
    jax.block_until_ready(weights)
    print(f"{args.preset}: weights in {time.perf_counter() - t0:.0f} s; copy bandwidth {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    results = {"meta": {**run_metadata(), "preset": args.preset, "weights": "generated from a seed (speed only)",
                        "kernels": resolve_kernels(args.kernels),
                        # what decode_attention(kernel="auto") runs: FASTER's configs on sm_90 only
                        "attention": {"mosaic": dict(attention_mosaic.FASTER),
                                      "min_cache_tokens": attention_mosaic.MIN_CACHE_TOKENS,
                                      "jit": attention_mosaic.JIT}
                        if attention_mosaic.FASTER and is_hopper() else "triton",
                        "new_tokens": args.new_tokens, "reps": args.reps, "kv_group": args.kv_group,
                        "kv_window": args.kv_window, "copy_bytes_per_s": bandwidth, "argv": sys.argv[1:],
                        "device_bytes_limit": (jax.devices()[0].memory_stats() or {}).get("bytes_limit"),
                        "timing": "decode loop only (speculative.decode_jit) over a directly built cache; "
                                  "median of reps after AOT compile and one warm-up call",
                        "acceptance": "replayed per cycle (acceptance_source per mode)"},
               "cells": []}
    if args.append and os.path.exists(args.out):
        results = append_to(results, args.out)
    t0 = time.perf_counter()
    plans = [plan_mode(name, weights, config, batch, context, args.new_tokens, traces, fallback, args.kv_group,
                       args.kv_window) for batch, context, modes in cells for name in modes]
    print(f"{len(plans)} programs lowered in {time.perf_counter() - t0:.0f} s; compiling with {args.compile_threads} "
          "threads", flush=True)
    t0 = time.perf_counter()
    plans = compile_all(plans, args.compile_threads)
    print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    cells_out = {(c["batch"], c["context"]): c for c in results["cells"]}  # --append: the earlier run's
    for plan in plans:
        batch, context, name, s = plan["batch"], plan["context"], plan["name"], plan["settings"]
        cell = cells_out.get((batch, context))
        if cell is None:
            cell = cells_out[(batch, context)] = {"batch": batch, "context": context, "modes": []}
            results["cells"].append(cell)
        try:
            if "error" in plan:
                raise RuntimeError(plan["error"])
            m = measure(plan, args.reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the run goes on
            print(f"B={batch} S={context} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            cell["modes"].append({"mode": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        finally:
            plan.pop("compiled", None)  # free the executable once timed
        stats = jax.devices()[0].memory_stats() or {}
        m["device_peak_bytes"] = stats.get("peak_bytes_in_use")  # the process's peak so far
        if s["gamma"] == 0:
            wb, kvb = step_bytes(weights[s["weights"]], config, batch, context, s["kv"])
            m["step_floor_ms"] = 1e3 * (wb + kvb) / bandwidth
        cell["modes"].append(m)
        print(f"B={batch} S={context} {name}: {m['ms_per_token']:.2f} ms/token "
              f"({m['tokens_per_s']:.0f} tok/s, floor {m.get('step_floor_ms', float('nan')):.2f} ms), "
              f"accept {m['acceptance_rate']}, compile {m['compile_s']:.0f} s", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.summary:
        print(json.dumps(write_summary([(args.out, results, None)], args.summary), indent=1))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
