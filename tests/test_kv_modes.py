"""The hierarchical INT8 KV cache wired into the engine: model.forward over a HierarchicalKVCache
(int8 / int4 views) against a bf16 KVCache holding the same (dequantized) values, and generation
with kv="int8" (greedy QSpec == plain greedy W4A16 on the same cache, tiny model and SmolLM2)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import quantize
from qspec_jax.config import get_preset
from qspec_jax.hierarchical_kv import HierarchicalKVCache
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import forward as _forward

forward = jax.jit(_forward, static_argnames=("config", "mode", "kv_view"))

from conftest import TEST_SEED as SEED  # noqa: E402  (printed with every test)

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny_qparams(tiny_float_and_int4):
    return tiny_float_and_int4[1]


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
    """A KVCache holding what the hierarchical cache's `view` reads for a query at each row's
    length L: dequantized planes below the cut c(L), the recent buffer from c(L) on."""
    k, v = zip(*(hier.dense(i, view) for i in range(len(hier.layers))))
    return KVCache(k=k, v=v, lengths=hier.lengths)


@pytest.mark.parametrize("view", ["int8", "int4"])
def test_forward_reads_the_view(tiny_qparams, view):
    """A decode step over the hierarchical cache gives the logits of the plain path over a cache
    holding the view's dequantized values below the query's cut and the buffer from it; a verify
    block of gamma + 1 tokens gives the logits of gamma + 1 single steps (each followed by the
    cache's maintenance), so what a query sees depends on its position only (groups quantized and
    dropped from the buffer in between, blocks straddling cut changes)."""
    rng = np.random.default_rng(SEED)
    lens = jnp.asarray([70, 5, 33], jnp.int32)
    toks = jnp.asarray(rng.integers(3, TINY.vocab_size, (3, 70)), jnp.int32)
    G, R, headroom = 16, 26, 4  # delay 8: window >= 16 + 8 + 4 - 2
    _, hier = _prefilled(tiny_qparams, toks, lens, 128, group=G, window=R, headroom=headroom)
    assert int(hier.layers[0].q_len[0]) > 0  # the long row has quantized groups
    q_len0, r_start0 = hier.layers[0].q_len, hier.layers[0].r_start
    for step in range(10):
        t = 1 if step % 3 else headroom
        new = jnp.asarray(rng.integers(3, TINY.vocab_size, (3, t)), jnp.int32)
        pos = hier.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
        if t == 1:
            want, _ = forward(tiny_qparams, new, pos, _as_plain(hier, view), config=TINY, mode="w4a16")
        else:  # one token at a time, with maintenance in between (plain decoding's schedule)
            seq, wants = hier, []
            for i in range(t):
                w, seq = forward(tiny_qparams, new[:, i:i + 1], pos[:, i:i + 1], seq, config=TINY, mode="w4a16",
                                 kv_view=view)
                wants.append(w)
                seq = seq.replace(lengths=seq.lengths + 1).flush(1)
            want = jnp.concatenate(wants, axis=1)
        got, hier = forward(tiny_qparams, new, pos, hier, config=TINY, mode="w4a16", kv_view=view)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4, err_msg=f"step {step}")
        hier = hier.replace(lengths=hier.lengths + t).flush(headroom)
        if t > 1:  # the maintained state depends on the lengths only
            for a, b in zip(jax.tree_util.tree_leaves(hier), jax.tree_util.tree_leaves(seq)):
                if a.dtype == jnp.int32:
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(hier.layers[0].q_len[2]) > int(q_len0[2])  # the middle row quantized a group during decoding
    assert int(hier.layers[0].r_start[2]) > int(r_start0[2])  # ... and dropped one from its buffer


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


# ---------------------------------------------------------------- generation with kv="int8"

from qspec_jax.speculative import generate, pad_prompts  # noqa: E402


def _plain(params, toks, lens, config, n, **kw):
    return generate(params, toks, lens, config=config, max_new_tokens=n, gamma=0, verify_mode="w4a16", **kw)


@pytest.mark.parametrize("draft", ["w4a4", "w4a8"])
def test_greedy_qspec_equals_w4a16_int8_tiny(tiny_qparams, draft):
    """Contract 3 on the int8 cache (prefill quantizes groups of the longer rows, short generation):
    greedy QSpec, drafting on the INT4 view, emits exactly plain greedy W4A16 on the INT8 view."""
    rng = np.random.default_rng(SEED)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (49, 20, 5)])
    kv = dict(kv="int8", kv_group=16, kv_window=48, eos_ids=())
    base = _plain(tiny_qparams, toks, lens, TINY, 10, **kv)
    for gamma in (1, 3):
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=10, gamma=gamma, draft_mode=draft, **kv)
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens), err_msg=f"gamma={gamma}")
        s = res.summary()
        assert s["new_tokens"] == 3 * 10 and 0 < s["drafted"]


@pytest.mark.parametrize("draft", ["w4a4", "w4a8"])
def test_qspec_int8_with_flushes_tiny(tiny_qparams, draft):
    """With groups quantized and dropped from the buffer during generation (48 tokens = 3 groups,
    ragged prompts at every phase of a group): what a query reads depends on its position only
    (planes below c(p), buffer from it), so greedy QSpec equals plain greedy W4A16 on the same int8
    cache token for token at every gamma; plain int8 stays close to the bf16 cache's output."""
    rng = np.random.default_rng(SEED)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (3, 40, 17, 1, 31)])
    kv = dict(kv="int8", kv_group=16, kv_window=32, eos_ids=())  # delay 8: gamma + 1 <= 8
    base = np.asarray(_plain(tiny_qparams, toks, lens, TINY, 48, **kv).tokens)
    bf16 = np.asarray(_plain(tiny_qparams, toks, lens, TINY, 48, eos_ids=()).tokens)
    assert np.mean(base == bf16) > 0.5
    for gamma in (1, 2, 3, 5, 7):
        res = generate(tiny_qparams, toks, lens, config=TINY, max_new_tokens=48, gamma=gamma, draft_mode=draft, **kv)
        np.testing.assert_array_equal(np.asarray(res.tokens), base, err_msg=f"gamma={gamma}")
        assert 0 < res.summary()["accepted"]


