"""QuantSpec's hierarchical INT8 KV cache vs the bf16 cache on the real SmolLM2-135M, on CPU.

1. Perplexity through the cache: ShareGPT texts of `--ppl-len` tokens, the first `--prefix` tokens
   prefilled (plain causal attention, not scored), then the rest teacher-forced in blocks of
   gamma + 1 tokens exactly as verify passes run them (write the block, attend over the cache, flush
   after each block), in W4A16 (the verifier) with the bf16 cache, the int8 view (the verifier's)
   and the int4 view (the draft's). Only the KV cache differs between the rows.
2. Acceptance: greedy QSpec at `--gamma` with the w4a8 and w4a4 drafts on real prompts (HumanEval
   code + ShareGPT first-turn chat prompts in one batch; multi-turn ShareGPT conversations of
   `--long-min`..`--long-max` tokens in a second batch), kv="bf16" and kv="int8" (drafts read the
   INT4 view, verify the INT8 view; the long batch on int8 only by default), and QuantSpec (`speculative.quantspec`: float weights verify on
   the INT8 view, the W4A16 int4 draft reads the INT4 view). Every run is compared token for token
   with plain greedy decoding by its verifier on the same cache (W4A16, or the float weights for
   QuantSpec). Optional extra gammas (`--extra-gammas`) for w4a8 on int8, then (phase `w4a16_draft`)
   the int4 weights drafting in W4A16 on the INT4 view: speculation through the KV cache alone.
3. Traces: every speculative run's per-cycle accepted counts (`GenerationResult.trace`, [B, cycles])
   go to traces_<kv>kv.json (short batch) and traces_<kv>kv_long.json (long batch), in the format of
   benchmarks/acceptance/traces.json (keys "<draft>_g<gamma>", QuantSpec "quantspec_w4a16_g<gamma>"),
   for the replay rule (`scripts/replay.py`) of the GPU benchmarks. Results are saved after every run.

    python scripts/measure_kv_quality.py            # results in benchmarks/kv/kv_quality.json
    python scripts/measure_kv_quality.py --smoke    # tiny random model, about two minutes
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

from qspec_jax import datasets, speculative  # noqa: E402
from qspec_jax.evaluation import run_metadata, tokenize_texts  # noqa: E402
from qspec_jax.loading import encode_prompts  # noqa: E402
from qspec_jax.hierarchical_kv import HierarchicalKVCache  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402
from qspec_jax.model import forward, unstack_layers  # noqa: E402


@partial(jax.jit, static_argnames=("config", "kv", "prefix", "block", "group", "window"))
def cached_nll(params, tokens, *, config, kv, prefix, block, group, window):
    """Per-position NLL [B, L - 1 - prefix] of tokens [B, L] teacher-forced through a cache:
    prefix prefilled, then blocks of `block` tokens. kv: "bf16", "int8" or "int4" (the view read)."""
    b, L = tokens.shape
    dtype = params["embed"].dtype
    pos0 = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix))
    lens = jnp.full((b,), prefix, jnp.int32)
    if kv == "bf16":
        cache = KVCache.create(config, b, L + block, dtype)
        _, cache = forward(params, tokens[:, :prefix], pos0, cache, config=config, mode="w4a16")
        cache = cache.replace(lengths=lens)
    else:
        pre = KVCache.create(config, b, prefix, dtype)
        _, pre = forward(params, tokens[:, :prefix], pos0, pre, config=config, mode="w4a16")
        cache = HierarchicalKVCache.from_prompt(config, pre.k, pre.v, lens, L + block, headroom=block,
                                                group=group, window=window, dtype=dtype)
    n = (L - 1 - prefix) // block
    view = "int4" if kv == "int4" else "int8"

    def step(cache, j):
        start = prefix + j * block
        inp = jax.lax.dynamic_slice_in_dim(tokens, start, block, axis=1)
        tgt = jax.lax.dynamic_slice_in_dim(tokens, start + 1, block, axis=1)
        pos = start + jnp.broadcast_to(jnp.arange(block, dtype=jnp.int32), (b, block))
        logits, cache = forward(params, inp, pos, cache, config=config, mode="w4a16", kv_view=view)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        cache = cache.replace(lengths=cache.lengths + block).flush(block)
        return cache, nll

    _, nll = jax.lax.scan(step, cache, jnp.arange(n))  # [n, B, block]
    return jnp.transpose(nll, (1, 0, 2)).reshape(b, n * block)


def long_chat_prompts(tokenizer, n: int, min_tokens: int, max_tokens: int, start: int = 0):
    """(token lists, ShareGPT record indices) of `n` multi-turn ShareGPT conversations as chat
    prompts: every turn up to the last user turn that keeps the templated prompt within
    `max_tokens` (assistant turns as assistant messages, generation prompt appended), kept when it
    has at least `min_tokens`. English conversations only: from before datasets.CALIBRATION_SKIP
    (start 0), or from record `start` on (past the calibration records; the caller checks)."""
    out, used = [], []
    records = datasets.sharegpt_conversations() if start == 0 else datasets.sharegpt_conversations(LONG_HEAD_BYTES)
    for i, conv in enumerate(records):
        if (start == 0 and i >= datasets.CALIBRATION_SKIP) or len(out) == n:
            break
        if i < start:
            continue
        msgs, best = [], None
        for turn in conv.get("conversations") or []:
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            text = (turn.get("value") or "").strip()
            if role is None or not text or not text.isascii() or (not msgs and role != "user") or (
                    msgs and msgs[-1]["role"] == role):
                break
            msgs.append({"role": role, "content": text})
            if role == "user":
                ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                if len(ids) > max_tokens:
                    break
                best = [int(t) for t in ids]
        if best is not None and len(best) >= min_tokens:
            out.append(best)
            used.append(i)
    return out, used


LONG_HEAD_BYTES = 64 << 20  # the packaged file's first 64 MB: about 9,400 records, 49 of 14k-30k characters past 1024
PHASES = ("short_int8", "quantspec", "ppl", "long", "short_bf16", "extra_gammas", "w4a16_draft")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sharegpt", type=int, default=8, help="ShareGPT texts for perplexity")
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=16, help="prefilled tokens per text (not scored)")
    ap.add_argument("--humaneval", type=int, default=8)
    ap.add_argument("--chat-prompts", type=int, default=8)
    ap.add_argument("--long-prompts", type=int, default=4, help="multi-turn ShareGPT prompts (second batch)")
    ap.add_argument("--long-min", type=int, default=1024, help="long prompts' minimum tokens")
    ap.add_argument("--long-max", type=int, default=2048, help="long prompts' maximum tokens")
    ap.add_argument("--long-from", type=int, default=0,
                    help="take the long prompts from this ShareGPT record on (0: from before the calibration "
                         "records); it must lie past the records the conversion's GPTQ calibration read")
    ap.add_argument("--long-kv", default="int8", help="kv caches the long batch runs on: int8 or bf16,int8")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--extra-gammas", default="1,2,4", help="further gammas for w4a8 on int8 (run last; '' none)")
    ap.add_argument("--kv-group", type=int, default=64)
    ap.add_argument("--kv-window", type=int, default=128)
    ap.add_argument("--calibration-tokens", type=int, default=None)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--skip-quantspec", action="store_true")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="acceptance phases to run, in this order: " + ", ".join(PHASES))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/kv")
    args = ap.parse_args()
    t_start = time.time()
    from qspec_jax import checkpoint, quantize

    if args.smoke:
        from qspec_jax.config import get_preset

        config = get_preset("tiny")
        fparams = checkpoint.random_params(config, 0, jnp.float32)
        params = quantize.quantize_params(fparams, config, dtype=jnp.float32)
        rng = np.random.default_rng(0)
        ppl_tokens = rng.integers(3, config.vocab_size, (2, 96)).astype(np.int32)
        ppl_mask = np.ones_like(ppl_tokens, bool)
        batches = {"short": ([list(rng.integers(3, config.vocab_size, n)) for n in (5, 40)], ["random"] * 2),
                   "long": ([list(rng.integers(3, config.vocab_size, 150))], ["random_long"])}
        args.max_new_tokens, args.kv_group, args.kv_window, args.ppl_len = 24, 16, 32, 96
        args.extra_gammas = "2"
        weights, long_records = "round to nearest", []
    else:
        from qspec_jax.loading import CALIBRATION_ROW, CALIBRATION_TOKENS, load_params, weight_rounding
        from qspec_jax.tokenizer import load_tokenizer

        calib = CALIBRATION_TOKENS if args.calibration_tokens is None else args.calibration_tokens
        config, params = load_params(args.model, quantized=True, calibration_tokens=calib)
        fparams = None
        if not (args.skip_acceptance or args.skip_quantspec):
            _, fparams = load_params(args.model, quantized=False)
        weights = weight_rounding(calib)
        tok = load_tokenizer(args.model)
        ppl_tokens, ppl_mask = tokenize_texts(tok, datasets.sharegpt_texts(args.sharegpt), args.ppl_len,
                                              config.bos_token_id)
        code = encode_prompts(tok, datasets.humaneval_prompts(args.humaneval), chat=False)
        chat = encode_prompts(tok, datasets.sharegpt_prompts(args.chat_prompts), chat=True)
        batches = {"short": (code + chat, ["humaneval"] * len(code) + ["sharegpt"] * len(chat))}
        if args.long_from:
            end = datasets.calibration_end(4 * (calib // CALIBRATION_ROW)) if calib else 0
            if args.long_from < max(end, datasets.CALIBRATION_SKIP):
                raise SystemExit(f"--long-from {args.long_from}: the GPTQ calibration read ShareGPT records "
                                 f"{datasets.CALIBRATION_SKIP}..{end - 1}; take long prompts from {end} on")
        long_rows, long_records = long_chat_prompts(tok, args.long_prompts, args.long_min, args.long_max,
                                                    start=args.long_from)
        if long_rows:
            batches["long"] = (long_rows, ["sharegpt_long"] * len(long_rows))
    params = unstack_layers(params)
    fparams = None if fparams is None else unstack_layers(fparams)
    block = args.gamma + 1
    meta = {**run_metadata(), "model": "tiny (random, smoke)" if args.smoke else args.model,
            "weights": weights, "kv_group": args.kv_group, "kv_window": args.kv_window,
            "gamma": args.gamma, "device_note": "CPU, reference attention (dequantize + f32 softmax)"}
    out = {"meta": meta}
    os.makedirs(args.out, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    path = os.path.join(args.out, f"kv_quality{suffix}.json")
    old = {}
    if os.path.exists(path) and (args.skip_ppl or args.skip_acceptance):  # a partial run updates the file
        with open(path) as f:
            old = json.load(f)

    def save():
        meta["seconds"] = round(time.time() - t_start, 1)
        res = {**old, **out, "meta": {**old.get("meta", {}), **meta}}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    def perplexity():
        ppl = {}
        mask = ppl_mask[:, args.prefix + 1:][:, : ((args.ppl_len - 1 - args.prefix) // block) * block]
        for kv in ("bf16", "int8", "int4"):
            t0 = time.time()
            nll = np.asarray(cached_nll(params, jnp.asarray(ppl_tokens), config=config, kv=kv, prefix=args.prefix,
                                        block=block, group=args.kv_group, window=args.kv_window))
            ppl[kv] = {"ppl": float(np.exp(nll[mask].mean())), "seconds_cpu": round(time.time() - t0, 1)}
            print(f"ppl kv={kv}: {ppl[kv]['ppl']:.4f} ({ppl[kv]['seconds_cpu']} s)", flush=True)
        out["perplexity"] = {
            "texts": int(len(ppl_tokens)), "sequence_tokens": args.ppl_len, "prefix_prefilled": args.prefix,
            "scored_tokens": int(mask.sum()), "mode": "w4a16", "block": block,
            "source": "ShareGPT (datasets.sharegpt_texts), BOS first, truncated to sequence_tokens",
            **ppl, "int8_over_bf16": ppl["int8"]["ppl"] / ppl["bf16"]["ppl"],
            "int4_over_bf16": ppl["int4"]["ppl"] / ppl["bf16"]["ppl"],
        }
        save()

    if args.skip_acceptance:
        if not args.skip_ppl:
            perplexity()
        print(f"wrote {path}")
        return

    padded = {name: speculative.pad_prompts(rows, multiple=64) for name, (rows, _) in batches.items()}
    labels = np.asarray([lab for _, labs in batches.values() for lab in labs])
    long_kv = tuple(k.strip() for k in args.long_kv.split(",") if k.strip())
    common = dict(config=config, max_new_tokens=args.max_new_tokens, eos_ids=(), kv_group=args.kv_group,
                  kv_window=args.kv_window)
    acc = {"prompts": {n: int((labels == n).sum()) for n in sorted(set(labels))},
           "batches": {name: {"rows": len(rows), "prompt_lengths": [len(r) for r in rows],
                              "padded_width": int(padded[name][0].shape[1]),
                              "kv": ["bf16", "int8"] if name == "short" else list(long_kv)}
                       for name, (rows, _) in batches.items()},
           "long_prompts": {"source": "multi-turn ShareGPT conversations (chat template, turns up to the last user "
                                      "turn within long_max tokens)", "records": long_records,
                            "long_min": args.long_min, "long_max": args.long_max},
           "max_new_tokens": args.max_new_tokens, "eos": "disabled (fixed-length rows)", "rule": "greedy",
           "identity_reference": "plain greedy decoding (gamma 0) by the run's verifier on the same kv cache: "
                                 "W4A16 int4 weights for QSpec, the float weights for QuantSpec",
           "baselines": [], "runs": []}
    out["acceptance"] = acc
    traces = {}
    trace_meta = {k: v for k, v in meta.items() if k not in ("gamma", "device_note")}
    trace_meta.update({
        "device": "cpu (reference kernels: exact W4A4 / W4A8 math)",
        "long_prompt_records": long_records, "max_new_tokens": args.max_new_tokens,
        "eos": "disabled (fixed-length rows)", "rule": "greedy",
        "batches": "short: HumanEval + ShareGPT first-turn prompts (traces_<kv>kv.json); long: multi-turn ShareGPT "
                   "conversations of long_min..long_max tokens (traces_<kv>kv_long.json)",
        "long_min": args.long_min, "long_max": args.long_max,
        "quantspec": "bf16 (float) weights verify on the INT8 view, W4A16 int4 draft on the INT4 view",
    })
    if fparams is not None:
        meta["quantspec_verifier_weights"] = "the float checkpoint in float32 (mode 'bf16' on CPU)"

    def save_traces():
        for (kv, name), tr in traces.items():
            if tr:
                lab = batches[name][1]
                gam = sorted({int(k.rsplit("_g", 1)[1]) for k in tr})
                tail = "" if name == "short" else f"_{name}"
                with open(os.path.join(args.out, f"traces_{kv}kv{tail}{suffix}.json"), "w") as f:
                    json.dump({"meta": {**trace_meta, "kv": kv, "gammas": gam, "batch": name,
                                        "prompts": {n: lab.count(n) for n in sorted(set(lab))},
                                        "prompt_lengths": acc["batches"][name]["prompt_lengths"],
                                        "padded_width": acc["batches"][name]["padded_width"]},
                               "labels": lab, "traces": tr}, f)

    base = {}

    def baseline(kv, verify, name):
        """Plain greedy tokens of batch `name` by the verifier `verify` ("w4a16" or "bf16") on `kv`."""
        key = (verify, kv, name)
        if key not in base:
            toks, lens = padded[name]
            t0 = time.time()
            w = params if verify == "w4a16" else fparams
            base[key] = np.asarray(speculative.generate(w, toks, lens, gamma=0, verify_mode=verify, kv=kv,
                                                        **common).tokens)
            acc["baselines"].append({"verify": verify, "kv": kv, "batch": name,
                                     "seconds_cpu": round(time.time() - t0, 1)})
            print(json.dumps(acc["baselines"][-1]), flush=True)
        return base[key]

    def spec_run(draft, kv, gamma, name, quantspec=False):
        if name not in batches:
            return
        ref = baseline(kv, "bf16" if quantspec else "w4a16", name)
        toks, lens = padded[name]
        t0 = time.time()
        if quantspec:
            res = speculative.quantspec(fparams, params, toks, lens, gamma=gamma, draft_mode=draft, **common)
        else:
            res = speculative.generate(params, toks, lens, gamma=gamma, draft_mode=draft, kv=kv, **common)
        same = np.all(np.asarray(res.tokens) == ref, axis=1)
        s = res.summary()
        run = {"system": "quantspec" if quantspec else "qspec", "draft": draft,
               "verify": "bf16" if quantspec else "w4a16", "kv": kv, "gamma": gamma, "batch": name,
               "acceptance_rate": s["acceptance_rate"], "tokens_per_cycle": s["tokens_per_cycle"],
               "acceptance_at_position": s["acceptance_at_position"],
               "identical_to_plain_greedy_verifier_same_kv": f"{same.sum()}/{len(same)}",
               "seconds_cpu": round(time.time() - t0, 1)}
        lab = np.asarray(batches[name][1])
        for n in sorted(set(lab)):
            m = lab == n
            d, a = int(np.sum(np.asarray(res.drafted)[m])), int(np.sum(np.asarray(res.accepted)[m]))
            run[f"acceptance_{n}"] = a / d if d else None
        acc["runs"].append(run)
        key = f"quantspec_{draft}_g{gamma}" if quantspec else f"{draft}_g{gamma}"
        traces.setdefault((kv, name), {})[key] = np.asarray(res.trace).tolist()
        print(json.dumps(run), flush=True)
        save()
        save_traces()

    # Priority order (each run is saved as it finishes): the short batch on int8 at gamma 3 (QSpec
    # w4a8, w4a4; QuantSpec), perplexity, the long batch on int8, the bf16-kv comparison, and the
    # extra gammas last.
    qs = fparams is not None and not args.skip_quantspec
    phases = {p.strip() for p in args.phases.split(",")}
    if "short_int8" in phases:
        spec_run("w4a8", "int8", args.gamma, "short")
        spec_run("w4a4", "int8", args.gamma, "short")
    if qs and "quantspec" in phases:
        spec_run("w4a16", "int8", args.gamma, "short", quantspec=True)
    if not args.skip_ppl and "ppl" in phases:
        perplexity()
    for kv in long_kv if "long" in phases else ():
        spec_run("w4a8", kv, args.gamma, "long")
        spec_run("w4a4", kv, args.gamma, "long")
        if qs and kv == "int8":
            spec_run("w4a16", "int8", args.gamma, "long", quantspec=True)
    if "short_bf16" in phases:
        spec_run("w4a8", "bf16", args.gamma, "short")
        spec_run("w4a4", "bf16", args.gamma, "short")
        b8 = baseline("int8", "w4a16", "short")  # one more plain run where short_int8 did not run
        b16 = base[("w4a16", "bf16", "short")]
        acc["w4a16_int8_vs_bf16_short_batch"] = {
            "identical_rows": f"{int(np.all(b8 == b16, axis=1).sum())}/{len(b8)}", "token_agreement": float(np.mean(b8 == b16))}
        save()
    for g in (int(x) for x in args.extra_gammas.split(",") if x.strip()) if "extra_gammas" in phases else ():
        if g != args.gamma:
            spec_run("w4a8", "int8", g, "short")
    if "w4a16_draft" in phases:  # KV-only self-speculation: W4A16 drafts on the INT4 view, verifies on INT8
        spec_run("w4a16", "int8", args.gamma, "short")
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
