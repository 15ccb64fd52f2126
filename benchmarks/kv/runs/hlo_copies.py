"""List the copies in optimized HLO text (an XLA dump's *after_optimizations.txt): each copied shape,
in which computation, how many times, and the bytes copied per execution of that computation.

XLA copies a buffer that a conditional's branch, or an in-place update it cannot order after the
buffer's readers, would otherwise overwrite. In a decode loop a copy of a KV-cache-sized buffer costs
a read and a write of it every step, and nothing in a profile's kernel names says why.

    python3 benchmarks/kv/runs/hlo_copies.py DUMP.txt [--min-bytes N]
"""
import argparse
import re
from collections import Counter

BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}
COPY = re.compile(r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? copy\(")


def copies(text: str) -> Counter:
    """(computation, shape) -> number of copy instructions."""
    found, computation = Counter(), "?"
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split(" (")[0].split()[-1]
        m = COPY.search(line)
        if m:
            found[(computation, f"{m.group(1)}[{m.group(2)}]")] += 1
    return found


def nbytes(shape: str) -> int:
    dtype, dims = shape.rstrip("]").split("[")
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * BYTES.get(dtype, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dumps", nargs="+")
    ap.add_argument("--min-bytes", type=int, default=1 << 20, help="list copies of at least this size")
    args = ap.parse_args()
    for path in args.dumps:
        found = copies(open(path).read())
        big = {k: n for k, n in found.items() if nbytes(k[1]) >= args.min_bytes}
        total = sum(n * nbytes(shape) for (_, shape), n in big.items())
        print(f"{path}: {sum(found.values())} copies, {sum(big.values())} of >= {args.min_bytes} bytes "
              f"({total / 1e6:.1f} MB if each ran once)")
        for (computation, shape), n in sorted(big.items(), key=lambda kv: -kv[1] * nbytes(kv[0][1])):
            print(f"  {n:3d} x {shape:28s} {nbytes(shape) / 1e6:9.1f} MB  in {computation}")


if __name__ == "__main__":
    main()
