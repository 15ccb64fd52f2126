"""The evaluation and benchmark scripts keep running: their --smoke paths on the tiny preset (CPU)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

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
               "--out", str(tmp_path / "tp.json"), "--auto-summary", str(tmp_path / "auto.json"))
    tp = json.loads((tmp_path / "tp.json").read_text())
    check_auto_rows_and_summary(tp, json.loads((tmp_path / "auto.json").read_text()))
    run_script("bench_throughput.py", "--summary-only-from", str(tmp_path / "tp.json"),
               "--auto-summary", str(tmp_path / "auto2.json"))
    assert json.loads((tmp_path / "auto2.json").read_text()) == json.loads((tmp_path / "auto.json").read_text())
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


def check_auto_rows_and_summary(tp, summary):
    """Every cell has gamma="auto"'s row (on the CPU: no cost table, so the default setting, timed with
    replayed acceptance) and the summary's ratios are the results' own timings: best / auto."""
    from qspec_jax import policy

    assert "acceptance_smoke.json" in tp["meta"]["policy"]["prior_source"]  # the traces' own run
    assert "same real-model run" in tp["meta"]["policy"]["statement"]
    first = {}
    for c in tp["cells"]:
        a = c["auto"]
        assert (a["gamma"], a["draft"]) == (policy.DEFAULT_GAMMA, policy.DEFAULT_DRAFT)
        assert a["policy_source"].startswith("default") and a["predicted_speedup"] is None
        assert a["context"] == c["prompt_len"] + c["new_tokens"] // 2 and a["batch"] == c["batch"]
        assert a["acceptance_rate"] is not None and a["seconds"] > 0
        # No fixed entry of the smoke cells is w4a8 at gamma 3: auto's program was compiled and timed itself.
        assert a["same_program_as"] is None and a["compile_s"] > 0
        first.setdefault(f"{c['batch']}x{c['prompt_len']}", c)
    assert set(summary) == {"auto_vs_best_plain", "auto_vs_best_fixed", "commit", "device", "jax", "notes"}
    assert summary["device"] == tp["meta"]["device"] and summary["commit"] == tp["meta"]["commit"]
    assert set(first) == {"2x16", "1x40"}
    assert set(summary["auto_vs_best_plain"]) == set(summary["auto_vs_best_fixed"]) == set(first)
    for key, c in first.items():
        plain = {m: e["seconds"] for m, e in c["modes"].items()}
        assert "bf16" in plain or key == "1x40"  # bf16 counts as a plain mode where it ran
        fixed = [q["seconds"] for q in c["qspec"] if q["gamma"] > 0]
        for name, best in (("auto_vs_best_plain", min(plain.values())), ("auto_vs_best_fixed", min(fixed))):
            ratio = summary[name][key]
            assert math.isfinite(ratio) and ratio > 0
            assert ratio == pytest.approx(best / c["auto"]["seconds"], rel=1e-12), (name, key)
        assert f"best plain: {min(plain, key=plain.get)}" in summary["notes"][key]


def test_bench_auto_reuses_a_program_only_when_it_is_the_same(tmp_path):
    """The auto entry's timing is an already-timed program's only when the settings are literally that
    program's: gamma 0 -> the plain w4a16 program; an adaptive loop (a table that prices drafting)
    or anything else is compiled and timed on its own."""
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_throughput as bt
    from qspec_jax import checkpoint, policy, quantize
    from qspec_jax.config import get_preset
    from qspec_jax.model import fuse_projections, unstack_layers

    config = get_preset("tiny")
    fparams = checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16)
    qparams = unstack_layers(fuse_projections(quantize.quantize_params(fparams, config, dtype=jnp.bfloat16)))
    traces = bt.load_traces(os.path.join(ROOT, "benchmarks", "acceptance", "traces.json"))
    spec = dict(batch=2, prompt_len=16, gammas=[1], drafts=["w4a8"], modes=["w4a16"])

    def cell(auto, step_split=None):
        return bt.measure_cell(None, qparams, config, spec, 6, traces, 1, np.random.default_rng(0), 1e12, 16,
                               auto=auto, step_split=step_split)

    def cheap(max_gamma):  # a table where drafting pays: the chooser speculates at its largest gamma
        n = max_gamma + 1
        return policy.AutoGamma(policy.CostTable({
            "device_kind": "synthetic", "batches": [1], "plain_ms": [1.0], "draft_ms": {"w4a8": [0.05]},
            "verify_ms": [[1.0 + 0.01 * g for g in range(n)]]}), max_gamma=max_gamma, drafts=("w4a8",))

    # The committed H200 table chooses gamma 0 at batch 2: plain W4A16, the very program of the w4a16 row.
    c = cell(policy.AutoGamma.for_device("NVIDIA H200"), step_split=[])
    a = c["auto"]
    assert (a["gamma"], a["draft"], a["same_program_as"], a["compile_s"]) == (0, None, "plain w4a16", 0.0)
    assert a["seconds"] == c["modes"]["w4a16"]["seconds"] and a["policy_source"].startswith("qspec_jax/cost_tables/")
    assert c["modes"]["w4a16"]["step_ms"] is None and c["qspec"][0]["verify_ms_residual"] is None  # not split
    # gamma 1 with w4a8: the adaptive loop (gamma re-chosen in 0..1 every cycle) is not the cell's fixed
    # g1 program, so it is compiled and timed on its own, replayed from the same trace.
    c = cell(cheap(1))
    a = c["auto"]
    assert (a["gamma"], a["draft"], a["adaptive"], a["same_program_as"]) == (1, "w4a8", True, None)
    assert a["compile_s"] > 0 and set(a["gamma_histogram"]) <= {"0", "1"}
    # The adaptive loop held at the entry's gamma replays the same counts through its own program.
    c = bt.measure_cell(None, qparams, config, spec, 6, traces, 1, np.random.default_rng(0), 1e12, 16,
                        step_split=[], adaptive_pinned=True)
    pinned = c["qspec"][0]["adaptive_pinned"]
    assert pinned["same_counts"] and pinned["compile_s"] > 0 and pinned["time_over_fixed"] > 0
    # gamma 2: not in the cell, so its own program with the gamma-2 trace.
    c = cell(cheap(2))
    a = c["auto"]
    assert (a["gamma"], a["draft"], a["same_program_as"]) == (2, "w4a8", None) and a["compile_s"] > 0
    trace = np.asarray(traces["traces"]["w4a8_g2"])[:2]
    assert a["tokens_per_cycle"] > 1 and a["loop_cycles"] <= trace.shape[1]
    # A gamma-0 program with another draft_mode is a different program (static settings differ): no reuse.
    from qspec_jax import speculative

    prompts, lens = np.zeros((2, 16), np.int32), np.full((2,), 16, np.int32)
    common = dict(config=config, eos_ids=(), prefill_chunk=16, max_new_tokens=6, gamma=0)
    keys = [bt.program_key(qparams, *speculative.prepare(qparams, prompts, lens, draft_mode=d, **common))
            for d in ("w4a16", "w4a4")]
    assert keys[0] != keys[1]
    settings, _ = bt.auto_settings(policy.AutoGamma.for_device("NVIDIA H200"), prompts, lens, 6,
                                   dict(config=config, eos_ids=(), prefill_chunk=16))
    assert bt.program_key(qparams, *speculative.prepare(qparams, prompts, lens, **settings)) == keys[0]


def test_eval_quality_smoke(tmp_path):
    out = run_script("eval_quality.py", "--smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "eval_smoke.json").read_text())["results"]
    qspec = next(r for r in res if r["mode"] == "qspec")
    assert qspec["identical_to_w4a16"] == "2/2"
    assert "| qspec |" in out


def test_bench_kernels_smoke(tmp_path):
    run_script("bench_kernels.py", "--smoke", "--out", str(tmp_path / "k.json"))
    assert json.loads((tmp_path / "k.json").read_text())


def test_bench_engine_steps_on_the_int8_cache_build_its_cost_table(tmp_path):
    """bench_engine --kv int8 times each mode on the hierarchical cache (drafts on its INT4 view: half
    the KV bytes of the verifier's INT8 view), and build_cost_table --kv int8 turns the run into an
    INT8-KV table, refusing it as a bf16 one."""
    step, table = tmp_path / "step.json", tmp_path / "costs.json"
    run_script("bench_engine.py", "--smoke", "--parts", "step", "--kv", "int8", "--modes", "w4a16,w4a8,w4a4",
               "--out", str(step))
    res = json.loads(step.read_text())
    assert res["meta"]["kv"] == "int8"
    cells = {c["mode"]: c for c in res["step"]}
    assert set(cells) == {"w4a16", "w4a8", "w4a4"} and all(c["step_ms"] > 0 for c in cells.values())
    assert cells["w4a8"]["kv_bytes_read"] * 2 == cells["w4a4"]["kv_bytes_read"] * 2 == cells["w4a16"]["kv_bytes_read"]
    kernels = os.path.join(ROOT, "benchmarks", "engine", "h200_kernels.json")
    run_script("build_cost_table.py", "--kv", "int8", "--step", str(step), "--kernels", kernels, "--out", str(table))
    t = json.loads(table.read_text())
    assert t["kv"] == "int8" and t["batches"] == [2] and t["plain_ms"] == [pytest.approx(cells["w4a16"]["step_ms"], rel=1e-3)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_cost_table.py"), "--step", str(step),
                           "--kernels", kernels, "--out", str(tmp_path / "bf16.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "int8 KV cache" in proc.stderr


def test_bench_long_context_smoke(tmp_path):
    """The long-context decode benchmark runs every kind of mode on the tiny preset, and its summary
    ratios are the baseline's median time over the mode's, recomputed here from the results."""
    out, summary = tmp_path / "lc.json", tmp_path / "summary.json"
    summary.write_text(json.dumps({"int8kv_ppl_ratio": 1.0}))  # measured keys already there are kept
    run_script("bench_long_context.py", "--smoke", "--compile-threads", "2", "--out", str(out), "--summary", str(summary),
               "--plot", str(tmp_path / "lc.png"))
    assert (tmp_path / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res, summ = json.loads(out.read_text()), json.loads(summary.read_text())
    (cell,) = res["cells"]
    t = {m["mode"]: m["seconds"] for m in cell["modes"]}
    assert set(t) == {"w4a16_bf16kv", "w4a16_bf16kv+einsum", "w4a16_int8kv", "qspec_w4a8_int8kv_g3",
                      "qspec_w4a16_int8kv_g3", "bf16_bf16kv", "quantspec_g3"}
    assert all(v > 0 and math.isfinite(v) for v in t.values())
    spec = {m["mode"]: m for m in cell["modes"]}["qspec_w4a8_int8kv_g3"]
    assert spec["gamma"] == 3 and 0 < spec["acceptance_rate"] <= 1 and spec["acceptance_source"]
    key = f"{cell['batch']}x{cell['context']}"
    assert summ["int8kv_ppl_ratio"] == 1.0
    assert summ["qspec_int8kv_vs_w4a16_bf16kv"][key] == pytest.approx(t["w4a16_bf16kv"] / t["qspec_w4a8_int8kv_g3"])
    assert summ["qspec_int8kv_vs_w4a16_int8kv"][key] == pytest.approx(t["w4a16_int8kv"] / t["qspec_w4a8_int8kv_g3"])
    assert summ["quantspec_vs_bf16"][key] == pytest.approx(t["bf16_bf16kv"] / t["quantspec_g3"])
    # the W4A16 draft on the INT4 view is its own map, not counted as QSpec
    assert summ["w4a16_int4view_draft_vs_w4a16_int8kv"][key] == pytest.approx(
        t["w4a16_int8kv"] / t["qspec_w4a16_int8kv_g3"])
    assert summ["best_setting"][key]["qspec_int8kv"] == "qspec_w4a8_int8kv_g3"
    # the ratios at every pass's floor: only where a cheaper draft speculates (not the W4A16 draft)
    bounds = summ["floor_bound"]
    assert all(math.isfinite(bounds[k][key]) and bounds[k][key] > 0 for k in
               ("qspec_int8kv_vs_w4a16_bf16kv", "qspec_int8kv_vs_w4a16_int8kv", "quantspec_vs_bf16"))


def test_bench_long_context_cells_in_two_processes(tmp_path):
    """--dry-run prices each mode's cache from shapes alone (the 16 x 32k bf16 cache is 69 GB);
    --shapes runs a subset of the cells and --append adds a second process's cells to the same
    file, refusing a run of other settings."""
    rows = run_script("bench_long_context.py", "--dry-run", "--shapes", "16x32768")
    assert "16x32768 w4a16_bf16kv: cache 69.0 GB + weights 5.8 GB" in rows and "4x32768" not in rows
    out, cells = tmp_path / "lc.json", "2x48:w4a16_bf16kv,qspec_w4a8_int8kv_g3;1x40:bf16_bf16kv"
    for shape, attention in (("2x48", ["--mosaic-attention", "int8=5:2:64:3,int4=5:2:128"]), ("1x40", [])):
        run_script("bench_long_context.py", "--smoke", "--cells", cells, "--shapes", shape, "--append",
                   "--compile-threads", "2", "--out", str(out), *attention)
    res = json.loads(out.read_text())
    assert res["meta"]["attention"] == "triton"  # Mosaic configs take effect on sm_90 only
    assert [(c["batch"], c["context"], [m["mode"] for m in c["modes"]]) for c in res["cells"]] == [
        (2, 48, ["w4a16_bf16kv", "qspec_w4a8_int8kv_g3"]), (1, 40, ["bf16_bf16kv"])]
    assert res["meta"]["argv"][3:5] == ["--shapes", "2x48"] and res["meta"]["appended"][0]["argv"][3:5] == [
        "--shapes", "1x40"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_long_context.py"), "--smoke",
                           "--cells", cells, "--shapes", "1x40", "--append", "--kernels", "mosaic", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "other settings" in proc.stderr


def test_long_context_summary_merges_runs_cell_by_cell(tmp_path):
    """bench_long_context.py --summarize A B:16x8192: each ratio from one run, the later of a cell's
    runs that measured it (B only where named), the issue's unmeasured cells null, the sources recorded."""
    rng = np.random.default_rng(18)
    t = rng.uniform(2.0, 10.0, 9)

    def mode(name, seconds, gamma=0):
        return {"mode": name, "seconds": seconds, "gamma": gamma, "tokens_per_cycle": 3.5}

    def run(commit, big, small):
        return {"meta": {"device": "GPU", "jax": "0", "commit": commit, "preset": "tiny", "copy_bytes_per_s": 3e12,
                         "kernels": "mosaic", "attention": commit},
                "cells": [{"batch": 16, "context": 8192, "modes": big}, {"batch": 1, "context": 8192, "modes": small}]}

    a = run("aaaaaaa", [mode("w4a16_bf16kv", t[0]), mode("w4a16_int8kv", t[1]), mode("qspec_w4a8_int8kv_g3", t[2], 3)],
            [mode("bf16_bf16kv", t[3]), mode("quantspec_g3", t[4], 3)])
    b = run("bbbbbbb", [mode("w4a16_int8kv", t[5]), mode("qspec_w4a8_int8kv_g3", t[6], 3)],
            [mode("bf16_bf16kv", t[7]), mode("quantspec_g3", t[8], 3)])
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, (a, b)):
        path.write_text(json.dumps(results))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"int8kv_ppl_ratio": 1.0, "commit": ["ccccccc"]}))
    run_script("bench_long_context.py", "--summarize", str(paths[0]), f"{paths[1]}:16x8192", "--summary", str(summary))
    s = json.loads(summary.read_text())
    assert s["qspec_int8kv_vs_w4a16_int8kv"]["16x8192"] == pytest.approx(t[5] / t[6])  # b's, named
    assert s["qspec_int8kv_vs_w4a16_bf16kv"]["16x8192"] == pytest.approx(t[0] / t[2])  # b has no bf16-KV baseline
    assert s["quantspec_vs_bf16"]["1x8192"] == pytest.approx(t[3] / t[4])  # a's: b's not named
    assert s["quantspec_vs_bf16"]["4x32768"] is None and s["int8kv_ppl_ratio"] == 1.0
    assert s["e2e"]["source"] == {"16x8192": [str(paths[0]), str(paths[1])], "1x8192": [str(paths[0])]}
    assert s["commit"] == ["ccccccc", "aaaaaaa", "bbbbbbb"]
    assert s["floor_bound"]["quantspec_vs_bf16"]["1x8192"] > 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_long_context.py"), "--summarize",
                           f"{paths[0]}:4x32768", "--summary", str(summary)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "4x32768" in proc.stderr


