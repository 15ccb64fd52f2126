"""The speculation policy (issue 12): E[n], the chooser, learning acceptance, the committed H200
table, gamma="auto" through `generate` (greedy fidelity, sampling exactness) and the CLI."""

import dataclasses
import itertools
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, policy, quantize
from qspec_jax.model import fuse_projections, unstack_layers
from qspec_jax.config import get_preset
from qspec_jax.generate import MAX_GAMMA, parse_args, validate_args
from qspec_jax.policy import AutoGamma, CostTable, choose, expected_tokens, expected_tokens_single
from qspec_jax.acceptance import Sampling
from qspec_jax.spec import GenerationSpec
from qspec_jax.speculative import GenerationResult, generate, pad_prompts, prepare

from conftest import TEST_SEED  # noqa: E402  (printed with every test)

sys.path.insert(0, os.path.join(policy.ROOT, "scripts"))
import build_cost_table as builder  # noqa: E402  (scripts/: the cost-table builder is a tool, not the library)
from replay import Replay  # noqa: E402  (benchmark-only: lives beside the benchmarks)

TINY = get_preset("tiny")


def synthetic_table(t_plain=1.0, t_draft=0.3, verify_growth=0.05, max_gamma=8, batches=(1,)):
    """A cost table with a cheap (or not) draft; the verify pass grows by verify_growth per position."""
    n = len(batches)
    return CostTable({
        "device_kind": "synthetic", "batches": list(batches), "plain_ms": [t_plain] * n,
        "draft_ms": {"w4a8": [t_draft] * n, "w4a4": [t_draft] * n},
        "verify_ms": [[t_plain * (1 + verify_growth * g) for g in range(max_gamma + 1)]] * n,
    }, source="synthetic")


def brute_force_tokens(rates, gamma):
    """E[tokens per cycle] by enumerating every accept/reject pattern of the gamma drafts."""
    total = 0.0
    for pattern in itertools.product((0, 1), repeat=gamma):
        p = np.prod([rates[j] if x else 1 - rates[j] for j, x in enumerate(pattern)])
        lead = next((j for j, x in enumerate(pattern) if not x), gamma)  # accepted prefix
        total += p * (lead + 1)  # the accepted drafts and the verifier's own token
    return total


def test_expected_tokens_matches_enumeration():
    rng = np.random.default_rng(0)
    for gamma in range(0, 7):
        rates = list(rng.uniform(0.2, 1.0, gamma))
        assert expected_tokens(rates, gamma) == pytest.approx(brute_force_tokens(rates, gamma), rel=1e-12)
        for a in (0.0, 0.5, 0.9, 1.0):
            assert expected_tokens([a] * gamma, gamma) == pytest.approx(expected_tokens_single(a, gamma))
            assert expected_tokens(a, gamma) == pytest.approx(brute_force_tokens([a] * gamma, gamma))


def test_chooser_speculates_only_where_it_pays():
    rates = {"w4a8": 0.99, "w4a4": 0.9}
    # A draft step as slow as the verifier's step: nothing pays, whatever the acceptance.
    for t_draft in (1.0, 1.2):
        c = choose(synthetic_table(t_draft=t_draft), rates, batch=1)
        assert (c.gamma, c.draft, c.predicted_speedup) == (0, None, 1.0)
    # Cheap drafts and high acceptance: speculate, at the argmax of the predicted speedup.
    table = synthetic_table(t_draft=0.1)
    c = choose(table, rates, batch=1)
    best = max(((policy.speedup(rates[d], g, 1.0, 0.1, table.t_verify(g, 1)), g, d)
                for d in policy.DRAFTS for g in range(1, 9)))
    assert c.gamma > 0 and (c.gamma, c.draft) == (best[1], best[2])
    assert c.predicted_speedup == pytest.approx(best[0], rel=1e-3) and c.predicted_speedup > 2
    # Low acceptance pulls gamma down; none at all pulls it to 0.
    assert 0 < choose(table, {"w4a8": 0.6, "w4a4": 0.5}, 1).gamma < c.gamma
    assert choose(table, {"w4a8": 0.0, "w4a4": 0.0}, 1).gamma == 0


