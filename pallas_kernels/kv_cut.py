"""The cut c(p) of the hierarchical KV cache: where a query stops reading the quantized planes.

A query at position p reads the positions below

    c(p) = G * floor(max(p + 1 - D, 0) / G)

from the planes (the int8 or int4 view) and the positions [c(p), p] from the full-precision recent
buffer; G is the key quantization group and D the fixed delay (qspec_jax/hierarchical_kv.py). c
depends on p only, not on how far the cache's maintenance has got or which other queries share a
verify block, so a verify block of gamma + 1 queries reads what gamma + 1 single decode steps read.
c is non-decreasing in p, and a query sees its last D .. D + G - 1 tokens in full precision.

This is the one definition: the cache's bookkeeping (qspec_jax/hierarchical_kv.py), the attention
kernel and its reference (decode_attention.py) all call `cut_position`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def cut_position(pos, group: int, delay: int):
    """c(p) = G * floor(max(p + 1 - D, 0) / G), elementwise on int32 positions `pos` (a jnp array or
    a value inside a Pallas kernel); group G >= 1 and delay D are Python ints."""
    x = jnp.maximum(pos + (1 - delay), 0)
    return lax.div(x, jnp.full_like(x, group)) * group  # x >= 0, so truncating division is floor
