"""Decode attention kernels (bf16 / int8 / int4 planes + recent buffer) against float64 NumPy.

Every case draws fresh random inputs (seed printed, pin with QSPEC_TEST_SEED). The kernels run in
interpret mode on CPU and compiled (backend="triton") on a GPU; the plain-jnp reference runs too.
The NumPy check decodes the planes itself (nibble layout and formula from the module docstring)
and computes masked softmax attention in float64. Tolerances are max-abs errors over outputs of
size ~1: f32 inputs 2e-5 (f32 accumulation, scales folded into q and p in f32), bf16 inputs 3e-2
(q, probabilities and scaled queries rounded to bf16 before the dots).
"""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (DEFAULTS, QuantKV, decode_attention, decode_attention_reference, pick_splits,
                                             ring_block)
from test_kernels import TRITON_TARGETS, _export_cuda, verify_triton_modules  # noqa: F401 (fixture)

from conftest import kernel_backends  # noqa: E402

KERNEL_BACKENDS = kernel_backends()
BACKENDS = KERNEL_BACKENDS + ["reference"]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.fixture
def rng():
    seed = int(os.environ.get("QSPEC_TEST_SEED", secrets.randbits(32)))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def np_unpack(packed):
    p = np.asarray(packed).astype(np.int64)
    return np.concatenate([p & 15, p >> 4], axis=-1)


def np_dequant(kv: QuantKV, variant, v_layout="tokens"):
    """float64 (k, v) [B, KV, S, hd] decoded independently of the package; the value planes are
    [B, KV, hd/2, S] (v_layout "tokens", the only layout)."""
    assert v_layout == "tokens", v_layout
    kv = kv._replace(v_upper=np.swapaxes(np.asarray(kv.v_upper), -1, -2),
                     v_lower=np.swapaxes(np.asarray(kv.v_lower), -1, -2))
    S = kv.k_upper.shape[2]
    G = S // kv.k_scale.shape[2]
    ks = np.repeat(np.asarray(kv.k_scale, np.float64), G, axis=2)
    km = np.repeat(np.asarray(kv.k_min, np.float64), G, axis=2)
    vs, vm = np.asarray(kv.v_scale, np.float64)[..., None], np.asarray(kv.v_min, np.float64)[..., None]

    def val(u, l, s, m):
        u = np_unpack(u)
        if variant == "int4":
            return u * s + m
        return u * s + (np_unpack(l) - 8) * s / 16 + m

    return val(kv.k_upper, kv.k_lower, ks, km), val(kv.v_upper, kv.v_lower, vs, vm)


