"""QuantSpec's hierarchical KV cache for ONE layer: INT8 codes stored as two 4-bit planes + a recent buffer.

Format (the kernel side is pallas_kernels/decode_attention.py, which reads it):
- Each element x gets an upper nibble u = clip(round((x - m) / s), 0, 15), asymmetric 4-bit with
  scale s and minimum m, and a lower nibble l = clip(round((x - u*s - m) / (s/16)) + 8, 0, 15), the
  residual at scale s/16 offset by 8. INT8 view: u*s + (l-8)*s/16 + m; INT4 view (the draft's, upper
  plane only): u*s + m, an ordinary round-to-nearest 4-bit quantization.
- The planes are separate arrays, so the draft's reads touch only `k_upper` / `v_upper`. Both are
  uint8 [B, KV, S, hd/2] packed along head_dim: byte i holds channel i (low nibble) and channel
  i + hd/2 (high nibble). Slot = position, as in the bf16 cache.
- Keys: (s, m) per channel over each group of G tokens: k_scale, k_min [B, KV, S/G, hd].
  Values: (s, m) per token over head_dim: v_scale, v_min [B, KV, S]. Stored in `scale_dtype`
  (float16 by default): m is rounded down and s up to that dtype before the codes are computed, so
  the codes are exact for the stored (s, m) and no value falls outside [m, m + 15 s].
  Error bounds per element: INT4 s/2; INT8 s/32, or s/16 where the residual's code is clipped at 15.
- Recent buffer: k_recent, v_recent [B, KV, R, hd] in the model dtype; slot r holds position
  q_len + r, where q_len [B] (a multiple of G) is the row's quantized length. Planes are valid for
  positions [0, q_len), the buffer for [q_len, length). Rows sit at different lengths, so q_len and
  the buffer's base differ per row.

Life cycle, all inside the compiled generate program:
- `prefill` quantizes all full groups of the prompt that the buffer cannot keep;
- `write` puts new K/V (draft steps or the verify pass) into the buffer at their positions: writes
  are always at positions >= length >= q_len, so the verify pass overwrites the draft's entries
  in the buffer, and drafts never reach the planes;
- `flush` (or `flush_layers` for all layers under one cond), after acceptance has set the lengths, quantizes the oldest group of each row whose
  buffer could not hold the next cycle's `headroom` (= gamma + 1) new tokens, and shifts that row's
  buffer down by G. Only accepted tokens are quantized. With headroom <= G <= R - headroom, one
  group per cycle keeps `length - q_len + headroom <= R`: the buffer holds between R - headroom - G
  and R - headroom accepted tokens in full precision (QuantSpec keeps 128-256).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.decode_attention import QuantKV, decode_attention, dequantize_planes


@struct.dataclass
class HierarchicalKV:
    """One layer's hierarchical cache (field shapes: module docstring)."""

    k_upper: jax.Array  # [B, KV, S, hd/2] uint8
    k_lower: jax.Array  # [B, KV, S, hd/2] uint8
    k_scale: jax.Array  # [B, KV, S/G, hd] scale_dtype
    k_min: jax.Array  # [B, KV, S/G, hd]
    v_upper: jax.Array  # [B, KV, S, hd/2] uint8
    v_lower: jax.Array  # [B, KV, S, hd/2] uint8
    v_scale: jax.Array  # [B, KV, S]
    v_min: jax.Array  # [B, KV, S]
    k_recent: jax.Array  # [B, KV, R, hd] model dtype; slot r = position q_len + r
    v_recent: jax.Array  # [B, KV, R, hd]
    q_len: jax.Array  # [B] int32, a multiple of G

    @property
    def group(self) -> int:
        return self.k_upper.shape[2] // self.k_scale.shape[2]

    @property
    def window(self) -> int:
        return self.k_recent.shape[2]

    @property
    def max_len(self) -> int:
        return self.k_upper.shape[2]

    def planes(self) -> QuantKV:
        return QuantKV(self.k_upper, self.k_lower, self.k_scale, self.k_min,
                       self.v_upper, self.v_lower, self.v_scale, self.v_min)


