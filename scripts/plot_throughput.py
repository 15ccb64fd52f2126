"""Plots and markdown tables from a bench_throughput.py result (no GPU needed).

    python scripts/plot_throughput.py benchmarks/throughput/h100_llama3-8b.json

Writes next to the JSON: <name>_batch.png (tokens/s vs batch per mode), <name>_gamma.png
(acceptance and QSpec/W4A16 vs gamma), <name>_latency.png (per-token latency split into draft and
verify residual (cycle time minus its draft steps) against the W4A16 step), and <name>.md (the tables, including the verdict table of
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main_cells(cells, prompt_len):
    """Cells of the batch sweep: the given prompt length, by batch (first cell of each batch)."""
    by_batch = {}
    for c in cells:
        if c["prompt_len"] == prompt_len:
            by_batch.setdefault(c["batch"], c)
    return [by_batch[b] for b in sorted(by_batch)]


def qspec_by_gamma(cells, batch, prompt_len, draft="w4a4"):
    """{gamma: entry} over every cell at (batch, prompt_len)."""
    out = {}
    for c in cells:
        if c["batch"] == batch and c["prompt_len"] == prompt_len:
            out.update({q["gamma"]: q for q in c["qspec"] if q["draft"] == draft})
    return dict(sorted(out.items()))


def verify_residual_ms(q) -> float:
    """A QSpec cycle's time minus its gamma plain draft steps: what is left for the verify pass.

    A residual, not a timing (bench_throughput.py writes it as `verify_ms_residual`; result files
    written before that name call it `verify_ms`).
    """
    return q["verify_ms_residual"] if "verify_ms_residual" in q else q["verify_ms"]


def per_token_ms(c, q):
    """(draft ms, verify residual ms) per emitted token of one QSpec entry."""
    t_draft = c["modes"][q["draft"]]["step_ms"]
    cycle_tokens = q["tokens_per_cycle"]
    return q["gamma"] * t_draft / cycle_tokens, verify_residual_ms(q) / cycle_tokens


def tables(res) -> str:
    cells, meta = res["cells"], res["meta"]
    lines = [f"Device {meta['device']}, jax {meta['jax']}, commit {meta['commit']}; {meta['weights']}; "
             f"acceptance {meta['acceptance']}; {meta['timing']}.", ""]
    lines += ["| preset | batch | prompt | mode | ms/step | floor ms | step/floor | tok/s | prefill ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for mode, m in c["modes"].items():
            lines.append(f"| {c['preset']} | {c['batch']} | {c['prompt_len']} | {mode} | {m['step_ms']:.2f} | "
                         f"{m['step_floor_ms']:.2f} | {m['step_ms'] / m['step_floor_ms']:.1f} | "
                         f"{m['tokens_per_s']:.0f} | {1e3 * m['prefill_seconds']:.0f} |")
    lines += ["", "| preset | batch | prompt | draft | gamma | acceptance | tokens/cycle | tok/s | QSpec/W4A16 | "
              "decode-only ratio | cycle ms | verify ms (residual) | draft share |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for q in c["qspec"]:
            lines.append(f"| {c['preset']} | {c['batch']} | {c['prompt_len']} | {q['draft']} | {q['gamma']} | "
                         f"{q['acceptance_rate']:.3f} | {q['tokens_per_cycle']:.2f} | {q['tokens_per_s']:.0f} | "
                         f"{q['speedup_vs_w4a16']:.3f} | {q['decode_speedup_vs_w4a16']:.3f} | {q['cycle_ms']:.2f} | "
                         f"{verify_residual_ms(q):.2f} | {q['draft_share']:.2f} |")
    lines += ["", "Verdict (best measured gamma per cell):", "",
              "| preset | batch | prompt | draft | best gamma | QSpec/W4A16 | decode-only ratio | t_draft/t_w4a16 | "
              "t_verify/t_w4a16 (residual) | W4A16 step/floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for c in cells:
        for draft in dict.fromkeys(q["draft"] for q in c["qspec"]):
            key = (c["preset"], c["batch"], c["prompt_len"], draft)
            if key in seen:
                continue
            seen.add(key)
            qs = qspec_by_gamma([x for x in cells if x["preset"] == c["preset"]], c["batch"], c["prompt_len"], draft)
            best = max(qs.values(), key=lambda q: q["speedup_vs_w4a16"])
            w = c["modes"]["w4a16"]
            lines.append(f"| {c['preset']} | {c['batch']} | {c['prompt_len']} | {draft} | {best['gamma']} "
                         f"(of {','.join(map(str, qs))}) | {best['speedup_vs_w4a16']:.2f} | "
                         f"{best['decode_speedup_vs_w4a16']:.2f} | {c['modes'][draft]['step_ms'] / w['step_ms']:.2f} | "
                         f"{verify_residual_ms(best) / w['step_ms']:.2f} | {w['step_ms'] / w['step_floor_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res, stem):
    cells = res["cells"]
    prompt_len = cells[0]["prompt_len"]
    main = main_cells(cells, prompt_len)
    batches = [c["batch"] for c in main]

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("bf16", "w4a16", "w4a4", "w4a8"):
        if all(mode in c["modes"] for c in main):
            ax.plot(batches, [c["modes"][mode]["tokens_per_s"] for c in main], "o-", label=mode)
    first = main[0]["qspec"][0] if main[0]["qspec"] else None
    g, draft = (first["gamma"], first["draft"]) if first else (None, None)

    def entry(c):
        return next(q for q in c["qspec"] if q["gamma"] == g and q["draft"] == draft)

    if g is not None:
        ax.plot(batches, [entry(c)["tokens_per_s"] for c in main], "s--",
                label=f"qspec ({draft} draft, gamma {g}, replayed acceptance)")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="generated tokens/s",
           title=f"{main[0]['preset']}, prompt {prompt_len}, {main[0]['new_tokens']} new tokens")
    ax.minorticks_off()
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "_batch.png", dpi=120)

    best_batch = max((c["batch"] for c in cells if len(qspec_by_gamma(cells, c["batch"], prompt_len)) > 1), default=None)
    if best_batch is not None:
        qs = qspec_by_gamma(cells, best_batch, prompt_len)
        fig, ax = plt.subplots(figsize=(6, 4))
        gam = list(qs)
        ax.plot(gam, [qs[k]["acceptance_rate"] for k in gam], "o-", label="acceptance rate (replayed)")
        ax.plot(gam, [qs[k]["speedup_vs_w4a16"] for k in gam], "s-", label="QSpec / W4A16 tokens/s")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="gamma", title=f"batch {best_batch}, prompt {prompt_len}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem + "_gamma.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(main))
    w = [c["modes"]["w4a16"]["step_ms"] for c in main]
    split = [per_token_ms(c, entry(c)) for c in main] if g is not None else []
    ax.bar([i - 0.2 for i in x], w, 0.4, label="W4A16 step")
    if split:
        ax.bar([i + 0.2 for i in x], [s[0] for s in split], 0.4, label=f"QSpec {draft} draft (gamma {g})")
        ax.bar([i + 0.2 for i in x], [s[1] for s in split], 0.4, bottom=[s[0] for s in split], label="QSpec verify (residual)")
    ax.set_xticks(list(x), [str(b) for b in batches])
    ax.set(xlabel="batch", ylabel="ms per generated token (per row)", title="per-token latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "_latency.png", dpi=120)

    lengths = sorted({c["prompt_len"] for c in cells})
    if len(lengths) > 1:  # a context sweep: how the ratio moves as KV reads grow
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for b in sorted({c["batch"] for c in cells}):
            row = sorted((c for c in cells if c["batch"] == b and c["qspec"]), key=lambda c: c["prompt_len"])
            if not row:
                continue
            ps = [c["prompt_len"] for c in row]
            a1.plot(ps, [c["qspec"][0]["decode_speedup_vs_w4a16"] for c in row], "o-", label=f"batch {b}")
            a2.plot(ps, [c["modes"]["w4a16"]["step_ms"] for c in row], "o-", label=f"W4A16 step, batch {b}")
            a2.plot(ps, [c["modes"]["w4a16"]["step_floor_ms"] for c in row], ":", label=f"floor, batch {b}")
        a1.axhline(1.0, color="gray", lw=0.8)
        a1.set(xscale="log", xlabel="prompt tokens", ylabel="QSpec / W4A16 (decode only)",
               title=f"{cells[0]['qspec'][0]['draft']} draft, gamma {cells[0]['qspec'][0]['gamma']}")
        a2.set(xscale="log", xlabel="prompt tokens", ylabel="ms", title="W4A16 decode step vs byte floor")
        for a in (a1, a2):
            a.minorticks_off()  # log-axis minor labels would overprint the prompt lengths
            a.set_xticks(lengths, [str(p) for p in lengths])
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem + "_context.png", dpi=120)
    plt.close("all")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="bench_throughput.py JSON")
    args = ap.parse_args()
    with open(args.result) as f:
        res = json.load(f)
    if not res["cells"]:
        raise SystemExit(f"{args.result} holds no cells")
    stem = os.path.splitext(args.result)[0]
    plot(res, stem)
    md = tables(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
