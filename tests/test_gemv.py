"""The W4A16 GEMV kernel (decode sizes, no tensor cores) against float64 NumPy.

Interpret mode on CPU, compiled Triton on a GPU; the CUDA lowering check runs without a GPU on
jax 0.10.2 (see test_kernels.py). Tolerances as in test_kernels.py: f32 activations 2e-6, bf16
activations 6e-3 (the output's rounding to bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quantize_weight, w4a16_matmul
from pallas_kernels.tiling import GEMV_MAX_M
from pallas_kernels.w4a16_gemv import GemvTiles, choose_gemv_tiles, nibbles_as_f32, w4a16_gemv
from test_kernels import BF16_TOL, F32_TOL, KERNEL_BACKENDS, _export_cuda, np_dequant, rel_err, rng, verify_triton_modules  # noqa: F401

INTERPRET = [b == "interpret" for b in KERNEL_BACKENDS]


def test_nibbles_by_bits_every_byte():
    packed = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8)
    lo, hi = nibbles_as_f32(packed)
    p = np.arange(-128, 128)
    want_lo = np.where((p & 15) >= 8, (p & 15) - 16, p & 15)
    want_hi = p >> 4
    np.testing.assert_array_equal(np.asarray(lo), want_lo)
    np.testing.assert_array_equal(np.asarray(hi), want_hi)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("M,K,N,gs,tiles", [
    (1, 512, 384, 128, None),
    (1, 576, 576, 64, GemvTiles(bn=128, split=3, reduce_each_block=False)),  # N edge masked
    (3, 512, 200, 64, GemvTiles(bn=64, split=2)),
    (8, 256, 256, -1, GemvTiles(bn=128, split=2)),  # per channel: one rescale at the end
    (5, 1024, 256, 128, GemvTiles(bn=256, split=1, num_warps=8)),
])
def test_gemv_matches_float64(rng, interpret, M, K, N, gs, tiles):
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    qw = quantize_weight(w, gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = x.astype(np.float64) @ np_dequant(qw)
    y = w4a16_gemv(jnp.asarray(x), qw, tiles=tiles, interpret=interpret)
    assert y.dtype == jnp.float32 and y.shape == (M, N)
    assert rel_err(y, ref) < F32_TOL
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = w4a16_gemv(xb, qw, tiles=tiles, interpret=interpret)
    assert yb.dtype == jnp.bfloat16
    assert rel_err(yb, np.asarray(xb.astype(jnp.float32), np.float64) @ np_dequant(qw)) < BF16_TOL


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matmul_dispatches_decode_sizes_to_gemv(rng, backend):
    K, N = 256, 128
    w = rng.standard_normal((K, N)).astype(np.float32)
    qw = quantize_weight(w, 64)
    for M in (1, GEMV_MAX_M, GEMV_MAX_M + 1):
        x = rng.standard_normal((2, M, K)).astype(np.float32)[0]
        y = w4a16_matmul(jnp.asarray(x), qw, backend=backend)
        assert rel_err(y, x.astype(np.float64) @ np_dequant(qw)) < F32_TOL, M


def test_gemv_refuses_bad_shapes(rng):
    qw = quantize_weight(rng.standard_normal((256, 128)).astype(np.float32), 64)
    with pytest.raises(ValueError, match="M <= 8"):
        w4a16_gemv(jnp.ones((9, 256)), qw, interpret=True)
    with pytest.raises(ValueError, match="split=3"):
        w4a16_gemv(jnp.ones((1, 256)), qw, tiles=GemvTiles(split=3), interpret=True)


def test_default_plan_divides_k_and_fills_the_gpu():
    for M, K, N in ((1, 4096, 28672), (4, 14336, 4096), (8, 4096, 6144), (1, 576, 576)):
        t = choose_gemv_tiles(M, N, K, 128 if K % 128 == 0 else 64)
        pb = 128 if K % 128 == 0 else 64
        assert (K // pb) % t.split == 0


@pytest.mark.parametrize("K,N,gs", [(4096, 1024, 128), (576, 576, 64), (4096, 1024, -1)])
@pytest.mark.parametrize("M", [1, 4])
def test_gemv_triton_lowering(verify_triton_modules, K, N, gs, M):
    qw = jax.eval_shape(lambda: quantize_weight(jnp.zeros((K, N)), gs))
    for tiles in (None, GemvTiles(bn=64, split=2, reduce_each_block=False), GemvTiles(bn=256, split=1)):
        if tiles is not None and (K // (K // qw["scales"].shape[0] if gs > 0 else 128)) % tiles.split:
            continue
        for dtype in (jnp.bfloat16, jnp.float32):
            x = jax.ShapeDtypeStruct((M, K), dtype)
            n = len(verify_triton_modules)
            _export_cuda(lambda x, qw, t=tiles: w4a16_gemv(x, qw, tiles=t), x, qw)
            assert len(verify_triton_modules) == n + 1, "no Triton kernel was lowered"
