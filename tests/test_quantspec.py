"""QuantSpec's own system as a mode (issue 11 item 3): float (bf16-mode) weights verify, a W4A16
draft on the int4 pytree of the same model drafts, through `generate(..., draft_params=)` /
`speculative.quantspec` and `--mode quantspec`.

Exactness: greedy QuantSpec emits plain greedy bf16-mode decoding on the same cache kind, token
for token, on the bf16 KV cache and on the int8 hierarchical cache (what a query reads from the
latter depends on its position only, see tests/test_kv_modes.py)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint
from qspec_jax.config import get_preset
from qspec_jax.speculative import generate, generate_jit, pad_prompts, prepare, quantspec

from conftest import TEST_SEED as SEED  # noqa: E402  (printed with every test)

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny_params(tiny_float_and_int4):
    """(float params, their rotated int4 pytree): one model, two weight copies."""
    return tiny_float_and_int4


def _prompts(lengths, seed=SEED):
    rng = np.random.default_rng(seed)
    return pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in lengths])


def _plain_bf16(params, toks, lens, n, **kw):
    return generate(params, toks, lens, config=TINY, max_new_tokens=n, gamma=0, verify_mode="bf16", **kw)


def test_greedy_quantspec_equals_bf16_on_bf16_kv(tiny_params):
    """draft_params on the bf16 KV cache: bf16 verifies, W4A16 on the int4 pytree drafts."""
    fp, qp = tiny_params
    toks, lens = _prompts([3, 17, 8, 1])
    base = np.asarray(_plain_bf16(fp, toks, lens, 24, eos_ids=()).tokens)
    for gamma in (1, 3):
        res = quantspec(fp, qp, toks, lens, config=TINY, max_new_tokens=24, gamma=gamma, kv="bf16", eos_ids=())
        np.testing.assert_array_equal(np.asarray(res.tokens), base, err_msg=f"gamma={gamma}")
        s = res.summary()
        assert s["new_tokens"] == 4 * 24 and 0 < s["accepted"] <= s["drafted"]


def test_greedy_quantspec_equals_bf16_on_int8_kv(tiny_params):
    """QuantSpec proper: the verifier on the INT8 view, the drafts on the INT4 view, groups quantized
    and dropped from the buffer during generation (ragged prompts): token for token plain greedy
    bf16-mode decoding on the same int8 cache."""
    fp, qp = tiny_params
    toks, lens = _prompts([3, 40, 17, 1])
    kv = dict(kv="int8", kv_group=16, kv_window=32, eos_ids=())  # delay 8: gamma + 1 <= 8
    base = np.asarray(_plain_bf16(fp, toks, lens, 40, **kv).tokens)
    for gamma in (1, 3, 5):
        res = quantspec(fp, qp, toks, lens, config=TINY, max_new_tokens=40, gamma=gamma, **kv)
        np.testing.assert_array_equal(np.asarray(res.tokens), base, err_msg=f"gamma={gamma}")
        assert 0 < res.summary()["accepted"]


def test_quantspec_defaults_and_program(tiny_params):
    """The defaults are QuantSpec's (int8 cache, gamma 3, bf16 verifies, w4a16 drafts); the draft
    weights are an input only when given (None, an empty pytree, otherwise), so QSpec's shared-pytree
    program is unchanged."""
    fp, qp = tiny_params
    toks, lens = _prompts([5, 9])
    args, static = prepare(qp, toks, lens, config=TINY, max_new_tokens=4, gamma=3, eos_ids=())
    assert args[4] is None and not static["spec"].separate_draft
    args, static = prepare(fp, toks, lens, config=TINY, max_new_tokens=4, gamma=3, eos_ids=(), kv="int8",
                           kv_group=16, kv_window=32, verify_mode="bf16", draft_mode="w4a16", draft_params=qp)
    assert args[4] is not None and static["spec"].separate_draft
    assert "stablehlo.while" in generate_jit.lower(*args, **static).as_text()
    res = quantspec(fp, qp, toks, lens, config=TINY, max_new_tokens=4, eos_ids=(), kv_group=16, kv_window=32)
    assert res.summary()["gamma_histogram"] == {"3": int(np.sum(np.asarray(res.cycles)))}


def test_mismatched_draft_params_are_refused(tiny_params):
    fp, qp = tiny_params
    toks, lens = _prompts([4])
    kw = dict(config=TINY, max_new_tokens=4, eos_ids=(), kv="bf16")
    deeper = dataclasses.replace(TINY, num_layers=3)
    other = checkpoint.random_params(deeper, seed=1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="draft_params do not match.*layers 3"):
        quantspec(fp, other, toks, lens, **kw)
    wider = dataclasses.replace(TINY, vocab_size=2 * TINY.vocab_size)
    with pytest.raises(ValueError, match="draft_params do not match.*embed"):
        quantspec(fp, checkpoint.random_params(wider, seed=1, dtype=jnp.float32), toks, lens, **kw)
    with pytest.raises(ValueError, match="draft_params do not match.*not a model"):
        quantspec(fp, {"w": jnp.zeros(3)}, toks, lens, **kw)
    with pytest.raises(ValueError, match="int4_params, not draft_params"):
        quantspec(fp, qp, toks, lens, draft_params=qp, **kw)


def test_cli_mode_quantspec(monkeypatch):
    from qspec_jax import generate as cli

    args = cli.parse_args(["--prompt", "x", "--mode", "quantspec"])
    assert args.mode == "quantspec" and cli.quantspec_gamma(args.gamma) == 3
    cli.validate_args(args)
    with pytest.raises(ValueError, match="--gamma must be at least 1"):
        cli.validate_args(cli.parse_args(["--prompt", "x", "--mode", "quantspec", "--gamma", "0"]))


def test_cli_quantspec_runs_float_verifier_and_int4_draft(capsys, monkeypatch, tiny_params):
    """The CLI loads both weight copies and runs bf16 verify / w4a16 draft on the int8 cache."""
    from qspec_jax import generate as cli
    from qspec_jax import speculative

    fp, qp = tiny_params
    loads, calls = [], []
    monkeypatch.setattr(cli, "load_params", lambda model, *, quantized, **k: (loads.append(quantized), (TINY, qp if quantized else fp))[1])

    class Tok:
        chat_template = None
        def encode(self, text): return [5, 6, 7]
        def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))

    monkeypatch.setattr("qspec_jax.tokenizer.load_tokenizer", lambda model: Tok())
    real = speculative.prepare
    monkeypatch.setattr(speculative, "prepare", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    assert cli.main(["--prompt", "hi", "--mode", "quantspec", "--max-new-tokens", "3", "--json"]) == 0
    assert sorted(loads) == [False, True]
    (k,) = calls
    assert (k["verify_mode"], k["draft_mode"], k["kv"], k["gamma"]) == ("bf16", "w4a16", "int8", 3)
    # The int4 pytree itself, split into per-layer buffers once by the CLI (not on every batch).
    drafts = k["draft_params"]
    assert drafts["embed"] is qp["embed"] and isinstance(drafts["layers"], tuple)
    assert len(drafts["layers"]) == TINY.num_layers
    assert '"mode": "quantspec"' in capsys.readouterr().out