def np_attention(q, q_pos, k, v, k_pos, k_valid):
    """float64 masked attention. q [B, T, H, hd]; k, v [B, KV, S, hd]; k_pos, k_valid [B, S]."""
    q = np.asarray(q, np.float64)
    B, T, H, hd = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, T, KV, H // KV, hd)
    s = np.einsum("btgrd,bgsd->btgrs", qg, k) / np.sqrt(hd)
    mask = k_valid[:, None, None, None, :] & (k_pos[:, None, None, None, :] <= np.asarray(q_pos)[:, :, None, None, None])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("btgrs,bgsd->btgrd", p, v).reshape(B, T, H, hd)


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def random_planes(rng, B, KV, S, hd, G, scale_dtype=jnp.float16):
    """Random planes: keys [B, KV, S, hd/2], values transposed [B, KV, hd/2, S]."""
    u8 = lambda *shape: jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)  # noqa: E731
    return QuantKV(
        u8(B, KV, S, hd // 2), u8(B, KV, S, hd // 2),
        jnp.asarray(rng.uniform(0.02, 0.15, (B, KV, S // G, hd)), scale_dtype),
        jnp.asarray(rng.uniform(-1.2, -0.8, (B, KV, S // G, hd)), scale_dtype),
        u8(B, KV, hd // 2, S), u8(B, KV, hd // 2, S),
        jnp.asarray(rng.uniform(0.02, 0.15, (B, KV, S)), scale_dtype),
        jnp.asarray(rng.uniform(-1.2, -0.8, (B, KV, S)), scale_dtype),
    )


# (B, T, H, KV, hd, S): draft step (T=1) and verify passes (T = gamma+1 = 4, 5); SmolLM2's 9/3
# heads at hd 64 (rep*T = 15 -> 16 rows), Llama-3's 4x grouping at hd 128 (T=5: 20 -> 32 rows), MHA.
SHAPES = [
    (2, 1, 9, 3, 64, 128),
    (3, 5, 9, 3, 64, 256),
    (2, 5, 8, 2, 128, 128),
    (1, 4, 4, 4, 32, 64),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B,T,H,KV,hd,S", SHAPES)
def test_bf16_kv_matches_float64(rng, dtype, B, T, H, KV, hd, S):
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), dtype)
    k = jnp.asarray(rng.standard_normal((B, KV, S, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((B, KV, S, hd)), dtype)
    lens = jnp.asarray(rng.integers(0, S - T + 1, B), jnp.int32)  # rows at different lengths
    lens = lens.at[0].set(S - T)  # one row filling the cache
    q_pos = lens[:, None] + jnp.arange(T, dtype=jnp.int32)  # the caller has written the T new tokens
    kv_len = lens + T
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(f64(q), q_pos, f64(k), f64(v), k_pos, k_pos < np.asarray(kv_len)[:, None])
    for backend in BACKENDS:
        out = decode_attention(q, q_pos, (k, v), kv_len, backend=backend)
        assert out.shape == (B, T, H, hd) and out.dtype == dtype
        err = np.abs(f64(out) - want).max()
        assert err < TOL[dtype], (backend, err)


@pytest.mark.parametrize("block_k,splits", [(16, 1), (16, 7), (32, 3), (64, 64)])
def test_bf16_tilings(rng, block_k, splits):
    """Dynamic splits: more splits than blocks, one split, uneven division."""
    B, T, H, KV, hd, S = 2, 3, 6, 2, 64, 256
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, KV, S, hd)), jnp.float32) for _ in range(2))
    lens = jnp.asarray([37, 200], jnp.int32)
    q_pos = lens[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(f64(q), q_pos, f64(k), f64(v), k_pos, k_pos < np.asarray(lens + T)[:, None])
    for backend in KERNEL_BACKENDS:
        out = decode_attention(q, q_pos, (k, v), lens + T, block_k=block_k, splits=splits,
                               backend=backend)
        assert np.abs(f64(out) - want).max() < TOL[jnp.float32], backend


def test_keys_past_kv_len_and_position_are_masked(rng):
    """Garbage (huge values) in slots past kv_len or past the query's position changes nothing."""
    B, T, H, KV, hd, S = 2, 4, 4, 2, 64, 128
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    k, v = (rng.standard_normal((B, KV, S, hd)).astype(np.float32) for _ in range(2))
    lens = np.array([10, 60])
    kv_len = jnp.asarray(lens + T, jnp.int32)
    q_pos = jnp.asarray(lens[:, None] + np.arange(T), jnp.int32)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(f64(q), q_pos, k.astype(np.float64), v.astype(np.float64), k_pos, k_pos < np.asarray(kv_len)[:, None])
    for b in range(B):
        k[b, :, lens[b] + T:] = 1e4
        v[b, :, lens[b] + T:] = 1e4
    for backend in BACKENDS:
        out = decode_attention(q, q_pos, (jnp.asarray(k), jnp.asarray(v)), kv_len, backend=backend)
        assert np.abs(f64(out) - want).max() < TOL[jnp.float32], backend


@pytest.mark.parametrize("variant", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B,T,H,KV,hd,S", SHAPES[:3])
def test_quantized_planes_with_recent_buffer(rng, variant, dtype, B, T, H, KV, hd, S):
    G, R = 64, 96
    kv = random_planes(rng, B, KV, S, hd, G)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, hd)), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), dtype)
    q_len = jnp.asarray(rng.integers(0, S // G + 1, B) * G, jnp.int32)  # 0 .. S: empty and full planes
    q_len = q_len.at[0].set(0)
    buffered = jnp.asarray(rng.integers(0, R - T + 1, B), jnp.int32)  # accepted tokens in the buffer
    lens = q_len + buffered
    q_pos = lens[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_deq, v_deq = np_dequant(kv, variant)
    k_all = np.concatenate([k_deq, f64(rk)], axis=2)
    v_all = np.concatenate([v_deq, f64(rv)], axis=2)
    k_pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), np.asarray(q_len)[:, None] + np.arange(R)], axis=1)
    valid = np.concatenate([np.arange(S) < np.asarray(q_len)[:, None], np.ones((B, R), bool)], axis=1)
    want = np_attention(f64(q), q_pos, k_all, v_all, k_pos, valid)
    for backend in BACKENDS:
        out = decode_attention(q, q_pos, kv, q_len, variant=variant, recent=(rk, rv), recent_start=q_len,
                               backend=backend)
        assert out.shape == (B, T, H, hd) and out.dtype == dtype
        err = np.abs(f64(out) - want).max()
        assert err < TOL[dtype], (backend, err)


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_tilings_and_f32_scales(rng, variant):
    B, T, H, KV, hd, S, G, R = 2, 5, 6, 2, 64, 512, 128, 32
    kv = random_planes(rng, B, KV, S, hd, G, scale_dtype=jnp.float32)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, hd)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    q_len = jnp.asarray([128, 384], jnp.int32)
    q_pos = q_len[:, None] + 20 + jnp.arange(T, dtype=jnp.int32)
    want = np.asarray(decode_attention_reference(q, q_pos, kv, q_len, variant=variant, recent=(rk, rv),
                                                 recent_start=q_len), np.float64)
    # 256 and 512: two and four key groups per block (sub-blocks under one softmax rescale)
    for block_k, splits in [(16, 5), (64, 2), (128, 1), (32, 64), (256, 3), (512, 1)]:
        for backend in KERNEL_BACKENDS:
            out = decode_attention(q, q_pos, kv, q_len, variant=variant, recent=(rk, rv), recent_start=q_len,
                                   block_k=block_k, splits=splits, backend=backend)
            assert np.abs(f64(out) - want).max() < TOL[jnp.float32], (backend, block_k, splits)


KNOBS = [  # (query dtype, launch knobs): every unpacking, sub-blocked blocks, warps / stages
    (jnp.bfloat16, dict(block_k=256, unpack="bits")),  # 4 key groups of 64 per block
    (jnp.bfloat16, dict(block_k=512, unpack="asm", splits=3, num_warps=8, num_stages=3)),  # asm -> bits here
    (jnp.float16, dict(block_k=128, unpack="bits", programs_per_sm=8)),  # f16 bit patterns
    (jnp.bfloat16, dict(block_k=32, unpack="convert", splits=5)),
    (jnp.float32, dict(block_k=256)),
]


@pytest.mark.parametrize("variant", ["int8", "int4"])
@pytest.mark.parametrize("dtype,knobs", KNOBS)
def test_launch_knobs_match_float64(rng, variant, dtype, knobs):
    """Every launch knob and way of unpacking gives the same attention (16-bit queries: the
    bit-built operands carry an offset subtracted per block; interpret mode runs "asm" as "bits")."""
    B, T, H, KV, hd, S, G, R = 2, 4, 8, 2, 64, 512, 64, 64
    kv = random_planes(rng, B, KV, S, hd, G)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, hd)), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), dtype)
    q_len = jnp.asarray([rng.integers(1, S // G) * G, S], jnp.int32)
    buffered = jnp.asarray(rng.integers(0, R - T + 1, B), jnp.int32)
    q_pos = (q_len + buffered)[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_deq, v_deq = np_dequant(kv, variant)
    k_pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), np.asarray(q_len)[:, None] + np.arange(R)], axis=1)
    valid = np.concatenate([np.arange(S) < np.asarray(q_len)[:, None], np.ones((B, R), bool)], axis=1)
    want = np_attention(f64(q), q_pos, np.concatenate([k_deq, f64(rk)], axis=2),
                        np.concatenate([v_deq, f64(rv)], axis=2), k_pos, valid)
    for backend in KERNEL_BACKENDS:
        out = decode_attention(q, q_pos, kv, q_len, variant=variant, recent=(rk, rv), recent_start=q_len,
                               backend=backend, **knobs)
        assert out.dtype == dtype
        err = np.abs(f64(out) - want).max()
        assert err < TOL[jnp.bfloat16], (backend, err)


@pytest.mark.parametrize("variant", ["int8", "int4"])
@pytest.mark.parametrize("G,D,T", [(64, 32, 5), (32, 32, 4), (16, 1, 1), (32, 8, 8)])
def test_per_query_cut(rng, variant, G, D, T):
    """cut=(G, D): a query at p reads plane slots below c(p) = G*floor(max(p+1-D, 0)/G) and buffer
    positions in [c(p), p], whatever the buffer's start and whichever queries share its block. Each
    row's block starts at its own offset within a group so rows straddle cut boundaries; planes and
    buffer overlap (both hold positions [r_start, q_len)), with different values there."""
    B, H, KV, hd, S, R = 3, 6, 2, 64, 256, 256
    kv = random_planes(rng, B, KV, S, hd, G)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, hd)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    lens = np.array([0, G + D - 1 + int(rng.integers(0, G)), 2 * G + int(rng.integers(0, G))])
    cut = lambda p: np.maximum(p + 1 - D, 0) // G * G
    q_len = lens // G * G
    r_start = np.minimum(cut(lens), q_len) - G * rng.integers(0, 2, B)  # earlier than needed is fine
    r_start = np.maximum(r_start, 0)
    assert (cut(lens + T - 1) <= q_len).all()  # T <= D: the block's last cut is within the planes
    q_pos = lens[:, None] + np.arange(T)
    k_deq, v_deq = np_dequant(kv, variant)
    k_all = np.concatenate([k_deq, f64(rk)], axis=2)
    v_all = np.concatenate([v_deq, f64(rv)], axis=2)
    out_of = {}
    for t in range(T):  # float64 attention of each query on its own with its own visible set
        p = q_pos[:, t]
        k_pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), r_start[:, None] + np.arange(R)], axis=1)
        valid = np.concatenate([(np.arange(S) < np.minimum(q_len, cut(p))[:, None]),
                                (r_start[:, None] + np.arange(R) >= cut(p)[:, None])], axis=1)
        out_of[t] = np_attention(f64(q[:, t:t + 1]), q_pos[:, t:t + 1], k_all, v_all, k_pos, valid)
    want = np.concatenate([out_of[t] for t in range(T)], axis=1)
    for backend in BACKENDS:
        out = decode_attention(q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(q_len, jnp.int32), variant=variant,
                               recent=(rk, rv), recent_start=jnp.asarray(r_start, jnp.int32), cut=(G, D),
                               backend=backend)
        err = np.abs(f64(out) - want).max()
        assert err < TOL[jnp.float32], (backend, err)
    with pytest.raises(ValueError, match="cut"):
        decode_attention(q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(q_len, jnp.int32), variant=variant,
                         cut=(G, D))


