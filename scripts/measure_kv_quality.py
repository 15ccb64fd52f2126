"""QuantSpec's hierarchical INT8 KV cache vs the bf16 cache on the real SmolLM2-135M, on CPU.

1. Perplexity through the cache: ShareGPT texts of `--ppl-len` tokens, the first `--prefix` tokens
   prefilled (plain causal attention, not scored), then the rest teacher-forced in blocks of
   gamma + 1 tokens exactly as verify passes run them (write the block, attend over the cache, flush
   after each block), in W4A16 (the verifier) with the bf16 cache, the int8 view (the verifier's)
   and the int4 view (the draft's). Only the KV cache differs between the rows.
2. Acceptance: greedy QSpec at `--gamma` with the w4a8 and w4a4 drafts on real prompts (HumanEval
   code + ShareGPT chat), kv="bf16" and kv="int8" (drafts read the INT4 view, verify the INT8 view);
   every int8 run is compared token for token with plain greedy W4A16 on the int8 cache.

    python scripts/measure_kv_quality.py            # results in benchmarks/kv/kv_quality.json
    python scripts/measure_kv_quality.py --smoke    # tiny random model, seconds
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
from qspec_jax.kv_cache import HierarchicalKVCache, KVCache, flush  # noqa: E402
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
        cache = flush(cache.replace(lengths=cache.lengths + block), block)
        return cache, nll

    _, nll = jax.lax.scan(step, cache, jnp.arange(n))  # [n, B, block]
    return jnp.transpose(nll, (1, 0, 2)).reshape(b, n * block)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sharegpt", type=int, default=8, help="ShareGPT texts for perplexity")
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=16, help="prefilled tokens per text (not scored)")
    ap.add_argument("--humaneval", type=int, default=4)
    ap.add_argument("--chat-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--kv-group", type=int, default=64)
    ap.add_argument("--kv-window", type=int, default=128)
    ap.add_argument("--calibration-tokens", type=int, default=None)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/kv")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        from qspec_jax import checkpoint, quantize
        from qspec_jax.config import get_preset

        config = get_preset("tiny")
        params = quantize.quantize_params(checkpoint.random_params(config, 0, jnp.float32), config, dtype=jnp.float32)
        rng = np.random.default_rng(0)
        ppl_tokens = rng.integers(3, config.vocab_size, (2, 96)).astype(np.int32)
        ppl_mask = np.ones_like(ppl_tokens, bool)
        rows = [list(rng.integers(3, config.vocab_size, n)) for n in (5, 40)]
        labels = ["random"] * 2
        args.max_new_tokens, args.kv_group, args.kv_window, args.ppl_len = 24, 16, 32, 96
        weights = "round to nearest"
    else:
        from qspec_jax.generate import CALIBRATION_TOKENS, encode_prompts, load_params, weight_rounding
        from qspec_jax.tokenizer import load_tokenizer

        calib = CALIBRATION_TOKENS if args.calibration_tokens is None else args.calibration_tokens
        config, params = load_params(args.model, quantized=True, calibration_tokens=calib)
        weights = weight_rounding(calib)
        tok = load_tokenizer(args.model)
        ppl_tokens, ppl_mask = tokenize_texts(tok, datasets.sharegpt_texts(args.sharegpt), args.ppl_len,
                                              config.bos_token_id)
        code = encode_prompts(tok, datasets.humaneval_prompts(args.humaneval), chat=False)
        chat = encode_prompts(tok, datasets.sharegpt_prompts(args.chat_prompts), chat=True)
        rows, labels = code + chat, ["humaneval"] * len(code) + ["sharegpt"] * len(chat)
    params = unstack_layers(params)
    block = args.gamma + 1
    out = {"meta": {**run_metadata(), "model": "tiny (random, smoke)" if args.smoke else args.model,
                    "weights": weights, "kv_group": args.kv_group, "kv_window": args.kv_window,
                    "gamma": args.gamma, "device_note": "CPU, reference attention (dequantize + f32 softmax)"}}

    if not args.skip_ppl:
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

    if not args.skip_acceptance:
        toks, lens = speculative.pad_prompts(rows, multiple=64)
        common = dict(config=config, max_new_tokens=args.max_new_tokens, eos_ids=(), kv_group=args.kv_group,
                      kv_window=args.kv_window)
        lab = np.asarray(labels)
        acc = {"prompts": {n: int((lab == n).sum()) for n in sorted(set(labels))},
               "prompt_lengths": [len(r) for r in rows], "max_new_tokens": args.max_new_tokens,
               "eos": "disabled (fixed-length rows)", "policy": "greedy", "runs": []}
        base = {}
        for kv in ("bf16", "int8"):
            t0 = time.time()
            base[kv] = np.asarray(speculative.generate(params, toks, lens, gamma=0, verify_mode="w4a16", kv=kv,
                                                       **common).tokens)
            acc[f"w4a16_{kv}_seconds_cpu"] = round(time.time() - t0, 1)
        acc["w4a16_int8_vs_bf16_identical_rows"] = int(np.all(base["int8"] == base["bf16"], axis=1).sum())
        acc["w4a16_int8_vs_bf16_token_agreement"] = float(np.mean(base["int8"] == base["bf16"]))
        for draft in ("w4a8", "w4a4"):
            for kv in ("bf16", "int8"):
                t0 = time.time()
                res = speculative.generate(params, toks, lens, gamma=args.gamma, draft_mode=draft, kv=kv, **common)
                same = np.all(np.asarray(res.tokens) == base[kv], axis=1)
                s = res.summary()
                run = {"draft": draft, "kv": kv, "gamma": args.gamma, "acceptance_rate": s["acceptance_rate"],
                       "tokens_per_cycle": s["tokens_per_cycle"], "identical_to_plain_w4a16_same_kv": f"{same.sum()}/{len(same)}",
                       "seconds_cpu": round(time.time() - t0, 1)}
                for name in sorted(set(labels)):
                    m = lab == name
                    d, a = int(np.sum(np.asarray(res.drafted)[m])), int(np.sum(np.asarray(res.accepted)[m]))
                    run[f"acceptance_{name}"] = a / d if d else None
                acc["runs"].append(run)
                print(json.dumps(run), flush=True)
        out["acceptance"] = acc
    out["meta"]["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    name = "kv_quality_smoke.json" if args.smoke else "kv_quality.json"
    path = os.path.join(args.out, name)
    if os.path.exists(path) and (args.skip_ppl or args.skip_acceptance):  # a partial run updates the file
        with open(path) as f:
            old = json.load(f)
        out = {**old, **out, "meta": {**old.get("meta", {}), **out["meta"]}}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
