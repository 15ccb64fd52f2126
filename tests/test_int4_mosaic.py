"""The Mosaic GPU int4 matmuls (pallas_kernels/int4_mosaic.py) and the weight layout they read.

On CPU the kernels run under Mosaic GPU's interpreter (`plgpu.kernel(..., interpret=...)`), which
executes the same TMA pipeline, grid, split-K and scale arithmetic, with one difference: its wgmma
reads A from shared memory, so the converted weights are staged there instead of passed in
registers (the register path is checked compiled on the GPU: scripts/bench_mosaic.py's check).
W4A16 is compared with float64 NumPy (bf16 output rounding: ~1.6e-3 relative); W4A8 / W4A4 with
w4a4_reference, the same exact integer dots summed in another order (f32 output: ~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_SEED
from pallas_kernels import dequantize_weight, quantize_weight
from pallas_kernels.int4_mosaic import (
    COLUMN_BLOCK,
    MosaicTiles,
    choose_tiles,
    from_mosaic_layout,
    mosaic_matmul,
    supported,
    to_mosaic_layout,
    token_tile,
    w4a8_mosaic,
    w4a16_mosaic,
)
from pallas_kernels.w4a4 import w4a4_reference
from pallas_kernels.w4a16 import w4a16_reference
from qspec_jax.kernel_choice import arrange_weights, resolve_kernels

BF16_TOL = 6e-3
F32_TOL = 2e-6


def weights(rng, K, N, group):
    w = rng.standard_normal((K, N)).astype(np.float32)
    return quantize_weight(w, group)


def rel(y, ref):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


@pytest.fixture
def rng(request):
    return np.random.default_rng([TEST_SEED, abs(hash(request.node.name)) % 2**31])


@pytest.mark.parametrize("K,N,M,group,tiles", [
    (512, 256, 1, 128, MosaicTiles()),
    (512, 256, 5, 128, MosaicTiles(rows=128, split=2, stages=2)),
    (256, 128, 9, 64, MosaicTiles(split=2)),
    (512, 256, 3, -1, MosaicTiles(rows=128, split=4, stages=1)),
    (256, 192, 20, 128, MosaicTiles(rows=64, stages=3)),
    (512, 256, 5, 128, MosaicTiles(carry=True)),  # scales on the weights, one accumulator
    (256, 128, 130, 64, MosaicTiles(rows=128, stages=2, carry=True)),
    (256, 128, 300, 64, MosaicTiles(split=2, stages=2)),  # two 256-row chunks, the last padded
    (1024, 256, 7, 128, MosaicTiles(split=2, groups=2)),  # two groups per pipeline step
    (512, 256, 3, -1, MosaicTiles(groups=4, stages=1)),  # per channel: four steps of 128 in one
    (512, 128, 70, 128, MosaicTiles(stages=2, carry=True, groups=2)),
])
def test_w4a16_matches_float64(rng, K, N, M, group, tiles):
    qw = weights(rng, K, N, group)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(dequantize_weight(qw), np.float64)
    y = w4a16_mosaic(x, to_mosaic_layout(qw), tiles=tiles, interpret=True)
    assert y.shape == (M, N) and y.dtype == jnp.bfloat16
    assert rel(y, ref) < BF16_TOL


@pytest.mark.parametrize("M,split", [(5, 2), (12, 1), (3, 4)])
def test_both_epilogues_agree(rng, M, split):
    """The kernel's own y [M, N] (the transposed store, compiled on jax >= 0.11; split-K's f32
    partials as two 16-bit halves) and the out^T [N, tm] that XLA transposes (jax 0.10.2's compiled
    path) are the same numbers."""
    from pallas_kernels.int4_mosaic import _int4_matmul

    qw = weights(rng, 256, 128, 64)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
    tiles = MosaicTiles(split=split, stages=2)
    ys = [_int4_matmul(x, None, to_mosaic_layout(qw), tiles, interpret=True, token_major=t) for t in (True, False)]
    assert ys[0].shape == ys[1].shape == (M, 128)
    np.testing.assert_array_equal(np.asarray(ys[0], np.float32), np.asarray(ys[1], np.float32))
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(dequantize_weight(qw), np.float64)
    assert rel(ys[0], ref) < BF16_TOL


def test_f32_halves_round_trip(rng):
    """The token-major split-K epilogue's bit halves give back every f32 exactly: normal numbers of
    both signs and many scales, zeros, subnormals, infinities."""
    from pallas_kernels.int4_mosaic import f32_halves, join_f32_halves

    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-140, 120, 4096))).astype(np.float32)
    x[:6] = [0.0, -0.0, np.inf, -np.inf, 1e-42, -3e-39]
    upper, lower = f32_halves(jnp.asarray(x))
    assert upper.dtype == lower.dtype == jnp.bfloat16
    bits = x.view(np.uint32)
    np.testing.assert_array_equal(np.asarray(upper, np.float32).view(np.uint32), bits >> 16 << 16)  # x truncated
    np.testing.assert_array_equal(np.asarray(join_f32_halves(upper, lower)).view(np.uint32), bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K,N,M,group,tiles", [
    (512, 256, 3, 128, MosaicTiles(split=2)),
    (256, 128, 9, 64, MosaicTiles(rows=128, stages=2)),
    (512, 128, 2, -1, MosaicTiles(split=4)),
    (1024, 256, 12, 128, MosaicTiles(split=2, groups=2)),
    (256, 128, 200, 64, MosaicTiles(split=2, stages=2, max_tokens=128)),  # two chunks of 128 tokens
    (256, 128, 250, 64, MosaicTiles(stages=2)),  # one 256-token tile in two 128-column blocks
])
def test_w4a8_matches_integer_reference(rng, bits, K, N, M, group, tiles):
    qw = weights(rng, K, N, group)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    ref = np.asarray(w4a4_reference(x, qw, act_bits=bits), np.float64)
    y = w4a8_mosaic(x, to_mosaic_layout(qw), act_bits=bits, tiles=tiles, interpret=True)
    assert rel(y, ref) < (F32_TOL if tiles.split > 1 else BF16_TOL)  # split 1 writes bf16


@pytest.mark.parametrize("group", [128, 64, -1])
def test_layout_round_trip(rng, group):
    qw = weights(rng, 256, 192, group)
    mw = to_mosaic_layout(qw)
    assert mw["w"].shape == (192, 256) and mw["w"].dtype == jnp.int4
    back = from_mosaic_layout(mw)
    for k in qw:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(qw[k]))


@pytest.mark.parametrize("mode", ["w4a16", "w4a8", "w4a4"])
def test_mosaic_matmul_falls_back_to_the_same_math(rng, mode):
    """On CPU (and above 256 rows) mosaic_matmul runs XLA math equal to the packed references."""
    qw = weights(rng, 256, 128, 64)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    y = mosaic_matmul(x, to_mosaic_layout(qw), mode)
    ref = w4a16_reference(x, qw) if mode == "w4a16" else w4a4_reference(x, qw, int(mode[-1]))
    assert y.shape == (2, 3, 128)
    assert rel(y, np.asarray(ref, np.float64)) < F32_TOL


def test_mosaic_matmul_chunks_w4a8_prefill(rng):
    """Above 256 rows W4A8 runs the kernel over 256-row chunks, a grid axis (here 300 rows: a
    zero-padded last chunk), equal to the integer reference up to the kernel's bf16 output."""
    qw = weights(rng, 256, 128, 64)
    x = jnp.asarray(rng.standard_normal((300, 256)), jnp.float32)
    y = mosaic_matmul(x, to_mosaic_layout(qw), "w4a8", interpret=True)
    assert y.shape == (300, 128)
    assert rel(y, np.asarray(w4a4_reference(x, qw, 8), np.float64)) < BF16_TOL


