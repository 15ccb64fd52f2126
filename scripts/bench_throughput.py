"""End-to-end generation throughput per mode on real-size shapes (generated weights), one run.

Every mode runs its whole compiled generate program (prefill + `lax.while_loop`), timed after an
ahead-of-time compile and a warm-up call. QSpec on generated weights cannot produce meaningful
acceptance, so it uses the `replay` policy with per-cycle acceptance traces recorded on the real
SmolLM2 (scripts/measure_acceptance.py): the control flow is what the real model would execute.

Per-step times come from the same run: t_step(mode) = (T(n) - T_prefill) / (n - 1), where T_prefill
is the same prefill and first token compiled alone; for QSpec t_verify = (T_decode - drafted_steps *
t_draft) / cycles, with t_draft the plain per-step time of the draft mode. Each plain mode's step is
also compared with its floor: the bytes a step reads (weights and the whole KV cache) over the
measured copy bandwidth.

    bash benchmarks/throughput/runs/run_throughput.sh   # on the GPU: the run in benchmarks/throughput/
    python scripts/bench_throughput.py --smoke --out /tmp/tp.json             # CPU, tiny preset
    python scripts/plot_throughput.py benchmarks/throughput/h100_llama3-8b.json # plots + tables
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qspec_jax import checkpoint, quantize, speculative  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from qspec_jax.evaluation import copy_bandwidth, run_metadata  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402
from qspec_jax.model import fuse_projections  # noqa: E402


def load_traces(path):
    if not os.path.exists(path):
        raise SystemExit(f"no acceptance traces at {path}: run scripts/measure_acceptance.py first")
    with open(path) as f:
        return json.load(f)


def replay_rows(traces, draft, gamma, batch):
    """A [batch, cycles] replay trace: rows of the recorded trace at this (draft, gamma), cycled."""
    t = np.asarray(traces["traces"][f"{draft}_g{gamma}"], np.int32)
    return jnp.asarray(t[np.arange(batch) % t.shape[0]])


def timed(fn, reps):
    """(median seconds, last result) of a compiled callable, after one warm-up call.

    Each call's result is dropped before the next call starts: a long-context prefill returns a KV
    cache of tens of GB (batch 32 x 8192 tokens of llama3-8b: 33 GB), and holding two ran the H100
    out of memory."""
    result = jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        result = None
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def timed_generate(params, prompts, lens, reps, **settings):
    """(median seconds, result, compile seconds) of one compiled generate program."""
    args, static = speculative.prepare(params, prompts, lens, **settings)
    t0 = time.perf_counter()
    compiled = speculative.generate_jit.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t0
    seconds, result = timed(lambda: compiled(*args), reps)
    return seconds, result, compile_s


@partial(jax.jit, static_argnames=("config", "mode", "max_len", "chunk"))
def prefill_only(params, prompts, lens, *, config, mode, max_len, chunk):
    """The prefill and first token of a generate program, without its decode loop."""
    cache = KVCache.create(config, prompts.shape[0], max_len, params["embed"].dtype)
    logits, cache = speculative.prefill(params, prompts, lens, cache, config=config, mode=mode, chunk=chunk)
    return jnp.argmax(logits, axis=-1), cache


def step_floor_ms(params, config, batch, max_len, bandwidth):
    """Bytes one decode step must read (every weight but the embedding table, plus the whole
    KV cache, which attention reads) over the measured bandwidth, in ms."""
    weights = sum(x.nbytes for x in jax.tree.leaves({k: v for k, v in params.items() if k != "embed"}))
    if "lm_head" not in params:  # tied head: the embedding is read as the head
        weights += params["embed"].nbytes
    kv = 2 * config.num_layers * batch * config.num_kv_heads * max_len * config.head_dim * params["embed"].dtype.itemsize
    return 1e3 * (weights + kv) / bandwidth, weights, kv


def measure_cell(fparams, qparams, config, spec, new_tokens, traces, reps, rng, bandwidth, chunk):
    """All modes for one (preset, batch, prompt length) cell, in the same process."""
    batch, prompt_len, gammas, drafts, modes = (spec[k] for k in ("batch", "prompt_len", "gammas", "drafts", "modes"))
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    common = dict(config=config, eos_ids=(), prefill_chunk=chunk)
    cell = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "modes": {}, "qspec": []}
    step, prefill_s = {}, {}
    for mode in dict.fromkeys(modes + ["w4a16"] + drafts):  # the verifier and the drafts are always timed
        params = fparams if mode == "bf16" else qparams
        max_len = speculative.cache_length(prompt_len, new_tokens, 0)
        prefill_s[mode], _ = timed(lambda: prefill_only(params, prompts, lens, config=config, mode=mode,
                                                        max_len=max_len, chunk=chunk), reps)
        t_all, _, c = timed_generate(params, prompts, lens, reps, max_new_tokens=new_tokens, gamma=0,
                                     verify_mode=mode, **common)
        step[mode] = (t_all - prefill_s[mode]) / (new_tokens - 1)
        floor_ms, wbytes, kvbytes = step_floor_ms(params, config, batch, max_len, bandwidth)
        cell["modes"][mode] = {
            "seconds": t_all, "prefill_seconds": prefill_s[mode], "step_ms": 1e3 * step[mode],
            "tokens_per_s": batch * new_tokens / t_all, "compile_s": c,
            "step_floor_ms": floor_ms, "weight_bytes": wbytes, "kv_bytes": kvbytes,
        }
        print(f"  B={batch} P={prompt_len} {mode}: {1e3 * step[mode]:.2f} ms/step (floor {floor_ms:.2f}), "
              f"prefill {1e3 * prefill_s[mode]:.0f} ms, {batch * new_tokens / t_all:.0f} tok/s, compile {c:.0f}s",
              flush=True)
    base = cell["modes"]["w4a16"]
    for draft in drafts:
        for gamma in gammas:
            trace = replay_rows(traces, draft, gamma, batch)
            t, res, c = timed_generate(qparams, prompts, lens, reps, max_new_tokens=new_tokens, gamma=gamma,
                                       draft_mode=draft, policy="replay", replay_trace=trace, **common)
            s = res.summary()
            cycles = max(int(np.max(np.asarray(res.cycles))), 1)  # the batch runs as long as its longest row
            decode = t - prefill_s["w4a16"]
            entry = {
                "draft": draft, "gamma": gamma, "seconds": t, "tokens_per_s": batch * new_tokens / t,
                "acceptance_rate": s["acceptance_rate"], "tokens_per_cycle": s["tokens_per_cycle"],
                "loop_cycles": cycles, "compile_s": c,
                "speedup_vs_w4a16": base["seconds"] / t,
                "decode_speedup_vs_w4a16": (base["seconds"] - base["prefill_seconds"]) / decode,
                "cycle_ms": 1e3 * decode / cycles,
                # A residual, not a timing: decode time minus gamma plain draft steps per cycle.
                "verify_ms_residual": 1e3 * (decode - cycles * gamma * step[draft]) / cycles,
                "draft_share": cycles * gamma * step[draft] / decode,
            }
            cell["qspec"].append(entry)
            print(f"  B={batch} P={prompt_len} qspec {draft} g={gamma}: a={s['acceptance_rate']:.3f} "
                  f"{entry['tokens_per_s']:.0f} tok/s, x{entry['speedup_vs_w4a16']:.3f} vs w4a16 "
                  f"(decode x{entry['decode_speedup_vs_w4a16']:.3f}), verify (residual) {entry['verify_ms_residual']:.2f} ms, "
                  f"compile {c:.0f}s", flush=True)
    cell["t_draft_over_t_w4a16"] = {d: step[d] / step["w4a16"] for d in drafts}
    return cell


def cell_specs(args):
    """The (batch, prompt length, gammas, drafts, modes) cells of one run."""
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    modes = [m for m in args.modes.split(",") if m]
    drafts = [d for d in args.drafts.split(",") if d]
    cells = [dict(batch=b, prompt_len=p, gammas=ints(args.gammas), drafts=drafts, modes=modes)
             for p in ints(args.prompt_lens) for b in ints(args.batches)]
    if args.gamma_sweep:  # "B:g1,g2,...": every gamma at batch B (first prompt length), w4a4 drafts
        b, gs = args.gamma_sweep.split(":")
        cells.append(dict(batch=int(b), prompt_len=ints(args.prompt_lens)[0], gammas=ints(gs),
                          drafts=drafts[:1], modes=["w4a16"]))
    if args.context_sweep:  # "B1,B2:P1,P2,...": long prompts, W4A16 against QSpec at the first gamma
        bs, ps = args.context_sweep.split(":")
        cells += [dict(batch=b, prompt_len=p, gammas=ints(args.gammas)[:1], drafts=drafts[:1], modes=["w4a16"])
                  for b in ints(bs) for p in ints(ps)]
    return cells


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llama3-8b")
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--prompt-lens", default="256", help="ShareGPT/HumanEval prompts are 40-400 tokens")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--gammas", default="3")
    ap.add_argument("--drafts", default="w4a4")
    ap.add_argument("--modes", default="w4a16,w4a4,bf16", help="plain modes timed in every main cell")
    ap.add_argument("--gamma-sweep", default="", help="B:g1,g2,... every gamma at batch B")
    ap.add_argument("--context-sweep", default="", help="B1,B2:P1,P2,... long-prompt cells (w4a16 vs qspec)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--traces", default="benchmarks/acceptance/traces.json")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, few tokens: CPU check that the script runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.smoke:
        args.presets, args.batches, args.prompt_lens, args.new_tokens, args.reps = "tiny", "2", "16", 6, 1
        args.gamma_sweep, args.context_sweep = "2:1", "1:40"  # the smoke traces hold gamma 1 and 3
        args.prefill_chunk = 16
        args.traces = args.traces if os.path.exists(args.traces) else "benchmarks/acceptance/traces_smoke.json"

    traces = load_traces(args.traces)
    specs = cell_specs(args)
    bandwidth = copy_bandwidth(2**24 if args.smoke else 2**30)
    meta = {
        **run_metadata(), "weights": "generated from a seed (speed only)",
        "acceptance": f"replayed from {args.traces} ({traces['meta'].get('model')}, greedy, per-cycle counts)",
        "group_size": args.group_size or "default", "reps": args.reps,
        "timing": "median of reps after AOT compile + warm-up; step = (T_generate - T_prefill) / (new_tokens - 1)",
        "projections": "q/k/v and gate/up fused", "prefill_chunk": args.prefill_chunk,
        "copy_bytes_per_s": bandwidth, "argv": sys.argv[1:],
    }
    print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s; {len(specs)} cells per preset", flush=True)
    results = {"meta": meta, "cells": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    for preset in args.presets.split(","):
        config = get_preset(preset)
        t0 = time.perf_counter()
        fparams = checkpoint.random_params(config, seed=0, dtype=dtype)
        qparams = fuse_projections(quantize.quantize_params(fparams, config, group_size=args.group_size, dtype=dtype))
        fparams = fuse_projections(fparams) if any("bf16" in s["modes"] for s in specs) else None
        jax.block_until_ready(qparams)
        print(f"{preset}: weights generated and quantized in {time.perf_counter() - t0:.1f}s", flush=True)
        for spec in specs:
            t0 = time.perf_counter()
            cell = measure_cell(fparams, qparams, config, spec, args.new_tokens, traces, args.reps, rng,
                                bandwidth, args.prefill_chunk)
            cell["preset"], cell["elapsed_s"] = preset, time.perf_counter() - t0
            results["cells"].append(cell)
            with open(args.out, "w") as f:  # after every cell: a cut-off run still leaves its data
                json.dump(results, f, indent=1)
        del fparams, qparams
    print(json.dumps(results["meta"]))


if __name__ == "__main__":
    main()