def test_a_speedup_inside_the_margin_is_not_taken():
    # t_draft 0.95, perfect acceptance, flat verify: S(1) = 2 / 1.95 = 1.026, S(8) = 9 / 8.6 = 1.047.
    table = synthetic_table(t_draft=0.95, verify_growth=0.0)
    assert choose(table, {"w4a8": 1.0, "w4a4": 1.0}, 1, margin=0.02).gamma == 8
    assert choose(table, {"w4a8": 1.0, "w4a4": 1.0}, 1, margin=0.05).gamma == 0


def test_costs_interpolate_in_batch_and_clamp():
    t = CostTable({"device_kind": "x", "batches": [1, 16], "plain_ms": [4.0, 6.0],
                   "draft_ms": {"w4a8": [4.0, 5.0], "w4a4": [4.0, 5.0]},
                   "verify_ms": [[4.0, 5.0], [6.0, 9.0]]})
    assert t.t_plain(1) == 4.0 and t.t_plain(16) == 6.0 and t.t_plain(64) == 6.0 and t.t_plain(0) == 4.0
    assert t.t_plain(8.5) == pytest.approx(5.0) and t.t_verify(1, 8.5) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="gamma 0..1"):
        t.t_verify(2, 1)


def test_costs_with_a_context_axis_interpolate_in_both_and_clamp():
    t = CostTable({"device_kind": "x", "contexts": [512, 8192], "batches": [1, 16],
                   "plain_ms": [[4.0, 6.0], [8.0, 16.0]],
                   "draft_ms": {"w4a8": [[4.0, 5.0], [5.0, 8.0]], "w4a4": [[4.0, 5.0], [5.0, 8.0]]},
                   "verify_ms": [[[4.0, 5.0], [6.0, 9.0]], [[8.0, 9.0], [16.0, 20.0]]]})
    assert t.kv == "bf16" and t.max_gamma == 1
    assert t.t_plain(1, 512) == 4.0 and t.t_plain(16, 8192) == 16.0
    assert t.t_plain(1, 100) == 4.0 and t.t_plain(64, 100_000) == 16.0  # clamped in both
    mid = (512 + 8192) / 2
    assert t.t_plain(8.5, mid) == pytest.approx((5.0 + 12.0) / 2)  # bilinear
    assert t.t_draft("w4a8", 16, mid) == pytest.approx(6.5) and t.t_verify(1, 1, mid) == pytest.approx(7.0)
    # A one-context table (the committed layout) gives its costs at every context.
    one = CostTable({"device_kind": "x", "context": 456, "batches": [1, 16], "plain_ms": [4.0, 6.0],
                     "draft_ms": {"w4a8": [4.0, 5.0]}, "verify_ms": [[4.0, 5.0], [6.0, 9.0]]})
    assert one.t_plain(16, 0) == one.t_plain(16, 456) == one.t_plain(16, 32768) == 6.0
    with pytest.raises(ValueError, match="2 contexts x 2 batches"):
        CostTable({"device_kind": "x", "contexts": [512, 8192], "batches": [1, 16], "plain_ms": [4.0, 6.0],
                   "draft_ms": {}, "verify_ms": [[4.0], [6.0]]})
    # The chooser reads the context: a draft that pays only at long context (where it reads less KV).
    long = CostTable({"device_kind": "x", "contexts": [512, 8192], "batches": [1], "plain_ms": [[1.0], [3.0]],
                      "draft_ms": {"w4a8": [[1.0], [1.0]]}, "verify_ms": [[[1.0, 1.1]], [[3.0, 3.1]]]})
    assert choose(long, {"w4a8": 0.99}, 1, 512, drafts=("w4a8",)).gamma == 0
    c = choose(long, {"w4a8": 0.99}, 1, 8192, drafts=("w4a8",))
    assert (c.gamma, c.draft, c.context) == (1, "w4a8", 8192) and c.predicted_speedup > 1.4


