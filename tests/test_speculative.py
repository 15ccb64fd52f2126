"""The QSpec loop against plain decoding: fidelity, sampling exactness, compilation, edge cases.

Every random draw comes from one seed, printed with each test (pytest shows it on failure):
rerun with QSPEC_TEST_SEED=<seed> to reproduce.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, quantize
from qspec_jax.acceptance import Greedy, Sampling
from qspec_jax.config import LlamaConfig, get_preset
from qspec_jax.kv_cache import KVCache, write_layer
from qspec_jax.model import forward
from qspec_jax.sampling import probabilities, speculative_accept
from qspec_jax.model import unstack_layers
from qspec_jax.spec import GenerationSpec
from qspec_jax.speculative import cache_length, cache_slots, decode_jit, generate, generate_jit, pad_prompts, prefill, prepare

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from conftest import TEST_SEED  # noqa: E402
from replay import Replay  # noqa: E402  (benchmark-only: lives beside the benchmarks)

TINY = get_preset("tiny")
SEED = TEST_SEED  # the suite's seed (conftest prints it with every test)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(scope="module")
def tiny_qparams():
    params = checkpoint.random_params(TINY, seed=SEED, dtype=jnp.float32)
    return quantize.quantize_params(params, TINY, rotate=True, seed=SEED, dtype=jnp.float32)


def random_prompts(lengths, vocab, rng):
    return [list(rng.integers(3, vocab, n)) for n in lengths]


def plain(params, toks, lens, config, n, mode="w4a16", **kw):
    return generate(params, toks, lens, config=config, max_new_tokens=n, gamma=0, verify_mode=mode, **kw)


@pytest.mark.parametrize("draft", ["w4a4", "w4a8"])
def test_greedy_qspec_equals_w4a16_tiny(tiny_qparams, draft, rng):
    toks, lens = pad_prompts(random_prompts([3, 17, 8, 1], TINY.vocab_size, rng))
    base = plain(tiny_qparams, toks, lens, TINY, 40, eos_ids=())
    for gamma in (1, 3, 6):
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=40, gamma=gamma, draft_mode=draft,
                       eos_ids=())
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens), err_msg=f"gamma={gamma}")
        s = res.summary()
        assert s["new_tokens"] == 4 * 40
        assert 0 < s["drafted"] and 0 <= s["accepted"] <= s["drafted"]
        assert np.all(np.asarray(res.cycles) >= math.ceil(39 / (gamma + 1)))


def test_decode_from_a_prefilled_cache_continues_generate(tiny_qparams, rng):
    """decode_jit over a cache prefilled by hand gives generate's tokens, and returns the cache it
    wrote: the verifier's K/V of every emitted token but the last, at the right positions."""
    toks, lens = pad_prompts(random_prompts([5, 11], TINY.vocab_size, rng))
    n, gamma = 12, 3
    ref = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=gamma, draft_mode="w4a8", eos_ids=())
    params = unstack_layers(tiny_qparams)
    cache = KVCache.create(TINY, 2, cache_length(toks.shape[1], n, gamma), jnp.float32)
    logits, cache = prefill(params, toks, lens, cache, config=TINY, mode="w4a16", chunk=0)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The cache is donated, lengths included: give it its own copy of lens.
    spec = GenerationSpec(config=TINY, max_new_tokens=n, gamma=gamma, draft_mode="w4a8", verify_mode="w4a16",
                          rule=Greedy(), eos_ids=())
    res, final = decode_jit(params, cache.replace(lengths=jnp.array(lens)), first, jax.random.PRNGKey(1), spec=spec)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(final.lengths), np.asarray(lens) + n - 1)
    # The returned cache holds the verifier's K/V: a plain W4A16 forward of prompt + tokens agrees.
    row = 1
    seq = np.concatenate([np.asarray(toks[row, : int(lens[row])]), np.asarray(res.tokens[row, : n - 1])])
    pos = jnp.arange(len(seq), dtype=jnp.int32)[None]
    full = KVCache.create(TINY, 1, len(seq), jnp.float32)
    _, full = forward(params, jnp.asarray(seq)[None], pos, full, config=TINY, mode="w4a16")
    np.testing.assert_allclose(np.asarray(final.k[0][row, :, : len(seq)]), np.asarray(full.k[0][0]), atol=2e-5)


