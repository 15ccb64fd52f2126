"""The cache interface (qspec_jax/kv_cache.py) on its own: each implementation against a plain
reference, `forward` through the interface only, and the cut c(p) against its brute-force definition.

- bf16 `KVCache`: writing then reading back gives the dense K/V written; `attend` is float64 masked
  attention over them; `flush` changes nothing.
- `HierarchicalKVCache`: dense reads are within the quantization error of the values written (INT8
  view: s/16, INT4: s/2, the recent buffer exact), also after writes and flushes move groups from
  the buffer into the planes; `attend` is float64 attention over its own dense read.
- `NoCache`: causal attention over the call's own K/V.
Random inputs from the suite's seed (QSPEC_TEST_SEED, printed).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_SEED as SEED
from pallas_kernels.kv_cut import cut_position
from qspec_jax import hierarchical_kv as hkv
from qspec_jax.config import get_preset
from qspec_jax.hierarchical_kv import HierarchicalKVCache
from qspec_jax.kv_cache import KVCache, NoCache
from qspec_jax.model import forward
from test_decode_attention import f64, np_attention

TINY = get_preset("tiny")
B, KV, H, HD = 2, 2, 4, 32


def _cfg(num_layers=2):
    return dataclasses.replace(TINY, num_layers=num_layers, num_kv_heads=KV, num_heads=H, head_dim=HD)


def _kv(rng, t):
    return tuple(jnp.asarray(rng.standard_normal((B, KV, t, HD)), jnp.float32) for _ in range(2))


# ---------------------------------------------------------------- the cut


@pytest.mark.parametrize("group", [1, 3, 8, 16])
def test_cut_matches_brute_force(group):
    """c(p) is the largest multiple of G at most max(p + 1 - D, 0); a query at p >= D - 1 therefore
    reads its last D .. D + G - 1 positions from the buffer."""
    for delay in range(1, group + 4):
        p = np.arange(0, 300)
        got = np.asarray(cut_position(jnp.asarray(p, jnp.int32), group, delay))
        want = [max(c for c in range(0, q + 2, group) if c <= max(q + 1 - delay, 0)) for q in p]
        np.testing.assert_array_equal(got, want, err_msg=f"G={group} D={delay}")
        seen = p + 1 - got  # positions [c(p), p] come from the buffer
        assert np.all(seen[p >= delay - 1] >= delay) and np.all(seen <= delay + group - 1)
        assert np.all(np.diff(got) >= 0)


def test_cache_cuts_use_the_one_definition():
    cache = hkv.create(1, 1, 8, 64, group=16, window=40, delay=5)
    p = jnp.arange(64, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(cache.cuts(p)), np.asarray(cut_position(p, 16, 5)))


# ---------------------------------------------------------------- bf16


def test_bf16_write_then_read_back():
    rng = np.random.default_rng(SEED)
    cache = KVCache.create(_cfg(), B, 32, jnp.float32)
    starts = jnp.asarray([0, 5], jnp.int32)
    k, v = _kv(rng, 4)
    cache = cache.write(1, k, v, starts)
    for b, s in enumerate([0, 5]):
        dk, dv = cache.dense(1, "int8")
        np.testing.assert_array_equal(np.asarray(dk[b, :, s:s + 4]), np.asarray(k[b]))
        np.testing.assert_array_equal(np.asarray(dv[b, :, s:s + 4]), np.asarray(v[b]))
        untouched = np.ones(32, bool)
        untouched[s:s + 4] = False
        assert not np.asarray(dk[b, :, untouched]).any()
    assert not any(np.asarray(x).any() for x in cache.dense(0))  # other layers untouched
    assert cache.flush(3) is cache


def test_bf16_attend_is_masked_attention():
    rng = np.random.default_rng(SEED + 1)
    S, T = 32, 3
    cache = KVCache.create(_cfg(1), B, S, jnp.float32)
    lengths = np.asarray([10, 20])
    k, v = _kv(rng, S)
    cache = cache.write(0, k, v, jnp.zeros(B, jnp.int32))
    pos = jnp.asarray(lengths[:, None] + np.arange(T), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(f64(q), np.asarray(pos), f64(k), f64(v), k_pos, np.ones((B, S), bool))
    np.testing.assert_allclose(f64(cache.attend(0, q, pos)), want, rtol=1e-5, atol=1e-5)


def test_no_cache_is_causal_attention_over_the_call():
    rng = np.random.default_rng(SEED + 2)
    T = 6
    k, v = _kv(rng, T)
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    got = NoCache().write(0, k, v, pos[:, 0]).attend(0, q, pos)
    want = np_attention(f64(q), np.asarray(pos), f64(k), f64(v), np.asarray(pos), np.ones((B, T), bool))
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- hierarchical


def _error_bounds(layer, view):
    """Per-element bound [B, KV, S, hd] on |dequantized - written| of the planes in `view`."""
    frac = 1 / 16 if view == "int8" else 1 / 2  # INT8: s/32, s/16 where the residual's code clips
    G = layer.group
    ks = np.repeat(f64(layer.k_scale), G, axis=2)  # per channel over groups: [B, KV, S, hd]
    vs = f64(layer.v_scale)[..., None]  # per token: [B, KV, S, 1]
    return ks * frac + 1e-5, vs * frac + 1e-5


def _check_dense(cache, truth_k, truth_v, lengths):
    """Every layer's dense read within its view's quantization error of the written values, for
    positions below each row's length; exact where the read comes from the full-precision buffer."""
    for i, layer in enumerate(cache.layers):
        cut = np.asarray(layer.cuts(jnp.asarray(lengths)))
        for view in ("int8", "int4"):
            dk, dv = (f64(x) for x in cache.dense(i, view))
            kb, vb = _error_bounds(layer, view)
            for b, n in enumerate(lengths):
                ek = np.abs(dk[b, :, :n] - truth_k[i][b, :, :n])
                ev = np.abs(dv[b, :, :n] - truth_v[i][b, :, :n])
                assert np.all(ek <= kb[b, :, :n]), (view, i, b, ek.max())
                assert np.all(ev <= np.broadcast_to(vb[b, :, :n], ev.shape)), (view, i, b, ev.max())
                assert np.all(ek[:, cut[b]:n] < 1e-6) and np.all(ev[:, cut[b]:n] < 1e-6)  # buffer: exact