def test_tables_are_found_by_device_and_kv_kind(tmp_path):
    base = {"device_kind": "Some GPU", "context": 456, "batches": [1], "plain_ms": [1.0],
            "draft_ms": {"w4a8": [0.9], "w4a4": [0.9]}, "verify_ms": [[1.0, 1.1]]}
    (tmp_path / "gpu_costs.json").write_text(json.dumps(base))
    (tmp_path / "gpu_int8kv_costs.json").write_text(json.dumps({**base, "kv": "int8", "plain_ms": [2.0]}))
    assert policy.find_table("some-gpu", str(tmp_path)).t_plain(1) == 1.0  # no "kv" key: a bf16-KV table
    assert policy.find_table("some-gpu", str(tmp_path), kv="int8").t_plain(1) == 2.0
    assert policy.find_table("other gpu", str(tmp_path), kv="int8") is None
    assert policy.find_table("NVIDIA H200", kv="int8") is None  # not measured yet
    c = policy.resolve(None, 16, 8192, kv="int8")  # no table for that cache here: the default, saying why
    assert (c.gamma, c.draft) == (policy.DEFAULT_GAMMA, policy.DEFAULT_DRAFT) and "int8 KV cache" in c.policy_source


def test_build_cost_table_with_a_context_axis(tmp_path):
    engine = os.path.join(policy.ROOT, "benchmarks", "engine")
    with open(os.path.join(engine, "h200_step_run2.json")) as f:
        step = json.load(f)
    assert builder.step_context(step) == 456  # no --context in its argv: bench_engine's default
    # A second step file at another context (its times doubled: a made-up file, only the layout is tested).
    long = {"meta": {**step["meta"], "argv": step["meta"]["argv"] + ["--context", "8192"]},
            "step": [{**s, "step_ms": 2 * s["step_ms"]} for s in step["step"]]}
    (tmp_path / "long.json").write_text(json.dumps(long))
    kernels = os.path.join(engine, "h200_kernels.json")
    built = builder.build_cost_table([str(tmp_path / "long.json"), os.path.join(engine, "h200_step_run2.json")],
                                    kernels, kv="int8")
    one = builder.build_cost_table(os.path.join(engine, "h200_step_run2.json"), kernels)
    assert built["contexts"] == [456, 8192] and "context" not in built and built["kv"] == "int8"
    assert built["plain_ms"][0] == one["plain_ms"] and built["verify_ms"][0] == one["verify_ms"]
    assert built["plain_ms"][1] == pytest.approx([2 * v for v in one["plain_ms"]], abs=1e-4)
    t = CostTable(json.loads(json.dumps(built)))
    assert t.t_verify(2, 16, 8192) == pytest.approx(2 * one["verify_ms"][1][2], rel=1e-3)
    assert t.t_plain(1, (456 + 8192) / 2) == pytest.approx(1.5 * one["plain_ms"][0], rel=1e-3)
    with pytest.raises(ValueError, match="share a context"):
        builder.build_cost_table([os.path.join(engine, "h200_step_run2.json")] * 2, kernels)


def test_build_cost_table_from_the_mosaic_runs():
    """The H100 table: Mosaic step labels read as their modes, the kernel sums from bench_mosaic's
    sweep at the M where all four projections were measured; the shipped table is what it builds."""
    engine = os.path.join(policy.ROOT, "benchmarks", "engine")
    built = builder.build_cost_table(os.path.join(engine, "hopper_step_costs.json"),
                                     os.path.join(engine, "hopper_kernels.json"))
    with open(os.path.join(engine, "hopper_step_costs.json")) as f:
        step = {(c["batch"], c["mode"]): c["step_ms"] for c in json.load(f)["step"]}
    assert built["plain_ms"] == [round(step[(b, "w4a16_mosaic")], 4) for b in built["batches"]]
    assert built["draft_ms"]["w4a4"] == [round(step[(b, "w4a4_mosaic")], 4) for b in built["batches"]]
    assert set(built["kernel_sum_us"]) == {"1", "4", "16", "64", "128", "256"}
    sweep = {"sweep": [{"proj": p, "M": m, "methods": {"mosaic_w4a16": {"us": 1.0}}}
                       for p in builder.PROJECTIONS for m in (1, 2) if (p, m) != ("qkv", 2)]}
    assert {k["M"] for k in builder.sweep_kernels(sweep)} == {1}  # M = 2 lacks qkv: left out
    again = {"sweep": sweep["sweep"] + [{"proj": "o", "M": 1, "methods": {"mosaic_w4a16": {"us": 0.5}}}]}
    assert builder.kernel_sum(builder.sweep_kernels(again)) == {1: 3.5}  # a shape measured twice: its best
    with open(os.path.join(policy.ROOT, "qspec_jax", "cost_tables", "h100_costs.json")) as f:
        shipped = json.load(f)
    assert shipped["plain_ms"] == built["plain_ms"] and shipped["verify_ms"] == built["verify_ms"]
    assert policy.find_table("NVIDIA H100 80GB HBM3") is not None