def test_batched_rows_equal_single_rows(tiny_qparams, rng):
    prompts = random_prompts([5, 12, 2], TINY.vocab_size, rng)
    toks, lens = pad_prompts(prompts)
    batch = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=24, gamma=3, eos_ids=())
    for i, p in enumerate(prompts):
        t1, l1 = pad_prompts([p])
        single = generate(tiny_qparams, t1, l1, config=TINY, max_new_tokens=24, gamma=3, eos_ids=())
        np.testing.assert_array_equal(np.asarray(single.tokens[0]), np.asarray(batch.tokens[i]))


def test_chunked_prefill_equals_one_pass(tiny_qparams, rng):
    """Prompts prefilled in chunks (last tokens in different chunks, a ragged last chunk) give the
    same first-token logits and the same generation as a one-pass prefill."""
    toks, lens = pad_prompts(random_prompts([23, 6, 17, 9], TINY.vocab_size, rng))
    cache = KVCache.create(TINY, 4, 40, jnp.float32)
    one, _ = prefill(tiny_qparams, toks, lens, cache, config=TINY, mode="w4a16", chunk=0)
    for chunk in (4, 8, 16):
        chunked, _ = prefill(tiny_qparams, toks, lens, cache, config=TINY, mode="w4a16", chunk=chunk)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), rtol=1e-4, atol=1e-4, err_msg=str(chunk))
    base = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=12, eos_ids=(), prefill_chunk=0)
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=12, eos_ids=(), prefill_chunk=8)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))


def test_eos_inside_a_drafted_block(tiny_qparams, rng):
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


def test_gamma_larger_than_budget_and_batch_of_one(tiny_qparams, rng):
    toks, lens = pad_prompts(random_prompts([7], TINY.vocab_size, rng))
    for n in (1, 2, 3):
        base = plain(tiny_qparams, toks, lens, TINY, n, eos_ids=())
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=6, eos_ids=())
        assert int(res.num_tokens[0]) == n
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))


def test_prompt_at_context_limit(tiny_qparams, rng):
    """A prompt of context-1 tokens may generate exactly one token; one more is refused clearly."""
    cfg = LlamaConfig(**{**TINY.__dict__, "max_position_embeddings": 48})
    toks, lens = pad_prompts(random_prompts([47, 20], cfg.vocab_size, rng))
    base = plain(tiny_qparams, toks, lens, cfg, 1, eos_ids=())
    res = generate(tiny_qparams, toks, lens, config=cfg, max_new_tokens=1, gamma=3, eos_ids=())
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny_qparams, toks, lens, config=cfg, max_new_tokens=2, gamma=3)


def test_dynamic_update_slice_clamps_and_the_cache_never_reaches_it(rng):
    # The trap: an out-of-range start is clamped, silently overwriting earlier entries.
    buf = jnp.zeros((8,))
    clamped = jax.lax.dynamic_update_slice(buf, jnp.ones((3,)), (7,))
    np.testing.assert_array_equal(np.asarray(clamped), [0, 0, 0, 0, 0, 1, 1, 1])
    # write_layer at the last legal start fills exactly the last slots of each row.
    cache = KVCache.create(TINY, 2, 10, jnp.float32)
    new = jnp.asarray(rng.normal(size=(2, TINY.num_kv_heads, 3, TINY.head_dim)), jnp.float32)
    k = write_layer(cache.k[1], new, jnp.asarray([7, 2], jnp.int32))
    np.testing.assert_array_equal(np.asarray(k[0, :, 7:10]), np.asarray(new[0]))
    np.testing.assert_array_equal(np.asarray(k[1, :, 2:5]), np.asarray(new[1]))
    assert float(jnp.abs(k[0, :, :7]).max()) == 0 and float(jnp.abs(k[1, :, 5:]).max()) == 0


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(gamma=-1), "gamma must be"),
    (dict(draft_mode="w2a2"), "unknown draft_mode"),
    (dict(rule="beam"), "unknown rule"),
    (dict(rule=lambda: Sampling(temperature=0.0)), "temperature > 0"),
    (dict(rule=lambda: Sampling(temperature=float("nan"))), "temperature > 0"),
    (dict(rule=lambda: Sampling(temperature=float("inf"))), "temperature > 0"),
    (dict(rule=lambda: Replay.of(np.zeros((2, 3), np.int32))), "replay trace must be"),
    (dict(prefill_chunk=-4), "prefill_chunk must be"),
])
def test_bad_settings_are_refused(tiny_qparams, bad, match):
    toks, lens = pad_prompts([[5, 6, 7]])
    kw = {"config": TINY, "max_new_tokens": 4, **bad}
    with pytest.raises(ValueError, match=match):
        if callable(kw.get("rule")):  # a rule refuses bad settings when it is built
            kw["rule"] = kw["rule"]()
        generate(tiny_qparams, toks, lens, **kw)


