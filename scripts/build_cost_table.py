"""Build the speculation policy's cost table (qspec_jax/policy.py) from committed engine measurements.

    python scripts/build_cost_table.py  # -> qspec_jax/cost_tables/h200_costs.json

Plain W4A16 and draft (w4a8, w4a4) steps are measured (benchmarks/engine/h200_step_run2.json: the one
run that timed all three, at batch 1 and 16); the verify pass over gamma + 1 positions is estimated
from the kernel table (benchmarks/engine/h200_kernels.json) and labelled so in the JSON.

A context axis: pass --step once per context, each file a `bench_engine.py --parts step` run at its
own --context (the same batches and modes w4a16,w4a8,w4a4 in every file); the context of a file is
its meta "context", else its --context argument, else bench_engine's default (456). The table then
holds "contexts" and costs per (context, batch); the policy interpolates in both and clamps outside.
The INT8 (hierarchical) KV cache gets its own table: steps measured on that cache (the drafts
reading its INT4 view: `bench_engine.py --parts step --kv int8`), built with --kv int8 into
<device>_int8kv_costs.json; the policy looks a table up by device kind and KV kind
(`policy.find_table(kind, kv=...)`). A step file whose meta records another "kv" is refused. For
example, on Hopper:

    for c in 512 8192; do python scripts/bench_engine.py --parts step --kv int8 --kernels mosaic \\
        --modes w4a16,w4a8,w4a4 --batches 1,16 --no-peers --context $c --out $OUT/h100_step_int8kv_ctx$c.json; done
    python scripts/build_cost_table.py --kv int8 \\
        --step $OUT/h100_step_int8kv_ctx512.json --step $OUT/h100_step_int8kv_ctx8192.json \\
        --kernels benchmarks/engine/hopper_kernels.json --out qspec_jax/cost_tables/h100_int8kv_costs.json

On Hopper with the Mosaic kernels (issue 18) the steps are `bench_engine.py --kernels mosaic` runs
(modes "w4a16_mosaic" etc., read as w4a16) and the kernel table is bench_mosaic.py's joined sweep:

    python scripts/build_cost_table.py --step benchmarks/engine/hopper_step_costs.json \
        --kernels benchmarks/engine/hopper_kernels.json --out qspec_jax/cost_tables/h100_costs.json

The tables ship inside the package (package data, pyproject.toml), where `policy.find_table` reads them.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qspec_jax.policy import DRAFTS, MAX_POLICY_GAMMA  # noqa: E402

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def kernel_sum(kernels: list, method: str = "w4a16") -> dict:
    """{M: sum over one layer's four projections of `method` microseconds, minus the harness's no-op}
    (the harness overhead is not in a compiled step)."""
    out = {}
    for k in kernels:
        if k["proj"] in PROJECTIONS:
            out[k["M"]] = out.get(k["M"], 0.0) + max(k["us"][method] - k["us"].get("noop", 0.0), 0.0)
    return dict(sorted(out.items()))


def sweep_kernels(sweep: dict) -> list:
    """bench_mosaic.py's (joined) sweep as kernel rows: the Mosaic W4A16 call time ("us") of each
    shape, at the M where all four projections were measured."""
    best = {}  # a shape several runs measured: its fastest configuration (the one dispatch runs)
    for c in sweep["sweep"]:
        us = c["methods"].get("mosaic_w4a16", {}).get("us")
        if us is not None:
            best[(c["proj"], c["M"])] = min(us, best.get((c["proj"], c["M"]), us))
    full = {m for _, m in best if {p for p, m2 in best if m2 == m} >= set(PROJECTIONS)}
    return [{"proj": p, "M": m, "us": {"w4a16": us}} for (p, m), us in sorted(best.items()) if m in full]


def base_mode(mode: str) -> str:
    """A step file's mode label without its kernel family ("w4a8_mosaic" -> "w4a8")."""
    return mode.removesuffix("_mosaic")


def monotone(sums: dict) -> dict:
    """Running maximum over M: the measured sums are noisy (M = 4 above M = 8 and 16 on the H200), and
    a wider matmul never costs less."""
    out, top = {}, 0.0
    for m, v in sorted(sums.items()):
        top = max(top, v)
        out[m] = top
    return out