def test_trace_prior_fits_the_replay_traces():
    with open(os.path.join(policy.ROOT, "benchmarks", "acceptance", "traces.json")) as f:
        traces = json.load(f)
    prior, acc = policy.trace_prior(traces), policy.acceptance_prior()
    # The same run: acceptance.json's tokens per cycle are truncated at the token budget, the traces' not.
    for d in policy.DRAFTS:
        assert acc[d] <= prior[d] < acc[d] + 0.02
    t = np.asarray(traces["traces"]["w4a8_g3"])
    assert expected_tokens_single(prior["w4a8"], 3) == pytest.approx(np.mean(t[t >= 0] + 1), rel=0.03)


def fake_result(accepted_at, gamma_cycles, draft=None):
    """A result of cycles at one fixed gamma: position j was reached by the cycles that accepted j - 1."""
    g = len(accepted_at)
    z = np.zeros((1, 1), np.int32)
    choice = policy.Choice(g, draft, None, "test") if draft else None
    reached = [gamma_cycles[g]] + list(accepted_at[:-1]) if g else []
    return GenerationResult(tokens=z, num_tokens=z[:, 0], drafted=z[:, 0], accepted=z[:, 0], cycles=z[:, 0],
                            trace=z, accepted_at=np.asarray([accepted_at]), gamma_cycles=np.asarray([gamma_cycles]),
                            reached_at=np.asarray([reached]), policy=choice)


def test_update_moves_the_estimate_toward_observed_rates():
    auto = AutoGamma(synthetic_table(t_draft=0.1), prior={"w4a8": 0.98, "w4a4": 0.86})
    before = auto.rates("w4a4")
    assert before == pytest.approx([0.86] * policy.MAX_POLICY_GAMMA)
    g0, _ = auto.choose(1)
    # 400 cycles at gamma 3, w4a4: position 0 accepted 200 times (0.5), then 100 (0.5), 50 (0.5).
    auto.update(fake_result([200, 100, 50], [0, 0, 0, 400], draft="w4a4"))
    after = auto.rates("w4a4")
    assert all(0.5 < a < b for a, b in zip(after, before))  # every position moved toward 0.5
    assert after[0] == pytest.approx((200 + 50 * ((350 + 50 * 0.86) / (700 + 50))) / (400 + 50))  # reached: 400, 200, 100
    assert after[7] < 0.6  # positions never drafted follow the pooled observed rate
    assert auto.rates("w4a8") == pytest.approx([0.98] * policy.MAX_POLICY_GAMMA)  # the other draft is untouched
    # The draft can also be named; more evidence moves it further, and the choice follows.
    for _ in range(5):
        auto.update(fake_result([200, 100, 50], [0, 0, 0, 400]), draft="w4a8")
    assert auto.rates("w4a8")[0] < 0.55
    gamma, draft = auto.choose(1)
    assert gamma < g0 or gamma == 0
    # A plain run (gamma 0) teaches nothing.
    snapshot = auto.rates("w4a4")
    auto.update(fake_result([], [10], draft=None))
    assert auto.rates("w4a4") == snapshot


def test_no_table_default():
    auto = AutoGamma.for_device("cpu")
    assert auto.table is None and auto.choose(4, 100) == (policy.DEFAULT_GAMMA, policy.DEFAULT_DRAFT) == (3, "w4a8")
    c = auto.last_choice
    assert c.predicted_speedup is None and c.policy_source.startswith("default") and "cpu" in c.policy_source
    assert auto.choose(4, 100, drafts=("w4a4",)) == (3, "w4a4")
    assert policy.find_table("some unmeasured gpu") is None


_INSTALLED = """
import qspec_jax, qspec_jax.policy as policy
table = policy.find_table("NVIDIA H200")
print(qspec_jax.__file__)
print(table.source, [int(b) for b in table.batches], table.t_plain(1))
"""


