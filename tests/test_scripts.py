"""The evaluation and benchmark scripts keep running: their --smoke paths on the tiny preset (CPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_acceptance_then_throughput_smoke(tmp_path):
    out = run_script("measure_acceptance.py", "--smoke", "--out", str(tmp_path))
    assert "identical to w4a16" in out
    acc = json.loads((tmp_path / "acceptance_smoke.json").read_text())
    assert all(r["identical_rows"] == r["rows"] for r in acc["runs"])
    traces = json.loads((tmp_path / "traces_smoke.json").read_text())
    assert "w4a4_g3" in traces["traces"]
    run_script("bench_throughput.py", "--smoke", "--traces", str(tmp_path / "traces_smoke.json"),
               "--out", str(tmp_path / "tp.json"))
    tp = json.loads((tmp_path / "tp.json").read_text())
    cell = tp["cells"][0]
    assert set(cell["modes"]) == {"w4a16", "w4a4", "bf16"}
    assert cell["qspec"][0]["acceptance_rate"] is not None
    assert "replayed" in tp["meta"]["acceptance"]
    gammas = sorted(q["gamma"] for c in tp["cells"] if c["batch"] == 2 for q in c["qspec"])
    assert gammas == [1, 3]  # the main cell's gamma and the gamma sweep
    assert any(c["prompt_len"] == 40 for c in tp["cells"])  # the context sweep, prefilled in chunks
    out = run_script("plot_throughput.py", str(tmp_path / "tp.json"))
    assert "Verdict" in out
    for suffix in ("_batch.png", "_gamma.png", "_latency.png", ".md"):
        assert (tmp_path / f"tp{suffix}").stat().st_size > 0


def test_eval_quality_smoke(tmp_path):
    out = run_script("eval_quality.py", "--smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "eval_smoke.json").read_text())["results"]
    qspec = next(r for r in res if r["mode"] == "qspec")
    assert qspec["identical_to_w4a16"] == "2/2"
    assert "| qspec |" in out


def test_bench_kernels_smoke(tmp_path):
    run_script("bench_kernels.py", "--smoke", "--out", str(tmp_path / "k.json"))
    assert json.loads((tmp_path / "k.json").read_text())
