"""The KV cache interface, and its bf16 implementation (`KVCache`).

Every cache `model.forward` takes implements the same few methods, so `forward` never asks which
cache it holds (the other implementation is QuantSpec's `hierarchical_kv.HierarchicalKVCache`):

    cache.write(i, k, v, starts) -> cache      layer i's new K/V [B, KV, T, hd] at positions starts[b] + t
    cache.attend(i, q, positions, view) -> a   q [B, T, H, hd] at positions [B, T] over layer i (its new
                                               K/V written first) -> a [B, T, H, hd]; `view` ("int8" /
                                               "int4") says how a quantized cache is read, bf16 ignores it
    cache.flush(headroom) -> cache             after acceptance has set `lengths`: bookkeeping (a cycle
                                               writes at most `headroom` = gamma + 1 tokens)
    cache.dense(i, view) -> (k, v)             what layer i holds for a query at each row's length, as
                                               dense [B, KV, S, hd] arrays (tests, debugging)
    cache.lengths [B] int32, cache.max_len, cache.batch

`NoCache` is the no-cache case (`forward(..., cache=None)`): each layer attends causally over the
tokens of the call only.

bf16 layout: one buffer per layer, `k[i], v[i]: [batch, kv_heads, max_len, head_dim]`. Separate
buffers (not one stacked [layers, ...] array) let every layer read and write its cache where it
lies: a slice of a stacked array is copied into a fresh buffer before a kernel or dot reads it,
which on the H200 cost 1.4x (W4A16) to 2.6x (bf16) of a whole decode step. Rows are right-padded: a
row's token at position p lives in slot p, so the write position of a row is its own length. Slots
at or past a row's length hold stale or draft entries; attention masks them out by position, and
the next write overwrites them (one explicit scatter per layer and array, `write_layer`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels
from qspec_jax.config import LlamaConfig

# Decode and verify passes (T <= this many new positions) over a bf16 cache read it through the
# flash-decoding kernel on the GPU (pallas_kernels/decode_attention.py), which reads only the slots
# below each row's length; prefill chunks and the CPU use the einsum `attention`. 0 turns the
# kernel off (scripts/bench_long_context.py's "+einsum" modes measure the difference).
KERNEL_ATTENTION_MAX_T = 32
KERNEL_ATTENTION_BACKEND = "auto"  # "auto": the kernel on GPU only; tests set "interpret" to run it on CPU


def attention(q, k, v, q_pos, k_pos):
    """Grouped-query attention. q: [B, T, H, hd]; k, v: [B, KV, S, hd]; q_pos: [B, T]; k_pos: [B, S].
    Returns [B, T, H, hd].

    A query at position p sees keys at positions <= p; everything else (padding, stale or future
    slots) is masked.
    """
    b, t, h, hd = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, rep, T, hd]
    scores = jnp.einsum("bgrtd,bgsd->bgrts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bgrts,bgsd->bgrtd", probs, v.astype(q.dtype), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def write_layer(layer_cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write `new: [batch, kv_heads, T, head_dim]` into one layer's cache at per-row slots `starts`.

    A per-row slice update written as one explicit scatter: `vmap` of `dynamic_update_slice`
    lowers to a windowed scatter that XLA:CPU runs ~35x slower. Callers guarantee
    `starts + T <= max_len` (checked before generation): `dynamic_update_slice` would clamp an
    out-of-range start onto earlier entries; this scatter drops such writes instead.
    """
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]
    slots = starts[:, None] + jnp.arange(t)  # [batch, T]
    # Advanced indices (rows, slots) around a slice put [batch, T] first: values [B, T, KV, hd].
    values = new.transpose(0, 2, 1, 3).astype(layer_cache.dtype)
    return layer_cache.at[rows, :, slots, :].set(values, mode="drop")


def replace_at(items: tuple, i: int, item) -> tuple:
    """`items` with entry i replaced (per-layer tuples of a cache)."""
    return items[:i] + (item,) + items[i + 1:]


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

    def write(self, i: int, k: jax.Array, v: jax.Array, starts: jax.Array) -> "KVCache":
        return self.replace(k=replace_at(self.k, i, write_layer(self.k[i], k, starts)),
                            v=replace_at(self.v, i, write_layer(self.v[i], v, starts)))

    def attend(self, i: int, q: jax.Array, positions: jax.Array, view: str = "int8") -> jax.Array:
        """Decode and verify passes read the cache through the flash-decoding kernel (GPU: only the
        slots below each row's length); prefill chunks and the CPU through the einsum `attention`."""
        b, t = positions.shape
        backend = pallas_kernels.resolve_backend(KERNEL_ATTENTION_BACKEND)
        k, v = self.k[i], self.v[i]
        if t <= KERNEL_ATTENTION_MAX_T and self.max_len % 16 == 0 and backend != "reference":
            return pallas_kernels.decode_attention(q, positions, (k, v), positions[:, 0] + t, backend=backend)
        k_pos = jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (b, self.max_len))
        return attention(q, k, v, positions, k_pos)

    def flush(self, headroom: int) -> "KVCache":
        """Nothing to maintain: stale slots are masked by position and overwritten."""
        return self

    def dense(self, i: int, view: str = "int8") -> tuple:
        return self.k[i], self.v[i]


@struct.dataclass
class NoCache:
    """No cache (`forward(..., cache=None)`): a plain causal pass over the call's own tokens (a query
    sees the call's keys at positions <= its own). Holds the current layer's K/V from `write` to
    `attend`; nothing outlives the call."""

    k: Optional[jax.Array] = None  # [B, KV, T, hd]
    v: Optional[jax.Array] = None

    def write(self, i: int, k: jax.Array, v: jax.Array, starts: jax.Array) -> "NoCache":
        return self.replace(k=k, v=v)

    def attend(self, i: int, q: jax.Array, positions: jax.Array, view: str = "int8") -> jax.Array:
        return attention(q, self.k, self.v, positions, positions)