def test_cost_tables_are_found_from_a_non_editable_install(tmp_path):
    """`pip install --target` (a copy in site-packages, not this checkout) still finds the shipped table:
    the tables are package data read through importlib.resources, not paths beside the source tree."""
    import shutil
    import subprocess

    src = tmp_path / "src"  # build from a copy: pip leaves build/ and egg-info folders behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(policy.ROOT, name), src / name)
    for pkg in ("qspec_jax", "pallas_kernels"):
        shutil.copytree(os.path.join(policy.ROOT, pkg), src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"], env["JAX_PLATFORMS"] = str(site), "cpu"
    out = subprocess.run([sys.executable, "-c", _INSTALLED], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    where, found = out.stdout.splitlines()
    assert where.startswith(str(site)), where  # the installed copy, not this checkout
    with open(os.path.join(policy.ROOT, "qspec_jax", policy.TABLES, "h200_costs.json")) as f:
        committed = json.load(f)
    assert found == f"qspec_jax/cost_tables/h200_costs.json {committed['batches']} {committed['plain_ms'][0]}"


def test_acceptance_prior_from_the_real_model():
    prior = policy.acceptance_prior()
    assert 0.95 < prior["w4a8"] < 1.0 and 0.8 < prior["w4a4"] < 0.9
    with open(policy.ACCEPTANCE_FILE) as f:
        runs = json.load(f)["runs"]
    for r in runs:  # the single-rate model reproduces every measured tokens-per-cycle within 6%
        e = expected_tokens_single(prior[r["draft"]], r["gamma"])
        assert e == pytest.approx(r["all"]["tokens_per_cycle"], rel=0.06), (r["draft"], r["gamma"])


def test_h200_table_is_reproducible_labelled_and_chooses_plain_decoding():
    path = os.path.join(policy.ROOT, "qspec_jax", policy.TABLES, "h200_costs.json")
    with open(path) as f:
        committed = json.load(f)
    engine = os.path.join(policy.ROOT, "benchmarks", "engine")
    built = builder.build_cost_table(os.path.join(engine, "h200_step_run2.json"),
                                    os.path.join(engine, "h200_kernels.json"))
    assert json.loads(json.dumps(built)) == committed
    assert all(d["estimate"] == (d["gamma"] > 0) for d in committed["verify_detail"])
    assert any("ESTIMATE" in n for n in committed["notes"]) and committed["estimated"]
    table = policy.find_table("NVIDIA H200")
    assert table is not None and table.batches.tolist() == [1, 16]
    auto = AutoGamma(table)
    for batch in (1, 16):  # the draft step costs about a W4A16 step on the H200: drafting cannot pay
        assert auto.choose(batch, 456) == (0, None), auto.last_choice
        assert auto.last_choice.policy_source.startswith("qspec_jax/cost_tables/h200_costs.json")


# --- gamma="auto" through generate ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qparams():
    params = checkpoint.random_params(TINY, seed=7, dtype=jnp.float32)
    return quantize.quantize_params(params, TINY, rotate=True, seed=7, dtype=jnp.float32)


def test_generate_auto_greedy_equals_w4a16(tiny_qparams):
    rng = np.random.default_rng(1)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (3, 17, 8)])
    base = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=24, gamma=0, eos_ids=())
    cheap = AutoGamma(synthetic_table(t_draft=0.1, max_gamma=5), max_gamma=5)
    plain = AutoGamma(synthetic_table(t_draft=1.5))
    for auto in (None, cheap, plain):  # the CPU default (3, w4a8), a speculating choice, gamma 0
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=24, gamma="auto", eos_ids=(), auto=auto)
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))
        s = res.summary()
        assert s["policy"]["gamma"] == res.policy.gamma
        if res.policy.adaptive:  # the loop re-chose gamma in 0..policy.gamma each cycle
            assert auto is cheap and {int(g) for g in s["gamma_histogram"]} <= set(range(res.policy.gamma + 1))
            assert sum(s["gamma_histogram"].values()) == int(np.sum(res.cycles))
        else:
            assert s["gamma_histogram"] == {str(res.policy.gamma): int(np.sum(res.cycles))}
        if auto is not None:
            auto.update(res)
    assert res.policy.gamma == 0 and res.policy.draft is None and res.summary()["drafted"] == 0
    assert cheap.last_choice.gamma > 0 and cheap.accepted[cheap.last_choice.draft].sum() > 0  # it learned
    # draft_mode restricts the choice; prepare takes only the resolved integer.
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma="auto", draft_mode="w4a4",
                   eos_ids=())
    assert (res.policy.gamma, res.policy.draft) == (3, "w4a4")
    with pytest.raises(ValueError, match="resolved"):
        prepare(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma="auto")
    with pytest.raises(ValueError, match="gamma must be"):
        prepare(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma="three")
    with pytest.raises(ValueError, match="w4a16 verifier"):
        generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma="auto", verify_mode="w4a8")