CUT_KNOBS = [  # (query dtype, launch knobs) with a per-query cut: value tiles [hd/2, sub]
    (jnp.bfloat16, dict()),  # the defaults (asm -> bits here)
    (jnp.float16, dict(block_k=256, unpack="bits")),  # 4 key groups of 64 per block
    (jnp.bfloat16, dict(block_k=256, unpack="convert", splits=3)),
    (jnp.float16, dict(block_k=32, unpack="asm", splits=5)),
    (jnp.float16, dict(block_k=64, unpack="convert")),
]


def _cut_case(rng, variant, dtype):
    """A verify block of T queries per row over transposed value planes, a recent buffer (slot r at
    position r_start + r) and a per-query cut: the inputs and float64 attention."""
    B, T, H, KV, hd, S, G, D, R = 2, 4, 8, 2, 64, 512, 64, 32, 256
    kv = random_planes(rng, B, KV, S, hd, G)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, hd)), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), dtype)
    lens = np.array([G + D - 1 + int(rng.integers(0, G)), 5 * G + int(rng.integers(0, 3 * G))])
    cut = lambda p: np.maximum(p + 1 - D, 0) // G * G  # noqa: E731
    q_len = lens // G * G
    r_start = np.maximum(np.minimum(cut(lens), q_len) - G * rng.integers(0, 2, B), 0)
    assert (cut(lens + T - 1) <= q_len).all() and (lens + T - r_start <= R).all()
    q_pos = lens[:, None] + np.arange(T)
    k_deq, v_deq = np_dequant(kv, variant)
    k_all, v_all = np.concatenate([k_deq, f64(rk)], axis=2), np.concatenate([v_deq, f64(rv)], axis=2)
    k_pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), r_start[:, None] + np.arange(R)], axis=1)
    want = np.concatenate([
        np_attention(f64(q[:, t:t + 1]), q_pos[:, t:t + 1], k_all, v_all, k_pos, np.concatenate(
            [np.arange(S) < np.minimum(q_len, cut(q_pos[:, t]))[:, None],
             r_start[:, None] + np.arange(R) >= cut(q_pos[:, t])[:, None]], axis=1))
        for t in range(T)], axis=1)
    args = (q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(q_len, jnp.int32))
    return args, dict(variant=variant, recent=(rk, rv), recent_start=jnp.asarray(r_start, jnp.int32), cut=(G, D)), want


