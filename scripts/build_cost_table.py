"""Build the speculation policy's cost table (qspec_jax/policy.py) from committed engine measurements.

    python scripts/build_cost_table.py  # -> benchmarks/policy/h200_costs.json

Plain W4A16 and draft (w4a8, w4a4) steps are measured (benchmarks/engine/h200_step_run2.json: the one
run that timed all three, at batch 1 and 16); the verify pass over gamma + 1 positions is estimated
from the kernel table (benchmarks/engine/h200_kernels.json) and labelled so in the JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qspec_jax.policy import ROOT, build_cost_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default=os.path.join(ROOT, "benchmarks", "engine", "h200_step_run2.json"))
    ap.add_argument("--kernels", default=os.path.join(ROOT, "benchmarks", "engine", "h200_kernels.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "policy", "h200_costs.json"))
    args = ap.parse_args(argv)
    table = build_cost_table(args.step, args.kernels)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: batches {table['batches']}, plain {table['plain_ms']} ms")


if __name__ == "__main__":
    main()