def test_speculative_sampling_with_auto_keeps_the_verifier_distribution():
    """tests/test_speculative.py's chi-square check of the whole loop, with gamma chosen by the policy
    (a synthetic table that picks gamma 2 with the w4a4 draft, as the fixed-gamma test runs; the loop
    then re-chooses gamma in 0..2 every cycle from the acceptance it sees)."""
    from test_speculative import MICRO, PROMPT, assert_distributed, verifier_token_pairs  # its helpers

    params = checkpoint.random_params(MICRO, seed=1234, dtype=jnp.float32)
    params["lm_head"] = params["lm_head"] * 10
    qp = quantize.quantize_params(params, MICRO, rotate=True, seed=1234, dtype=jnp.float32)
    temperature, top_p, v, n = 0.7, 0.8, MICRO.vocab_size, 6000
    auto = AutoGamma(synthetic_table(t_draft=0.1, max_gamma=2), max_gamma=2, drafts=("w4a4",))
    toks, lens = pad_prompts([PROMPT] * n)
    res = generate(qp, toks, lens, config=MICRO, max_new_tokens=4, gamma="auto",
                   rule=Sampling(temperature, top_p), seed=3, eos_ids=(), auto=auto)
    assert (res.policy.gamma, res.policy.draft, res.policy.adaptive) == (2, "w4a4", True)
    assert res.summary()["acceptance_rate"] < 0.9  # the draft differs: rejections happen
    p12, _, p34 = verifier_token_pairs(qp, temperature, top_p)
    t = np.asarray(res.tokens)
    assert_distributed("(t1, t2)", np.bincount(t[:, 0] * v + t[:, 1], minlength=v * v), p12 * n)
    assert_distributed("(t3, t4)", np.bincount(t[:, 2] * v + t[:, 3], minlength=v * v), p34 * n)


# --- choosing gamma inside the loop ---------------------------------------------------------------


def reference_pick(accepted, reached, adaptive, with_lead=False):
    """pick_gamma in float64 through the host's own E[n] (`expected_tokens`): the gamma with the best
    tokens per millisecond, plain decoding's raised by the margin. With `with_lead`, also the best
    score's relative lead over the runner-up: near 0 is a tie that float32 may break either way."""
    k, prior = adaptive.strength, np.asarray(adaptive.prior, np.float64)
    rates = (np.asarray(accepted, np.float64) + k * prior) / (np.asarray(reached, np.float64) + k)
    score = [expected_tokens(list(rates), g) / t for g, t in enumerate(adaptive.cycle_ms)]
    score[0] *= 1 + adaptive.margin
    best, runner_up = sorted(score)[-1], sorted(score)[-2]
    pick = int(np.argmax(score))
    return (pick, (best - runner_up) / best) if with_lead else pick