@pytest.mark.parametrize("variant", ["int8", "int4"])
@pytest.mark.parametrize("dtype,knobs", CUT_KNOBS)
def test_launch_knobs_with_cut_match_float64(rng, variant, dtype, knobs):
    """Transposed value planes with the recent buffer and a per-query cut give float64 attention of
    the planes' values, for every way of unpacking and several blocks."""
    args, kw, want = _cut_case(rng, variant, dtype)
    for backend in BACKENDS:
        out = decode_attention(*args, **kw, backend=backend, **knobs)
        assert out.dtype == dtype
        err = np.abs(f64(out) - want).max()
        assert err < TOL[jnp.bfloat16], (backend, err)


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_ring_buffer_matches_float64(rng, variant):
    """The recent buffer as a ring (the hierarchical cache's: position p in slot p mod R, so the
    oldest group leaves without a shift) gives the linear buffer's float64 attention: the kernel
    turns whole blocks of the ring."""
    for _ in range(20):  # a draw where some row's buffer wraps around (about 7 in 8 do)
        args, kw, want = _cut_case(rng, variant, jnp.bfloat16)
        (rk, rv), r_start, R = kw["recent"], np.asarray(kw["recent_start"]), kw["recent"][0].shape[2]
        if (r_start % R).any():
            break
    slots = (r_start[:, None] + np.arange(R)) % R  # [B, R]: where linear slot r goes in the ring
    rows = np.arange(len(r_start))[:, None]
    ring = tuple(jnp.zeros_like(x).at[rows, :, slots].set(jnp.swapaxes(x, 1, 2)) for x in (rk, rv))
    for backend in BACKENDS:
        out = decode_attention(*args, **dict(kw, recent=ring), recent_ring=True, backend=backend)
        err = np.abs(f64(out) - want).max()
        assert err < TOL[jnp.bfloat16], (backend, err)
    with pytest.raises(ValueError, match="cut"):
        decode_attention(*args, **dict(kw, cut=None), recent_ring=True)