def test_bench_mosaic_summary_keys_and_ratios(tmp_path):
    """The issue-18 summary from a made-up run: every key the issue names, ratios the right way up."""
    bw = 3.0e12
    cells = []
    for proj in ("qkv", "o", "gate_up", "down"):
        for M in (1, 4, 8, 16, 64, 128, 256):
            t = 10.0 + M / 16
            methods = {"mosaic_w4a16": {"us": t, "kernel_us": 0.9 * t}, "xla_bf16": {"us": 2 * t}, "xla_int4": {"us": 3 * t},
                       "torch_tinygemm": {"us": 1.5 * t}, "torch_cublas_bf16": {"us": 2.5 * t},
                       "triton_w4a16": {"us": 4 * t}, "mosaic_w4a8": {"us": t / 2}}
            cells.append({"proj": proj, "M": M, "weight_bytes_int4": 3.0e7, "methods": methods})
    sweep = {"meta": {"device": "H100", "jax": "0.11.2", "commit": "abc", "copy_bw_Bps": bw}, "sweep": cells}
    step = {"meta": {"copy_bytes_per_s": bw}, "step": [
        {"batch": b, "mode": m, "step_ms": ms, "weight_bytes": 4.5e9, "kv_bytes_read": 5e8}
        for b in (1, 16) for m, ms in (("w4a16_mosaic", 2.0), ("bf16", 5.0), ("torch_tinygemm", 4.0),
                                        ("torch_cublas_bf16", 6.0), ("w4a8_mosaic", 1.6))
    ] + [{"batch": b, "mode": m, "step_ms": ms, "weight_bytes": 4.5e9, "kv_bytes_read": 5e8}
         for b in (64, 128) for m, ms in (("w4a16_mosaic", 3.0), ("w4a8_mosaic", 2.0))]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    (tmp_path / "step.json").write_text(json.dumps(step))
    # two runs: the second re-measures two cells on a machine with another copy bandwidth, one
    # faster (its ratios and bandwidth win) and one slower (the first run's stand)
    again = {"meta": {**sweep["meta"], "copy_bw_Bps": 2 * bw}, "sweep": [
        {**cells[-7], "methods": {**cells[-7]["methods"], "mosaic_w4a16": {"us": 5.0, "kernel_us": 4.5}}},
        {**cells[-6], "methods": {**cells[-6]["methods"], "mosaic_w4a16": {"us": 99.0, "kernel_us": 98.0}}}]}
    assert [(c["proj"], c["M"]) for c in again["sweep"]] == [("down", 1), ("down", 4)]
    (tmp_path / "again.json").write_text(json.dumps(again))
    # a tile probe of our kernel alone (faster at gate_up M = 1) and a later step run of batch 1
    probe = {"meta": {**sweep["meta"], "copy_bw_Bps": bw}, "cells": [
        {"proj": "gate_up", "M": 1, "mode": "w4a16", "tiles": "t", "us": 8.0, "kernel_us": 6.0, "rel_err": 1e-3,
         "weight_bytes": 3.0e7},
        {"proj": "gate_up", "M": 1, "mode": "w4a16", "tiles": "t2", "us": 4.0, "kernel_us": 3.0, "rel_err": 0.5}]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    later = {"meta": {"copy_bytes_per_s": bw / 2, "commit": "later"}, "step": [
        {"batch": 1, "mode": m, "step_ms": ms, "weight_bytes": 4.5e9, "kv_bytes_read": 5e8}
        for m, ms in (("w4a16_mosaic", 1.0), ("bf16", 5.0), ("w4a8_mosaic", 2.0))]}
    (tmp_path / "later.json").write_text(json.dumps(later))
    run_script("bench_mosaic.py", "--summary", str(tmp_path / "sweep.json"), str(tmp_path / "again.json"),
               "--probe", str(tmp_path / "probe.json"),
               "--step", str(tmp_path / "step.json"), str(tmp_path / "later.json"), "--out", str(tmp_path / "summary.json"))
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("copy_bw_Bps", "commit", "device", "jax", "timing"):
        assert key in s
    assert s["timing"] == "cupti"
    assert set(s["kernel_frac_copy_bw"]) == {"gate_up", "down"}
    # the kernel's own time (the pad and transpose around it fuse into neighbours in the model)
    assert math.isclose(s["kernel_frac_copy_bw"]["down"]["1"], 3.0e7 / 4.5e-6 / (2 * bw))
    assert math.isclose(s["kernel_vs_best_peer"]["down"]["1"], 1.5 * 10.0625 / 5.0)
    assert math.isclose(s["kernel_frac_copy_bw"]["down"]["4"], 3.0e7 / (0.9 * 10.25e-6) / bw)
    assert math.isclose(s["kernel_frac_copy_bw"]["gate_up"]["4"], 3.0e7 / (0.9 * 10.25e-6) / bw)
    assert set(s["kernel_frac_copy_bw"]["gate_up"]) == {"1", "4", "8", "16"}
    assert math.isclose(s["kernel_vs_best_peer"]["qkv"]["64"], 1.5)  # tinygemm is the fastest peer
    assert math.isclose(s["verify_flatness"]["gate_up"], (10 + 4) / 11.0)
    assert math.isclose(s["w4a8_vs_cublas_bf16"]["down"]["256"], 5.0)
    assert math.isclose(s["step_over_floor"]["w4a16"]["16"], 2e-3 * bw / 5.0e9)
    # the probe's matching row counts for bandwidth (its wrong, faster row does not), not for peers
    assert math.isclose(s["kernel_frac_copy_bw"]["gate_up"]["1"], 3.0e7 / 6.0e-6 / bw)
    assert math.isclose(s["kernel_vs_best_peer"]["gate_up"]["1"], 1.5)
    # batch 1 from the later step file (its own copy bandwidth), batch 16 from the first
    assert math.isclose(s["step_over_floor"]["w4a16"]["1"], 1e-3 * bw / 2 / 5.0e9)
    assert math.isclose(s["w4a16_vs_bf16_step"]["1"], 5.0) and math.isclose(s["draft_vs_verify_step"]["1"], 0.5)
    assert "1" not in s["w4a16_vs_torch_peer"]
    assert math.isclose(s["w4a16_vs_torch_peer"]["16"], 2.0)
    assert math.isclose(s["w4a16_vs_bf16_step"]["16"], 2.5)
    assert math.isclose(s["bf16_vs_torch_bf16"]["16"], 1.2)
    assert math.isclose(s["draft_vs_verify_step"]["128"], 1.5)
    assert set(s["draft_vs_verify_step"]) == {"1", "16", "64", "128"}


def test_attention_summary_keys_and_dispatch(tmp_path):
    """Issue 19's summary from made-up runs: every key, the faster kernel per cell, e2e left null."""
    def cell(variant, ctx, kernel, frac):
        return {"variant": variant, "context": ctx, "kernel": kernel, "config": {}, "kernel_us": 1 / frac,
                "frac_copy_bw": frac}
    runs = [{"meta": {"device": "H100", "jax": "0.11.2", "commit": c},
             "cells": [cell(v, ctx, k, f * (1 + i / 100)) for v in ("bf16", "int8", "int4") for ctx in (8192, 32768)
                       for k, f in (("triton", 0.6), ("mosaic", 0.4 if v != "bf16" else 0.7))]}
            for i, c in enumerate(("a", "b"))]
    for i, run in enumerate(runs):
        (tmp_path / f"run{i}.json").write_text(json.dumps(run))
    quality = {"perplexity": {"int8_over_bf16": 1.001}, "acceptance": {"runs": [
        {"system": "qspec", "draft": "w4a8", "kv": "int8", "batch": "short", "acceptance_rate": 0.95}]}}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    run_script("bench_attention_mosaic.py", "--summary", str(tmp_path / "run0.json"), str(tmp_path / "run1.json"),
               "--quality", str(tmp_path / "q.json"), "--out", str(tmp_path / "s.json"))
    s = json.loads((tmp_path / "s.json").read_text())
    for key in ("attention_frac_copy_bw", "qspec_int8kv_vs_w4a16_bf16kv", "qspec_int8kv_vs_w4a16_int8kv",
                "quantspec_vs_bf16", "int8kv_ppl_ratio", "int4kv_w4a8_acceptance", "device", "jax", "commit", "timing"):
        assert key in s
    assert s["attention_kernel"]["int8"]["8192"] == "triton" and s["attention_kernel"]["bf16"]["32768"] == "mosaic"
    assert math.isclose(s["attention_frac_copy_bw"]["int4"]["32768"], 0.6 * 1.01)
    assert math.isclose(s["attention_frac_copy_bw_mosaic"]["int8"]["8192"], 0.4 * 1.01)
    assert s["quantspec_vs_bf16"] is None and s["int4kv_w4a8_acceptance"] == 0.95


def test_join_sweeps_numbers_new_runs_after_the_joined_ones():
    """Joining an already-joined sweep with new runs: its cells keep their run index and commit,
    each new run takes the next free index (so cells of different calls never share one)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_mosaic import join_sweeps

    meta = {"device": "H100", "copy_bw_Bps": 3e12}
    joined = {"meta": {**meta, "commit": "old"}, "sweep": [
        {"proj": "o", "M": 1, "run": 0, "commit": "a", "methods": {}},
        {"proj": "o", "M": 4, "run": 3, "commit": "b", "methods": {}}]}
    new = [{"meta": {**meta, "commit": c}, "sweep": [{"proj": "qkv", "M": m, "methods": {}} for m in (1, 16)]}
           for c in ("c", "d")]
    cells = join_sweeps([joined, *new])["sweep"]
    assert [(c["run"], c["commit"]) for c in cells] == [(0, "a"), (3, "b"), (4, "c"), (4, "c"), (5, "d"), (5, "d")]
    assert [c["run"] for c in join_sweeps(new)["sweep"]] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="different devices"):
        join_sweeps([joined, {**new[0], "meta": {**meta, "device": "H200"}}])


def test_attention_summary_names_the_kernel_decode_attention_runs(tmp_path):
    """Issue 19's A1 keys: per variant and context the kernel whose call as decode_attention makes
    it (attend_us) was fastest in the newest run that timed it, with that kernel's own fraction,
    even where another kernel's kernel-only cell read faster; without attend_us, the higher fraction."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_attention_mosaic as bam

    rng = np.random.default_rng(19)
    frac = rng.uniform(0.3, 0.9, 4)

    def cell(variant, kernel, f, attend=None):
        c = {"context": 8192, "variant": variant, "kernel": kernel, "config": {}, "kernel_us": 100 / f, "frac_copy_bw": f}
        return {**c, "attend_us": attend} if attend else c

    meta = {"device": "GPU", "jax": "0", "commit": "abc"}
    old = {"meta": meta, "cells": [cell("int8", "triton", frac[0]), cell("int8", "mosaic", frac[0] / 2)]}
    new = {"meta": {**meta, "commit": "def"}, "cells": [
        cell("int4", "triton", max(frac[1:3]), attend=200.0), cell("int4", "mosaic", min(frac[1:3]), attend=150.0)]}
    quality = json.load(open(os.path.join(ROOT, "benchmarks", "kv", "kv_quality.json")))
    s = bam.summarize([old, new], quality, "kv_quality.json")
    assert s["attention_kernel"] == {"int8": {"8192": "triton"}, "int4": {"8192": "mosaic"}}
    assert s["attention_frac_copy_bw"]["int4"]["8192"] == min(frac[1:3])  # the kernel the call runs
    assert s["attention_frac_copy_bw"]["int8"]["8192"] == frac[0]
    assert s["attention_frac_copy_bw_mosaic"]["int8"]["8192"] == frac[0] / 2
    assert s["commit"] == ["abc", "def"]


def test_ptx_mix_counts_the_mma_block(tmp_path):
    """scripts/ptx_mix.py: the block that issues wgmma, its instructions by opcode (inline-asm
    statements one by one, predicated ones by their opcode), registers and spills from ptxas."""
    rng = np.random.default_rng(7)
    n_and, n_mma = (int(x) for x in rng.integers(1, 9, 2))
    wgmma = ("\t{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
             "{%r1,%r2}, {%r3}, %rd4, p, 1, 1, 0; }\n")
    ptx = (".visible .entry k(\n.param .u64 a\n)\n{\n\t.reg .b32 %r<9>;\n\tmov.b32 %r1, 0;\n$L__BB0_1:\n"
           + "\tand.b32 %r2, %r1, 15;\n" * n_and + "\t@%p1 bra $L__BB0_2;\n" + wgmma * n_mma
           + "\t// a comment\n$L__BB0_2:\n\tret;\n}\n")
    (tmp_path / "k_0.ptx").write_text(ptx)
    (tmp_path / "k_0.ptxas").write_text("ptxas info    : 0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
                                        "ptxas info    : Used 96 registers, used 1 barriers\n")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import ptx_mix

    got = ptx_mix.main([str(tmp_path), "--out", str(tmp_path / "mix.json"), "--meta", "device=test"])
    k = got["kernels"]["k"]
    assert k["registers"] == 96 and k["spill_store_bytes"] == 8 and got["meta"] == {"device": "test"}
    body = k["loop_body"]
    assert body["block"] == "$L__BB0_1" and body["instructions"] == n_and + 1 + 2 * n_mma
    assert body["ops"]["and.b32"] == n_and and body["ops"]["bra"] == 1 and body["ops"]["setp.ne.b32"] == n_mma
    assert body["outside_wgmma_asm"] == n_and + 1


def test_ncu_probe_lists_every_mosaic_attention_body_and_the_shipped_configs():
    """ncu_probe's probe list (no GPU needed): each Mosaic attention body that shares v1's layout
    and each view's shipped config (attention_mosaic.FASTER), so an Nsight Compute call can name them."""
    from pallas_kernels.attention_mosaic import FOLDED, VERSIONS

    names = set(run_script("ncu_probe.py", "--list").split())
    for variant in ("int8", "int4"):
        assert f"attention_mosaic_shipped_{variant}_16x8192" in names
        for n in VERSIONS:
            assert (f"attention_mosaic_v{n}_{variant}_16x8192" in names) == (n not in FOLDED)