def test_pick_gamma_matches_a_float64_reference():
    rng = np.random.default_rng(TEST_SEED)
    for _ in range(200):
        adaptive = policy.AdaptiveGamma(tuple(rng.uniform(1.0, 3.0, 7)), tuple(rng.uniform(0.3, 1.0, 6)),
                                        strength=float(rng.uniform(1, 100)))
        reached = rng.integers(0, 400, (3, 6))  # three rows' counts
        accepted = rng.binomial(reached, rng.uniform(0.2, 1.0, 6))
        got = int(policy.pick_gamma(adaptive.arrays(), jnp.asarray(accepted), jnp.asarray(reached)))
        assert got == reference_pick(accepted.sum(0), reached.sum(0), adaptive)
    # Nothing seen yet: the prior alone decides, as the host chooser did.
    table = synthetic_table(t_draft=0.2)
    auto = AutoGamma(table, prior={"w4a8": 0.9, "w4a4": 0.7})
    c = auto.choice(1)
    a = auto.adaptive(c)
    assert c.gamma > 0 and a.max_gamma == c.gamma and a.prior == tuple(auto.rates(c.draft)[: c.gamma])
    zeros = jnp.zeros((1, c.gamma), jnp.int32)
    assert int(policy.pick_gamma(a.arrays(), zeros, zeros)) == c.gamma
    # Every drafting cycle verifies at the choice's width: fewer drafts save only draft steps.
    for g in range(1, c.gamma + 1):
        assert a.cycle_ms[g] == pytest.approx(g * table.t_draft(c.draft, 1) + table.t_verify(c.gamma, 1))
    assert a.cycle_ms[0] == table.t_plain(1)
    # No adaptive loop where the choice should stay: no table, or plain decoding chosen.
    default = policy.Choice(3, "w4a8", None, "default")
    assert AutoGamma.for_device("cpu").adaptive(default) is None
    assert auto.adaptive(dataclasses.replace(default, gamma=0, draft=None)) is None
    for bad in (dict(cycle_ms=(1.0,), prior=()), dict(cycle_ms=(1.0, 0.0, 1.0)), dict(prior=(0.5,)),
                dict(prior=(0.5, 1.5))):
        with pytest.raises(ValueError):
            policy.AdaptiveGamma(**{"cycle_ms": (1.0, 1.2, 1.6), "prior": (0.9, 0.9), **bad})


def simulate_adaptive(traces, adaptive, max_new_tokens):
    """The adaptive loop's bookkeeping under the replay rule, in float64 NumPy: each cycle picks its
    gamma from the pooled counts (`reference_pick`) until that is 0, plain decoding after; every active
    row accepts its trace's next count clipped to that gamma and emits it plus one token, cut at its
    budget. Returns the per-row (gamma_cycles, accepted_at, reached_at) the loop should end with, and
    the smallest lead any pick had over its runner-up."""
    b, width = len(traces), adaptive.max_gamma
    least_lead = np.inf
    gamma_cycles, acc, reached = np.zeros((b, width + 1), int), np.zeros((b, width), int), np.zeros((b, width), int)
    n_out, done, pos, drafting = np.ones(b, int), np.zeros(b, bool), np.arange(width), True
    for _ in range(max_new_tokens):
        if done.all():
            break
        g = 0
        if drafting:
            g, lead = reference_pick(acc.sum(0), reached.sum(0), adaptive, with_lead=True)
            least_lead = min(least_lead, lead)
        drafting = g > 0
        for r in np.flatnonzero(~done):
            n_acc = min(traces[r][gamma_cycles[r].sum() % len(traces[r])], g)
            gamma_cycles[r, g] += 1
            acc[r] += pos < n_acc
            reached[r] += (pos < g) & (pos <= n_acc)
            n_out[r] += min(n_acc + 1, max_new_tokens - n_out[r])
            done[r] = n_out[r] >= max_new_tokens
    return gamma_cycles, acc, reached, least_lead


def test_adaptive_loop_follows_the_policy_under_replay(tiny_qparams):
    """The compiled loop's per-cycle choice, with acceptance replayed from random traces, against the
    same choice made in float64 on the host, cycle by cycle: identical gamma histograms and counts."""
    rng = np.random.default_rng(TEST_SEED)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (5, 12, 9)])
    adaptive = policy.AdaptiveGamma((1.0, 1.45, 1.8, 2.15, 2.5), (0.95,) * 4, strength=4.0)
    # Acceptance falls from a perfect start to none: the loop walks down to plain decoding (200 float64
    # re-runs of such draws all reached gamma 0 through at least one gamma between). Integer counts can
    # tie two gammas exactly (seed 322185570 did), and float32 breaks a tie either way: redraw those.
    for _ in range(20):
        traces = [[4] * int(rng.integers(2, 6)) + list(rng.integers(0, 4, 4)) + [0] * 40 for _ in range(3)]
        gamma_cycles, acc, reached, least_lead = simulate_adaptive(traces, adaptive, 64)
        if least_lead > 1e-4:
            break
    assert least_lead > 1e-4, "20 draws in a row met a near-tie"
    width = max(len(t) for t in traces)
    trace = np.array([t + [-1] * (width - len(t)) for t in traces], np.int32)
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=64, gamma=4, draft_mode="w4a8",
                   rule=Replay.of(trace), eos_ids=(), adaptive=adaptive)
    np.testing.assert_array_equal(np.asarray(res.gamma_cycles), gamma_cycles)
    np.testing.assert_array_equal(np.asarray(res.accepted_at), acc)
    np.testing.assert_array_equal(np.asarray(res.reached_at), reached)
    assert gamma_cycles[:, 0].sum() > 0 and (gamma_cycles.sum(0) > 0).sum() >= 3  # it walked down, to 0
    with pytest.raises(ValueError, match="largest gamma"):
        prepare(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma=3, adaptive=adaptive)


