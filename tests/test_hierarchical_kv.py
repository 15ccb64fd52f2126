"""The hierarchical KV cache: quantization round trips and error bounds, the write / flush life cycle
with rows at different lengths (drafts overwritten by the verifier), and attention over it.

Fresh random inputs per test (seed printed, pin with QSPEC_TEST_SEED). Planes are decoded by NumPy
independently of the package (tests/test_decode_attention.np_dequant).
"""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import hierarchical_kv as hkv
from test_decode_attention import KERNEL_BACKENDS, f64, np_attention, np_dequant, np_unpack


@pytest.fixture
def rng():
    seed = int(os.environ.get("QSPEC_TEST_SEED", secrets.randbits(32)))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def kv_like(rng, shape, offset=0.0, outliers=True):
    """Keys-like data: per-channel offsets and a few outlier channels (why keys are quantized per
    channel: over a token they would set the range)."""
    x = rng.standard_normal(shape)
    x += offset * rng.standard_normal(shape[-1])  # per-channel offset
    if outliers:
        x[..., :: max(1, shape[-1] // 4)] *= 8
    return x.astype(np.float32)


@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.float32])
@pytest.mark.parametrize("axis", [2, 3])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_quantize_planes_round_trip_and_bounds(rng, scale_dtype, axis, offset):
    """Per element: INT4 error <= s/2, INT8 <= s/16 (s/32 unless the residual code clips); relative
    Frobenius error INT8 < 1e-2, INT4 < 0.15. Large per-channel offsets (|m| >> range) stay exact to
    the bound because m is rounded down and s up before the codes are computed."""
    x = kv_like(rng, (2, 3, 64, 64), offset if axis == 2 else 0.0, outliers=axis == 2)
    u, l, s, m = hkv.quantize_planes(jnp.asarray(x), axis, scale_dtype)
    assert u.dtype == jnp.uint8 and u.shape == (2, 3, 64, 32) and s.dtype == scale_dtype
    uc, lc = np_unpack(u), np_unpack(l)
    sf, mf = np.asarray(s, np.float64), np.asarray(m, np.float64)
    int4 = uc * sf + mf
    int8 = uc * sf + (lc - 8) * sf / 16 + mf
    x64 = x.astype(np.float64)
    assert (np.abs(int4 - x64) <= sf / 2 * (1 + 1e-5) + 1e-6 * np.abs(x64)).all()
    assert (np.abs(int8 - x64) <= sf / 16 * (1 + 1e-5) + 1e-6 * np.abs(x64)).all()
    clipped = lc == 15
    assert (np.abs(int8 - x64)[~clipped] <= np.broadcast_to(sf / 32, x.shape)[~clipped] * (1 + 1e-4) + 1e-6 * np.abs(x64)[~clipped]).all()
    centered = x64 - x64.mean(axis=axis, keepdims=True)
    rel = lambda y: np.linalg.norm(y - x64) / np.linalg.norm(centered)
    assert rel(int8) < 1e-2 and rel(int4) < 0.15, (rel(int8), rel(int4))
    # The package's own decode agrees with NumPy's.
    from pallas_kernels.decode_attention import unpack_planes
    np.testing.assert_array_equal(np.asarray(unpack_planes(u)), uc)


def test_quantize_constant_and_extremes():
    x = np.zeros((1, 1, 16, 32), np.float32)
    x[0, 0, :, 1] = 3.0  # constant channel: s -> 1, exact
    u, l, s, m = hkv.quantize_planes(jnp.asarray(x), 2)
    deq = np_unpack(u) * np.asarray(s, np.float64) + (np_unpack(l) - 8) * np.asarray(s, np.float64) / 16 + np.asarray(m, np.float64)
    np.testing.assert_array_equal(deq, x)
    # The extremes of a group are represented: min -> (u=0, l=8), max within the bound.
    y = np.linspace(-2, 5, 32, dtype=np.float32).reshape(1, 1, 1, 32)
    u, l, s, m = hkv.quantize_planes(jnp.asarray(y), 3)
    assert np_unpack(u).min() == 0 and np_unpack(u).max() == 15


def test_quantize_group_layout(rng):
    """Keys: one (s, m) per channel over the group's tokens; values: one per token."""
    k = jnp.asarray(kv_like(rng, (2, 2, 32, 64)))
    v = jnp.asarray(kv_like(rng, (2, 2, 32, 64)))
    q = hkv.quantize_group(k, v)
    assert q["k_scale"].shape == (2, 2, 64) and q["v_scale"].shape == (2, 2, 32)
    np.testing.assert_allclose(np.asarray(q["k_min"], np.float64), np.asarray(k).min(axis=2), rtol=2e-3)
    np.testing.assert_allclose(np.asarray(q["v_min"], np.float64), np.asarray(v).min(axis=3), rtol=2e-3)


