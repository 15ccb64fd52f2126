"""The KV cache: explicit arrays, written and overwritten in place with dynamic_update_slice.

Layout `k, v: [layers, batch, kv_heads, max_len, head_dim]`. Rows are right-padded: a row's token at
position p lives in slot p, so the write position of a row is its own length. Slots at or past a
row's length hold stale or draft entries; attention masks them out by position, and the next write
overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qspec_jax.config import LlamaConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values plus each row's length (number of valid slots)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # [batch] int32

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        """An empty cache of `max_len` slots per row."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def write_layer(cache_all: jax.Array, new: jax.Array, layer, starts: jax.Array) -> jax.Array:
    """Write `new: [batch, kv_heads, T, head_dim]` into `cache_all[layer]` at per-row slots `starts`.

    `dynamic_update_slice` clamps an out-of-range start instead of failing, which would silently
    overwrite earlier entries; callers guarantee `starts + T <= max_len` (checked before generation).
    """

    def write_row(row_all, row_new, start):
        # row_all: [layers, kv_heads, max_len, head_dim]
        return jax.lax.dynamic_update_slice(row_all, row_new[None].astype(row_all.dtype), (layer, 0, start, 0))

    return jax.vmap(write_row, in_axes=(1, 0, 0), out_axes=1)(cache_all, new, starts)