@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_adaptive_loop_greedy_equals_plain_decoding(tiny_qparams, kv):
    """Greedy output of a loop that changes gamma mid-run equals plain W4A16 greedy decoding on the
    same cache kind. An optimistic prior starts it at gamma 4; the w4a4 draft's real acceptance on
    this model (about 0.7 per position) makes fewer drafts the better buy, so it moves."""
    rng = np.random.default_rng(1)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (3, 17, 8)])
    kw = dict(config=TINY, max_new_tokens=40, eos_ids=(), kv=kv, kv_group=16, kv_window=32)
    base = generate(tiny_qparams, toks, lens, gamma=0, **kw)
    adaptive = policy.AdaptiveGamma((1.0, 1.7, 2.0, 2.3, 2.6), (1.0,) * 4, strength=2.0)
    res = generate(tiny_qparams, toks, lens, gamma=4, draft_mode="w4a4", adaptive=adaptive, **kw)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))
    hist = res.summary()["gamma_histogram"]
    assert hist.get("4", 0) > 0 and len(hist) >= 2, hist


def test_adaptive_loop_copies_no_cache_sized_buffer():
    """The adaptive loop keeps the cache in place: XLA copies every buffer that a conditional's branch
    updates in place, so a `lax.switch` over verify widths copied the whole cache each cycle (24
    cache-sized copies in this program). The compiled program holds none, like the fixed-gamma one."""
    import re

    import jax

    from qspec_jax.kv_cache import KVCache
    from qspec_jax.speculative import decode_jit
    from test_layer_layout import CFG

    params = checkpoint.random_params(CFG, seed=3, dtype=jnp.float32)
    qp = unstack_layers(fuse_projections(quantize.quantize_params(params, CFG, group_size=64, dtype=jnp.float32)))
    b, slots = 2, 256
    cache = KVCache.create(CFG, b, slots, jnp.float32).replace(lengths=jnp.asarray([5, 9], jnp.int32))
    adaptive = policy.AdaptiveGamma((1.0, 1.6, 1.9, 2.2, 2.5), (0.9,) * 4)
    shape = f"f32[{b},{CFG.num_kv_heads},{slots},{CFG.head_dim}]"
    for arrays in (None, adaptive.arrays()):
        spec = GenerationSpec(config=CFG, max_new_tokens=32, gamma=4, draft_mode="w4a4", verify_mode="w4a16",
                              eos_ids=(), adaptive=arrays is not None)
        text = decode_jit.lower(qp, cache, jnp.asarray([3, 4], jnp.int32), jax.random.PRNGKey(0), None, arrays,
                                spec=spec).compile().as_text()
        assert shape in text  # the pattern below looks for the right buffers
        copies = re.findall(re.escape(shape) + r"\{[^}]*\} copy\(", text)
        assert not copies, f"{len(copies)} cache-sized copies (adaptive={arrays is not None})"


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_gamma_auto_is_the_default_and_integers_still_parse(capsys):
    args = parse_args([])
    assert args.gamma == "auto" and args.draft is None
    validate_args(args)
    assert parse_args(["--gamma", "AUTO"]).gamma == "auto"
    assert parse_args(["--gamma", "5", "--draft", "w4a8"]).gamma == 5
    validate_args(parse_args(["--gamma", str(MAX_GAMMA)]))
    for bad, message in ((str(MAX_GAMMA + 1), "at most"), ("0", "at least 1")):
        with pytest.raises(ValueError, match=message):
            validate_args(parse_args(["--gamma", bad]))
    with pytest.raises(SystemExit):
        parse_args(["--gamma", "lots"])
    assert "expected 'auto' or an integer" in capsys.readouterr().err
