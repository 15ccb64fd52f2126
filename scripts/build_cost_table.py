"""Build the speculation policy's cost table (qspec_jax/policy.py) from committed engine measurements.

    python scripts/build_cost_table.py  # -> benchmarks/policy/h200_costs.json

Plain W4A16 and draft (w4a8, w4a4) steps are measured (benchmarks/engine/h200_step_run2.json: the one
run that timed all three, at batch 1 and 16); the verify pass over gamma + 1 positions is estimated
from the kernel table (benchmarks/engine/h200_kernels.json) and labelled so in the JSON.

A context axis: pass --step once per context, each file a `bench_engine.py --parts step` run at its
own --context (the same batches and modes w4a16,w4a8,w4a4 in every file); the context of a file is
its meta "context", else its --context argument, else bench_engine's default (456). The table then
holds "contexts" and costs per (context, batch); the policy interpolates in both and clamps outside.
The INT8 (hierarchical) KV cache gets its own table: steps measured on that cache (the drafts
reading its INT4 view), built with --kv int8 into <device>_int8kv_costs.json; the policy looks a
table up by device kind and KV kind (`policy.find_table(kind, kv=...)`). For example:

    python scripts/build_cost_table.py --kv int8 \\
        --step benchmarks/engine/h200_step_int8kv_ctx512.json --step benchmarks/engine/h200_step_int8kv_ctx8192.json \\
        --out benchmarks/policy/h200_int8kv_costs.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qspec_jax.policy import ROOT, build_cost_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", action="append", default=None,
                    help="a bench_engine --parts step JSON; repeat for one file per context "
                         "(default: benchmarks/engine/h200_step_run2.json)")
    ap.add_argument("--kernels", default=os.path.join(ROOT, "benchmarks", "engine", "h200_kernels.json"))
    ap.add_argument("--kv", default="bf16", choices=("bf16", "int8"), help="the KV cache the steps ran on")
    ap.add_argument("--context", type=int, default=None, help="override the context of a single step file")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "policy", "h200_costs.json"))
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