def test_hierarchical_reads_within_quantization_error_through_its_life_cycle():
    """Prefill, then cycles of `write` (drafts, then the verifier overwriting them), lengths set by
    acceptance, `flush`: dense reads stay within the quantization error of the accepted values, while
    groups move from the buffer into the planes."""
    rng = np.random.default_rng(SEED + 3)
    cfg, G, R, headroom, S, P = _cfg(2), 8, 20, 3, 96, 40
    truth_k = rng.standard_normal((2, B, KV, S, HD)) * (1 + 4 * (np.arange(HD) % 7 == 0))
    truth_v = rng.standard_normal((2, B, KV, S, HD))
    lengths = np.asarray([P, 13])
    pk = tuple(jnp.asarray(truth_k[i][:, :, :P], jnp.float32) for i in range(2))
    pv = tuple(jnp.asarray(truth_v[i][:, :, :P], jnp.float32) for i in range(2))
    cache = HierarchicalKVCache.from_prompt(cfg, pk, pv, jnp.asarray(lengths, jnp.int32), S, headroom=headroom,
                                            group=G, window=R, dtype=jnp.float32)
    _check_dense(cache, truth_k, truth_v, lengths)
    q_len0 = np.asarray(cache.layers[0].q_len)
    write, flush = jax.jit(lambda c, i, k, v, s: c.write(i, k, v, s), static_argnums=1), jax.jit(
        lambda c: c.flush(headroom))
    for step in range(12):
        starts = jnp.asarray(lengths, jnp.int32)
        for i in range(2):
            junk = jnp.asarray(rng.standard_normal((B, KV, headroom, HD)), jnp.float32)
            cache = write(cache, i, junk, -junk, starts)  # a draft's K/V, overwritten next
            idx = lengths[:, None] + np.arange(headroom)
            new = [np.stack([t[i][b][:, idx[b]] for b in range(B)]) for t in (truth_k, truth_v)]
            cache = write(cache, i, jnp.asarray(new[0], jnp.float32), jnp.asarray(new[1], jnp.float32), starts)
        lengths = lengths + rng.integers(1, headroom + 1, B)  # what acceptance kept
        cache = flush(cache.replace(lengths=jnp.asarray(lengths, jnp.int32)))
        _check_dense(cache, truth_k, truth_v, lengths)
    assert np.all(np.asarray(cache.layers[0].q_len) > q_len0)  # groups were quantized on the way


@pytest.mark.parametrize("view", ["int8", "int4"])
def test_hierarchical_attend_is_attention_over_its_dense_read(view):
    """A decode step: the new token's K/V written at each row's length, its query there."""
    rng = np.random.default_rng(SEED + 4)
    cfg, G, R, S = _cfg(1), 8, 20, 64
    lengths = np.asarray([37, 9])
    k, v = _kv(rng, 40)
    cache = HierarchicalKVCache.from_prompt(cfg, (k,), (v,), jnp.asarray(lengths, jnp.int32), S, headroom=1,
                                            group=G, window=R, dtype=jnp.float32)
    cache = cache.write(0, *_kv(rng, 1), jnp.asarray(lengths, jnp.int32))
    pos = jnp.asarray(lengths[:, None], jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, 1, H, HD)), jnp.float32)
    dk, dv = cache.dense(0, view)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(f64(q), np.asarray(pos), f64(dk), f64(dv), k_pos, np.ones((B, S), bool))
    np.testing.assert_allclose(f64(cache.attend(0, q, pos, view=view)), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- forward sees only the interface


def test_forward_uses_only_the_interface(tiny_float_and_int4):
    """A cache that forwards the interface's calls to a `KVCache` (and records them) gives forward's
    logits over the KVCache itself: forward asks nothing else of a cache."""
    params = tiny_float_and_int4[1]
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def write(self, i, k, v, starts):
            calls.append(("write", i))
            return Recording(self.inner.write(i, k, v, starts))

        def attend(self, i, q, positions, view="int8"):
            calls.append(("attend", i, view))
            return self.inner.attend(i, q, positions, view)

    toks = jnp.asarray([[5, 6, 7], [8, 9, 10]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2], [4, 5, 6]], jnp.int32)
    cache = KVCache.create(TINY, 2, 16, jnp.float32)
    want, want_cache = forward(params, toks, pos, cache, config=TINY, mode="w4a16")
    got, got_cache = forward(params, toks, pos, Recording(cache), config=TINY, mode="w4a16", kv_view="int4")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree_util.tree_leaves(got_cache.inner), jax.tree_util.tree_leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert calls == [c for i in range(TINY.num_layers) for c in (("write", i), ("attend", i, "int4"))]