def test_ring_block():
    assert ring_block(256, 128) == 128 and ring_block(96, 32) == 32 and ring_block(48, 16) == 16
    with pytest.raises(ValueError, match="power-of-2"):
        ring_block(40, 16)


def test_v_layout_bad_inputs(rng):
    B, T, H, KV, hd, S, G = 1, 1, 4, 2, 64, 128, 64
    kv = random_planes(rng, B, KV, S, hd, G)
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    q_len, q_pos = jnp.asarray([S], jnp.int32), jnp.asarray([[S]], jnp.int32)
    untransposed = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731  [B, KV, S, hd/2]
    with pytest.raises(ValueError, match=r"v_upper must be \[B, KV, hd/2, S\]"):
        decode_attention(q, q_pos, kv._replace(v_upper=untransposed(kv.v_upper)), q_len, variant="int4",
                         backend="interpret")
    with pytest.raises(ValueError, match=r"v_lower must be \[B, KV, hd/2, S\]"):
        decode_attention(q, q_pos, kv._replace(v_lower=untransposed(kv.v_lower)), q_len, variant="int8",
                         backend="interpret")
    for layout in ("channels", "slots"):
        with pytest.raises(ValueError, match="v_layout must be 'tokens'"):
            decode_attention(q, q_pos, kv, q_len, variant="int8", v_layout=layout, backend="reference")
    # the hierarchical cache still names the layout
    a = decode_attention(q, q_pos, kv, q_len, variant="int8", v_layout="tokens", backend="reference")
    # int4 never reads v_lower: its shape is not checked
    b = decode_attention(q, q_pos, kv._replace(v_lower=untransposed(kv.v_lower)), q_len, variant="int4",
                         backend="reference")
    c = decode_attention(q, q_pos, kv, q_len, variant="int4", backend="reference")
    assert np.allclose(np.asarray(b), np.asarray(c), atol=1e-6) and a.shape == c.shape