def test_bad_prompts_are_refused(tiny_qparams):
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(tiny_qparams, jnp.asarray([[1, TINY.vocab_size]]), jnp.asarray([2]), config=TINY, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_qparams, jnp.asarray([[1, 2]]), jnp.asarray([0]), config=TINY, max_new_tokens=2)


def test_one_program_with_a_while_loop_and_no_recompile(tiny_qparams, rng):
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


def test_replay_accepts_exactly_the_trace(tiny_qparams, rng):
    """Replay follows its trace, not the model: a synthetic trace (every count 0..gamma, rows of
    different trace lengths, cycled) comes back as the run's trace and sets the number of cycles.
    A trace recorded on a real run reproduces that run's counts."""
    g, n = 3, 30
    toks, lens = pad_prompts(random_prompts([5, 8, 3], TINY.vocab_size, rng))
    forced = np.full((3, n), -1, np.int32)
    forced[0, :4] = [3, 0, 2, 1]
    forced[1, :6] = [0, 0, 1, 3, 3, 2]
    forced[2, :1] = [2]
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=g, eos_ids=(),
                   rule=Replay.of(forced))
    trace = np.asarray(res.trace)
    for b in range(3):
        counts, want, n_out = forced[b][forced[b] >= 0], [], 1
        while n_out < n:
            want.append(int(counts[len(want) % len(counts)]))
            n_out += min(want[-1] + 1, n - n_out)
        assert trace[b, : len(want)].tolist() == want and np.all(trace[b, len(want):] == -1), f"row {b}"
        assert int(res.cycles[b]) == len(want) and int(res.num_tokens[b]) == n
    real = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=g, eos_ids=())
    replay = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=g, eos_ids=(),
                      rule=Replay.of(real.trace))
    np.testing.assert_array_equal(np.asarray(replay.trace), np.asarray(real.trace))
    np.testing.assert_array_equal(np.asarray(replay.cycles), np.asarray(real.cycles))


