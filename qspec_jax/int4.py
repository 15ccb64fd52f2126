"""Int4 rounding primitives shared by round-to-nearest (qspec_jax.quantize) and GPTQ (qspec_jax.gptq).

A module of its own so that quantize -> gptq -> int4 is a chain, not a circle.
"""

from __future__ import annotations

import jax.numpy as jnp

import pallas_kernels

_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


def quantize_weight_mse(w, group_size: int) -> dict:
    """Like pallas_kernels.quantize_weight, but each group's scale is searched, not max|w| / 7.

    Per (group, output channel) the scale c * max|w| / 7 with the c in 1.0, 0.95, ..., 0.5 of least
    squared error is kept (values past the range clip to -8..7). On rotated (Gaussian-like) weights
    clipping the tails lowers the error; it matters most per channel, where one group spans all of K.
    Same layout as quantize_weight (packed with pallas_kernels.pack_int4).
    """
    w = jnp.asarray(w, jnp.float32)
    K, N = w.shape
    gs = K if group_size == -1 else group_size
    G = K // gs
    wg = w.reshape(G, gs, N)
    best_s = mse_scales(wg)
    q = round_int4(wg, best_s[:, None]).astype(jnp.int8).reshape(K, N)
    return {"packed": pallas_kernels.pack_int4(q, pallas_kernels.pack_block(K, G)),
            "scales": best_s.astype(jnp.float32)}


def round_int4(w, scale):
    """clip(round(w / scale), -8, 7) as f32 integer values."""
    return jnp.clip(jnp.round(w / scale), -8, 7)


def mse_scales(wg):
    """Per (group, output channel) scale of wg [G, gs, N]: the c * max|w| / 7, c in _CLIP_RATIOS,
    with the least squared rounding error. Returns f32 [G, N]."""
    amax = jnp.max(jnp.abs(wg), axis=1)
    best_s = best_e = None
    for c in _CLIP_RATIOS:
        s = jnp.where(amax == 0, 1.0, amax * (c / pallas_kernels.packing.QMAX_W))
        e = jnp.sum((round_int4(wg, s[:, None]) * s[:, None] - wg) ** 2, axis=1)
        if best_s is None:
            best_s, best_e = s, e
        else:
            best_s, best_e = jnp.where(e < best_e, s, best_s), jnp.minimum(e, best_e)
    return best_s
