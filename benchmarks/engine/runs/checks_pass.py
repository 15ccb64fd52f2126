"""Exit 0 when a `bench_mosaic.py --check-only` file holds checks of tiles whose repr contains
TILES and every one of them ran within 1e-2 of its reference; else exit 1. Device calls use it to
sweep a new kind of tiles only where its checks passed.

    python3 benchmarks/engine/runs/checks_pass.py $OUT/check/mosaic_sweep.json consumers=2
"""
import json
import sys

path, tiles = sys.argv[1:]
cells = [c for c in json.load(open(path))["check"] if tiles in c["tiles"]]
bad = [c for c in cells if "error" in c or any(v > 1e-2 or v != v for k, v in c.items() if "rel_err" in k)]
print(f"{tiles} checks: {len(cells)}, bad: {len(bad)}")
sys.exit(0 if cells and not bad else 1)