def test_acceptance_statistics_agree_with_the_trace(tiny_qparams, rng):
    """Per-position acceptance counts, gamma histogram and mean accepted length of a greedy run,
    against the per-cycle trace; the trace against the number of tokens emitted; the summary."""
    g, n = 3, 30
    toks, lens = pad_prompts(random_prompts([4, 11, 7], TINY.vocab_size, rng))
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=g, eos_ids=())
    trace, at, cycles = np.asarray(res.trace), np.asarray(res.accepted_at), np.asarray(res.cycles)
    ran = trace >= 0
    assert at.shape == (3, g)
    np.testing.assert_array_equal(ran.sum(1), cycles)
    np.testing.assert_array_equal(at, ((trace[:, :, None] > np.arange(g)) & ran[:, :, None]).sum(1))
    assert np.all(np.diff(at, axis=1) <= 0)
    np.testing.assert_array_equal(at.sum(1), np.asarray(res.accepted))
    np.testing.assert_array_equal(np.asarray(res.drafted), g * cycles)
    hist = np.asarray(res.gamma_cycles)
    assert hist.shape == (3, g + 1) and not hist[:, :g].any()
    np.testing.assert_array_equal(hist[:, g], cycles)
    # A cycle emits its accepted drafts and the verifier's token; only the last one is cut (budget).
    per_cycle = np.where(ran, trace + 1, 0)
    last = per_cycle[np.arange(3), cycles - 1]
    assert np.all(per_cycle.sum(1) >= n - 1) and np.all(per_cycle.sum(1) - last < n - 1)
    np.testing.assert_allclose(res.mean_accepted_length(), at.sum(1) / cycles)

    s = res.summary()
    assert json.loads(json.dumps(s)) == s
    assert s["accepted_at_position"] == at.sum(0).tolist()
    assert s["acceptance_at_position"] == pytest.approx((at.sum(0) / cycles.sum()).tolist())
    assert s["gamma_histogram"] == {str(g): int(cycles.sum())}
    assert s["mean_accepted_length"] == pytest.approx(at.sum() / cycles.sum())
    assert s["tokens_per_cycle"] <= 1 + s["mean_accepted_length"]

    s0 = plain(tiny_qparams, toks, lens, TINY, 5, eos_ids=()).summary()
    assert s0["accepted_at_position"] == [] and s0["acceptance_at_position"] == []
    assert s0["gamma_histogram"] == {"0": 3 * 4} and s0["mean_accepted_length"] is None


def test_eos_as_the_first_token(tiny_qparams, rng):
    """A row whose first token (from prefill) is EOS stops there, runs no cycle, and the other rows
    of the batch are unaffected."""
    toks, lens = pad_prompts(random_prompts([6, 9, 4], TINY.vocab_size, rng))
    free = np.asarray(plain(tiny_qparams, toks, lens, TINY, 12, eos_ids=()).tokens)
    eos = int(free[0, 0])
    res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=12, gamma=3, eos_ids=(eos,))
    got = np.asarray(res.tokens)
    assert int(res.num_tokens[0]) == 1 and got[0, 0] == eos and np.all(got[0, 1:] == -1)
    assert int(res.cycles[0]) == 0 and int(res.drafted[0]) == 0 and np.all(np.asarray(res.trace)[0] == -1)
    for b in (1, 2):
        hits = np.flatnonzero(free[b] == eos)
        stop = hits[0] + 1 if len(hits) else 12
        assert int(res.num_tokens[b]) == stop
        np.testing.assert_array_equal(got[b, :stop], free[b, :stop])


def test_generate_never_writes_past_the_cache(tiny_qparams, rng, monkeypatch):
    """Every K/V write of a generation ends inside the `cache_length` slots: prefill, drafts, verify,
    and the masked cycles a finished row still runs while others go on. (A write past the end is
    dropped by the scatter, or with a clamping write lands on earlier slots: silent either way.)
    Row 0 accepts every draft and finishes in two cycles, its last one cut by the budget; row 1
    accepts nothing and keeps the loop running."""
    import qspec_jax.kv_cache as kv_cache

    ends, sizes, real = [], set(), kv_cache.write_layer

    def spy(layer_cache, new, starts):
        sizes.add(layer_cache.shape[-2])
        jax.debug.callback(lambda e: ends.append(int(e)), jnp.max(starts) + new.shape[2])
        return real(layer_cache, new, starts)

    g, n = 6, 10
    toks, lens = pad_prompts(random_prompts([9, 9, 4], TINY.vocab_size, rng))
    monkeypatch.setattr(kv_cache, "write_layer", spy)
    generate_jit.clear_cache()  # trace again, through the spy
    try:
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=n, gamma=g, eos_ids=(),
                       rule=Replay.of([[g], [0], [2]]), prefill_chunk=0)
        jax.block_until_ready(res.tokens)
    finally:
        generate_jit.clear_cache()
    assert np.asarray(res.trace)[0, :2].tolist() == [g, g] and int(res.cycles[1]) == n - 1
    assert sizes == {cache_slots(9, n, g)}  # allocated: cache_length rounded up for the attention kernel
    assert len(ends) > 2 * TINY.num_layers * (n - 1) and max(ends) <= cache_length(9, n, g)