def np_cut(cache, p):
    """c(p) = G * floor(max(p + 1 - D, 0) / G), in NumPy."""
    return np.maximum(np.asarray(p) + 1 - cache.delay, 0) // cache.group * cache.group


def np_dense(cache, q_pos, variant):
    """float64 (k, v, positions, valid) of what attention may read for queries at q_pos [B]: plane
    slots below the query's cut c(p), then the buffer's ring (position p in slot p mod R) from c(p) on."""
    kd, vd = np_dequant(cache.planes(), variant, hkv.V_LAYOUT)
    B, S = kd.shape[0], kd.shape[2]
    rs, R, c = np.asarray(cache.r_start), cache.window, np_cut(cache, q_pos)
    assert (c <= np.asarray(cache.q_len)).all() and (rs <= c).all()
    k = np.concatenate([kd, f64(cache.k_recent)], axis=2)
    v = np.concatenate([vd, f64(cache.v_recent)], axis=2)
    r_pos = rs[:, None] + (np.arange(R) - rs[:, None]) % R  # computed here, not by slot_positions
    pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), r_pos], axis=1)
    valid = np.concatenate([np.arange(S) < c[:, None], r_pos >= c[:, None]], axis=1)
    return k, v, pos, valid


def check_cache(cache, truth_k, truth_v, lengths, headroom):
    """The state is a function of the lengths (q_len = G floor(len / G), r_start = c(len)); buffer
    entries equal the truth exactly; plane entries within the INT8 / INT4 bounds of it."""
    G, R = cache.group, cache.window
    ql, rs, lengths = np.asarray(cache.q_len), np.asarray(cache.r_start), np.asarray(lengths)
    np.testing.assert_array_equal(ql, lengths // G * G)
    np.testing.assert_array_equal(rs, np_cut(cache, lengths))
    assert (lengths - rs + headroom <= R).all(), (lengths, rs)
    kr, vr = f64(cache.k_recent), f64(cache.v_recent)
    ks = np.repeat(f64(cache.k_scale), G, axis=2)
    vs = f64(cache.v_scale)[..., None]
    for variant, frac in (("int8", 1 / 16), ("int4", 1 / 2)):
        kd, vd = np_dequant(cache.planes(), variant, hkv.V_LAYOUT)
        for b in range(len(ql)):
            ring = np.arange(rs[b], lengths[b]) % R  # the slots of the buffered positions
            np.testing.assert_array_equal(kr[b][:, ring], truth_k[b, :, rs[b]:lengths[b]])
            np.testing.assert_array_equal(vr[b][:, ring], truth_v[b, :, rs[b]:lengths[b]])
            q = ql[b]
            assert (np.abs(kd[b, :, :q] - truth_k[b, :, :q]) <= ks[b, :, :q] * frac * 1.0001 + 1e-5).all(), variant
            assert (np.abs(vd[b, :, :q] - truth_v[b, :, :q]) <= vs[b, :, :q] * frac * 1.0001 + 1e-5).all(), variant


def test_life_cycle_rows_at_different_lengths(rng):
    """Prefill ragged prompts, then draft / verify / accept / flush cycles in which every row accepts
    its own number of tokens. Drafts are junk that the verifier must overwrite; flushed groups must
    equal quantize_group of the true (accepted) tokens. Every group is quantized once complete and
    dropped from the buffer once no query at or past the length reads it there."""
    B, KV, hd, G, R, gamma, max_len = 3, 2, 64, 16, 28, 3, 256
    h = gamma + 1
    cache = hkv.create(B, KV, hd, max_len, group=G, window=R)
    hkv.check_capacity(cache, h, max_len)
    truth_k = kv_like(rng, (B, KV, max_len + h, hd)).astype(jnp.bfloat16).astype(np.float64)
    truth_v = kv_like(rng, (B, KV, max_len + h, hd)).astype(jnp.bfloat16).astype(np.float64)
    lengths = np.array([5, 40, 70])  # 0, 2 and 4 groups quantized at prefill
    P = 70
    prefill = jax.jit(hkv.prefill, static_argnums=4)
    cache = prefill(cache, jnp.asarray(truth_k[:, :, :P], jnp.bfloat16), jnp.asarray(truth_v[:, :, :P], jnp.bfloat16),
                    jnp.asarray(lengths), h)
    check_cache(cache, truth_k, truth_v, lengths, h)
    write, flush = jax.jit(hkv.write), jax.jit(hkv.flush, static_argnums=2)
    flushes, shifts = 0, 0
    for cycle in range(40):
        starts = jnp.asarray(lengths, jnp.int32)
        for i in range(gamma):  # draft steps write junk at len + i
            junk = jnp.asarray(rng.standard_normal((B, KV, 1, hd)) * 100, jnp.bfloat16)
            cache = write(cache, junk, junk, starts + i)
        sl = lambda t: jnp.asarray(np.stack([t[b, :, lengths[b]:lengths[b] + h] for b in range(B)]), jnp.bfloat16)
        cache = write(cache, sl(truth_k), sl(truth_v), starts)  # the verify pass overwrites the drafts
        lengths = np.minimum(lengths + rng.integers(1, h + 1, B), max_len - h)
        before, rs_before = np.asarray(cache.q_len), np.asarray(cache.r_start)
        cache = flush(cache, jnp.asarray(lengths), h)
        flushed = np.asarray(cache.q_len) != before
        flushes += flushed.sum()
        shifts += (np.asarray(cache.r_start) != rs_before).sum()
        for b in np.nonzero(flushed)[0]:  # the new group equals a direct quantization of the truth
            g0 = before[b]
            grp = lambda t: jnp.asarray(t[b:b + 1, :, g0:g0 + G], jnp.bfloat16)
            want = hkv.quantize_group(grp(truth_k), grp(truth_v))
            for name in ("k_upper", "k_lower", "v_scale", "v_min"):
                np.testing.assert_array_equal(np.asarray(getattr(cache, name)[b, :, g0:g0 + G]), np.asarray(want[name][0]))
            for name in ("v_upper", "v_lower"):  # stored transposed: [B, KV, hd/2, S]
                np.testing.assert_array_equal(np.asarray(getattr(cache, name)[b, :, :, g0:g0 + G]),
                                              np.swapaxes(np.asarray(want[name][0]), -1, -2))
            for name in ("k_scale", "k_min"):
                np.testing.assert_array_equal(np.asarray(getattr(cache, name)[b, :, g0 // G]), np.asarray(want[name][0]))
        check_cache(cache, truth_k, truth_v, lengths, h)
    assert flushes >= 8 and shifts >= 8


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_attention_over_the_cache(rng, variant):
    """Verify-pass attention (gamma + 1 causal queries) over a prefilled cache: kernel and reference
    equal float64 attention over the cache's own contents; against the unquantized K/V the INT8 view
    is close and the INT4 view further off but bounded."""
    B, KV, H, hd, G, R, T, max_len = 2, 2, 6, 64, 32, 64, 4, 256  # delay 16
    cache = hkv.create(B, KV, hd, max_len, group=G, window=R, dtype=jnp.float32, scale_dtype=jnp.float32)
    k = kv_like(rng, (B, KV, 200, hd), 2.0)
    v = kv_like(rng, (B, KV, 200, hd), outliers=False)
    lengths = np.array([173, 46])  # both blocks straddle a cut change: c(173) = 128, c(176) = 160; 0 -> 32
    cache = hkv.prefill(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), T)
    assert list(np.asarray(cache.q_len)) == [160, 32] and list(np.asarray(cache.r_start)) == [128, 0]
    # The verify pass writes its T tokens (positions len .. len+T-1) before attending.
    new = lambda x: jnp.asarray(np.stack([x[b, :, lengths[b]:lengths[b] + T] for b in range(B)]))
    cache = hkv.write(cache, new(k), new(v), jnp.asarray(lengths))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    q_pos = jnp.asarray(lengths[:, None] + np.arange(T), jnp.int32)
    want = np.concatenate([np_attention(f64(q[:, t:t + 1]), q_pos[:, t:t + 1], *np_dense(cache, np.asarray(q_pos[:, t]), variant))
                           for t in range(T)], axis=1)  # each query over its own visible set
    k_pos = np.broadcast_to(np.arange(200), (B, 200))
    exact = np_attention(f64(q), q_pos, k.astype(np.float64), v.astype(np.float64), k_pos, np.ones((B, 200), bool))
    for backend in KERNEL_BACKENDS + ["reference"]:
        out = f64(hkv.attention(cache, q, q_pos, view=variant, backend=backend))
        assert np.abs(out - want).max() < 2e-5, backend
        rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        assert rel < (0.02 if variant == "int8" else 0.25), (backend, rel)


def test_flush_inside_jit_loop_and_bad_config():
    """write and flush_layers trace inside a lax.fori_loop (as in the generate program)."""
    B, KV, hd, G, R = 2, 1, 32, 16, 32
    caches = (hkv.create(B, KV, hd, 128, group=G, window=R),) * 2  # two layers

    def step(i, c):
        caches, lengths = c
        x = jnp.full((B, KV, 2, hd), i, jnp.bfloat16)
        caches = tuple(hkv.write(c, x, -x, lengths) for c in caches)
        lengths = lengths + jnp.asarray([2, 1])
        return hkv.flush_layers(caches, lengths, 2), lengths

    caches, lengths = jax.jit(lambda c: jax.lax.fori_loop(0, 40, step, (c, jnp.zeros((B,), jnp.int32))))(caches)
    assert list(np.asarray(lengths)) == [80, 40]
    for cache in caches:
        assert list(np.asarray(cache.q_len)) == [80, 32] and list(np.asarray(cache.r_start)) == [64, 32]
        kd, vd = np_dequant(cache.planes(), "int8", hkv.V_LAYOUT)  # position p of row 0 was written in step p // 2
        np.testing.assert_allclose(kd[0, 0, :80, 0], np.arange(80) // 2, atol=0.03)  # s = 7/15 per group
        np.testing.assert_allclose(vd[0, 0, :80, 0], -(np.arange(80) // 2), atol=0.03)
        assert float(cache.k_recent[0, 0, 0, 0]) == 32 and float(cache.k_recent[1, 0, 0, 0]) == 32
    with pytest.raises(ValueError, match="headroom"):
        hkv.check_capacity(cache, 17, 100)
    with pytest.raises(ValueError, match="window"):
        hkv.flush(hkv.create(1, 1, 32, 64, group=16, window=20), jnp.zeros((1,), jnp.int32), 8)
    with pytest.raises(ValueError, match="fit"):
        hkv.check_capacity(cache, 4, 1000)


@pytest.mark.parametrize("gamma,draft,recent_copies", [(0, "w4a16", 4), (3, "w4a8", 0)])
def test_int8_decode_loop_copies_no_plane(gamma, draft, recent_copies):
    """The compiled INT8-cache decode loop updates the planes in place: flushing after a cycle's
    attention had read them made XLA copy a layer's planes every cycle (at gamma 0, 12 copies of the
    4-bit planes in this program, in the flush conditional's branches and the loop body); each cycle
    now flushes first. The recent buffers, a ring, need no shift: with one, this program copied all
    6 of them in the shift conditional and 6 in the loop body (24 in all); at gamma 0 one layer's
    two are still copied twice in the body."""
    import re

    from qspec_jax import checkpoint, quantize
    from qspec_jax.model import fuse_projections, unstack_layers
    from qspec_jax.spec import GenerationSpec
    from qspec_jax.speculative import decode_jit
    from test_layer_layout import CFG

    params = checkpoint.random_params(CFG, seed=3, dtype=jnp.float32)
    qp = unstack_layers(fuse_projections(quantize.quantize_params(params, CFG, group_size=64, dtype=jnp.float32)))
    b, prompt, slots, group = 2, 40, 512, 32
    kv = tuple(jnp.ones((b, CFG.num_kv_heads, prompt, CFG.head_dim), jnp.float32) for _ in range(CFG.num_layers))
    cache = hkv.HierarchicalKVCache.from_prompt(CFG, kv, kv, jnp.asarray([30, 37], jnp.int32), slots, headroom=gamma + 1,
                                                group=group, window=96, dtype=jnp.float32)
    spec = GenerationSpec(config=CFG, max_new_tokens=32, gamma=gamma, draft_mode=draft, verify_mode="w4a16",
                          eos_ids=(), kv="int8", kv_group=group, kv_window=96)
    text = decode_jit.lower(qp, cache, jnp.asarray([3, 4], jnp.int32), jax.random.PRNGKey(0), None, None,
                            spec=spec).compile().as_text()
    hd2 = CFG.head_dim // 2
    planes = [f"u8[{b},{CFG.num_kv_heads},{slots},{hd2}]", f"u8[{b},{CFG.num_kv_heads},{hd2},{slots}]"]
    assert all(p in text for p in planes)  # the pattern below looks for the right buffers
    copies = [c for p in planes for c in re.findall(re.escape(p) + r"\{[^}]*\} copy\(", text)]
    assert not copies, f"{len(copies)} plane-sized copies"
    recent = f"f32[{b},{CFG.num_kv_heads},96,{CFG.head_dim}]"
    assert recent in text
    copies = re.findall(re.escape(recent) + r"\{[^}]*\} copy\(", text)
    assert len(copies) <= recent_copies, f"{len(copies)} copies of recent buffers"
