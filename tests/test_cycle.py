"""The cycle's parts on their own: draft, verify, accept, advance (speculative.py), the acceptance
rules (acceptance.py, scripts/replay.py) and the generation spec (spec.py). The end-to-end checks of
the whole loop are in test_speculative.py.

Every random draw comes from one seed, printed with each test: rerun with QSPEC_TEST_SEED=<seed>.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, quantize
from qspec_jax.acceptance import Greedy, Sampling
from qspec_jax.config import get_preset
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import forward, unstack_layers
from qspec_jax.spec import KV_GROUP, KV_WINDOW, GenerationSpec, default
from qspec_jax.speculative import (Drafts, LoopState, Verdict, accept, advance, cycle, draft, generate, pad_prompts,
                                   prefill, verify)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from conftest import TEST_SEED  # noqa: E402
from replay import Replay  # noqa: E402

TINY = get_preset("tiny")
SEED = TEST_SEED  # the suite's seed (conftest prints it with every test)


@pytest.fixture(scope="module")
def setup():
    """Unstacked tiny int4 weights, two prompts (lengths 5 and 8) prefilled in W4A16, and the state
    after prefill: the first token of each row pending."""
    params = checkpoint.random_params(TINY, seed=SEED, dtype=jnp.float32)
    qp = unstack_layers(quantize.quantize_params(params, TINY, rotate=True, seed=SEED, dtype=jnp.float32))
    rng = np.random.default_rng(SEED)
    prompts = [list(rng.integers(3, TINY.vocab_size, n)) for n in (5, 8)]
    toks, lens = pad_prompts(prompts)
    spec = GenerationSpec(config=TINY, max_new_tokens=12, gamma=3, draft_mode="w4a8", eos_ids=())
    cache = KVCache.create(TINY, 2, spec.cache_length(toks.shape[1]), jnp.float32)
    logits, cache = prefill(qp, toks, lens, cache, config=TINY, mode="w4a16", chunk=0)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    state = LoopState.start(cache.replace(lengths=lens), first, jax.random.PRNGKey(SEED), spec)
    return qp, prompts, spec, state


def full_logits(qp, seq, mode):
    """Logits [len(seq), V] of a cache-free forward over one sequence in `mode`."""
    pos = jnp.arange(len(seq), dtype=jnp.int32)[None]
    logits, _ = forward(qp, jnp.asarray(seq, jnp.int32)[None], pos, None, config=TINY, mode=mode)
    return np.asarray(logits[0])


def test_draft_is_greedy_decoding_in_the_draft_mode(setup):
    """Fixed gamma: draft j is the draft mode's argmax at slot length + j, one forward at a time
    over the cache (the prompt's K/V the verifier's, each earlier draft's its own), and the cache
    holds the drafts' K/V; its lengths do not move (the verifier's pass owns them)."""
    qp, prompts, spec, state = setup
    drafts, after = draft(qp, state, 3, spec)
    assert drafts.tokens.shape == (2, 3) and drafts.q is None and drafts.count == 3
    np.testing.assert_array_equal(np.asarray(after.cache.lengths), np.asarray(state.cache.lengths))
    cache, tok = state.cache, state.pending
    for j in range(3):
        logits, cache = forward(qp, tok[:, None], (state.cache.lengths + j)[:, None], cache, config=TINY, mode="w4a8")
        tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        np.testing.assert_array_equal(np.asarray(drafts.tokens[:, j]), np.asarray(tok), err_msg=f"draft {j}")
    np.testing.assert_allclose(np.asarray(after.cache.k[0]), np.asarray(cache.k[0]), atol=1e-6)
    # A traced gamma (an adaptive cycle): the same first drafts in a buffer of width spec.gamma.
    two = jax.jit(lambda s, g: draft(qp, s, g, spec)[0].tokens)(state, jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(two[:, :2]), np.asarray(drafts.tokens[:, :2]))
    assert np.all(np.asarray(two[:, 2]) == 0)


def test_draft_under_sampling_keeps_q():
    spec = GenerationSpec(config=TINY, max_new_tokens=4, gamma=2, rule=Sampling(0.7, 0.9))
    assert spec.rule.keeps_q and not Greedy.keeps_q


def test_verify_gives_the_verifier_logits_at_each_drafted_position(setup):
    """verify's logits at the pending token and each draft equal a cache-free W4A16 forward over the
    whole sequence there; the cache lengths stay (advance moves them)."""
    qp, prompts, spec, state = setup
    drafts, state2 = draft(qp, state, 3, spec)
    logits, after = verify(qp, state2, drafts, spec)
    assert logits.shape == (2, 4, TINY.vocab_size)
    np.testing.assert_array_equal(np.asarray(after.cache.lengths), np.asarray(state.cache.lengths))
    for row, prompt in enumerate(prompts):
        seq = prompt + [int(state.pending[row])] + [int(t) for t in drafts.tokens[row]]
        want = full_logits(qp, seq, "w4a16")[len(prompt):]
        np.testing.assert_allclose(np.asarray(logits[row]), want, rtol=1e-4, atol=1e-4)


def onehot_logits(targets, vocab=8):
    """[B, g + 1, vocab] logits whose argmax at each position is `targets`."""
    return jnp.asarray(np.eye(vocab, dtype=np.float32)[np.asarray(targets)] * 5.0)


def test_greedy_accept_keeps_the_matching_prefix(setup):
    _, _, spec, state = setup
    drafts = Drafts(jnp.asarray([[1, 2, 3], [1, 2, 3], [1, 2, 3]], jnp.int32), None, 3)
    logits = onehot_logits([[1, 2, 3, 4], [1, 5, 3, 6], [7, 2, 3, 0]])
    state3 = state.replace(gamma_cycles=jnp.zeros((3, 4), jnp.int32))  # three rows for this test
    verdict, after = accept(state3, drafts, logits, spec)
    assert np.asarray(verdict.n_accepted).tolist() == [3, 1, 0]
    assert np.asarray(verdict.next).tolist() == [4, 5, 7]  # bonus, correction, correction
    assert not np.array_equal(np.asarray(after.key), np.asarray(state.key))  # the key moved on
    # An adaptive cycle that drafted 2: the third draft is padding, never accepted.
    limited, _ = accept(state3, drafts._replace(count=jnp.int32(2)), logits, spec)
    assert np.asarray(limited.n_accepted).tolist() == [2, 1, 0]
    assert np.asarray(limited.next).tolist() == [3, 5, 7]


def test_replay_accepts_the_trace_at_each_rows_cycle(setup):
    """Replay's count is the trace's entry at the row's own cycle count (its -1 padding skipped,
    cycled), clipped to the drafts made; the next token is the verifier's argmax after them."""
    _, _, spec, state = setup
    rule = Replay.of([[3, 0, -1], [2, 1, 1]])
    spec = GenerationSpec(config=TINY, max_new_tokens=12, gamma=3, rule=rule, eos_ids=())
    drafts = Drafts(jnp.asarray([[1, 2, 3], [1, 2, 3]], jnp.int32), None, 3)
    logits = onehot_logits([[0, 1, 2, 3], [4, 5, 6, 7]])
    got = []
    for cycles in ([0, 0], [1, 1], [2, 2]):
        s = state.replace(gamma_cycles=jnp.zeros((2, 4), jnp.int32).at[:, 3].set(jnp.asarray(cycles)))
        verdict, _ = accept(s, drafts, logits, spec)
        got.append((np.asarray(verdict.n_accepted).tolist(), np.asarray(verdict.next).tolist()))
    assert got == [([3, 2], [3, 6]), ([0, 1], [0, 5]), ([3, 1], [3, 5])]
    with pytest.raises(ValueError, match="replay trace must be"):
        rule.check(3)


