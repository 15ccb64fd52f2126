"""End-to-end generation throughput per mode on real-size shapes (generated weights), one run.

Every mode runs its whole compiled generate program (prefill + `lax.while_loop`), timed after an
ahead-of-time compile and a warm-up call. QSpec on generated weights cannot produce meaningful
acceptance, so it uses the `replay` policy with per-cycle acceptance traces recorded on the real
SmolLM2 (scripts/measure_acceptance.py): the control flow is what the real model would execute.

Per-step times come from the same run: t_step(mode) = (T(n) - T(1)) / (n - 1), where T(1) is prefill
plus the first token; for QSpec t_verify = (T_decode - drafted_steps * t_draft) / cycles, with t_draft
the plain per-step time of the draft mode.

    python scripts/bench_throughput.py --out benchmarks/throughput/h100.json    # on the GPU
    python scripts/bench_throughput.py --smoke --out /tmp/tp.json             # CPU, tiny preset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qspec_jax import checkpoint, quantize, speculative  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402


def load_traces(path):
    if not os.path.exists(path):
        raise SystemExit(f"no acceptance traces at {path}: run scripts/measure_acceptance.py first")
    with open(path) as f:
        return json.load(f)


def replay_rows(traces, draft, gamma, batch):
    """A [batch, cycles] replay trace: rows of the recorded trace at this (draft, gamma), cycled."""
    t = np.asarray(traces["traces"][f"{draft}_g{gamma}"], np.int32)
    return jnp.asarray(t[np.arange(batch) % t.shape[0]])


def timed(params, prompts, lens, reps, **settings):
    """(median seconds, result, compile seconds) of one compiled generate program."""
    args, static = speculative.prepare(params, prompts, lens, **settings)
    t0 = time.perf_counter()
    compiled = speculative.generate_jit.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t0
    result = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result, compile_s


def measure_cell(fparams, qparams, config, batch, prompt_len, new_tokens, gammas, drafts, modes, traces, reps, rng):
    """All modes for one (preset, batch, prompt length) cell, in the same process."""
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    common = dict(config=config, eos_ids=())
    cell = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "modes": {}, "qspec": []}
    step = {}
    for mode in modes:
        params = fparams if mode == "bf16" else qparams
        t_first, _, c1 = timed(params, prompts, lens, reps, max_new_tokens=1, gamma=0, verify_mode=mode, **common)
        t_all, _, c2 = timed(params, prompts, lens, reps, max_new_tokens=new_tokens, gamma=0, verify_mode=mode, **common)
        step[mode] = (t_all - t_first) / (new_tokens - 1)
        cell["modes"][mode] = {
            "seconds": t_all, "prefill_seconds": t_first, "step_ms": 1e3 * step[mode],
            "tokens_per_s": batch * new_tokens / t_all, "compile_s": c1 + c2,
        }
        print(f"  B={batch} P={prompt_len} {mode}: {1e3 * step[mode]:.2f} ms/step, "
              f"{batch * new_tokens / t_all:.0f} tok/s", flush=True)
    base = cell["modes"].get("w4a16")
    for draft in drafts:
        for gamma in gammas:
            trace = replay_rows(traces, draft, gamma, batch)
            t, res, c = timed(qparams, prompts, lens, reps, max_new_tokens=new_tokens, gamma=gamma, draft_mode=draft,
                              policy="replay", replay_trace=trace, **common)
            s = res.summary()
            cycles = max(int(np.max(np.asarray(res.cycles))), 1)  # the batch runs as long as its longest row
            decode = t - base["prefill_seconds"] if base else None
            t_draft = step.get(draft)
            entry = {
                "draft": draft, "gamma": gamma, "seconds": t, "tokens_per_s": batch * new_tokens / t,
                "acceptance_rate": s["acceptance_rate"], "tokens_per_cycle": s["tokens_per_cycle"],
                "loop_cycles": cycles, "compile_s": c,
                "speedup_vs_w4a16": base["seconds"] / t if base else None,
                "cycle_ms": 1e3 * decode / cycles if decode else None,
                "verify_ms": 1e3 * (decode - cycles * gamma * t_draft) / cycles if decode and t_draft else None,
                "draft_share": cycles * gamma * t_draft / decode if decode and t_draft else None,
            }
            cell["qspec"].append(entry)
            print(f"  B={batch} P={prompt_len} qspec {draft} g={gamma}: a={s['acceptance_rate']:.3f} "
                  f"{entry['tokens_per_s']:.0f} tok/s, x{entry['speedup_vs_w4a16'] or float('nan'):.3f} vs w4a16",
                  flush=True)
    if "w4a16" in step and drafts and drafts[0] in step:
        cell["t_draft_over_t_w4a16"] = step[drafts[0]] / step["w4a16"]
    return cell


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llama3-8b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-lens", default="256")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--gammas", default="3")
    ap.add_argument("--drafts", default="w4a4")
    ap.add_argument("--modes", default="w4a16,w4a4,bf16")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--traces", default="benchmarks/acceptance/traces.json")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, few tokens: CPU check that the script runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.smoke:
        args.presets, args.batches, args.prompt_lens, args.new_tokens, args.reps = "tiny", "2", "16", 6, 1
        args.traces = args.traces if os.path.exists(args.traces) else "benchmarks/acceptance/traces_smoke.json"

    traces = load_traces(args.traces)
    modes = [m for m in args.modes.split(",") if m]
    drafts = [d for d in args.drafts.split(",") if d]
    gammas = [int(g) for g in args.gammas.split(",") if g]
    meta = {
        **run_metadata(), "weights": "generated from a seed (speed only)",
        "acceptance": f"replayed from {args.traces} ({traces['meta'].get('model')}, greedy, per-cycle counts)",
        "group_size": args.group_size or "default", "reps": args.reps, "timing": "median of reps after AOT compile + warm-up",
    }
    results = {"meta": meta, "cells": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    for preset in args.presets.split(","):
        config = get_preset(preset)
        t0 = time.perf_counter()
        fparams = checkpoint.random_params(config, seed=0, dtype=dtype)
        qparams = quantize.quantize_params(fparams, config, group_size=args.group_size, dtype=dtype)
        if "bf16" not in modes:
            del fparams
            fparams = None
        jax.block_until_ready(qparams)
        print(f"{preset}: weights generated and quantized in {time.perf_counter() - t0:.1f}s", flush=True)
        for prompt_len in (int(p) for p in args.prompt_lens.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                cell = measure_cell(fparams, qparams, config, batch, prompt_len, args.new_tokens, gammas, drafts,
                                    modes, traces, args.reps, rng)
                cell["preset"] = preset
                results["cells"].append(cell)
                with open(args.out, "w") as f:  # after every cell: a cut-off run still leaves its data
                    json.dump(results, f, indent=1)
        del fparams, qparams
    print(json.dumps(results["meta"]))


if __name__ == "__main__":
    main()