def test_int4_reads_no_lower_plane(rng):
    """The draft's view does not depend on the lower plane."""
    B, T, H, KV, hd, S, G = 1, 1, 4, 2, 64, 128, 64
    kv = random_planes(rng, B, KV, S, hd, G)
    other = kv._replace(k_lower=jnp.zeros_like(kv.k_lower), v_lower=jnp.full_like(kv.v_lower, 255))
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    q_len, q_pos = jnp.asarray([S], jnp.int32), jnp.asarray([[S]], jnp.int32)
    for backend in KERNEL_BACKENDS:
        a = decode_attention(q, q_pos, kv, q_len, variant="int4", backend=backend)
        b = decode_attention(q, q_pos, other, q_len, variant="int4", backend=backend)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        c = decode_attention(q, q_pos, other, q_len, variant="int8", backend=backend)
        assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_jit_and_bad_inputs(rng):
    B, T, H, KV, hd, S = 1, 2, 4, 2, 64, 64
    q = jnp.asarray(rng.standard_normal((B, T, H, hd)), jnp.float32)
    k = v = jnp.asarray(rng.standard_normal((B, KV, S, hd)), jnp.float32)
    q_pos = jnp.asarray([[3, 4]], jnp.int32)
    f = jax.jit(lambda q, p, k, v, n: decode_attention(q, p, (k, v), n, backend="interpret"))
    assert f(q, q_pos, k, v, jnp.asarray([5])).shape == (B, T, H, hd)
    with pytest.raises(ValueError, match="variant"):
        decode_attention(q, q_pos, (k, v), jnp.asarray([5]), variant="int3")
    with pytest.raises(ValueError, match="QuantKV"):
        decode_attention(q, q_pos, (k, v), jnp.asarray([5]), variant="int8")
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(jnp.zeros((B, T, 3, hd)), q_pos, (k, v), jnp.asarray([5]))
    with pytest.raises(ValueError, match="block_k"):
        decode_attention(q, q_pos, (k, v), jnp.asarray([5]), block_k=48, backend="interpret")
    with pytest.raises(ValueError, match="q_pos"):
        decode_attention(q, q_pos[:, :1], (k, v), jnp.asarray([5]))
    with pytest.raises(ValueError, match="unpack"):
        decode_attention(q, q_pos, (k, v), jnp.asarray([5]), unpack="lut", backend="interpret")
    with pytest.raises(TypeError, match="num_wraps"):
        decode_attention(q, q_pos, (k, v), jnp.asarray([5]), num_wraps=8, backend="interpret")
    kv = random_planes(rng, B, KV, 256, 64, 8)  # blocks larger than a group need groups of >= 16 slots
    with pytest.raises(ValueError, match="block_k"):
        decode_attention(q, q_pos, kv, jnp.asarray([5]), variant="int4", block_k=32, backend="interpret")


# ---------------------------------------------------------------- Triton lowering (no GPU)


LOWER_KNOBS = [  # the defaults, then the sweep's alternatives (scripts/bench_attention.py --sweep)
    {},
    dict(block_k=256, unpack="asm", num_warps=8, num_stages=3),  # inline PTX is lowered
    dict(block_k=512, unpack="bits", programs_per_sm=8, num_stages=1),
    dict(unpack="convert", block_k=64),
]