def test_advance_emits_cuts_and_counts(setup):
    """Row 0 accepts 2 of 3 drafts and emits them and the verifier's token; row 1 hits EOS in its
    first draft; row 2 is done already and changes nothing but writes -1s in its overhang."""
    _, _, _, state = setup
    spec = GenerationSpec(config=TINY, max_new_tokens=12, gamma=3, eos_ids=(9,))
    cache = KVCache.create(TINY, 3, 24, jnp.float32).replace(lengths=jnp.asarray([5, 8, 6], jnp.int32))
    s = LoopState.start(cache, jnp.asarray([4, 4, 9], jnp.int32), jax.random.PRNGKey(0), spec)
    assert np.asarray(s.done).tolist() == [False, False, True]  # row 2's first token is EOS
    drafts = Drafts(jnp.asarray([[1, 2, 3], [9, 2, 3], [1, 1, 1]], jnp.int32), None, 3)
    after = advance(s, drafts, Verdict(jnp.asarray([2, 3, 3], jnp.int32), jnp.asarray([7, 7, 7], jnp.int32)), spec)
    assert np.asarray(after.n_out).tolist() == [4, 2, 1]
    assert np.asarray(after.result().tokens[:, :4]).tolist() == [[4, 1, 2, 7], [4, 9, -1, -1], [9, -1, -1, -1]]
    assert np.asarray(after.done).tolist() == [False, True, True]
    assert np.asarray(after.cache.lengths).tolist() == [8, 9, 6]
    assert np.asarray(after.pending).tolist() == [7, 7, 9]
    assert np.asarray(after.accepted_at).tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert np.asarray(after.reached_at).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert np.asarray(after.gamma_cycles[:, 3]).tolist() == [1, 1, 0]
    assert np.asarray(after.trace[:, 0]).tolist() == [2, 3, -1] and int(after.step) == 1
    # The budget cuts a cycle's emission: 12 - 11 = 1 token left.
    s = s.replace(n_out=jnp.asarray([11, 11, 1], jnp.int32))
    after = advance(s, drafts, Verdict(jnp.asarray([3, 0, 0], jnp.int32), jnp.asarray([7, 7, 7], jnp.int32)), spec)
    assert np.asarray(after.n_out).tolist() == [12, 12, 1] and np.asarray(after.done).tolist() == [True, True, True]