@pytest.mark.parametrize("M,N", [(4, 128), (256, 256)])  # 256 x 256: warp-specialized clusters in the rule
def test_mosaic_matmul_interpreted_kernel(rng, M, N):
    """Under the interpreter mosaic_matmul runs the kernel (its wgmma, not the XLA fallback) with the
    rule's tiles on one warpgroup, and matches the reference."""
    qw = weights(rng, 256, N, 64)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
    ref = np.asarray(w4a16_reference(x.astype(jnp.float32), qw), np.float64)
    mw = to_mosaic_layout(qw)
    assert "wgmma" in str(jax.make_jaxpr(lambda x: mosaic_matmul(x, mw, "w4a16", interpret=True))(x))
    assert rel(mosaic_matmul(x, mw, "w4a16", interpret=True), ref) < BF16_TOL


@pytest.mark.parametrize("K,N", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),
                                 (576, 960), (1536, 576)])
def test_chosen_tiles_are_supported(K, N):
    G = K // (128 if K % 128 == 0 else 64)
    for M in (1, 2, 7, 16, 33, 64, 100, 128, 256):
        for x_bytes in (1, 2):
            tiles = choose_tiles(M, N, K, G, x_bytes)
            assert supported(M, N, K, G, tiles, x_bytes) is None
            # no warpgroup holds two accumulators of more than 64 x 128 (the uncarried body's column
            # blocks), nor one of more than 64 x 256 (the carried body): registers a thread has
            wg_rows = tiles.rows // tiles.consumers  # each warpgroup's accumulator rows
            tm = token_tile(M, tiles.max_tokens)
            cols = tm if tiles.carry else min(tm, COLUMN_BLOCK)
            assert wg_rows * cols <= 64 * (256 if tiles.carry else 128), (M, x_bytes, tiles)


