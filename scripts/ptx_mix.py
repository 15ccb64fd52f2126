#!/usr/bin/env python
"""Instruction mix of Mosaic GPU kernels from a PTX dump (MOSAIC_GPU_DUMP_PTX / _PTXAS, as
benchmarks/kv/runs/dump_ptx.sh makes it): per kernel, registers and spill bytes (ptxas), and the
static instructions of the pipeline step, the basic block that issues the wgmma MMAs, by opcode.
Instructions inside inline-asm braces (each wgmma comes with a predicate setp) are counted one by
one; `outside_wgmma_asm` leaves those pairs out, the count earlier files report.

  python scripts/ptx_mix.py DUMP_DIR --out benchmarks/kv/h100_attention_ptx_mix_v5_COMMIT.json --meta commit=...
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re


def blocks_of(ptx: str) -> dict:
    """Basic block label -> its instructions (directives and comments left out)."""
    blocks, cur = collections.OrderedDict(), "entry"
    for line in ptx.splitlines():
        t = line.strip()
        label = re.match(r"^(\$L__BB\w+):", t)
        if label:
            cur = label.group(1)
            blocks[cur] = []
        elif t.startswith("{"):  # an inline-asm block: its statements, without register declarations
            blocks.setdefault(cur, []).extend(
                x.strip() for x in t.strip("{} ").split(";") if x.strip() and not x.strip().startswith(".reg"))
        elif t and not t.startswith(("//", ".", "}")) and t.endswith(";"):
            blocks.setdefault(cur, []).append(t)
    return blocks


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?%?\S+\s+", "", instruction).split()[0].rstrip(";")


def kernel_mix(ptx_path: str) -> dict:
    blocks = blocks_of(open(ptx_path).read())
    step = next((name, ins) for name, ins in blocks.items() if any("wgmma.mma_async" in i for i in ins))
    ops = collections.Counter(opcode(i) for i in step[1])
    mma = sum(n for op, n in ops.items() if op.startswith("wgmma.mma_async"))
    out = {"loop_body": {"block": step[0], "instructions": len(step[1]),
                         "outside_wgmma_asm": len(step[1]) - 2 * mma, "ops": dict(ops.most_common())}}
    report = ptx_path[:-len(".ptx")] + ".ptxas"
    if os.path.exists(report):
        text = open(report).read()
        out["registers"] = int(re.search(r"Used (\d+) registers", text).group(1))
        out["spill_store_bytes"] = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", help="the dump folder (*.ptx, *.ptxas)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", nargs="*", default=[], help="key=value pairs for the file's meta")
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.dump, "*.ptx")))
    if not paths:
        raise SystemExit(f"no .ptx files in {args.dump}")
    result = {"meta": dict(kv.split("=", 1) for kv in args.meta),
              "kernels": {os.path.basename(p)[:-len(".ptx")].rsplit("_", 1)[0]: kernel_mix(p) for p in paths}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: (v.get("registers"), v["loop_body"]["outside_wgmma_asm"]) for k, v in result["kernels"].items()}))
    return result


if __name__ == "__main__":
    main()