@pytest.mark.parametrize("knobs", LOWER_KNOBS)
@pytest.mark.parametrize("variant", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("B,T,H,KV,hd,S", [(1, 1, 32, 8, 128, 8192), (4, 5, 9, 3, 64, 1024), (2, 4, 32, 8, 128, 2048)])
def test_triton_lowering(verify_triton_modules, variant, B, T, H, KV, hd, S, knobs):
    _check_lowering(verify_triton_modules, variant, B, T, H, KV, hd, S, knobs)


def _check_lowering(verify_triton_modules, variant, B, T, H, KV, hd, S, knobs):
    sd = jax.ShapeDtypeStruct
    G, R = 128, 256
    q, q_pos, n = sd((B, T, H, hd), jnp.bfloat16), sd((B, T), jnp.int32), sd((B,), jnp.int32)
    recent = (sd((B, KV, R, hd), jnp.bfloat16),) * 2
    if variant == "bf16":
        kv = (sd((B, KV, S, hd), jnp.bfloat16),) * 2
        knobs = {k: v for k, v in knobs.items() if k != "block_k"}  # bf16 keeps its 128-slot blocks
        fn = lambda q, p, kv, n, recent: decode_attention(q, p, kv, n, backend="triton", **knobs)
        launches = 1
    else:
        u8, sc = sd((B, KV, S, hd // 2), jnp.uint8), sd((B, KV, S // G, hd), jnp.float16)
        v8 = sd((B, KV, hd // 2, S), jnp.uint8)
        kv = QuantKV(u8, u8, sc, sc, v8, v8, sd((B, KV, S), jnp.float16), sd((B, KV, S), jnp.float16))
        fn = lambda q, p, kv, n, recent: decode_attention(q, p, kv, n, variant=variant, recent=recent,
                                                          recent_start=n, cut=(G, G // 2), recent_ring=True,
                                                          backend="triton", **knobs)
        launches = 2  # the planes and the recent buffer
    for dtype in (jnp.bfloat16, jnp.float32):
        n0 = len(verify_triton_modules)
        exp = _export_cuda(fn, sd(q.shape, dtype), q_pos, kv, n, recent)
        assert len(verify_triton_modules) == n0 + launches, "no Triton kernel was lowered"
        assert any(t in exp.mlir_module() for t in TRITON_TARGETS)
        has_asm = "prmt.b32" in str(verify_triton_modules[n0].module)
        unpack = knobs.get("unpack", DEFAULTS[variant]["unpack"])
        assert has_asm == (unpack == "asm" and variant != "bf16" and dtype != jnp.float32)


def _bench_attention():
    """scripts/bench_attention.py as a module (its main() takes argv and returns the results)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_attention_sweep_smoke(tmp_path):
    """scripts/bench_attention.py --sweep --smoke: the sweep path runs on CPU (interpret mode)."""
    bench = _bench_attention()
    out = bench.main(["--sweep", "--smoke", "--out", str(tmp_path / "sweep.json")])
    assert {c["variant"] for c in out["cells"]} == {"bf16", "int8", "int4"}
    assert all(c["us"] > 0 and "config" in c for c in out["cells"])
    assert set(out["best"]) == {"bf16", "int8", "int4"} and "geomean" in out["best"]["int4"]
    assert len(bench.sweep_configs("int4")) + len(bench.sweep_configs("int8")) + len(bench.sweep_configs("bf16")) <= 40
    kv, _ = bench.make_kv(jax.random.key(0), 1, 256, "int4")  # the hierarchical cache's layout
    assert kv.v_upper.shape == (1, bench.KV, bench.HD // 2, 256)
    assert kv.k_upper.shape == (1, bench.KV, 256, bench.HD // 2)


@pytest.mark.parametrize("rows,blocks,per_sm,want", [
    (128, 64, 2, 2),  # batch 16 x 8 kv heads at 8k, 2 programs per SM: 256 programs, one wave of 264
    (128, 64, 3, 3),  # 3 per SM: 384 of 396
    (128, 256, 2, 2),  # 32k: more splits would only add waves
    (8, 64, 2, 32),  # batch 1: 256 programs, two blocks each
    (32, 256, 3, 12),  # batch 4 x 32k: 384 programs of 396
    (128, 1, 2, 1),  # a one-block cache cannot be split
])
def test_pick_splits_fills_whole_waves(rows, blocks, per_sm, want):
    """The grid (rows x splits programs) fits whole waves of the programs the 132 SMs hold: the
    previous rule launched 640 programs at batch 16 x 8k where 264 fit (2.42 waves)."""
    splits = pick_splits(rows, 1, blocks, per_sm)
    assert splits == want
    assert rows * splits <= max(132 * per_sm, rows)  # never a second, partial wave
