"""Symmetric int4 weight quantization and the two-per-int8 packing the kernels read.

Layout (see DESIGN.md, "Pallas Triton facts"): K is cut into packing blocks of `pb` rows. Inside a
block the low nibble of packed row r holds block row r and the high nibble holds block row
r + pb/2, so a kernel reads a block as two dots over contiguous halves and never interleaves:

    packed[b*pb/2 + r, n] = (q[b*pb + r, n] & 0xF) | (q[b*pb + pb/2 + r, n] << 4)

`pb` is the group size when grouped and 128 (or 64 when K is not a multiple of 128) per channel.
The group size is never stored: K = 2 * packed.shape[0] and group_size = K // scales.shape[0].
"""

from __future__ import annotations

import jax.numpy as jnp

QMAX_W = 7  # symmetric int4 weights use -7..7 (clip to -8..7 is only a guard)


def pack_block(K: int, G: int) -> int:
    """Rows per packing block for a weight with K input rows and G scale groups."""
    if G < 1 or K % G:
        raise ValueError(f"K={K} is not divisible into {G} groups")
    if G > 1:
        pb = K // G
    elif K % 128 == 0:
        pb = 128
    elif K % 64 == 0:
        pb = 64
    else:
        raise ValueError(f"per-channel int4 weights need K to be a multiple of 64, got K={K}")
    if pb % 2:
        raise ValueError(f"packing block (group size) must be even, got {pb}")
    return pb


def pack_int4(q, pb: int):
    """Pack int4 values q ([K, N], any int dtype, values in -8..7) into int8 [K//2, N]."""
    K, N = q.shape
    if K % pb or pb % 2:
        raise ValueError(f"K={K} must be a multiple of the even packing block {pb}")
    q = jnp.asarray(q).astype(jnp.int8).reshape(K // pb, 2, pb // 2, N)
    low, high = q[:, 0], q[:, 1]
    # int8 arithmetic: (low & 0xF) is 0..15, (high << 4) wraps into the top nibble.
    packed = (low & jnp.int8(0xF)) | (high << jnp.int8(4))
    return packed.reshape(K // 2, N)


def unpack_int4(packed, pb: int):
    """Inverse of pack_int4: int8 [K//2, N] -> int8 [K, N] with values in -8..7."""
    Kh, N = packed.shape
    K = 2 * Kh
    if K % pb or pb % 2:
        raise ValueError(f"K={K} must be a multiple of the even packing block {pb}")
    p = jnp.asarray(packed, jnp.int8).reshape(K // pb, pb // 2, N)
    low = (p << jnp.int8(4)) >> jnp.int8(4)  # arithmetic shifts sign-extend the nibble
    high = p >> jnp.int8(4)
    return jnp.stack([low, high], axis=1).reshape(K, N)


def weight_layout(qw) -> tuple[int, int, int, int, int]:
    """(K, N, G, group_size, pb) of a quantized weight dict, derived from its shapes."""
    packed, scales = qw["packed"], qw["scales"]
    if packed.ndim != 2 or scales.ndim != 2:
        raise ValueError(
            f"packed and scales must be 2-D, got {packed.shape} and {scales.shape}"
        )
    K, N = 2 * packed.shape[0], packed.shape[1]
    G = scales.shape[0]
    if scales.shape[1] != N:
        raise ValueError(f"scales {scales.shape} do not match packed weight {packed.shape}")
    if K % G:
        raise ValueError(f"K={K} is not divisible by the {G} scale groups")
    return K, N, G, K // G, pack_block(K, G)


def resolve_groups(K: int, group_size: int):
    """(group_size, number of groups G) for K input channels; `group_size=-1` is one group over K."""
    if group_size == -1:
        group_size = K
    if group_size <= 0 or K % group_size:
        raise ValueError(f"K={K} is not divisible by group_size={group_size}")
    return group_size, K // group_size


def quantize_weight(w, group_size: int) -> dict:
    """Symmetric int4 quantization of w [K, N] (y = x @ w).

    One scale per output channel per group of `group_size` consecutive input rows
    (`group_size=-1`: one scale per output channel over all of K). scale = max|w| / 7 (0 -> 1),
    q = clip(round(w / scale), -8, 7). Returns {"packed": int8 [K//2, N], "scales": f32 [G, N]}.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {w.shape}")
    K, N = w.shape
    group_size, G = resolve_groups(K, group_size)
    pb = pack_block(K, G)
    wg = w.reshape(G, group_size, N)
    scales = jnp.max(jnp.abs(wg), axis=1) / QMAX_W
    scales = jnp.where(scales == 0, 1.0, scales)
    q = jnp.clip(jnp.round(wg / scales[:, None, :]), -8, 7).astype(jnp.int8).reshape(K, N)
    return {"packed": pack_int4(q, pb), "scales": scales.astype(jnp.float32)}


def dequantize_weight(qw):
    """float32 [K, N] weights of a quantized weight dict (q * scale)."""
    K, N, G, gs, pb = weight_layout(qw)
    q = unpack_int4(qw["packed"], pb).astype(jnp.float32).reshape(G, gs, N)
    return (q * qw["scales"].astype(jnp.float32)[:, None, :]).reshape(K, N)