def test_int8_chunked_prefill_and_capacity(tiny_qparams):
    """A chunked prefill gives the same int8 generation; a cache that cannot take a cycle is refused
    on the host with a clear message."""
    rng = np.random.default_rng(SEED + 2)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (37, 9)])
    kw = dict(config=TINY, max_new_tokens=16, gamma=3, kv="int8", kv_group=16, kv_window=32, eos_ids=())
    one = generate(tiny_qparams, toks, lens, prefill_chunk=0, **kw)
    chunked = generate(tiny_qparams, toks, lens, prefill_chunk=16, **kw)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(chunked.tokens))
    with pytest.raises(ValueError, match="kv='int8'.*window"):
        generate(tiny_qparams, toks, lens, **{**kw, "kv_window": 18})  # needs 16 + 8 + 4 - 2
    with pytest.raises(ValueError, match="kv='int8'.*delay"):
        generate(tiny_qparams, toks, lens, **{**kw, "gamma": 8})  # gamma + 1 > delay 8
    with pytest.raises(ValueError, match="unknown kv"):
        generate(tiny_qparams, toks, lens, **{**kw, "kv": "int4"})


def test_greedy_qspec_equals_w4a16_int8_on_smollm2(smollm2, smollm2_tokenizer):
    """The real model on the int8 cache (group 64, window 128, delay 32: the longer prompts quantize
    groups at prefill, every row quantizes and drops more during generation): greedy QSpec == plain
    greedy W4A16, token for token."""
    from qspec_jax.datasets import humaneval_prompts, sharegpt_prompts

    config, params = smollm2
    qp = quantize.quantize_params(params, config, dtype=jnp.float32)
    code = humaneval_prompts(4)
    texts = code + sharegpt_prompts(3) + ["\n".join(code[:3])]  # the last, ~300 tokens, quantizes at prefill
    toks, lens = pad_prompts([smollm2_tokenizer.encode(t) for t in texts], multiple=64)
    assert int(np.max(np.asarray(lens))) > 128  # some rows quantize groups at prefill
    kv = dict(kv="int8", kv_group=64, kv_window=128)
    base = _plain(qp, toks, lens, config, 48, eos_ids=(), **kv)
    for draft, gamma in (("w4a4", 3), ("w4a8", 5)):
        res = generate(qp, toks, lens, config=config, max_new_tokens=48, gamma=gamma, draft_mode=draft, eos_ids=(), **kv)
        np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(base.tokens), err_msg=f"{draft} g={gamma}")
        assert res.summary()["acceptance_rate"] > 0.3


def test_cli_kv_flag():
    from qspec_jax.generate import parse_args

    assert parse_args(["--prompt", "x"]).kv == "bf16"
    assert parse_args(["--prompt", "x", "--kv", "int8"]).kv == "int8"
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "x", "--kv", "int4"])


def test_bf16_cache_read_through_the_kernel_matches_einsum(tiny_qparams, monkeypatch):
    """On the GPU, decode and verify passes over a bf16 cache read it through the flash-decoding
    kernel (kv_cache.KERNEL_ATTENTION_BACKEND); here it runs in interpret mode against the einsum path:
    the same logits for a verify block over a prefilled cache with rows of different lengths."""
    import qspec_jax.kv_cache as kv_cache

    rng = np.random.default_rng(SEED)
    toks, lens = pad_prompts([list(rng.integers(3, TINY.vocab_size, n)) for n in (37, 9)])
    cache, _ = _prefilled(tiny_qparams, toks, lens, 64, group=16, window=48, headroom=4)
    block = jnp.asarray(rng.integers(3, TINY.vocab_size, (2, 4)), jnp.int32)
    pos = lens[:, None] + jnp.arange(4, dtype=jnp.int32)
    ref, ref_cache = _forward(tiny_qparams, block, pos, cache, config=TINY, mode="w4a16")
    monkeypatch.setattr(kv_cache, "KERNEL_ATTENTION_BACKEND", "interpret")
    out, out_cache = _forward(tiny_qparams, block, pos, cache, config=TINY, mode="w4a16")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-4, atol=2e-4)
    # Layer 1's new keys come from layer 0's attention output: equal up to f32 rounding.
    np.testing.assert_allclose(np.asarray(out_cache.k[1]), np.asarray(ref_cache.k[1]), rtol=1e-4, atol=1e-5)
