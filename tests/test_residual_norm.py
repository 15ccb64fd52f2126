"""The fused residual add + RMSNorm (pallas_kernels/residual_norm.py, interpreted on the CPU) against
float64 NumPy with the same roundings, its CUDA lowering, and the model with it switched on."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from conftest import TEST_SEED
from pallas_kernels.int4_mosaic import SplitKHalves, dequantize_mosaic, f32_halves
from pallas_kernels.residual_norm import residual_rmsnorm
from test_kernels import _export_cuda, verify_triton_modules  # noqa: F401 (fixture)

EPS = 1e-5
BF16_ULP = 2.0**-7  # a bf16 value's relative spacing is at most this


def to_bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def halved(partials, rows):
    """partials f32 [split, R, D] -> the SplitKHalves a token-major split-K kernel returns, stacked
    as integers: XLA's CPU flushes subnormal bf16 and quiets NaNs when it copies bf16, and about 1
    lower half in 150 reads as one, which moves that partial by up to 127 f32 ulps."""
    halves = [lax.bitcast_convert_type(h, jnp.uint16) for h in f32_halves(jnp.asarray(partials))]
    return SplitKHalves(lax.bitcast_convert_type(jnp.stack(halves, axis=1), jnp.bfloat16), rows)


def reference(x, partials, weight, rows):
    """x_new and h in float64 after model.py's roundings: the K ranges' sums added in f32, in order,
    rounded to bf16, added to x and rounded; the norm in float64."""
    total = partials[0].astype(np.float32)
    for p in partials[1:]:
        total = total + p.astype(np.float32)
    x_new = to_bf16(np.asarray(x, np.float64) + to_bf16(total[:rows]))
    h = x_new / np.sqrt(np.mean(x_new**2, axis=-1, keepdims=True) + EPS)
    return x_new, h if weight is None else h * np.asarray(weight, np.float64)


@pytest.mark.parametrize("rows,extra,d,split,with_weight", [
    (1, 0, 64, 1, False), (3, 5, 576, 2, True), (16, 0, 4096, 4, False), (5, 11, 1536, 3, True)])
def test_residual_rmsnorm_matches_float64(rows, extra, d, split, with_weight):
    rng = np.random.default_rng(TEST_SEED)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    partials = (rng.standard_normal((split, rows + extra, d)) * rng.uniform(0.1, 4)).astype(np.float32)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, d), jnp.bfloat16) if with_weight else None
    want_x, want_h = reference(x, partials, weight, rows)
    split_k = halved(partials, rows)
    for delta in (split_k, split_k.join().astype(jnp.bfloat16)):
        got_x, got_h = residual_rmsnorm(x, delta, weight, EPS, interpret=True)
        assert got_x.dtype == got_h.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got_x, np.float64), want_x)
        # h: one rounding to bf16 (two with a weight) after a float32 norm
        np.testing.assert_allclose(np.asarray(got_h, np.float64), want_h, rtol=2.5 * BF16_ULP, atol=1e-6)


def test_residual_rmsnorm_rejects_bad_shapes():
    x = jnp.ones((4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not match"):
        residual_rmsnorm(x, jnp.ones((3, 64), jnp.bfloat16), None, EPS, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        residual_rmsnorm(x, halved(np.ones((2, 4, 32), np.float32), 4), None, EPS, interpret=True)
    with pytest.raises(ValueError, match="weight"):
        residual_rmsnorm(x, x, jnp.ones((32,), jnp.bfloat16), EPS, interpret=True)


@pytest.mark.parametrize("split,with_weight", [(0, True), (2, False), (4, False)])
def test_residual_rmsnorm_lowers_for_cuda(verify_triton_modules, split, with_weight):
    rows, d = 16, 4096
    delta = (jax.ShapeDtypeStruct((split, 2, rows, d), jnp.bfloat16) if split
             else jax.ShapeDtypeStruct((rows, d), jnp.bfloat16))
    weight = jax.ShapeDtypeStruct((d,), jnp.bfloat16) if with_weight else None

    def f(x, parts, *w):
        return residual_rmsnorm(x, SplitKHalves(parts, rows) if split else parts, w[0] if w else None, EPS)

    n0 = len(verify_triton_modules)
    _export_cuda(f, jax.ShapeDtypeStruct((rows, d), jnp.bfloat16), delta, *([weight] if weight else []))
    assert len(verify_triton_modules) == n0 + 1, "no Triton kernel was lowered"


def test_model_with_fused_residual_norm(tiny_float_and_int4, monkeypatch):
    """forward with FUSED_RESIDUAL_NORM on, o_proj / down_proj handing over split-K partials (a stand-in
    for the Mosaic kernel's halved output, which the CPU does not run), against the same partials
    joined by XLA: the residual stream is bit-identical, so the logits differ only by the norm's
    summation order."""
    from qspec_jax import model
    from qspec_jax.config import get_preset
    from qspec_jax.kernel_choice import arrange_weights
    from qspec_jax.kv_cache import KVCache

    config = get_preset("tiny")
    params = arrange_weights(model.unstack_layers(model.fuse_projections(tiny_float_and_int4[1])), "mosaic")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, params)
    asked = []

    def split_k_stand_in(x, mw, mode, unjoined=False):
        # the product over two K ranges in f32, each range's sums as the kernel's halves
        N, K = mw["w"].shape
        x2 = x.reshape(-1, K).astype(jnp.float32)
        w = dequantize_mosaic(mw, jnp.float32)
        partials = jnp.stack([x2[:, :K // 2] @ w[:K // 2], x2[:, K // 2:] @ w[K // 2:]])
        asked.append(unjoined)
        out = halved(partials, x2.shape[0])
        return out if unjoined else out.join().astype(x.dtype).reshape(*x.shape[:-1], N)

    monkeypatch.setattr(model, "mosaic_matmul", split_k_stand_in)
    launches = []  # the fused kernel's calls: each layer's two adds (the last with the final norm)
    monkeypatch.setattr(model, "residual_rmsnorm", lambda *a, **k: launches.append(1) or residual_rmsnorm(*a, **k))
    tokens = jax.random.randint(jax.random.key(TEST_SEED), (2, 7), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    logits = {}
    for fused in (False, True):
        monkeypatch.setattr(model, "FUSED_RESIDUAL_NORM", fused)
        asked.clear()
        launches.clear()
        cache = KVCache.create(config, 2, 16, jnp.bfloat16)
        logits[fused] = np.asarray(model.forward(params, tokens, positions, cache, config=config, mode="w4a16")[0])
        assert sum(asked) == len(launches) == (2 * config.num_layers if fused else 0)
    np.testing.assert_allclose(logits[True], logits[False], atol=0.02 * np.abs(logits[False]).max())
