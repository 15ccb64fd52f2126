"""Acceptance and fidelity of QSpec on the real SmolLM2-135M, on CPU (integer W4A4 math is exact, so
the GPU kernels accept the same tokens).

One batch of real prompts (HumanEval code prompts and ShareGPT chat prompts, mixed lengths) is
generated greedily in plain W4A16 and with QSpec for every (draft mode, gamma). Every QSpec output is
compared token for token with W4A16; acceptance rate and tokens per cycle are reported per dataset.
The per-cycle acceptance traces are saved for the replay rule (`scripts/replay.py`) of the throughput benchmark.

    python scripts/measure_acceptance.py                      # 8 + 8 prompts x 128 tokens, gamma 1..7
    python scripts/measure_acceptance.py --smoke               # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qspec_jax import datasets, speculative  # noqa: E402
from qspec_jax.evaluation import git_commit  # noqa: E402
from qspec_jax.loading import CALIBRATION_TOKENS, encode_prompts, load_params, weight_rounding  # noqa: E402


def build_batch(args):
    """(token lists, dataset label per row, config, params) for the real model or the smoke model."""
    if args.smoke:
        import jax.numpy as jnp

        from qspec_jax import checkpoint, quantize
        from qspec_jax.config import get_preset

        config = get_preset("tiny")
        params = quantize.quantize_params(checkpoint.random_params(config, 0, jnp.float32), config, dtype=jnp.float32)
        rng = np.random.default_rng(0)
        rows = [list(rng.integers(3, config.vocab_size, n)) for n in (5, 17, 9, 30)]
        return rows, ["random"] * len(rows), config, params
    from qspec_jax.tokenizer import load_tokenizer

    config, params = load_params(args.model, quantized=True, group_size=args.group_size,
                                 calibration_tokens=args.calibration_tokens)
    tok = load_tokenizer(args.model)
    code = encode_prompts(tok, datasets.humaneval_prompts(args.humaneval), chat=False)
    chat = encode_prompts(tok, datasets.sharegpt_prompts(args.sharegpt), chat=True)
    return code + chat, ["humaneval"] * len(code) + ["sharegpt"] * len(chat), config, params


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--humaneval", type=int, default=8)
    ap.add_argument("--sharegpt", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gammas", default="1,2,3,4,5,6,7")
    ap.add_argument("--drafts", default="w4a4,w4a8")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                    help="GPTQ calibration tokens for the int4 weights (0: round to nearest)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few tokens (CI keeps the script alive)")
    ap.add_argument("--out", default="benchmarks/acceptance")
    ap.add_argument("--report", action="store_true", help="only redraw the plot and table from the saved JSON")
    args = ap.parse_args()
    if args.report:
        with open(os.path.join(args.out, "acceptance.json")) as f:
            saved = json.load(f)
        report(args.out, saved["meta"], saved["runs"])
        return 0
    if args.smoke:
        args.max_new_tokens, args.gammas = 8, "1,3"

    rows, labels, config, params = build_batch(args)
    toks, lens = speculative.pad_prompts(rows, multiple=64)
    common = dict(config=config, max_new_tokens=args.max_new_tokens, eos_ids=())  # fixed length: comparable rows
    t0 = time.perf_counter()
    base = speculative.generate(params, toks, lens, gamma=0, verify_mode="w4a16", **common)
    base_tokens = np.asarray(base.tokens)
    base_s = time.perf_counter() - t0
    labels = np.asarray(labels)

    meta = {
        "model": "tiny (random, smoke)" if args.smoke else args.model, "device": "cpu (reference kernels: exact W4A4)",
        "jax": jax.__version__, "commit": git_commit(), "prompts": {str(n): int((labels == n).sum()) for n in sorted(set(labels))},
        "prompt_lengths": [len(r) for r in rows], "padded_width": int(toks.shape[1]),
        "max_new_tokens": args.max_new_tokens, "eos": "disabled (fixed-length rows)", "rule": "greedy",
        "w4a16_seconds_cpu": round(base_s, 2), "group_size": args.group_size or "default",
        "weight_rounding": weight_rounding(0 if args.smoke else args.calibration_tokens),
    }
    runs, traces = [], {}
    # gamma 1, 3, 6 first: the fidelity check needs them; the rest fill in the acceptance curve.
    grid = sorted(((d, int(g)) for d in args.drafts.split(",") for g in args.gammas.split(",")),
                  key=lambda dg: (dg[1] not in (1, 3, 6), dg[1], dg[0]))
    for draft, gamma in tqdm(grid, desc="qspec runs", file=sys.stderr):
        t0 = time.perf_counter()
        res = speculative.generate(params, toks, lens, gamma=gamma, draft_mode=draft, **common)
        seconds = time.perf_counter() - t0
        tokens = np.asarray(res.tokens)
        same = np.all(tokens == base_tokens, axis=1)
        first_diff = [int(np.argmax(tokens[i] != base_tokens[i])) if not same[i] else None for i in range(len(rows))]
        per_set = {}
        for name in sorted(set(labels)):
            m = labels == name
            drafted, accepted = int(np.sum(np.asarray(res.drafted)[m])), int(np.sum(np.asarray(res.accepted)[m]))
            cycles, new = int(np.sum(np.asarray(res.cycles)[m])), int(np.sum(np.asarray(res.num_tokens)[m]))
            per_set[name] = {
                "rows": int(m.sum()), "acceptance_rate": accepted / drafted, "tokens_per_cycle": (new - m.sum()) / cycles,
                "drafted": drafted, "accepted": accepted, "cycles": cycles,
            }
        run = {
            "draft": draft, "gamma": gamma, "identical_rows": int(same.sum()), "rows": len(rows),
            "first_mismatch": first_diff, "seconds_cpu": round(seconds, 2), **{"all": res.summary()}, "by_dataset": per_set,
        }
        runs.append(run)
        traces[f"{draft}_g{gamma}"] = np.asarray(res.trace).tolist()
        save(args, meta, labels, runs, traces)
        tqdm.write(f"{draft} gamma={gamma}: identical {same.sum()}/{len(rows)}, "
                   + ", ".join(f"{k} a={v['acceptance_rate']:.3f} tpc={v['tokens_per_cycle']:.2f}" for k, v in per_set.items()),
                   file=sys.stderr)

    if not args.smoke:
        report(args.out, meta, runs)
    print(table(runs))
    bad = [r for r in runs if r["identical_rows"] != r["rows"]]
    return 1 if bad else 0


def save(args, meta, labels, runs, traces):
    os.makedirs(args.out, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    with open(os.path.join(args.out, f"acceptance{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    with open(os.path.join(args.out, f"traces{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "labels": labels.tolist(), "traces": traces}, f)


def report(out, meta, runs):
    """acceptance.png (rate and tokens per cycle vs gamma) and README.md with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for draft in sorted({r["draft"] for r in runs}):
        for name in sorted(runs[0]["by_dataset"]):
            rs = sorted((r for r in runs if r["draft"] == draft), key=lambda r: r["gamma"])
            g = [r["gamma"] for r in rs]
            style = "-" if name == "humaneval" else "--"
            axes[0].plot(g, [r["by_dataset"][name]["acceptance_rate"] for r in rs], style, marker="o", label=f"{draft} {name}")
            axes[1].plot(g, [r["by_dataset"][name]["tokens_per_cycle"] for r in rs], style, marker="o", label=f"{draft} {name}")
    axes[0].set(xlabel="gamma", ylabel="acceptance rate", title="Drafted tokens accepted by W4A16")
    axes[1].set(xlabel="gamma", ylabel="tokens per verify pass", title="Tokens per QSpec cycle")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, greedy, {meta['max_new_tokens']} new tokens, commit {str(meta['commit'])[:8]}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "acceptance.png"), dpi=110)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            "# QSpec acceptance and fidelity on SmolLM2-135M\n\n"
            f"Written by `scripts/measure_acceptance.py` on CPU ({meta['device']}), jax {meta['jax']}, commit "
            f"{meta['commit']}, int4 weights: {meta.get('weight_rounding', 'round to nearest')}. One batch of "
            f"{sum(meta['prompts'].values())} real prompts ({', '.join(f'{k} {v}' for k, v in meta['prompts'].items())}; "
            f"lengths {min(meta['prompt_lengths'])}-{max(meta['prompt_lengths'])} tokens, HumanEval code prompts "
            f"raw, ShareGPT first turns through the chat template), {meta['max_new_tokens']} new tokens each, "
            f"greedy, EOS {meta['eos']}. `identical` compares every row token for token with plain W4A16 "
            "greedy decoding of the same batch. `traces.json` holds each run's per-row, per-cycle accepted "
            "counts: the input of the replay rule (`scripts/replay.py`) of `scripts/bench_throughput.py`.\n\n"
            "Caveat: with EOS disabled, rows keep generating past their natural end, where text is often "
            "repetitive and easy to draft; acceptance on the model's own greedy text is also far higher than "
            "the teacher-forced agreement on human text in `benchmarks/quality/`, and it depends on how "
            "predictable the verifier's own text is (see README.md, Results: round-to-nearest weights, whose "
            "W4A16 text is further from the float model's, accepted w4a4 drafts more often).\n\n"
            + table(runs) + "\n\n![acceptance](acceptance.png)\n"
        )


def table(runs) -> str:
    sets = sorted(runs[0]["by_dataset"])
    head = "| draft | gamma | identical to w4a16 | " + " | ".join(f"{s} acceptance | {s} tokens/cycle" for s in sets) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(sets))]
    for r in sorted(runs, key=lambda r: (r["draft"], r["gamma"])):
        cells = " | ".join(f"{r['by_dataset'][s]['acceptance_rate']:.3f} | {r['by_dataset'][s]['tokens_per_cycle']:.2f}" for s in sets)
        lines.append(f"| {r['draft']} | {r['gamma']} | {r['identical_rows']}/{r['rows']} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
