"""The Mosaic GPU decode attention partials (pallas_kernels/attention_mosaic.py) against float64 NumPy.

On CPU the kernel runs under Mosaic GPU's interpreter, which executes the same TMA pipeline, grid,
splits, masking and online softmax; its wgmma reads A from shared memory, so the register A operand
(the dequantized keys) is staged there (the register path is checked compiled on a GPU:
scripts/bench_attention_mosaic.py). Partials are merged with decode_attention.merge_partials, the
recent buffer's partials (bf16, from the Mosaic kernel too) included. The NumPy reference decodes
the planes itself (test_decode_attention.np_dequant). Tolerance: max-abs error over outputs of size
~1; the queries, the dequantized keys and the (scaled) probabilities are rounded to bf16 before the
MMAs (observed ~1e-3 to 3e-3).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_SEED
from pallas_kernels.attention_mosaic import attention_partials, choose_splits, supported
from pallas_kernels.decode_attention import merge_partials
from pallas_kernels.kv_cut import cut_position
from test_decode_attention import np_attention, np_dequant, random_planes

TOL = 1e-2
HD = 128  # the kernel's head dim


@pytest.fixture
def rng(request):
    return np.random.default_rng([TEST_SEED, abs(hash(request.node.name)) % 2**31])


def mosaic_attention(q, q_pos, kv, kv_len, variant, *, recent=None, recent_start=None, cut=None, splits=None,
                     interpret=True, version=1, kv_tile=64):
    """decode_attention's flow (query rows per kv head, main launch + recent buffer, merge) on the
    Mosaic kernel: [B, T, H, hd] f32."""
    B, T, H, hd = q.shape
    KV = (kv[0] if variant == "bf16" else kv.k_upper).shape[1]
    rep = H // KV
    q_rows = q.reshape(B, T, KV, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, rep * T, hd)
    row_pos = jnp.tile(q_pos.astype(jnp.int32), (1, rep))
    sides = ("below", "from") if cut else (None, None)
    run = lambda *a, **k: attention_partials(q_rows, row_pos, *a, sm_scale=1 / math.sqrt(hd), cut=cut,  # noqa: E731
                                             interpret=interpret, **k)
    parts = [run(kv, kv_len, jnp.zeros((B,), jnp.int32), variant=variant, splits=splits, cut_side=sides[0],
                 version=version, kv_tile=kv_tile)]
    if recent is not None:
        R = recent[0].shape[2]
        parts.append(run(recent, jnp.full((B,), R, jnp.int32), recent_start, variant="bf16", splits=1,
                         cut_side=sides[1]))
    out = merge_partials(parts)  # [B, KV, rep*T, hd]
    return out.reshape(B, KV, rep, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def plane_shapes(B, KV, S, G):
    """A QuantKV of shapes only (jax.ShapeDtypeStruct): for lowering and for choose."""
    from pallas_kernels.decode_attention import QuantKV

    u8 = lambda *s: jax.ShapeDtypeStruct(s, jnp.uint8)  # noqa: E731
    f16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float16)  # noqa: E731
    return QuantKV(u8(B, KV, S, HD // 2), u8(B, KV, S, HD // 2), f16(B, KV, S // G, HD), f16(B, KV, S // G, HD),
                   u8(B, KV, HD // 2, S), u8(B, KV, HD // 2, S), f16(B, KV, S), f16(B, KV, S))


def cache(rng, variant, B, KV, S, G):
    if variant == "bf16":
        k, v = (jnp.asarray(rng.standard_normal((B, KV, S, HD)), jnp.bfloat16) for _ in range(2))
        return (k, v), np.asarray(k.astype(jnp.float32), np.float64), np.asarray(v.astype(jnp.float32), np.float64)
    kv = random_planes(rng, B, KV, S, HD, G)
    return (kv, *np_dequant(kv, variant))


# (variant, version): v2 and v3 are quantized paths (bf16 runs v1 either way)
VARIANT_VERSIONS = [("bf16", 1), ("int8", 1), ("int4", 1), ("int8", 2), ("int4", 2), ("int8", 3), ("int4", 3),
                    ("int8", 4), ("int4", 4), ("int8", 5), ("int4", 5), ("int8", 6), ("int4", 6),
                    ("int8", 7), ("int4", 7), ("int8", 8), ("int4", 8)]


CASES = [(1, 8, 2, 2), (5, 12, 3, None)]  # draft step; verify (15 -> 16 rows; 32 on v2)


# v2, v3, v4 at T = 1 only here: test_verify_with_cut runs them at T = 4 (file runtime)
@pytest.mark.parametrize("variant,version,T,H,KV,splits",
                         [(v, n, *c) for v, n in VARIANT_VERSIONS for c in CASES if n == 1 or c[0] == 1])
def test_matches_float64(rng, variant, version, T, H, KV, splits):
    """Decode (T=1) and verify (T=5) steps at per-row lengths: one row filling the cache, one short
    (its last tiles fully masked), each query seeing the keys up to its own position. v2 runs
    128-token key groups over 6 tiles: with 2 splits, each of the full row's programs crosses a group
    boundary (Q' refolded) and the second starts mid-group (folds at once)."""
    B, S, G = (2, 256, 64) if version == 1 else (2, 384, 128)  # v3, v4 as v2
    kv, k64, v64 = cache(rng, variant, B, KV, S, G)
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    lens = np.array([S - T, int(rng.integers(1, S // 2))])
    q_pos = lens[:, None] + np.arange(T)
    out = mosaic_attention(q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(lens + T, jnp.int32), variant,
                           splits=splits, version=version)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(q, q_pos, k64, v64, k_pos, k_pos < (lens + T)[:, None])
    err = np.abs(np.asarray(out, np.float64) - want).max()
    print(f"max abs err {err:.2e}")
    assert err < TOL, err


@pytest.mark.parametrize("variant,version,T", [("bf16", 1, 5), ("int8", 1, 5), ("int4", 1, 5), ("int4", 4, 5),
                                               ("int8", 6, 5), ("int4", 7, 5), ("int4", 8, 1), ("int8", 8, 2)])
def test_kv_tile_128_matches_float64(rng, variant, version, T):
    """128-token pipeline steps (v1, v4, v6 to v8 and bf16): a verify step (T = 5, or v8's 8 query
    columns at T = 1 / 2) over 4 tiles with 3 splits, one row filling the cache and one short row
    whose last step is partly masked."""
    B, S, G, H, KV = 2, 512, 128, 12, 3
    kv, k64, v64 = cache(rng, variant, B, KV, S, G)
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    lens = np.array([S - T, int(rng.integers(1, S // 2))])
    q_pos = lens[:, None] + np.arange(T)
    out = mosaic_attention(q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(lens + T, jnp.int32), variant,
                           splits=3, kv_tile=128, version=version)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(q, q_pos, k64, v64, k_pos, k_pos < (lens + T)[:, None])
    err = np.abs(np.asarray(out, np.float64) - want).max()
    print(f"max abs err {err:.2e}")
    assert err < TOL, err


# v2 and v3 share the values and the cut; each runs one variant here (both at T = 1 above), as v4
@pytest.mark.parametrize("variant,version", [("int8", 1), ("int4", 1), ("int8", 2), ("int4", 3), ("int8", 4)])
def test_verify_with_cut_matches_float64(rng, variant, version):
    """cut=(G, D) on the hierarchical cache: a query at p reads plane slots below c(p) and recent
    positions in [c(p), p]; rows straddle cut boundaries and the planes and buffer overlap with
    different values there (as test_decode_attention.test_per_query_cut). Four splits over the 1-3
    tiles below the cut leave some programs without a tile; the buffer's launch starts past its
    first tile."""
    B, T, H, KV, S, R, G, D = 2, 4, 8, 2, 256, 128, 64, 32
    kv, k_deq, v_deq = cache(rng, variant, B, KV, S, G)
    rk, rv = (jnp.asarray(rng.standard_normal((B, KV, R, HD)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    cut = lambda p: np.maximum(p + 1 - D, 0) // G * G  # noqa: E731
    lens = np.array([G + D - 1 + int(rng.integers(0, G)), 2 * G + int(rng.integers(0, G))])
    q_len = lens // G * G
    r_start = np.maximum(np.minimum(cut(lens), q_len) - G * rng.integers(0, 2, B), 0)
    assert (cut(lens + T - 1) <= q_len).all()
    q_pos = lens[:, None] + np.arange(T)
    out = mosaic_attention(q, jnp.asarray(q_pos, jnp.int32), kv, jnp.asarray(q_len, jnp.int32), variant,
                           recent=(rk, rv), recent_start=jnp.asarray(r_start, jnp.int32), cut=(G, D), splits=4,
                           version=version)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    k_all = np.concatenate([k_deq, f64(rk)], axis=2)
    v_all = np.concatenate([v_deq, f64(rv)], axis=2)
    k_pos = np.concatenate([np.broadcast_to(np.arange(S), (B, S)), r_start[:, None] + np.arange(R)], axis=1)
    want = []
    for t in range(T):  # each query with its own visible set
        p = q_pos[:, t]
        valid = np.concatenate([np.arange(S) < np.minimum(q_len, cut(p))[:, None],
                                r_start[:, None] + np.arange(R) >= cut(p)[:, None]], axis=1)
        want.append(np_attention(f64(q[:, t:t + 1]), q_pos[:, t:t + 1], k_all, v_all, k_pos, valid))
    err = np.abs(np.asarray(out, np.float64) - np.concatenate(want, axis=1)).max()
    print(f"max abs err {err:.2e}")
    assert err < TOL, err


@pytest.mark.parametrize("variant,version,kv_tile", [("int8", 6, 64), ("int4", 7, 128)])
def test_from_cut_matches_float64(rng, variant, version, kv_tile):
    """A verify launch (T = 4) over the planes with cut_side="from" (each query's slots from its cut
    c(p)): row 0's queries straddle a cut boundary, so the tiles between its lowest and highest cut
    are seen in part (v6's masked path compares with lo; its full tiles start at the highest cut)."""
    B, T, H, KV, S, G, D = 2, 4, 8, 2, 512, 128, 32
    kv, k64, v64 = cache(rng, variant, B, KV, S, G)
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    lens = np.array([3 * G + D - 3, int(rng.integers(G + D, S - T))])  # row 0: cuts 2G, 2G, 3G, 3G
    q_pos = lens[:, None] + np.arange(T)
    rep = H // KV
    q_rows = q.reshape(B, T, KV, rep, HD).transpose(0, 2, 3, 1, 4).reshape(B, KV, rep * T, HD)
    o, m, l = attention_partials(q_rows, jnp.tile(jnp.asarray(q_pos, jnp.int32), (1, rep)), kv,
                                 jnp.asarray(lens + T, jnp.int32), jnp.zeros((B,), jnp.int32), variant=variant,
                                 sm_scale=1 / math.sqrt(HD), splits=3, interpret=True, cut=(G, D), cut_side="from",
                                 version=version, kv_tile=kv_tile)
    out = merge_partials([(o, m, l)]).reshape(B, KV, rep, T, HD).transpose(0, 3, 1, 2, 4).reshape(B, T, H, HD)
    k_pos = np.broadcast_to(np.arange(S), (B, S))
    c = np.asarray(cut_position(jnp.asarray(q_pos, jnp.int32), G, D))  # [B, T]
    assert len(set(c[0])) == 2 and (c > 0).all()
    want = np.concatenate([np_attention(q[:, t:t + 1], q_pos[:, t:t + 1], k64, v64, k_pos,
                                        (k_pos < (lens + T)[:, None]) & (k_pos >= c[:, t:t + 1]))
                           for t in range(T)], axis=1)
    err = np.abs(np.asarray(out, np.float64) - want).max()
    print(f"max abs err {err:.2e}")
    assert err < TOL, err


def test_supported_and_bad_inputs(rng):
    assert supported("int8", 16, 128, 8192, 128, choose_splits(16, 8, 8192)) is None
    assert supported("int4", 4, 128, 32768, 128, choose_splits(16, 8, 32768), stages=4) is None
    assert supported("int4", 32, 128, 32768, 128, choose_splits(16, 8, 32768), stages=4, version=2) is None
    assert "version" in supported("int4", 4, 128, 256, 64, 1, version=9)
    assert "head_dim" in supported("bf16", 4, 64, 256, None, 1)
    assert "group" in supported("int4", 4, 128, 256, 32, 1)
    assert "splits" in supported("bf16", 4, 128, 256, None, 5)
    assert "tile" in supported("bf16", 4, 128, 200, None, 1)
    assert supported("int8", 20, 128, 8192, 128, choose_splits(16, 8, 8192, 128), stages=3, kv_tile=128) is None
    assert choose_splits(16, 8, 8192) == 2 < choose_splits(16, 8, 8192, programs_per_sm=3) == 3  # one wave either way
    assert "kv_tile" in supported("int8", 4, 128, 512, 128, 1, version=2, kv_tile=128)
    assert "kv_tile" in supported("int8", 4, 128, 512, 128, 1, kv_tile=32)
    assert "group" in supported("int4", 4, 128, 512, 64, 1, kv_tile=128)
    kv, _, _ = cache(rng, "int4", 1, 1, 128, 64)
    q = jnp.ones((1, 1, 4, HD), jnp.float32)
    with pytest.raises(ValueError, match="splits"):
        attention_partials(q, jnp.zeros((1, 4), jnp.int32), kv, jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                           variant="int4", sm_scale=0.1, splits=3, interpret=True)  # 2 tiles
    with pytest.raises(ValueError, match="QuantKV"):
        attention_partials(q, jnp.zeros((1, 4), jnp.int32), (jnp.ones((1, 1, 128, HD)),) * 2, jnp.ones((1,), jnp.int32),
                           jnp.zeros((1,), jnp.int32), variant="int8", sm_scale=0.1, interpret=True)


def test_shared_memory_model_and_residency():
    """smem_bytes against the H100's Nsight Compute readings (dynamic shared memory a program, v7,
    2 stages, 16 query rows): INT8 at 64-token steps and INT4 at 64 / 128; the programs an SM then
    holds; and every measured config asks for no more programs an SM than fit."""
    from pallas_kernels.attention_mosaic import FASTER, TILE, resident_programs, smem_bytes

    shapes = (("int8", 64), ("int4", 64), ("int4", 128))
    assert [smem_bytes(v, 4, HD, 2, 7, kt) // 1024 for v, kt in shapes] == [66, 50, 84]
    assert [resident_programs(v, 4, HD, 2, 7, kt) for v, kt in shapes] == [3, 4, 2]
    assert smem_bytes("int8", 4, HD, 3, 7) > smem_bytes("int8", 4, HD, 2, 7)  # a stage more
    for variant, config in FASTER.items():
        fits = resident_programs(variant, 4, HD, config.get("stages", 2), config["version"],
                                 config.get("kv_tile", TILE))
        assert config.get("programs_per_sm", 2) <= fits, (variant, config)


# v2 and v3 pad both M to 32 rows; they and v4 run only the cut case (file runtime)
@pytest.mark.parametrize("variant,version,M,cut,kv_tile",
                         [(v, n, M, c, 64) for v, n in VARIANT_VERSIONS for M, c in [(4, False), (20, True)]
                          if n == 1 or c] + [(v, n, 20, True, 128) for v, n in (("bf16", 1), ("int8", 1), ("int4", 1),
                                                                                ("int8", 4), ("int4", 5), ("int4", 7))])
def test_lowers_for_cuda(variant, version, M, cut, kv_tile):
    """jax 0.10.2 lowers the kernel for CUDA without a GPU: catches code that the interpreter runs but
    Mosaic GPU cannot lower (layout inference, wgmma operand layouts, 8-bit arithmetic). v8 stores
    P^T through a transposed view, which jax 0.10.2's layout inference refuses (jax 0.11.2 lowered
    and ran it on the H100): there the test holds that refusal, and nothing else, to be the error."""
    from jax import export

    B, KV, S, G = 2, 2, 512, 128
    sd = jax.ShapeDtypeStruct
    kv = (sd((B, KV, S, HD), jnp.bfloat16),) * 2 if variant == "bf16" else plane_shapes(B, KV, S, G)

    def f(q, pos, kv, n, off):
        return attention_partials(q, pos, kv, n, off, variant=variant, sm_scale=0.1, splits=2,
                                  stages=2 if variant == "bf16" and kv_tile == 128 else 3,  # shared memory
                                  cut=(G, 32) if cut else None, cut_side="below" if cut else None, version=version,
                                  kv_tile=kv_tile)

    args = (sd((B, KV, M, HD), jnp.float32), sd((B, M), jnp.int32), kv, sd((B,), jnp.int32), sd((B,), jnp.int32))
    lower = lambda: export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()  # noqa: E731
    if version >= 8 and jax.__version_info__ < (0, 11):
        with pytest.raises(ValueError, match="Failed to infer a possible set of layouts"):
            lower()
        return
    assert "mosaic_gpu" in lower()


def test_decode_attention_runs_the_mosaic_kernel_when_asked(rng, monkeypatch):
    """decode_attention(kernel="mosaic") runs this kernel on the planes (FASTER or FORCED; the recent
    buffer's launch stays Triton's) and matches decode_attention's reference, jitted or inline
    (attention_mosaic.JIT); "auto" keeps the Triton kernel off Hopper; bad names and unsupported
    shapes are refused."""
    from pallas_kernels import attention_mosaic
    from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

    B, T, H, KV, S, R, G, D = 2, 2, 8, 2, 256, 128, 64, 32
    kv, _, _ = cache(rng, "int4", B, KV, S, G)
    recent = tuple(jnp.asarray(rng.standard_normal((B, KV, R, HD)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, H, HD)), jnp.float32)
    lens = np.array([G + D + int(rng.integers(0, G)), 2 * G + int(rng.integers(0, G))])
    q_len = jnp.asarray(lens // G * G, jnp.int32)
    r_start = jnp.asarray(np.maximum(lens // G * G - G, 0), jnp.int32)
    q_pos = jnp.asarray(lens[:, None] + np.arange(T), jnp.int32)
    args = dict(variant="int4", recent=recent, recent_start=r_start, cut=(G, D))
    got = decode_attention(q, q_pos, kv, q_len, backend="interpret", kernel="mosaic", **args)
    want = decode_attention_reference(q, q_pos, kv, q_len, **args)
    err = float(jnp.abs(got - want).max())
    assert err < TOL, err
    monkeypatch.setattr(attention_mosaic, "JIT", False)
    inline = decode_attention(q, q_pos, kv, q_len, backend="interpret", kernel="mosaic", **args)
    np.testing.assert_allclose(np.asarray(inline), np.asarray(got), rtol=1e-6, atol=1e-6)
    M = 16  # the padded query rows of this launch
    assert attention_mosaic.choose("auto", "int4", M, kv) is None  # no GPU here
    # FASTER's INT4 config takes 128-token steps, which a 64-token key group cannot: FORCED runs it
    assert attention_mosaic.FASTER["int4"].get("kv_tile") == 128
    assert attention_mosaic.choose("mosaic", "int4", M, kv) == attention_mosaic.FORCED
    kv128, _, _ = cache(rng, "int4", B, KV, S, 128)
    assert attention_mosaic.choose("mosaic", "int4", M, kv128) == attention_mosaic.FASTER["int4"]
    assert attention_mosaic.choose("auto", "int4", M, kv128) is None
    with pytest.raises(ValueError, match="kernel must be"):
        attention_mosaic.choose("cuda", "int4", M, kv)
    with pytest.raises(ValueError, match="cannot run"):
        attention_mosaic.choose("mosaic", "int4", 512, kv)  # more query rows than wgmma's N


def test_auto_takes_the_measured_configs_on_hopper_for_large_caches_only(monkeypatch):
    """kernel="auto" on sm_90: FASTER's config from MIN_CACHE_TOKENS (batch x slots) on, where the
    shapes allow it; the Triton kernel below that, and for the bf16 cache (nothing measured faster)."""
    from pallas_kernels import attention_mosaic

    monkeypatch.setattr(attention_mosaic, "is_hopper", lambda: True)

    def planes(B, S, G=128, KV=8):  # shapes only: choose reads nothing else
        return plane_shapes(B, KV, S, G)

    big = attention_mosaic.MIN_CACHE_TOKENS // 8192
    for variant in ("int8", "int4"):
        assert attention_mosaic.choose("auto", variant, 16, planes(big, 8192)) == attention_mosaic.FASTER[variant]
        assert attention_mosaic.choose("auto", variant, 16, planes(big // 2, 8192)) is None
        assert attention_mosaic.choose("auto", variant, 512, planes(big, 8192)) is None  # wgmma's N: 256 rows
    assert attention_mosaic.choose("auto", "int4", 16, planes(big, 8192, G=64)) is None  # 128-token steps
    assert attention_mosaic.choose("mosaic", "int4", 16, planes(big, 8192, G=64)) == attention_mosaic.FORCED
    bf16 = (jax.ShapeDtypeStruct((big, 8, 8192, HD), jnp.bfloat16),) * 2
    assert attention_mosaic.choose("auto", "bf16", 16, bf16) is None
