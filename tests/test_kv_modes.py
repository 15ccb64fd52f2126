"""The hierarchical INT8 KV cache wired into the engine: model.forward over a HierarchicalKVCache
(int8 / int4 views) against a bf16 KVCache holding the same (dequantized) values, and generation
with kv="int8" (greedy QSpec == plain greedy W4A16 on the same cache, tiny model and SmolLM2)."""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, quantize
from qspec_jax import hierarchical_kv as hkv
from qspec_jax.config import get_preset
from qspec_jax.kv_cache import HierarchicalKVCache, KVCache, flush
from qspec_jax.model import forward as _forward

forward = jax.jit(_forward, static_argnames=("config", "mode", "kv_view"))

TINY = get_preset("tiny")
SEED = int(os.environ.get("QSPEC_TEST_SEED", secrets.randbits(30)))


@pytest.fixture(autouse=True)
def print_seed():
    print(f"QSPEC_TEST_SEED={SEED}")


@pytest.fixture(scope="module")
def tiny_qparams():
    params = checkpoint.random_params(TINY, seed=SEED, dtype=jnp.float32)
    return quantize.quantize_params(params, TINY, rotate=True, seed=SEED, dtype=jnp.float32)


def _prefilled(params, toks, lens, max_len, *, group, window, headroom):
    """(bf16-path KVCache, HierarchicalKVCache) after a causal prefill of toks [B, P]."""
    b, p = toks.shape
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    cache = KVCache.create(TINY, b, max_len, jnp.float32)
    _, cache = forward(params, toks, pos, cache, config=TINY, mode="w4a16")
    hier = HierarchicalKVCache.from_prompt(TINY, tuple(k[:, :, :p] for k in cache.k), tuple(v[:, :, :p] for v in cache.v),
                                           lens, max_len, headroom=headroom, group=group, window=window,
                                           dtype=jnp.float32)
    return cache.replace(lengths=lens), hier


def _as_plain(hier: HierarchicalKVCache, view: str) -> KVCache:
    """A KVCache holding what the hierarchical cache's `view` reads: dequantized planes below q_len,
    the recent buffer from q_len on."""
    ks, vs = [], []
    for c in hier.layers:
        k, v = hkv.dequantize_planes(c.planes(), view)
        S, R = c.max_len, c.window
        pos = jnp.arange(S)
        r = jnp.clip(pos[None, :] - c.q_len[:, None], 0, R - 1)  # [B, S]
        idx = r[:, None, :, None]
        in_buf = (pos[None, :] >= c.q_len[:, None])[:, None, :, None]
        ks.append(jnp.where(in_buf, jnp.take_along_axis(c.k_recent, idx, axis=2), k))
        vs.append(jnp.where(in_buf, jnp.take_along_axis(c.v_recent, idx, axis=2), v))
    return KVCache(k=tuple(ks), v=tuple(vs), lengths=hier.lengths)


@pytest.mark.parametrize("view", ["int8", "int4"])
def test_forward_reads_the_view(tiny_qparams, view):
    """Decode steps and a gamma+1 verify block over the hierarchical cache give the logits of the
    plain path over a cache holding the view's dequantized values (groups flushed in between)."""
    rng = np.random.default_rng(SEED)
    lens = jnp.asarray([70, 5, 33], jnp.int32)
    toks = jnp.asarray(rng.integers(3, TINY.vocab_size, (3, 70)), jnp.int32)
    G, R, headroom = 16, 40, 4
    _, hier = _prefilled(tiny_qparams, toks, lens, 128, group=G, window=R, headroom=headroom)
    assert int(hier.layers[0].q_len[0]) > 0  # the long row has quantized groups
    q_len0 = hier.layers[0].q_len
    for step in range(8):
        t = 1 if step % 3 else headroom
        new = jnp.asarray(rng.integers(3, TINY.vocab_size, (3, t)), jnp.int32)
        pos = hier.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
        plain = _as_plain(hier, view)
        want, _ = forward(tiny_qparams, new, pos, plain, config=TINY, mode="w4a16")
        got, hier = forward(tiny_qparams, new, pos, hier, config=TINY, mode="w4a16", kv_view=view)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4, err_msg=f"step {step}")
        hier = flush(hier.replace(lengths=hier.lengths + t), headroom)
    assert int(hier.layers[0].q_len[2]) > int(q_len0[2])  # the middle row flushed during decoding


def test_int8_view_close_to_bf16(tiny_qparams):
    """The int8 view's logits are close to the full-precision cache's, the int4 view's further."""
    rng = np.random.default_rng(SEED + 1)
    lens = jnp.asarray([90, 64], jnp.int32)
    toks = jnp.asarray(rng.integers(3, TINY.vocab_size, (2, 90)), jnp.int32)
    plain, hier = _prefilled(tiny_qparams, toks, lens, 128, group=16, window=32, headroom=1)
    new = jnp.asarray([[7], [9]], jnp.int32)
    pos = lens[:, None]
    ref, _ = forward(tiny_qparams, new, pos, plain, config=TINY, mode="w4a16")
    err = {}
    for view in ("int8", "int4"):
        got, _ = forward(tiny_qparams, new, pos, hier, config=TINY, mode="w4a16", kv_view=view)
        err[view] = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    assert err["int8"] < 0.02 and err["int8"] < err["int4"], err


def test_bad_kv_view(tiny_qparams):
    toks = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="kv_view"):
        _forward(tiny_qparams, toks, toks, None, config=TINY, mode="w4a16", kv_view="int2")