def create(batch: int, kv_heads: int, head_dim: int, max_len: int, *, group: int = 128, window: int = 256,
           dtype=jnp.bfloat16, scale_dtype=jnp.float16) -> HierarchicalKV:
    """An empty cache; the planes hold max_len rounded up to a multiple of `group` slots."""
    if head_dim % 2 or group < 1 or window < group:
        raise ValueError(f"need an even head_dim and window >= group, got {head_dim}, {window}, {group}")
    S = -(-max_len // group) * group
    B, KV, hd = batch, kv_heads, head_dim
    plane = jnp.zeros((B, KV, S, hd // 2), jnp.uint8)
    return HierarchicalKV(
        k_upper=plane, k_lower=plane,
        k_scale=jnp.ones((B, KV, S // group, hd), scale_dtype), k_min=jnp.zeros((B, KV, S // group, hd), scale_dtype),
        v_upper=plane, v_lower=plane,
        v_scale=jnp.ones((B, KV, S), scale_dtype), v_min=jnp.zeros((B, KV, S), scale_dtype),
        k_recent=jnp.zeros((B, KV, window, hd), dtype), v_recent=jnp.zeros((B, KV, window, hd), dtype),
        q_len=jnp.zeros((B,), jnp.int32),
    )


def check_capacity(cache: HierarchicalKV, headroom: int, max_total: int):
    """Host-side check before generation: the buffer takes a cycle's `headroom` new tokens next to
    one unflushed group, and no position reaches past the planes plus the buffer."""
    G, R = cache.group, cache.window
    if not 1 <= headroom <= G or R < G + headroom:
        raise ValueError(f"hierarchical cache needs 1 <= headroom ({headroom}) <= group ({G}) and "
                         f"window ({R}) >= group + headroom")
    if max_total > cache.max_len:
        raise ValueError(f"{max_total} tokens do not fit a cache of {cache.max_len} slots")


# ---------------------------------------------------------------- quantization


def _round_toward(x, dtype, direction):
    """x rounded to `dtype`, then stepped once toward `direction` (+-inf) if rounding went the other way."""
    y = x.astype(dtype)
    past = y.astype(jnp.float32) < x if direction > 0 else y.astype(jnp.float32) > x
    return jnp.where(past, jnp.nextafter(y, jnp.asarray(direction * jnp.inf, dtype)), y)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """[..., hd] codes 0..15 -> [..., hd/2] uint8: channel i low nibble, channel i + hd/2 high."""
    half = codes.shape[-1] // 2
    c = codes.astype(jnp.uint8)
    return c[..., :half] | (c[..., half:] << 4)


def quantize_planes(x: jax.Array, axis: int, scale_dtype=jnp.float16):
    """Asymmetric 4+4-bit quantization of x over `axis`: (upper, lower packed [.., hd/2] uint8,
    scale, min in scale_dtype with `axis` kept as size 1)."""
    x = x.astype(jnp.float32)
    m = _round_toward(jnp.min(x, axis=axis, keepdims=True), scale_dtype, -1)
    mf = m.astype(jnp.float32)
    s = _round_toward((jnp.max(x, axis=axis, keepdims=True) - mf) / 15, scale_dtype, +1)
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    sf = s.astype(jnp.float32)
    u = jnp.clip(jnp.round((x - mf) / sf), 0, 15)
    r = x - (u * sf + mf)
    l = jnp.clip(jnp.round(r / (sf / 16)) + 8, 0, 15)
    return pack_nibbles(u), pack_nibbles(l), s, m


def quantize_group(k: jax.Array, v: jax.Array, scale_dtype=jnp.float16) -> dict:
    """k, v [B, KV, G, hd] -> the planes of one group: keys per channel over the G tokens, values per
    token over head_dim. Returns {name: array} with k_scale/k_min [B, KV, hd], v_scale/v_min [B, KV, G]."""
    ku, kl, ks, km = quantize_planes(k, 2, scale_dtype)
    vu, vl, vs, vm = quantize_planes(v, 3, scale_dtype)
    return dict(k_upper=ku, k_lower=kl, k_scale=ks[:, :, 0], k_min=km[:, :, 0],
                v_upper=vu, v_lower=vl, v_scale=vs[..., 0], v_min=vm[..., 0])


def dequantize_int8(cache: HierarchicalKV):
    """(k, v) f32 [B, KV, S, hd] of both planes; slots at or past q_len hold stale values."""
    return dequantize_planes(cache.planes(), "int8")


def dequantize_int4(cache: HierarchicalKV):
    """(k, v) f32 [B, KV, S, hd] of the upper plane only (the draft's view)."""
    return dequantize_planes(cache.planes(), "int4")


# ---------------------------------------------------------------- writes


def write(cache: HierarchicalKV, k_new: jax.Array, v_new: jax.Array, starts: jax.Array) -> HierarchicalKV:
    """Write k_new, v_new [B, KV, T, hd] at positions starts[b] + t (>= the row's q_len) into the
    recent buffer, slot = position - q_len. One scatter per array; slots past the buffer are dropped
    (check_capacity and flush keep them from occurring)."""
    b, _, t, _ = k_new.shape
    rows = jnp.arange(b)[:, None]
    slots = (starts - cache.q_len)[:, None] + jnp.arange(t)  # [B, T]
    slots = jnp.where(slots >= 0, slots, cache.window)  # a write below q_len is a bug: drop it

    def put(buf, new):  # advanced indices (rows, slots) around a slice: values [B, T, KV, hd]
        return buf.at[rows, :, slots, :].set(new.transpose(0, 2, 1, 3).astype(buf.dtype), mode="drop")

    return cache.replace(k_recent=put(cache.k_recent, k_new), v_recent=put(cache.v_recent, v_new))


def _store_group(cache: HierarchicalKV, q: dict, at: jax.Array) -> dict:
    """Planes with group `q` stored at slots [at[b], at[b] + G) per row; at[b] = S drops the row."""
    B, G = at.shape[0], cache.group
    rows = jnp.arange(B)
    slots = at[:, None] + jnp.arange(G)  # [B, G]
    gi = at // G  # [B]
    out = {}
    for name in ("k_upper", "k_lower", "v_upper", "v_lower"):  # [B, KV, S, hd/2] <- [B, KV, G, hd/2]
        out[name] = getattr(cache, name).at[rows[:, None], :, slots, :].set(
            q[name].transpose(0, 2, 1, 3), mode="drop")
    for name in ("k_scale", "k_min"):  # [B, KV, S/G, hd] <- [B, KV, hd]
        out[name] = getattr(cache, name).at[rows, :, gi, :].set(q[name], mode="drop")
    for name in ("v_scale", "v_min"):  # [B, KV, S] <- [B, KV, G]
        out[name] = getattr(cache, name).at[rows[:, None], :, slots].set(q[name].transpose(0, 2, 1), mode="drop")
    return out


def flush(cache: HierarchicalKV, lengths: jax.Array, headroom: int) -> HierarchicalKV:
    """Quantize the oldest buffered group of every row with lengths - q_len + headroom > R, shift its
    buffer down by G and advance its q_len. Runs the work only when some row needs it (lax.cond)."""
    return flush_layers((cache,), lengths, headroom)[0]


def flush_layers(caches: tuple, lengths: jax.Array, headroom: int) -> tuple:
    """`flush` of every layer's cache under one lax.cond (all layers share lengths and q_len)."""
    G, R = caches[0].group, caches[0].window
    if not 1 <= headroom <= G or R < G + headroom:
        raise ValueError(f"flush needs 1 <= headroom ({headroom}) <= group ({G}) <= window ({R}) - headroom")
    due = lengths - caches[0].q_len + headroom > R  # [B]
    return jax.lax.cond(jnp.any(due), lambda cs: tuple(_flush_rows(c, due) for c in cs), lambda cs: cs, tuple(caches))


def _flush_rows(cache: HierarchicalKV, due: jax.Array) -> HierarchicalKV:
    G, S = cache.group, cache.max_len
    q = quantize_group(cache.k_recent[:, :, :G], cache.v_recent[:, :, :G], cache.k_scale.dtype)
    planes = _store_group(cache, q, jnp.where(due, cache.q_len, S))

    def shift(buf):
        rolled = jnp.concatenate([buf[:, :, G:], buf[:, :, :G]], axis=2)
        return jnp.where(due[:, None, None, None], rolled, buf)

    return cache.replace(**planes, k_recent=shift(cache.k_recent), v_recent=shift(cache.v_recent),
                         q_len=cache.q_len + jnp.where(due, G, 0))


def prefill(cache: HierarchicalKV, k: jax.Array, v: jax.Array, lengths: jax.Array, headroom: int) -> HierarchicalKV:
    """Fill an empty cache from a prompt's k, v [B, KV, P, hd] (row b valid for positions < lengths[b]).

    Each row keeps its last tokens in the buffer and quantizes the groups before them: q_len is the
    smallest multiple of G with lengths - q_len + headroom <= R.
    """
    B, KV, P, hd = k.shape
    G, R, S = cache.group, cache.window, cache.max_len
    q_len = -(-jnp.maximum(lengths + headroom - R, 0) // G) * G  # [B]
    n_groups = min(-(-P // G), S // G)
    if n_groups:
        pad = n_groups * G - P
        kp = jnp.pad(k, ((0, 0), (0, 0), (0, max(pad, 0)), (0, 0)))[:, :, : n_groups * G]
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, max(pad, 0)), (0, 0)))[:, :, : n_groups * G]
        # All groups at once: [B, KV, n, G, hd]; groups at or past q_len are stored but never read.
        q = quantize_group(kp.reshape(B, KV * n_groups, G, hd), vp.reshape(B, KV * n_groups, G, hd),
                           cache.k_scale.dtype)
        planes = {}
        for name in ("k_upper", "k_lower", "v_upper", "v_lower"):
            planes[name] = getattr(cache, name).at[:, :, : n_groups * G].set(q[name].reshape(B, KV, n_groups * G, hd // 2))
        for name in ("k_scale", "k_min"):
            planes[name] = getattr(cache, name).at[:, :, :n_groups].set(q[name].reshape(B, KV, n_groups, hd))
        for name in ("v_scale", "v_min"):
            planes[name] = getattr(cache, name).at[:, :, : n_groups * G].set(q[name].reshape(B, KV, n_groups * G))
        cache = cache.replace(**planes)
    pos = q_len[:, None] + jnp.arange(R)  # [B, R]: buffer slot r holds position q_len + r
    idx = jnp.clip(pos, 0, P - 1)[:, None, :, None]

    def gather(x, buf):
        got = jnp.take_along_axis(x, idx, axis=2).astype(buf.dtype)
        return jnp.where((pos < P)[:, None, :, None], got, 0)

    return cache.replace(k_recent=gather(k, cache.k_recent), v_recent=gather(v, cache.v_recent), q_len=q_len)


# ---------------------------------------------------------------- attention


def attention(cache: HierarchicalKV, q: jax.Array, q_pos: jax.Array, *, variant: str = "int8",
              backend: str = "auto", **tiling) -> jax.Array:
    """Decode attention of q [B, T, H, hd] at positions q_pos [B, T] over the planes (int8: the
    verifier, int4: the draft) and the full-precision buffer; the new tokens must already be
    written. Returns [B, T, H, hd]."""
    if variant not in ("int8", "int4"):
        raise ValueError(f"the hierarchical cache is read as 'int8' or 'int4', got {variant!r}")
    return decode_attention(q, q_pos, cache.planes(), cache.q_len, variant=variant,
                            recent=(cache.k_recent, cache.v_recent), recent_start=cache.q_len,
                            backend=backend, **tiling)
