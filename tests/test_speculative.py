"""The QSpec loop against plain decoding: fidelity, sampling exactness, compilation, edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, quantize
from qspec_jax.config import LlamaConfig, get_preset
from qspec_jax.kv_cache import KVCache, write_layer
from qspec_jax.model import forward
from qspec_jax.speculative import generate, generate_jit, pad_prompts, prefill, prepare

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny_qparams():
    seed = int(np.random.default_rng().integers(1 << 30))
    params = checkpoint.random_params(TINY, seed=seed, dtype=jnp.float32)
    return quantize.quantize_params(params, TINY, rotate=True, seed=seed, dtype=jnp.float32)


def random_prompts(lengths, vocab, rng):
    return [list(rng.integers(3, vocab, n)) for n in lengths]


def plain(params, toks, lens, config, n, mode="w4a16", **kw):
    return generate(params, toks, lens, config=config, max_new_tokens=n, gamma=0, verify_mode=mode, **kw)


@pytest.mark.parametrize("draft", ["w4a4", "w4a8"])
def test_greedy_qspec_equals_w4a16_tiny(tiny_qparams, draft):
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([3, 17, 8, 1], TINY.vocab_size, rng))
    base = plain(tiny_qparams, toks, lens, TINY, 40, eos_ids=())
    for gamma in (1, 3, 6):
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=40, gamma=gamma, draft_mode=draft, eos_ids=())
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens), err_msg=f"gamma={gamma}")
        s = res.summary()
        assert s["new_tokens"] == 4 * 40
        assert 0 < s["drafted"] and 0 <= s["accepted"] <= s["drafted"]
        assert np.all(np.asarray(res.cycles) >= math.ceil(39 / (gamma + 1)))


def test_batched_rows_equal_single_rows(tiny_qparams):
    rng = np.random.default_rng()
    prompts = random_prompts([5, 12, 2], TINY.vocab_size, rng)
    toks, lens = pad_prompts(prompts)
    batch = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=24, gamma=3, eos_ids=())
    for i, p in enumerate(prompts):
        t1, l1 = pad_prompts([p])
        single = generate(tiny_qparams, t1, l1, config=TINY, max_new_tokens=24, gamma=3, eos_ids=())
        np.testing.assert_array_equal(np.asarray(single.tokens[0]), np.asarray(batch.tokens[i]))


def test_chunked_prefill_equals_one_pass(tiny_qparams):
    """Prompts prefilled in chunks (last tokens in different chunks, a ragged last chunk) give the
    same first-token logits and the same generation as a one-pass prefill."""
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([23, 6, 17, 9], TINY.vocab_size, rng))
    cache = KVCache.create(TINY, 4, 40, jnp.float32)
    one, _ = prefill(tiny_qparams, toks, lens, cache, config=TINY, mode="w4a16", chunk=0)
    for chunk in (4, 8, 16):
        chunked, _ = prefill(tiny_qparams, toks, lens, cache, config=TINY, mode="w4a16", chunk=chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), rtol=1e-4, atol=1e-4, err_msg=str(chunk))
    base = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=12, eos_ids=(), prefill_chunk=0)
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=12, eos_ids=(), prefill_chunk=8)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))


def test_eos_inside_a_drafted_block(tiny_qparams):
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([6, 9], TINY.vocab_size, rng))
    free = np.asarray(plain(tiny_qparams, toks, lens, TINY, 30, eos_ids=()).tokens)
    eos = int(free[0, 10])  # row 0 must stop at its first occurrence of this token
    stop = int(np.argmax(free[0] == eos))
    for gamma in (3, 6):
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=30, gamma=gamma, eos_ids=(eos,))
        got = np.asarray(res.tokens)
        assert int(res.num_tokens[0]) == stop + 1
        np.testing.assert_array_equal(got[0, : stop + 1], free[0, : stop + 1])
        assert np.all(got[0, stop + 1 :] == -1)
        hits = np.flatnonzero(free[1] == eos)
        n1 = hits[0] + 1 if len(hits) else 30
        np.testing.assert_array_equal(got[1, :n1], free[1, :n1])


def test_gamma_larger_than_budget_and_batch_of_one(tiny_qparams):
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([7], TINY.vocab_size, rng))
    for n in (1, 2, 3):
        base = plain(tiny_qparams, toks, lens, TINY, n, eos_ids=())
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=6, eos_ids=())
        assert int(res.num_tokens[0]) == n
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))


def test_prompt_at_context_limit(tiny_qparams):
    """A prompt of context-1 tokens may generate exactly one token; one more is refused clearly."""
    cfg = LlamaConfig(**{**TINY.__dict__, "max_position_embeddings": 48})
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([47, 20], cfg.vocab_size, rng))
    base = plain(tiny_qparams, toks, lens, cfg, 1, eos_ids=())
    res = generate(tiny_qparams, toks, lens, config=cfg, max_new_tokens=1, gamma=3, eos_ids=())
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny_qparams, toks, lens, config=cfg, max_new_tokens=2, gamma=3)


def test_dynamic_update_slice_clamps_and_the_cache_never_reaches_it():
    # The trap: an out-of-range start is clamped, silently overwriting earlier entries.
    buf = jnp.zeros((8,))
    clamped = jax.lax.dynamic_update_slice(buf, jnp.ones((3,)), (7,))
    np.testing.assert_array_equal(np.asarray(clamped), [0, 0, 0, 0, 0, 1, 1, 1])
    # write_layer at the last legal start fills exactly the last slots of each row.
    cache = KVCache.create(TINY, 2, 10, jnp.float32)
    new = jnp.asarray(np.random.default_rng().normal(size=(2, TINY.num_kv_heads, 3, TINY.head_dim)), jnp.float32)
    k = write_layer(cache.k[1], new, jnp.asarray([7, 2], jnp.int32))
    np.testing.assert_array_equal(np.asarray(k[0, :, 7:10]), np.asarray(new[0]))
    np.testing.assert_array_equal(np.asarray(k[1, :, 2:5]), np.asarray(new[1]))
    assert float(jnp.abs(k[0, :, :7]).max()) == 0 and float(jnp.abs(k[1, :, 5:]).max()) == 0


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(gamma=-1), "gamma must be"),
    (dict(draft_mode="w2a2"), "unknown draft_mode"),
    (dict(policy="beam"), "unknown policy"),
    (dict(policy="sampling", temperature=0.0), "temperature > 0"),
    (dict(policy="replay"), "needs replay_trace"),
    (dict(prefill_chunk=-4), "prefill_chunk must be"),
])
def test_bad_settings_are_refused(tiny_qparams, bad, match):
    toks, lens = pad_prompts([[5, 6, 7]])
    kw = {"config": TINY, "max_new_tokens": 4, **bad}
    with pytest.raises(ValueError, match=match):
        generate(tiny_qparams, toks, lens, **kw)


def test_bad_prompts_are_refused(tiny_qparams):
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(tiny_qparams, jnp.asarray([[1, TINY.vocab_size]]), jnp.asarray([2]), config=TINY, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_qparams, jnp.asarray([[1, 2]]), jnp.asarray([0]), config=TINY, max_new_tokens=2)


def test_one_program_with_a_while_loop_and_no_recompile(tiny_qparams):
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([4, 9], TINY.vocab_size, rng), multiple=16)
    args, static = prepare(tiny_qparams, toks, lens, config=TINY, max_new_tokens=8, gamma=3, eos_ids=())
    text = generate_jit.lower(*args, **static).as_text()
    assert "stablehlo.while" in text
    assert "callback" not in text.lower()
    generate_jit(*args, **static)
    size = generate_jit._cache_size()
    toks2, lens2 = pad_prompts(random_prompts([11, 2], TINY.vocab_size, rng), multiple=16)
    assert toks2.shape == toks.shape
    args2, static2 = prepare(tiny_qparams, toks2, lens2, config=TINY, max_new_tokens=8, gamma=3, eos_ids=())
    generate_jit(*args2, **static2)
    assert generate_jit._cache_size() == size


def test_replay_accepts_exactly_the_trace(tiny_qparams):
    rng = np.random.default_rng()
    toks, lens = pad_prompts(random_prompts([5, 8], TINY.vocab_size, rng))
    real = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=30, gamma=3, eos_ids=())
    replay = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=30, gamma=3, eos_ids=(),
                      policy="replay", replay_trace=real.trace)
    np.testing.assert_array_equal(np.asarray(replay.trace), np.asarray(real.trace))
    np.testing.assert_array_equal(np.asarray(replay.cycles), np.asarray(real.cycles))


# A model with a 16-token vocabulary, so the exact output distribution can be enumerated.
MICRO = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=32, max_position_embeddings=64, eos_token_ids=())


def chi2_critical(dof, z=3.09):
    """Wilson-Hilferty approximation of the chi-square quantile at normal z (3.09 -> p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_speculative_sampling_keeps_the_verifier_distribution():
    seed = 1234  # fixed: the test is statistical, a fixed seed keeps it reproducible
    params = checkpoint.random_params(MICRO, seed=seed, dtype=jnp.float32)
    # Sharpen the logits so draft (w4a4) and verifier (w4a16) distributions differ visibly.
    params["embed"] = params["embed"] * 8
    qp = quantize.quantize_params(params, MICRO, rotate=True, seed=seed, dtype=jnp.float32)
    prompt = [3, 7, 1]
    temperature = 1.0

    def next_probs(prefixes):
        """w4a16 sampling distribution of the next token after each prefix (all the same length)."""
        seqs = jnp.asarray([prompt + list(p) for p in prefixes], jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
        logits, _ = forward(qp, seqs, pos, None, config=MICRO, mode="w4a16")
        return np.asarray(jax.nn.softmax(logits[:, -1] / temperature, axis=-1), np.float64)

    # Exact P(t1, t2) and P(t3) of plain w4a16 sampling, by enumerating the 16-token vocabulary.
    p1 = next_probs([()])[0]
    p12 = p1[:, None] * next_probs([(a,) for a in range(16)])
    p3 = (p12.reshape(-1, 1) * next_probs([(a, b) for a in range(16) for b in range(16)])).sum(0)

    n = 6000
    toks, lens = pad_prompts([prompt] * n)
    res = generate(qp, toks, lens, config=MICRO, max_new_tokens=3, gamma=3, policy="sampling",
                   temperature=temperature, seed=seed, eos_ids=())
    assert float(res.summary()["acceptance_rate"]) < 0.98  # rejections do happen
    t = np.asarray(res.tokens)
    for name, observed, expected in (
        ("(t1, t2)", np.bincount(t[:, 0] * 16 + t[:, 1], minlength=256), p12.reshape(-1) * n),
        ("t3", np.bincount(t[:, 2], minlength=16), p3 * n),
    ):
        keep = expected >= 5  # pool the rare cells into one
        obs = np.append(observed[keep], observed[~keep].sum()).astype(np.float64)
        exp = np.append(expected[keep], expected[~keep].sum())
        chi2 = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-9)))
        dof = len(obs) - 1
        assert chi2 < chi2_critical(dof), f"{name}: chi2={chi2:.1f} over {dof} dof exceeds the p=0.001 value"


def test_greedy_qspec_equals_w4a16_on_smollm2(smollm2, smollm2_tokenizer):
    """The real model, real prompts of mixed lengths in one batch (the full 16 x 128 x gamma sweep
    is scripts/measure_acceptance.py, recorded in benchmarks/acceptance/)."""
    from qspec_jax.datasets import humaneval_prompts, sharegpt_prompts

    config, params = smollm2
    qp = quantize.quantize_params(params, config, dtype=jnp.float32)
    texts = humaneval_prompts(2) + sharegpt_prompts(2)
    toks, lens = pad_prompts([smollm2_tokenizer.encode(t) for t in texts])
    assert len(set(np.asarray(lens).tolist())) > 1
    base = plain(qp, toks, lens, config, 32)
    for draft, gamma in (("w4a4", 3), ("w4a8", 5)):
        res = generate(qp, toks, lens, config=config, max_new_tokens=32, gamma=gamma, draft_mode=draft)
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens), err_msg=f"{draft} g={gamma}")
        assert res.summary()["acceptance_rate"] > 0.3