def _interp_m(sums: dict, m: float) -> float:
    """Kernel sum at M, linear between measured M, linear extrapolation past the largest, clamped below."""
    ms, vals = np.asarray(list(sums), np.float64), np.asarray(list(sums.values()), np.float64)
    if m > ms[-1]:
        return float(vals[-1] + (m - ms[-1]) * (vals[-1] - vals[-2]) / (ms[-1] - ms[-2]))
    return float(np.interp(m, ms, vals))


BENCH_ENGINE_CONTEXT = 456  # scripts/bench_engine.py's --context default (KV positions the step's attention reads)


def step_context(step: dict) -> int:
    """The context of a `bench_engine.py --parts step` file: meta["context"] if recorded, else its
    --context argument, else bench_engine's default."""
    meta = step.get("meta", {})
    if "context" in meta:
        return int(meta["context"])
    argv = list(meta.get("argv", []))
    for i, a in enumerate(argv):
        if a == "--context" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--context="):
            return int(a.split("=", 1)[1])
    return BENCH_ENGINE_CONTEXT


def build_cost_table(step_file, kernel_file: str, *, max_gamma: int = MAX_POLICY_GAMMA,
                     drafts: Sequence[str] = DRAFTS, context: Optional[int] = None, kv: str = "bf16") -> dict:
    """A cost table (see `CostTable`) from `bench_engine.py --parts step` output holding w4a16 and the
    drafts' step times at one or more batches (one run, so their ratios are meaningful) and a
    `--parts kernels` file. Plain and draft steps are measured. The verify pass over gamma + 1
    positions per row is an ESTIMATE: the measured W4A16 step at the batch, scaled by the W4A16
    kernel time (four projections, no-op subtracted) at M = batch * (gamma + 1) over M = batch.

    step_file: one path (a one-context table; `context` overrides the file's, see `step_context`), or
    a list of paths, one per context (step runs at different `--context`, same batches, same `kv`):
    a table with a context axis. `kv`: the KV cache kind the steps ran on ("bf16", or "int8" for the
    hierarchical cache, where the draft step must read its INT4 view); the policy looks tables up by it."""
    files = [step_file] if isinstance(step_file, str) else list(step_file)
    steps = []
    for path in files:
        with open(path) as f:
            steps.append(json.load(f))
    for path, st in zip(files, steps):  # a file that records its cache (bench_engine --kv) must match
        ran = st.get("meta", {}).get("kv", kv)
        if ran != kv:
            raise ValueError(f"{path} ran on the {ran} KV cache; this table is for {kv} (--kv)")
    with open(kernel_file) as f:
        kern = json.load(f)
    if len(files) == 1:
        contexts = [int(context) if context is not None else step_context(steps[0])]
    else:
        if context is not None:
            raise ValueError("context= names the context of a single step file; several files carry their own")
        contexts = [step_context(s) for s in steps]
        if len(set(contexts)) != len(contexts):
            raise ValueError(f"step files {files} share a context: {contexts} (one file per context)")
        order = np.argsort(contexts)
        files, steps, contexts = [files[i] for i in order], [steps[i] for i in order], sorted(contexts)
    rows = [{(s["batch"], base_mode(s["mode"])): s["step_ms"] for s in st["step"]} for st in steps]
    have = [{b for b, m in r if m == "w4a16" and all((b, d) in r for d in drafts)} for r in rows]
    batches = sorted(set.intersection(*have))
    if not batches:
        raise ValueError(f"{', '.join(files)}: no batch with w4a16 and {', '.join(drafts)} step times "
                         "(in every file)")
    raw = kernel_sum(kern["kernels"] if "kernels" in kern else sweep_kernels(kern))
    sums = monotone(raw)
    plain, draft, verify, detail = [], {d: [] for d in drafts}, [], []
    for ctx, r in zip(contexts, rows):
        plain.append([round(r[(b, "w4a16")], 4) for b in batches])
        for d in drafts:
            draft[d].append([round(r[(b, d)], 4) for b in batches])
        per_batch = []
        for b in batches:
            row = []
            for g in range(max_gamma + 1):
                m = b * (g + 1)
                ms = r[(b, "w4a16")] * _interp_m(sums, m) / _interp_m(sums, b)
                row.append(round(ms, 4))
                detail.append({**({"context": ctx} if len(files) > 1 else {}), "batch": b, "gamma": g, "M": m,
                               "ms": round(ms, 4), "estimate": g > 0, "extrapolated_past_measured_M": m > max(sums)})
            per_batch.append(row)
        verify.append(per_batch)
    rel = lambda p: os.path.relpath(os.path.abspath(p), ROOT)  # noqa: E731
    one = len(files) == 1
    axes = ({"context": contexts[0]} if one else {"contexts": contexts})
    if one:
        plain, draft, verify = plain[0], {d: v[0] for d, v in draft.items()}, verify[0]
    ctx_note = (f"attention over a context of {contexts[0]} tokens; the table holds that one context (the "
                "policy uses these costs at every context)." if one else
                f"attention over contexts of {contexts} tokens (one step file each); the policy interpolates "
                "linearly in context between them and clamps outside.")
    return {
        "device_kind": steps[0]["meta"]["device"],
        "kv": kv,
        **axes,
        "batches": batches,
        "plain_ms": plain,
        "draft_ms": draft,
        "verify_ms": verify,
        "measured": ["plain_ms", "draft_ms", "verify_ms[..., 0] (= plain_ms)"],
        "estimated": ["verify_ms[..., 1:] (every gamma > 0 entry; see verify_detail)"],
        "verify_detail": detail,
        "kernel_sum_us": {str(m): round(v, 3) for m, v in raw.items()},
        "kernel_sum_us_monotone": {str(m): round(v, 3) for m, v in sums.items()},
        "sources": {**({"step": rel(files[0]), "step_commit": steps[0]["meta"].get("commit")} if one else
                       {"steps": {str(c): rel(p) for c, p in zip(contexts, files)},
                        "step_commits": {str(c): s["meta"].get("commit") for c, s in zip(contexts, steps)}}),
                    "kernels": rel(kernel_file), "kernels_commit": kern["meta"].get("commit")},
        "notes": [
            f"Decode steps: Llama-3-8B shapes, generated int4 weights, {kv} KV cache, " + ctx_note,
            "verify_ms at gamma > 0 is an ESTIMATE, not a measurement: w4a16 step(batch) x K(batch*(gamma+1)) / "
            "K(batch), K = sum of the qkv, o, gate_up and down W4A16 kernel times of one layer minus the "
            "harness no-op, made non-decreasing in M (running maximum: kernel_sum_us_monotone), linear in M "
            "between measured M. It ignores the growth of attention, norms and "
            "the lm_head with more positions, so it is, if anything, low (favours speculation)"
            + ("." if one else "; at long context it also scales the attention share of the step, which "
               "reads the same KV bytes for gamma + 1 queries, so there it can be high (disfavours speculation)."),
            "Between batches the policy interpolates linearly; outside them it clamps.",
        ],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", action="append", default=None,
                    help="a bench_engine --parts step JSON; repeat for one file per context "
                         "(default: benchmarks/engine/h200_step_run2.json)")
    ap.add_argument("--kernels", default=os.path.join(ROOT, "benchmarks", "engine", "h200_kernels.json"))
    ap.add_argument("--kv", default="bf16", choices=("bf16", "int8"), help="the KV cache the steps ran on")
    ap.add_argument("--context", type=int, default=None, help="override the context of a single step file")
    ap.add_argument("--out", default=os.path.join(ROOT, "qspec_jax", "cost_tables", "h200_costs.json"))
    args = ap.parse_args(argv)
    steps = args.step or [os.path.join(ROOT, "benchmarks", "engine", "h200_step_run2.json")]
    table = build_cost_table(steps[0] if len(steps) == 1 else steps, args.kernels, context=args.context, kv=args.kv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    ctx = table.get("contexts", [table.get("context")])
    print(f"wrote {args.out}: kv {table['kv']}, contexts {ctx}, batches {table['batches']}, plain {table['plain_ms']} ms")


if __name__ == "__main__":
    main()