def test_one_cycle_continues_plain_greedy_decoding(setup):
    """draft -> verify -> accept -> advance, composed by `cycle`: the tokens one cycle emits are the
    next tokens of plain W4A16 greedy decoding."""
    qp, prompts, spec, state = setup
    after = jax.jit(lambda s: cycle(s, qp, qp, 3, spec))(state)
    toks, lens = pad_prompts(prompts)
    base = np.asarray(generate(qp, toks, lens, config=TINY, max_new_tokens=5, gamma=0, eos_ids=()).tokens)
    for row in range(2):
        n = int(after.n_out[row])
        assert 2 <= n <= 5
        assert np.asarray(after.out[row, :n]).tolist() == base[row, :n].tolist()


def test_rules_and_specs_are_hashable_values():
    assert Sampling(0.7, 0.9) == Sampling(0.7, 0.9) and hash(Sampling(0.7, 0.9)) == hash(Sampling(0.7, 0.9))
    assert Greedy() == Greedy() and Replay.of([[1, 2]]) == Replay.of(np.asarray([[1, 2]]))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature > 0"):
            Sampling(bad)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, 0.0)
    a = GenerationSpec(config=TINY, max_new_tokens=np.int64(8), eos_ids=[2])
    b = GenerationSpec(config=TINY, max_new_tokens=8, eos_ids=(2,), kv_group=16, kv_window=32)
    assert a == b and hash(a) == hash(b)  # a bf16 cache ignores (and normalizes) group and window
    assert (a.kv_group, a.kv_window) == (KV_GROUP, KV_WINDOW) == (default("kv_group"), default("kv_window"))
    int8 = GenerationSpec(config=TINY, max_new_tokens=8, kv="int8", kv_group=16, kv_window=32)
    assert (int8.kv_group, int8.kv_window) == (16, 32) and int8 != b
    assert GenerationSpec(config=TINY, max_new_tokens=8).eos_ids == tuple(TINY.eos_token_ids)
    for bad, match in ((dict(gamma="auto"), "resolved"), (dict(kv="int4"), "unknown kv"),
                       (dict(verify_mode="w2"), "unknown verify_mode"), (dict(rule="greedy"), "unknown rule")):
        with pytest.raises(ValueError, match=match):
            GenerationSpec(config=TINY, max_new_tokens=8, **bad)
