"""End-to-end generation throughput per mode on real-size shapes (generated weights), one run.

Every mode runs its whole compiled generate program (prefill + `lax.while_loop`), timed after an
ahead-of-time compile and a warm-up call. QSpec on generated weights cannot produce meaningful
acceptance, so it uses the replay rule (`scripts/replay.py`) with per-cycle acceptance traces recorded on the real
SmolLM2 (scripts/measure_acceptance.py): the control flow is what the real model would execute.

Per-step times come from the same run: t_step(mode) = (T(n) - T_prefill) / (n - 1), where T_prefill
is the same prefill and first token compiled alone; for QSpec t_verify = (T_decode - drafted_steps *
t_draft) / cycles, with t_draft the plain per-step time of the draft mode. Each plain mode's step is
also compared with its floor: the bytes a step reads (weights and the whole KV cache) over the
measured copy bandwidth.

Every cell also runs `auto` (issue 12): the (gamma, draft) that `gamma="auto"` gives a user for the
cell's batch and context, resolved by `speculative.resolve_auto` with the device's cost table
(qspec_jax/policy.py) and the acceptance prior of the same real-model run the replay traces come
from. Gamma > 0 is timed like the fixed-gamma entries (replayed acceptance at that gamma and draft);
gamma 0 is plain W4A16 decoding. Where the auto program is literally a program already timed in the
cell (same static settings, same argument shapes and values), that timing is reused and the entry
says so. `--auto-summary` writes auto's throughput over the best plain mode and the best fixed QSpec
entry per cell; `--summary-only-from` rebuilds it from a saved results JSON.

    bash benchmarks/throughput/runs/run_throughput.sh   # on the GPU: the run in benchmarks/throughput/
    python scripts/bench_throughput.py --issue12 --out $OUT/h200_auto.json --auto-summary $OUT/h200_auto_summary.json
    python scripts/bench_throughput.py --smoke --out /tmp/tp.json --auto-summary /tmp/auto.json  # CPU, tiny preset
    python scripts/bench_throughput.py --summary-only-from RESULTS.json --auto-summary SUMMARY.json
    python scripts/plot_throughput.py benchmarks/throughput/h100_llama3-8b.json # plots + tables
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qspec_jax import checkpoint, policy, quantize, speculative  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from qspec_jax.evaluation import copy_bandwidth, run_metadata  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402
from qspec_jax.kernel_choice import KERNELS, arrange_weights, resolve_kernels  # noqa: E402
from qspec_jax.model import fuse_projections, unstack_layers  # noqa: E402
from replay import Replay  # noqa: E402  (beside this script)


def load_traces(path):
    if not os.path.exists(path):
        raise SystemExit(f"no acceptance traces at {path}: run scripts/measure_acceptance.py first")
    with open(path) as f:
        return json.load(f)


def replay_rows(traces, draft, gamma, batch) -> Replay:
    """The rule that replays the recorded trace at this (draft, gamma), its rows cycled to `batch`."""
    t = np.asarray(traces["traces"][f"{draft}_g{gamma}"], np.int32)
    return Replay.of(t[np.arange(batch) % t.shape[0]])


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


def program_key(params, args, static):
    """What makes two runs literally the same compiled program on the same inputs: the weights
    (the same pytree object), the static spec (the replayed trace included), and the shape, dtype and
    value of every other argument (prompts, lengths, PRNG key, draft weights, adaptive arrays)."""
    data = tuple((tuple(x.shape), str(x.dtype), hashlib.sha1(np.asarray(x).tobytes()).hexdigest())
                 for x in jax.tree.leaves(args[1:]))
    return id(params), tuple(sorted((k, repr(v)) for k, v in static.items())), data


def timed_generate(params, prompts, lens, reps, programs=None, label=None, **settings):
    """(median seconds, result, compile seconds, label of the timed program it reuses or None) of one
    compiled generate program. `programs`: {program_key: (label, seconds, result)} of the programs
    timed so far (in this cell); a literally identical program is not compiled or timed again."""
    args, static = speculative.prepare(params, prompts, lens, **settings)
    key = program_key(params, args, static) if programs is not None else None
    if key is not None and key in programs:
        same, seconds, result = programs[key]
        return seconds, result, 0.0, same
    t0 = time.perf_counter()
    compiled = speculative.generate_jit.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t0
    seconds, result = timed(lambda: compiled(*args), reps)
    if key is not None:
        programs[key] = (label, seconds, result)
    return seconds, result, compile_s, None


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


def measure_cell(fparams, qparams, config, spec, new_tokens, traces, reps, rng, bandwidth, chunk, auto=None,
                 step_split=None, adaptive_pinned=False):
    """All modes for one (preset, batch, prompt length) cell, in the same process, then `auto`.

    step_split: the plain modes whose prefill is also timed alone (for per-step times); None: all.
    adaptive_pinned: also time each QSpec entry through the adaptive loop held at its gamma
    (`pinned_adaptive`): the cost of choosing gamma in the loop, with the same replayed counts."""
    batch, prompt_len, gammas, drafts, modes = (spec[k] for k in ("batch", "prompt_len", "gammas", "drafts", "modes"))
    prompts = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lens = jnp.full((batch,), prompt_len, jnp.int32)
    common = dict(config=config, eos_ids=(), prefill_chunk=chunk)
    cell = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "modes": {}, "qspec": []}
    step, prefill_s, programs = {}, {}, {}
    for mode in dict.fromkeys(modes + ["w4a16"] + drafts):  # the verifier and the drafts are always timed
        params = fparams if mode == "bf16" else qparams
        max_len = speculative.cache_length(prompt_len, new_tokens, 0)
        slots = speculative.bf16_cache_slots(prompt_len, new_tokens, 0, chunk)  # what the generate program allocates
        # Plain decoding in `mode`: gamma 0 with draft_mode = verify_mode, so plain W4A16 is the very
        # program `gamma="auto"` resolves to when it chooses gamma 0 (resolve_auto's draft_mode "w4a16").
        t_all, _, c, _ = timed_generate(params, prompts, lens, reps, programs, f"plain {mode}",
                                        max_new_tokens=new_tokens, gamma=0, verify_mode=mode, draft_mode=mode, **common)
        floor_ms, wbytes, kvbytes = step_floor_ms(params, config, batch, max_len, bandwidth)
        entry = {"seconds": t_all, "prefill_seconds": None, "step_ms": None,
                 "tokens_per_s": batch * new_tokens / t_all, "compile_s": c,
                 "step_floor_ms": floor_ms, "weight_bytes": wbytes, "kv_bytes": kvbytes}
        if step_split is None or mode in step_split:
            prefill_s[mode], _ = timed(lambda: prefill_only(params, prompts, lens, config=config, mode=mode,
                                                            max_len=slots, chunk=chunk), reps)
            step[mode] = (t_all - prefill_s[mode]) / (new_tokens - 1)
            entry.update(prefill_seconds=prefill_s[mode], step_ms=1e3 * step[mode])
        cell["modes"][mode] = entry
        split = (f"{1e3 * step[mode]:.2f} ms/step (floor {floor_ms:.2f}), prefill {1e3 * prefill_s[mode]:.0f} ms"
                 if mode in step else f"{t_all:.3f} s whole program (prefill not timed alone)")
        print(f"  B={batch} P={prompt_len} {mode}: {split}, {batch * new_tokens / t_all:.0f} tok/s, compile {c:.0f}s",
              flush=True)
    base = cell["modes"]["w4a16"]
    for draft in drafts:
        for gamma in gammas:
            replay = replay_rows(traces, draft, gamma, batch)
            t, res, c, _ = timed_generate(qparams, prompts, lens, reps, programs, f"qspec {draft} g{gamma}",
                                          max_new_tokens=new_tokens, gamma=gamma, draft_mode=draft, rule=replay,
                                          **common)
            entry = qspec_entry(res, t, c, batch, new_tokens, base, step, prefill_s, draft, gamma)
            if adaptive_pinned:
                ta, res_a, ca, _ = timed_generate(qparams, prompts, lens, reps, programs, f"adaptive {draft} g{gamma}",
                                                  max_new_tokens=new_tokens, gamma=gamma, draft_mode=draft,
                                                  rule=replay, adaptive=pinned_adaptive(gamma),
                                                  **common)
                entry["adaptive_pinned"] = {
                    "seconds": ta, "compile_s": ca, "time_over_fixed": ta / t,
                    "same_counts": bool(np.array_equal(np.asarray(res_a.trace), np.asarray(res.trace)))}
                print(f"  B={batch} P={prompt_len} adaptive loop held at {draft} g={gamma}: x{ta / t:.3f} the fixed "
                      f"program's time, compile {ca:.0f}s", flush=True)
            cell["qspec"].append(entry)
            resid = entry["verify_ms_residual"]
            print(f"  B={batch} P={prompt_len} qspec {draft} g={gamma}: a={entry['acceptance_rate']:.3f} "
                  f"{entry['tokens_per_s']:.0f} tok/s, x{entry['speedup_vs_w4a16']:.3f} vs w4a16"
                  + (f" (decode x{entry['decode_speedup_vs_w4a16']:.3f})" if entry["decode_speedup_vs_w4a16"] else "")
                  + (f", verify (residual) {resid:.2f} ms" if resid is not None else "") + f", compile {c:.0f}s",
                  flush=True)
    cell["t_draft_over_t_w4a16"] = {d: step[d] / step["w4a16"] for d in drafts if d in step and "w4a16" in step}
    if auto is not None:
        cell["auto"] = measure_auto(auto, qparams, prompts, lens, new_tokens, traces, reps, programs, common,
                                    base, step, prefill_s)
    return cell


def pinned_adaptive(gamma: int) -> policy.AdaptiveGamma:
    """An in-loop policy that always picks `gamma` (every other gamma priced out), so the adaptive
    loop runs the fixed program's cycles through its own machinery (traced-length drafts, limited
    acceptance, the per-cycle choice): timing it against the fixed program prices that machinery."""
    return policy.AdaptiveGamma((1e9,) * gamma + (1.0,), (1.0,) * gamma)


def qspec_entry(res, t, compile_s, batch, new_tokens, base, step, prefill_s, draft, gamma):
    """The record of one replayed QSpec run (fields that need an untimed prefill or draft step are None)."""
    s = res.summary()
    cycles = max(int(np.max(np.asarray(res.cycles))), 1)  # the batch runs as long as its longest row
    decode = t - prefill_s["w4a16"] if "w4a16" in prefill_s else None
    has_draft = decode is not None and draft in step
    return {
        "draft": draft, "gamma": gamma, "seconds": t, "tokens_per_s": batch * new_tokens / t,
        "acceptance_rate": s["acceptance_rate"], "tokens_per_cycle": s["tokens_per_cycle"],
        "loop_cycles": cycles, "compile_s": compile_s,
        "speedup_vs_w4a16": base["seconds"] / t,
        "decode_speedup_vs_w4a16": (base["seconds"] - prefill_s["w4a16"]) / decode if decode is not None else None,
        "cycle_ms": 1e3 * decode / cycles if decode is not None else None,
        # A residual, not a timing: decode time minus gamma plain draft steps per cycle.
        "verify_ms_residual": 1e3 * (decode - cycles * gamma * step[draft]) / cycles if has_draft else None,
        "draft_share": cycles * gamma * step[draft] / decode if has_draft else None,
    }


def auto_settings(auto, prompts, lens, new_tokens, common, traces=None):
    """(settings to time, policy.Choice): `gamma="auto"` resolved exactly as `generate` resolves it for
    a user (`speculative.resolve_auto`, greedy rule); with gamma > 0 the acceptance is then replayed
    from the real-model trace at that (draft, gamma), as the fixed-gamma entries are (an adaptive loop
    clips each cycle's count to the gamma it drafted)."""
    settings, choice = speculative.resolve_auto(prompts, lens, dict(max_new_tokens=new_tokens, gamma="auto", **common),
                                                auto)
    if choice.gamma > 0 and traces is not None:
        settings = dict(settings, rule=replay_rows(traces, choice.draft, choice.gamma, int(np.shape(prompts)[0])))
    return settings, choice


def measure_auto(auto, qparams, prompts, lens, new_tokens, traces, reps, programs, common, base, step, prefill_s):
    """The cell's `auto` entry: the policy's choice and the time of the program it resolves to."""
    batch = int(prompts.shape[0])
    settings, choice = auto_settings(auto, prompts, lens, new_tokens, common, traces)
    label = f"qspec {choice.draft} g{choice.gamma}" if choice.gamma else "plain w4a16"
    t, res, c, same = timed_generate(qparams, prompts, lens, reps, programs, f"auto: {label}", **settings)
    entry = {**choice.as_dict(), "program": label + (" (replayed acceptance)" if choice.gamma else ""),
             "seconds": t, "tokens_per_s": batch * new_tokens / t, "compile_s": c, "same_program_as": same,
             "speedup_vs_w4a16": base["seconds"] / t}
    if choice.gamma:
        q = qspec_entry(res, t, c, batch, new_tokens, base, step, prefill_s, choice.draft, choice.gamma)
        entry.update({k: q[k] for k in ("acceptance_rate", "tokens_per_cycle", "loop_cycles", "decode_speedup_vs_w4a16")})
        entry["gamma_histogram"] = res.summary()["gamma_histogram"]  # what an adaptive loop ran
    else:
        entry["decode_speedup_vs_w4a16"] = 1.0 if same == "plain w4a16" else None
    pred = f"predicted x{choice.predicted_speedup:.3f}" if choice.predicted_speedup is not None else "no prediction"
    print(f"  B={batch} P={int(prompts.shape[1])} auto -> gamma {choice.gamma} {choice.draft or ''} ({pred}; "
          f"{choice.policy_source}): {entry['tokens_per_s']:.0f} tok/s, x{entry['speedup_vs_w4a16']:.3f} vs w4a16"
          + (f", the {same} program's timing (same compiled program)" if same else f", compile {c:.0f}s"), flush=True)
    return entry


def cell_key(cell, presets):
    """ "BxP" (prefixed by the preset when a run holds several)."""
    key = f"{cell['batch']}x{cell['prompt_len']}"
    return f"{cell['preset']}:{key}" if len(presets) > 1 else key


def auto_summary(results: dict) -> dict:
    """{auto_vs_best_plain, auto_vs_best_fixed, commit, device, jax, notes} from a results JSON.

    Per cell (key "BxP"; the first cell of a key when sweeps repeat one): ratio = the best entry's
    whole-program seconds / auto's seconds (auto's throughput over the best's; > 1: auto faster).
    Best plain: the fastest plain mode timed in the cell (bf16, w4a8, w4a4 included when timed);
    best fixed: the fastest QSpec entry with gamma > 0."""
    cells = [c for c in results["cells"] if c.get("auto")]
    presets = sorted({c.get("preset", "") for c in cells})
    vs_plain, vs_fixed = {}, {}
    notes = {"ratio": "best seconds / auto seconds, whole generate program (prefill + decode), median of reps "
                      "after AOT compile + warm-up, one process; > 1 means auto is faster",
             "plain modes": "w4a8, w4a4 and bf16 plain decoding are not W4A16's output (other quantization or "
                            "the unquantized model); auto (QSpec greedy or plain W4A16) keeps W4A16's output",
             "acceptance": results["meta"].get("acceptance", "")}
    if "policy" in results["meta"]:
        notes["policy"] = results["meta"]["policy"].get("statement", "")
    seen = set()
    for c in cells:
        key = cell_key(c, presets)
        if key in seen:
            notes[f"{key} (repeat)"] = "a later cell with the same batch and prompt length (a sweep): not summarized"
            continue
        seen.add(key)
        a = c["auto"]
        plain = min((m["seconds"], name) for name, m in c["modes"].items())
        fixed = [(q["seconds"], f"{q['draft']} g{q['gamma']}") for q in c["qspec"] if q["gamma"] > 0]
        vs_plain[key] = plain[0] / a["seconds"]
        text = f"best plain: {plain[1]} ({plain[0]:.4f} s)"
        if fixed:
            best = min(fixed)
            vs_fixed[key] = best[0] / a["seconds"]
            text += f"; best fixed: {best[1]} ({best[0]:.4f} s)"
        else:
            text += "; no fixed-gamma entry timed"
        chosen = f"gamma {a['gamma']} {a['draft']}" if a["gamma"] else "gamma 0 (plain w4a16)"
        text += (f"; auto: {chosen} ({a['seconds']:.4f} s"
                 + (f", the {a['same_program_as']} program's timing: same compiled program" if a.get("same_program_as")
                    else "") + "), "
                 + (f"predicted x{a['predicted_speedup']} vs w4a16 decoding" if a["predicted_speedup"] is not None
                    else "no prediction") + f", source {a['policy_source']}")
        notes[key] = text
    meta = results["meta"]
    return {"auto_vs_best_plain": vs_plain, "auto_vs_best_fixed": vs_fixed, "commit": meta.get("commit"),
            "device": meta.get("device"), "jax": meta.get("jax"), "notes": notes}


def write_summary(results, path):
    summary = auto_summary(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return summary


def policy_for_traces(path, traces, device_kind=None):
    """(AutoGamma, meta) for the auto entries: the running device's policy (its cost table, found as
    `gamma="auto"` finds it) with the acceptance prior of the real-model run the replay traces come
    from: acceptance*.json beside the traces when its meta is the traces' (the same measure_acceptance
    run; for the committed files that is the prior a user gets), else fitted to the traces themselves."""
    folder, name = os.path.split(os.path.abspath(path))
    acc = os.path.join(folder, name.replace("traces", "acceptance", 1))
    same_run = False
    if acc != os.path.abspath(path) and os.path.exists(acc):
        with open(acc) as f:
            same_run = json.load(f).get("meta") == traces.get("meta")
    if same_run:
        prior, how = policy.acceptance_prior(acc), f"fitted to {os.path.relpath(acc)} (tokens per cycle)"
    else:
        prior, how = policy.trace_prior(traces), "fitted to the replay traces themselves (accepted + 1 per cycle)"
    auto = policy.AutoGamma.for_device(device_kind, prior=prior)
    user = policy.acceptance_prior()
    meta = {
        "device_kind": auto.device_kind, "cost_table": auto.table.source if auto.table else None,
        "prior": prior, "prior_source": how, "prior_equals_user_default": prior == user,
        "statement": (f"the auto choice is speculative.resolve_auto's for each cell (context = prompt + "
                      f"new_tokens // 2), with the cost table {auto.table.source if auto.table else '(none: default)'}"
                      f" and acceptance prior {prior} {how}, from the same real-model run "
                      f"({traces['meta'].get('model')}, commit {str(traces['meta'].get('commit'))[:12]}) as the "
                      f"replay traces" + ("" if same_run else " (no acceptance file of that run beside them)")
                      + ("; it is the prior a user's gamma='auto' gets" if prior == user else
                         f"; a user's gamma='auto' gets prior {user} from {os.path.relpath(policy.ACCEPTANCE_FILE)}")),
    }
    return auto, meta


# H200 planning figures for the printed estimate (from benchmarks/engine/h200_step_run2.log: decode step
# programs compiled in 10-16 s quantized, 4-6 s bf16; a generate program adds its prefill, QSpec its
# verify pass). Rough: the printed range scales the compile figures from 10 to 25 s per plain program.
EST_COMPILE_S = {"plain": 15.0, "plain_bf16": 8.0, "qspec": 22.0, "prefill": 6.0, "prefill_bf16": 3.0}
EST_SETUP_S = 45.0  # start-up, bandwidth probe, generating and quantizing Llama-3-8B-shaped weights


def estimate_seconds(specs, choices, new_tokens, reps, step_split):
    """(low, mid, high) seconds of a run on the H200 (see EST_COMPILE_S); choices: the auto choice per spec."""
    compile_s = run_s = 0.0
    for spec, choice in zip(specs, choices):
        b, p = spec["batch"], spec["prompt_len"]
        step = 1e-3 * (5.0 + 0.08 * b)  # s; H200 W4A16 step 4.7 ms at batch 1, 5.7 at 16 (cost table)
        prefill = b * p * 60e-6
        calls = reps + 1
        for mode in dict.fromkeys(spec["modes"] + ["w4a16"] + spec["drafts"]):
            bf = mode == "bf16"
            compile_s += EST_COMPILE_S["plain_bf16" if bf else "plain"]
            run_s += calls * (prefill * (0.3 if bf else 1.0) + new_tokens * step)
            if step_split is None or mode in step_split:
                compile_s += EST_COMPILE_S["prefill_bf16" if bf else "prefill"]
                run_s += calls * prefill * (0.3 if bf else 1.0)
        fixed = [(d, g) for d in spec["drafts"] for g in spec["gammas"]]
        extra = choice.gamma > 0 and (choice.draft, choice.gamma) not in fixed
        for _ in range(len(fixed) + extra):
            compile_s += EST_COMPILE_S["qspec"]
            run_s += calls * (prefill + 1.3 * new_tokens * step)
    return tuple(EST_SETUP_S + compile_s * f + run_s for f in (10 / 15, 1.0, 25 / 15))


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


ISSUE12 = dict(batches="1,16,64", prompt_lens="256", new_tokens=128, modes="w4a16,w4a8,bf16", drafts="w4a8",
               gammas="1,2", reps=2, step_split="w4a16", presets="llama3-8b")


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
    ap.add_argument("--step-split", default="all",
                    help="plain modes whose prefill is also timed alone, for per-step times ('all' or m1,m2,...); "
                         "the others record whole-program times only (plot_throughput.py needs 'all')")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--traces", default="benchmarks/acceptance/traces.json")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-auto", action="store_true", help="skip the gamma='auto' entry of each cell")
    ap.add_argument("--adaptive-pinned", action="store_true",
                    help="also time every QSpec entry through the adaptive loop held at its gamma (the cost of "
                         "choosing gamma inside the loop)")
    ap.add_argument("--auto-summary", default="", help="write auto vs best plain / best fixed per cell here")
    ap.add_argument("--summary-only-from", default="",
                    help="rebuild --auto-summary from this saved results JSON and exit (no run)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, few tokens: CPU check that the script runs")
    ap.add_argument("--kernels", default="auto", choices=KERNELS,
                    help="int4 kernels (qspec_jax.kernel_choice): auto = Mosaic GPU on Hopper, else Triton")
    ap.add_argument("--issue12", action="store_true",
                    help="issue 12's auto run: llama3-8b, batches 1,16,64 at prompt 256, 128 new tokens, plain "
                         "w4a16,w4a8,bf16, QSpec w4a8 at gamma 1,2, auto, prefill timed alone for w4a16 only, reps 2 "
                         "(its defaults: flags given explicitly still win)")
    ap.add_argument("--plan-only", action="store_true",
                    help="print the cells, the auto choices and the time estimate, then exit (no device work)")
    ap.add_argument("--policy-device-kind", default=None,
                    help="price auto with this device kind's cost table (default: the device running; for "
                         "--plan-only on another machine, e.g. 'NVIDIA H200')")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.issue12:  # the preset's values become the defaults; explicit flags win
        ap.set_defaults(**ISSUE12)
        args = ap.parse_args()
    if args.summary_only_from:
        if not args.auto_summary:
            ap.error("--summary-only-from needs --auto-summary PATH")
        with open(args.summary_only_from) as f:
            summary = write_summary(json.load(f), args.auto_summary)
        print(json.dumps(summary, indent=1))
        return
    if not args.out and not args.plan_only:
        ap.error("--out is required (unless --summary-only-from or --plan-only)")
    if args.smoke:
        args.presets, args.batches, args.prompt_lens, args.new_tokens, args.reps = "tiny", "2", "16", 6, 1
        args.gamma_sweep, args.context_sweep = "2:1", "1:40"  # the smoke traces hold gamma 1 and 3
        args.prefill_chunk = 16
        args.traces = args.traces if os.path.exists(args.traces) else "benchmarks/acceptance/traces_smoke.json"
    step_split = None if args.step_split == "all" else [m for m in args.step_split.split(",") if m]

    traces = load_traces(args.traces)
    specs = cell_specs(args)
    auto, policy_meta = (None, None) if args.no_auto else policy_for_traces(args.traces, traces, args.policy_device_kind)
    print(f"{len(specs)} cells per preset: " + "; ".join(
        f"B={s['batch']} P={s['prompt_len']} plain {','.join(dict.fromkeys(s['modes'] + ['w4a16'] + s['drafts']))} "
        f"qspec {','.join(s['drafts'])} x gamma {','.join(map(str, s['gammas']))}" for s in specs), flush=True)
    if auto is not None:  # the choices are made on the host: check the traces hold them before anything runs
        plans = [auto_settings(auto, np.zeros((s["batch"], s["prompt_len"]), np.int32),
                               np.full((s["batch"],), s["prompt_len"]), args.new_tokens, {})[1] for s in specs]
        for spec, c in zip(specs, plans):
            if c.gamma and f"{c.draft}_g{c.gamma}" not in traces["traces"]:
                raise SystemExit(f"auto chooses {c.draft} gamma {c.gamma} at batch {spec['batch']}, but "
                                 f"{args.traces} holds no replay trace {c.draft}_g{c.gamma}")
            print(f"auto at B={spec['batch']} P={spec['prompt_len']} (context {c.context}): gamma {c.gamma}"
                  f"{' ' + c.draft if c.draft else ''}, predicted x{c.predicted_speedup} vs w4a16, {c.policy_source}",
                  flush=True)
        low, mid, high = estimate_seconds(specs, plans, args.new_tokens, args.reps, step_split)
        n = len(args.presets.split(","))
        print(f"estimated H200 run time: {n * mid / 60:.1f} min ({n * low / 60:.1f}-{n * high / 60:.1f} min for "
              f"10-25 s per plain program compile; assumed compile s {EST_COMPILE_S})", flush=True)
    if args.plan_only:
        return
    bandwidth = copy_bandwidth(2**24 if args.smoke else 2**30)
    meta = {
        **run_metadata(), "weights": "generated from a seed (speed only)",
        "acceptance": f"replayed from {args.traces} ({traces['meta'].get('model')}, greedy, per-cycle counts)",
        "group_size": args.group_size or "default", "reps": args.reps,
        "timing": "median of reps after AOT compile + warm-up; step = (T_generate - T_prefill) / (new_tokens - 1)",
        "projections": "q/k/v and gate/up fused", "prefill_chunk": args.prefill_chunk,
        "weights_layout": "per-layer buffers (model.unstack_layers), as generate reads them; prefill_only too",
        "step_split": args.step_split, "copy_bytes_per_s": bandwidth, "argv": sys.argv[1:],
        "kernels": resolve_kernels(args.kernels),
    }
    if policy_meta is not None:
        meta["policy"] = policy_meta
    print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s; {len(specs)} cells per preset", flush=True)
    results = {"meta": meta, "cells": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    t_run = time.perf_counter()
    for preset in args.presets.split(","):
        config = get_preset(preset)
        t0 = time.perf_counter()
        fparams = checkpoint.random_params(config, seed=0, dtype=dtype)
        qparams = fuse_projections(quantize.quantize_params(fparams, config, group_size=args.group_size, dtype=dtype))
        fparams = fuse_projections(fparams) if any("bf16" in s["modes"] for s in specs) else None
        # Per-layer buffers once, for every program (generate would unstack per call; prefill_only reads them too).
        qparams = arrange_weights(unstack_layers(qparams), args.kernels)
        fparams = unstack_layers(fparams) if fparams is not None else None
        jax.block_until_ready((qparams, fparams))
        print(f"{preset}: weights generated and quantized in {time.perf_counter() - t0:.1f}s", flush=True)
        for spec in specs:
            t0 = time.perf_counter()
            cell = measure_cell(fparams, qparams, config, spec, args.new_tokens, traces, args.reps, rng,
                                bandwidth, args.prefill_chunk, auto=auto, step_split=step_split,
                                adaptive_pinned=args.adaptive_pinned)
            cell["preset"], cell["elapsed_s"] = preset, time.perf_counter() - t0
            results["cells"].append(cell)
            with open(args.out, "w") as f:  # after every cell: a cut-off run still leaves its data
                json.dump(results, f, indent=1)
            if args.auto_summary and auto is not None:
                write_summary(results, args.auto_summary)
            print(f"  cell done in {cell['elapsed_s']:.0f}s (run so far {time.perf_counter() - t_run:.0f}s)", flush=True)
        del fparams, qparams
    print(json.dumps(results["meta"]))
    if args.auto_summary and auto is not None:
        print(json.dumps(auto_summary(results), indent=1))


if __name__ == "__main__":
    main()
