"""The KV cache: explicit arrays, written and overwritten in place (per-row dynamic_update_slice).

Layout: one buffer per layer, `k[i], v[i]: [batch, kv_heads, max_len, head_dim]`. Separate buffers
(not one stacked [layers, ...] array) let every layer read and write its cache where it lies: a
slice of a stacked array is copied into a fresh buffer before a kernel or dot reads it, which on
the H200 cost 1.4x (W4A16) to 2.6x (bf16) of a whole decode step. Rows are right-padded: a row's
token at position p lives in slot p, so the write position of a row is its own length. Slots at or
past a row's length hold stale or draft entries; attention masks them out by position, and the
next write overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qspec_jax.config import LlamaConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values plus each row's length (number of valid slots)."""

    k: tuple  # num_layers x [batch, kv_heads, max_len, head_dim]
    v: tuple  # num_layers x [batch, kv_heads, max_len, head_dim]
    lengths: jax.Array  # [batch] int32

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        """An empty cache of `max_len` slots per row."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        def buffers():
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        return cls(k=buffers(), v=buffers(), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def write_layer(layer_cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write `new: [batch, kv_heads, T, head_dim]` into one layer's cache at per-row slots `starts`.

    This is a per-row `dynamic_update_slice`, written as one explicit scatter: `vmap` of
    `dynamic_update_slice` lowers to a windowed scatter that XLA:CPU runs ~35x slower. Callers
    guarantee `starts + T <= max_len` (checked before generation): `dynamic_update_slice` would clamp
    an out-of-range start onto earlier entries; this scatter drops such writes instead.
    """
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]
    slots = starts[:, None] + jnp.arange(t)  # [batch, T]
    # Advanced indices (rows, slots) around a slice put [batch, T] first: values [B, T, KV, hd].
    values = new.transpose(0, 2, 1, 3).astype(layer_cache.dtype)
    return layer_cache.at[rows, :, slots, :].set(values, mode="drop")


@struct.dataclass
class HierarchicalKVCache:
    """QuantSpec's INT8 KV cache (see qspec_jax/hierarchical_kv.py): one `HierarchicalKV` per layer
    (two 4-bit planes + a full-precision recent buffer) plus each row's length.

    `model.forward` reads it through its static `kv_view`: "int8" (both planes: the verifier and
    plain decoding) or "int4" (the upper plane only: the draft). A query at position p reads the
    planes below its cut c(p) = G * floor(max(p + 1 - D, 0) / G) and the buffer from there, so what
    it sees depends on p only. New K/V always go to the recent buffer; `flush` (after acceptance
    has set `lengths`) quantizes each group once all its tokens are accepted and drops it from the
    buffer once no query needs it there. A prompt is prefilled by a plain causal pass and `from_prompt`.
    """

    layers: tuple  # num_layers x HierarchicalKV
    lengths: jax.Array  # [batch] int32

    @classmethod
    def from_prompt(cls, config: LlamaConfig, k: tuple, v: tuple, lengths: jax.Array, max_len: int, *,
                    headroom: int, group: int = 128, window: int = 256, delay=None,
                    dtype=jnp.bfloat16) -> "HierarchicalKVCache":
        """A cache of `max_len` positions per row filled from a prompt's per-layer k, v
        [B, KV, P, hd] (e.g. a bf16 `KVCache`'s buffers after a causal prefill); `headroom` is the
        most tokens a cycle writes (gamma + 1), only checked; `delay` D defaults to group // 2."""
        from qspec_jax import hierarchical_kv as hkv

        b = k[0].shape[0]
        layers = tuple(
            hkv.prefill(hkv.create(b, config.num_kv_heads, config.head_dim, max_len, group=group, window=window,
                                   delay=delay, dtype=dtype), ki, vi, lengths, headroom)
            for ki, vi in zip(k, v)
        )
        return cls(layers=layers, lengths=lengths)

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def batch(self) -> int:
        return self.layers[0].k_upper.shape[0]


def check_hierarchical(config: LlamaConfig, batch: int, max_len: int, *, headroom: int, group: int, window: int,
                       delay=None):
    """Host-side capacity check of a `HierarchicalKVCache` before generation (clear ValueError)."""
    from qspec_jax import hierarchical_kv as hkv

    try:
        shapes = jax.eval_shape(lambda: hkv.create(batch, config.num_kv_heads, config.head_dim, max_len,
                                                   group=group, window=window, delay=delay))
        hkv.check_capacity(shapes, headroom, max_len)
    except ValueError as e:
        raise ValueError(f"kv='int8' (group {group}, window {window}, gamma + 1 = {headroom}): {e}") from None


def flush(cache, headroom: int):
    """After acceptance has set `cache.lengths`: maintain a `HierarchicalKVCache` (quantize each
    row's newly completed group, drop buffered groups no query reads any more; `headroom` = gamma + 1
    is only checked); a bf16 `KVCache` is returned unchanged."""
    if not isinstance(cache, HierarchicalKVCache):
        return cache
    from qspec_jax import hierarchical_kv as hkv

    return cache.replace(layers=hkv.flush_layers(cache.layers, cache.lengths, headroom))