# A model with a 16-token vocabulary, so the exact output distribution can be enumerated.
MICRO = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=32, max_position_embeddings=64, eos_token_ids=())
PROMPT = [3, 7, 1]


@pytest.fixture(scope="module")
def micro_qparams():
    """MICRO with a sharp head (lm_head x 10): at temperature 0.7 the draft's (w4a4) and the
    verifier's (w4a16) next-token distributions are ~0.2 apart in total variation, and they depend
    on the context. Fixed weights: the tests below measure these properties (seeded sampling)."""
    params = checkpoint.random_params(MICRO, seed=1234, dtype=jnp.float32)
    params["lm_head"] = params["lm_head"] * 10
    return quantize.quantize_params(params, MICRO, rotate=True, seed=1234, dtype=jnp.float32)


def nucleus(logits, temperature, top_p):
    """float64 NumPy reference of temperature / top-p sampling probabilities over the last axis."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # the mass before a token is short of top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def next_probs(qp, prefixes, temperature, top_p, mode="w4a16"):
    """[len(prefixes), 16] sampling distribution of the token after PROMPT + each prefix (same lengths)."""
    seqs = jnp.asarray([PROMPT + list(p) for p in prefixes], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
    logits, _ = forward(qp, seqs, pos, None, config=MICRO, mode=mode)
    return nucleus(logits[:, -1], temperature, top_p)


def chi2_critical(dof, z=4.75):
    """Wilson-Hilferty approximation of the chi-square quantile at normal z (4.75 -> p = 1e-6: a
    random seed fails about once in a million runs; the mutations these tests catch give chi2 far
    above it)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_distributed(name, observed, expected):
    """Chi-square goodness of fit of counts against expected counts (cells below 5 pooled)."""
    observed, expected = np.asarray(observed, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    chi2 = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-9)))
    dof = len(obs) - 1
    assert chi2 < chi2_critical(dof), f"{name}: chi2={chi2:.1f} over {dof} dof exceeds the p=1e-6 value"


def test_probabilities_temperature_and_top_p(rng):
    logits = rng.normal(size=(6, 40)) * 3
    for temperature in (0.5, 1.0, 1.7):
        for top_p in (0.3, 0.8, 1.0):
            got = np.asarray(probabilities(jnp.asarray(logits, jnp.float32), temperature, top_p))
            np.testing.assert_allclose(got, nucleus(logits, temperature, top_p), atol=1e-5,
                                       err_msg=f"T={temperature} top_p={top_p}")