def test_bad_inputs():
    qw = quantize_weight(np.ones((256, 128), np.float32), 64)
    mw = to_mosaic_layout(qw)
    with pytest.raises(ValueError, match="rows"):
        w4a16_mosaic(jnp.ones((2, 256), jnp.bfloat16), mw, tiles=MosaicTiles(rows=96), interpret=True)
    with pytest.raises(ValueError, match="no rows"):
        w4a16_mosaic(jnp.ones((0, 256), jnp.bfloat16), mw, interpret=True)
    with pytest.raises(ValueError, match="carry"):
        w4a8_mosaic(jnp.ones((2, 256), jnp.float32), mw, tiles=MosaicTiles(carry=True), interpret=True)
    with pytest.raises(ValueError, match="64 rows each"):  # a consumer warpgroup owns 64 rows
        w4a16_mosaic(jnp.ones((2, 256), jnp.bfloat16), mw, tiles=MosaicTiles(rows=64, consumers=2))
    with pytest.raises(ValueError, match="cluster"):  # multicast pairs are warp-specialized programs
        w4a16_mosaic(jnp.ones((2, 256), jnp.bfloat16), mw, tiles=MosaicTiles(cluster=2))
    with pytest.raises(ValueError, match="warp-specialized"):
        w4a16_mosaic(jnp.ones((2, 256), jnp.bfloat16), mw, tiles=MosaicTiles(rows=128, consumers=2),
                     interpret=True)
    with pytest.raises(ValueError, match="kernels must be"):
        resolve_kernels("cuda")
    with pytest.raises(ValueError, match="Mosaic layout"):
        arrange_weights({"w": mw}, "triton")
    if jax.default_backend() != "gpu":  # the CPU has no Mosaic kernels: auto is Triton's layout
        assert resolve_kernels("auto") == "triton"


def test_model_on_mosaic_weights_matches_packed(tiny_float_and_int4):
    """forward on weights arranged for the Mosaic kernels equals forward on the packed pytree."""
    from qspec_jax.config import get_preset
    from qspec_jax.kv_cache import KVCache
    from qspec_jax.model import forward, fuse_projections, unstack_layers

    config = get_preset("tiny")
    packed = unstack_layers(fuse_projections(tiny_float_and_int4[1]))
    mosaic = arrange_weights(packed, "mosaic")
    tokens = jax.random.randint(jax.random.key(TEST_SEED), (2, 7), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    for mode in ("w4a16", "w4a8", "bf16"):
        outs = []
        for params in (packed, mosaic):
            cache = KVCache.create(config, 2, 16, jnp.float32)
            logits = forward(params, tokens, positions, cache, config=config, mode=mode)[0]
            outs.append(np.asarray(logits, np.float64))
        assert rel(outs[1], outs[0]) < 1e-5, mode


@pytest.mark.parametrize("int8,M,tiles", [
    (int8, M, tiles) for int8 in (False, True)
    for M, tiles in [(1, MosaicTiles()), (20, MosaicTiles(rows=128, split=2, stages=3)),
                     (16, MosaicTiles(groups=2))]
] + [(False, 200, MosaicTiles(stages=2, carry=True)),  # carry: a W4A16 body
      (False, 64, MosaicTiles(stages=2, carry=True, groups=2)),
      (True, 300, MosaicTiles(stages=2)),  # 256-row chunks on a third grid axis
      (True, 256, MosaicTiles(split=2, max_tokens=128)),  # two 128-token chunks
      # warp-specialized: two consumer warpgroups and a memory warpgroup (the GPU only, no interpreter)
      (False, 256, MosaicTiles(rows=128, stages=2, carry=True, consumers=2)),
      (False, 16, MosaicTiles(rows=128, split=2, consumers=2, groups=2)),
      (True, 128, MosaicTiles(rows=128, stages=3, consumers=2, max_tokens=128)),
      # clusters of two programs multicasting each x tile
      (False, 256, MosaicTiles(rows=128, stages=2, carry=True, consumers=2, cluster=2)),
      (True, 128, MosaicTiles(rows=128, split=2, stages=3, consumers=2, max_tokens=128, cluster=2)),
      (True, 256, MosaicTiles(rows=128, stages=2, consumers=2))])  # int8: 256 tokens, two column blocks
def test_kernels_lower_for_cuda(int8, M, tiles):
    """jax 0.10.2 lowers the Mosaic kernels for CUDA without a GPU: catches code that traces under
    the interpreter but cannot become a Mosaic GPU module (it does not run ptxas or the GPU)."""
    from jax import export

    from pallas_kernels.int4_mosaic import _int4_matmul

    K, N = 512, 256
    w = jax.ShapeDtypeStruct((N, K), jnp.int4)
    s = jax.ShapeDtypeStruct((K // 128, N), jnp.float32)
    x = jax.ShapeDtypeStruct((M, K), jnp.int8 if int8 else jnp.bfloat16)
    xs = jax.ShapeDtypeStruct((K // 128, M), jnp.float32) if int8 else None

    def f(x, w, s, xs=None):
        return _int4_matmul(x, xs, {"w": w, "scales": s}, tiles, interpret=False)

    args = (x, w, s, xs) if int8 else (x, w, s)
    module = export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module