def test_speculative_accept_on_separated_distributions():
    """`speculative_accept` alone on hand-made distributions far apart (acceptance 0.4 and 0.5,
    gamma 2): among the rows that reach position j, the token there is distributed as p_j.
    Positions 0 and 1 mix accepted drafts with draws from normalize(max(p_j - q_j, 0)); position 2
    is the bonus token, drawn from p_2 when both drafts are accepted."""
    q = np.array([[0.1, 0.1, 0.1, 0.7], [0.4, 0.4, 0.1, 0.1]])
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.05, 0.6, 0.1]])
    n = 40000
    k_draft, k_accept = jax.random.split(jax.random.PRNGKey(SEED))
    drafts = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q, jnp.float32)), shape=(n, 2)).astype(jnp.int32)
    n_acc, nxt = speculative_accept(k_accept, drafts, jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 2, 4)),
                                    jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 3, 4)))
    n_acc, nxt, drafts = np.asarray(n_acc), np.asarray(nxt), np.asarray(drafts)
    tokens = np.where(np.arange(3) < n_acc[:, None], np.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    for j in range(3):
        reach = n_acc >= j
        assert_distributed(f"position {j}", np.bincount(tokens[reach, j], minlength=4), p[j] * reach.sum())
    for k, prob in ((1, 0.4), (2, 0.4 * 0.5)):  # P(n_acc >= k): the product of sum(min(p_j, q_j))
        assert abs(np.sum(n_acc >= k) - n * prob) < 5 * math.sqrt(n * prob * (1 - prob)), f"n_acc >= {k}"


def verifier_token_pairs(qp, temperature, top_p):
    """Plain w4a16 sampling's exact distributions of (t1, t2), of t3 given (t1, t2), and of (t3, t4),
    enumerated over MICRO's vocabulary: what the sampling tests compare the loop's tokens with."""
    v = MICRO.vocab_size
    pairs = [(a, b) for a in range(v) for b in range(v)]
    p1 = next_probs(qp, [()], temperature, top_p)[0]
    p12 = p1[:, None] * next_probs(qp, [(a,) for a in range(v)], temperature, top_p)
    p3 = next_probs(qp, pairs, temperature, top_p).reshape(v, v, v)
    p4 = next_probs(qp, [(a, b, c) for a, b in pairs for c in range(v)], temperature, top_p).reshape(v, v, v, v)
    return p12, p3, np.einsum("ab,abc,abcd->cd", p12, p3, p4)


def test_speculative_sampling_keeps_the_verifier_distribution(micro_qparams):
    """The whole loop at temperature 0.7, top-p 0.8, gamma 2, on a draft that differs visibly from
    the verifier: the first four tokens (prefill token, two drafted positions and the first cycle's
    bonus position) are distributed exactly as plain w4a16 sampling, enumerated over the vocabulary."""
    qp, temperature, top_p = micro_qparams, 0.7, 0.8
    v = MICRO.vocab_size
    p12, p3, p34 = verifier_token_pairs(qp, temperature, top_p)
    q3 = next_probs(qp, [(a, b) for a in range(v) for b in range(v)], temperature, top_p, mode="w4a4").reshape(v, v, v)
    assert np.sum(p12[..., None] * 0.5 * np.abs(q3 - p3)) > 0.1  # the draft differs visibly

    n = 12000
    toks, lens = pad_prompts([PROMPT] * n)
    res = generate(qp, toks, lens, config=MICRO, max_new_tokens=4, gamma=2,
                   rule=Sampling(temperature, top_p), seed=SEED, eos_ids=())
    s = res.summary()
    assert s["acceptance_rate"] < 0.9 and s["accepted_at_position"][1] > n / 4  # rejections, and bonus tokens
    t = np.asarray(res.tokens)
    assert_distributed("(t1, t2)", np.bincount(t[:, 0] * v + t[:, 1], minlength=v * v), p12 * n)
    assert_distributed("(t3, t4)", np.bincount(t[:, 2] * v + t[:, 3], minlength=v * v), p34 * n)


def test_eos_under_sampling(micro_qparams):
    """Sampling with an EOS: a row stops right after its first EOS (also when that is the first
    token), every row that stops early ends in EOS, and stopping changes nothing before it: the
    rates of EOS as first and as second token match the verifier's distribution."""
    qp, temperature, top_p, v = micro_qparams, 0.7, 0.8, MICRO.vocab_size
    p1 = next_probs(qp, [()], temperature, top_p)[0]
    p12 = p1[:, None] * next_probs(qp, [(a,) for a in range(v)], temperature, top_p)
    eos = int(np.argmax(p1 * (1 - p1) + p12.sum(0)))  # likely both first and second
    n, budget = 4000, 6
    toks, lens = pad_prompts([PROMPT] * n)
    res = generate(qp, toks, lens, config=MICRO, max_new_tokens=budget, gamma=3,
                   rule=Sampling(temperature, top_p), seed=SEED, eos_ids=(eos,))
    t, k = np.asarray(res.tokens), np.asarray(res.num_tokens)
    valid = np.arange(budget) < k[:, None]
    assert np.all(t[~valid] == -1) and np.all(t[valid] >= 0)
    last = t[np.arange(n), k - 1]
    np.testing.assert_array_equal(np.sum(t == eos, axis=1), last == eos)  # EOS at most once, and last
    assert np.all((k == budget) | (last == eos))
    assert np.all(np.asarray(res.cycles)[k == 1] == 0)
    second = p12[np.arange(v) != eos, eos].sum()
    for name, count, prob in (("first", np.sum(k == 1), p1[eos]), ("second", np.sum((k == 2) & (last == eos)), second)):
        assert prob > 0.05 and abs(count - n * prob) < 5 * math.sqrt(n * prob * (1 - prob)), (name, count, n * prob)


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
