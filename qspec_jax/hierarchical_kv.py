"""QuantSpec's hierarchical KV cache: INT8 codes stored as two 4-bit planes + a full-precision recent buffer.

`HierarchicalKVCache` (all layers) implements the cache interface of qspec_jax/kv_cache.py
(`write`, `attend`, `flush`, `dense`); it holds one `HierarchicalKV` per layer, which the functions
below (`create`, `prefill`, `write`, `flush_layers`, `attention`) work on.

Format (the kernel side is pallas_kernels/decode_attention.py, which reads it):
- Each element x gets an upper nibble u = clip(round((x - m) / s), 0, 15), asymmetric 4-bit with
  scale s and minimum m, and a lower nibble l = clip(round((x - u*s - m) / (s/16)) + 8, 0, 15), the
  residual at scale s/16 offset by 8. INT8 view: u*s + (l-8)*s/16 + m; INT4 view (the draft's, upper
  plane only): u*s + m, an ordinary round-to-nearest 4-bit quantization.
- The planes are separate arrays, so the draft's reads touch only `k_upper` / `v_upper`. They are
  uint8 packed along head_dim: byte i holds channel i (low nibble) and channel i + hd/2 (high
  nibble). Key planes are [B, KV, S, hd/2]; value planes are stored transposed, [B, KV, hd/2, S]
  (the kernel's v_layout="tokens"): contiguous along the slots, the axis p @ V reduces over, which
  cut the INT8 kernel's time by 22-29% on the H200 (benchmarks/kv/README.md). Slot = position, as in
  the bf16 cache.
- Keys: (s, m) per channel over each group of G tokens: k_scale, k_min [B, KV, S/G, hd].
  Values: (s, m) per token over head_dim: v_scale, v_min [B, KV, S]. Stored in `scale_dtype`
  (float16 by default): m is rounded down and s up to that dtype before the codes are computed, so
  the codes are exact for the stored (s, m) and no value falls outside [m, m + 15 s].
  Error bounds per element: INT4 s/2; INT8 s/32, or s/16 where the residual's code is clipped at 15.
- Recent buffer: k_recent, v_recent [B, KV, R, hd] in the model dtype, a ring: it holds positions
  [r_start, r_start + R), position p in slot p mod R. q_len [B] (a multiple of G) is the row's
  quantized length: planes are valid for positions [0, q_len), the buffer for [r_start, length),
  and r_start <= q_len, so the two overlap. Dropping the oldest group only moves r_start (a shifted
  buffer cost a copy of every layer's buffers each step: the shift cannot run in place).

What a query reads depends on its position p only (so a verify block of gamma + 1 queries and
gamma + 1 single decode steps read the same values, and greedy QSpec equals plain greedy decoding on
this cache by construction): keys at positions below its cut c(p) (pallas_kernels/kv_cut.py; fixed
delay D = `delay`, G // 2 by default, independent of gamma) come from the planes (int8 or int4
view), keys in [c(p), p] from the full-precision buffer.

Life cycle, all inside the compiled generate program; the cache state (q_len, r_start) is a function
of the row's length alone, however lengths advance:
- `prefill` quantizes all full groups of the prompt (q_len = G * floor(length / G)) and keeps
  positions [c(length), length) in the buffer (r_start = c(length));
- `write` puts new K/V (draft steps or the verify pass) into the buffer at their positions: writes
  are always at positions >= length, so the verify pass overwrites the draft's entries in the
  buffer, and drafts never reach the planes;
- `flush` (or `flush_layers` for all layers), after acceptance has set the lengths, quantizes group
  g as soon as all its tokens are accepted (length >= (g+1) G), eagerly, and drops a group from the
  buffer (r_start moves past it) once no current or future query reads it in full precision
  (c(length) >= its end: the next cycle's earliest query is at position length). Only accepted
  tokens are quantized.
- Capacity (`check_capacity`, on the host): a cycle writes `headroom` = gamma + 1 tokens, so
  headroom <= D (the block's last query's cut stays within the planes), headroom <= G and
  R >= G + D + headroom - 2 (the buffer spans [c(length), length + headroom)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.decode_attention import QuantKV, decode_attention, dequantize_planes, ring_positions
from pallas_kernels.kv_cut import cut_position
from qspec_jax.config import LlamaConfig
from qspec_jax.kv_cache import replace_at

V_LAYOUT = "tokens"  # how the value planes are stored (decode_attention's v_layout)

# Default key group (tokens per per-channel key scale) and full-precision recent window, in slots.
KV_GROUP, KV_WINDOW = 128, 256


@struct.dataclass
class HierarchicalKV:
    """One layer's hierarchical cache (field shapes: module docstring)."""

    k_upper: jax.Array  # [B, KV, S, hd/2] uint8
    k_lower: jax.Array  # [B, KV, S, hd/2] uint8
    k_scale: jax.Array  # [B, KV, S/G, hd] scale_dtype
    k_min: jax.Array  # [B, KV, S/G, hd]
    v_upper: jax.Array  # [B, KV, hd/2, S] uint8 (transposed: V_LAYOUT)
    v_lower: jax.Array  # [B, KV, hd/2, S] uint8
    v_scale: jax.Array  # [B, KV, S]
    v_min: jax.Array  # [B, KV, S]
    k_recent: jax.Array  # [B, KV, R, hd] model dtype, a ring: position p in slot p mod R
    v_recent: jax.Array  # [B, KV, R, hd]
    q_len: jax.Array  # [B] int32, a multiple of G: planes valid for positions < q_len
    r_start: jax.Array  # [B] int32, a multiple of G, <= q_len: the buffer holds [r_start, r_start + R)
    delay: int = struct.field(pytree_node=False, default=1)  # D: a query at p cuts at c(p)

    @property
    def group(self) -> int:
        return self.k_upper.shape[2] // self.k_scale.shape[2]

    @property
    def window(self) -> int:
        return self.k_recent.shape[2]

    @property
    def max_len(self) -> int:
        return self.k_upper.shape[2]

    @property
    def cut(self) -> tuple:
        """(G, D): a query at p reads the planes below c(p) (pallas_kernels/kv_cut.py)."""
        return (self.group, self.delay)

    def cuts(self, positions: jax.Array) -> jax.Array:
        """c(p) of each position."""
        return cut_position(positions, self.group, self.delay)

    def slot_positions(self) -> jax.Array:
        """[B, R] int32: the position each buffer slot holds, in [r_start, r_start + R)."""
        return ring_positions(self.r_start, self.window)

    def planes(self) -> QuantKV:
        """The kernel's view (value planes transposed: v_layout V_LAYOUT)."""
        return QuantKV(self.k_upper, self.k_lower, self.k_scale, self.k_min,
                       self.v_upper, self.v_lower, self.v_scale, self.v_min)


def default_delay(group: int) -> int:
    """D = G // 2 (at least 1): queries see their last G/2 .. 3G/2 - 1 tokens in full precision, and
    window 256 at group 128 takes gamma + 1 up to 64."""
    return max(1, group // 2)


def create(batch: int, kv_heads: int, head_dim: int, max_len: int, *, group: int = KV_GROUP, window: int = KV_WINDOW,
           delay: int = None, dtype=jnp.bfloat16, scale_dtype=jnp.float16) -> HierarchicalKV:
    """An empty cache; the planes hold max_len rounded up to a multiple of `group` slots. `delay`
    (D, default `default_delay(group)`) fixes every query's cut (module docstring). The GPU kernels
    read the `window`-slot ring in blocks: window and group must share a power-of-2 factor of at
    least 16 there (decode_attention.ring_block; the defaults 256 and 128 share 128)."""
    delay = default_delay(group) if delay is None else int(delay)
    if head_dim % 2 or group < 1 or delay < 1 or window < group + delay - 1:
        raise ValueError(f"need an even head_dim, delay >= 1 and window >= group + delay - 1, got "
                         f"head_dim {head_dim}, window {window}, group {group}, delay {delay}")
    S = -(-max_len // group) * group
    B, KV, hd = batch, kv_heads, head_dim
    plane = jnp.zeros((B, KV, S, hd // 2), jnp.uint8)
    v_plane = jnp.zeros((B, KV, hd // 2, S), jnp.uint8)
    return HierarchicalKV(
        k_upper=plane, k_lower=plane,
        k_scale=jnp.ones((B, KV, S // group, hd), scale_dtype), k_min=jnp.zeros((B, KV, S // group, hd), scale_dtype),
        v_upper=v_plane, v_lower=v_plane,
        v_scale=jnp.ones((B, KV, S), scale_dtype), v_min=jnp.zeros((B, KV, S), scale_dtype),
        k_recent=jnp.zeros((B, KV, window, hd), dtype), v_recent=jnp.zeros((B, KV, window, hd), dtype),
        q_len=jnp.zeros((B,), jnp.int32), r_start=jnp.zeros((B,), jnp.int32), delay=delay,
    )


def capacity_error(group: int, window: int, delay: int, headroom: int):
    """Why a cache of this group / window / delay cannot take cycles of `headroom` tokens, or None."""
    G, R, D = group, window, delay
    if not 1 <= headroom <= min(G, D) or R < G + D + headroom - 2:
        return (f"hierarchical cache needs 1 <= headroom ({headroom}) <= min(group ({G}), delay ({D})) and "
                f"window ({R}) >= group + delay + headroom - 2 = {G + D + headroom - 2}")
    return None


def check_capacity(cache: HierarchicalKV, headroom: int, max_total: int):
    """Host-side check before generation: a cycle's `headroom` new tokens fit the buffer next to the
    positions [c(length), length) that queries still read in full precision, every query's cut stays
    within the quantized groups, and no position reaches past the planes."""
    err = capacity_error(cache.group, cache.window, cache.delay, headroom)
    if err:
        raise ValueError(err)
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


def dequantize(cache: HierarchicalKV, view: str = "int8"):
    """(k, v) f32 [B, KV, S, hd] of the planes in `view`: "int8" (both planes, the verifier's) or
    "int4" (the upper plane, the draft's); slots at or past q_len hold stale values."""
    return dequantize_planes(cache.planes(), view, V_LAYOUT)


# ---------------------------------------------------------------- writes


def write(cache: HierarchicalKV, k_new: jax.Array, v_new: jax.Array, starts: jax.Array) -> HierarchicalKV:
    """Write k_new, v_new [B, KV, T, hd] at positions starts[b] + t (>= the row's length) into the
    recent buffer's ring, slot = position mod R. One scatter per array; positions outside
    [r_start, r_start + R) are dropped (check_capacity and flush keep them from occurring)."""
    b, _, t, _ = k_new.shape
    R = cache.window
    rows = jnp.arange(b)[:, None]
    pos = starts[:, None] + jnp.arange(t)  # [B, T]
    inside = (pos >= cache.r_start[:, None]) & (pos < cache.r_start[:, None] + R)
    slots = jnp.where(inside, pos % R, R)  # outside the buffer's span is a bug: drop it

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
    # Advanced indices (rows, slots) around slices put [B, G] first: values [B, G, KV, hd/2].
    for name in ("k_upper", "k_lower"):  # [B, KV, S, hd/2]
        out[name] = getattr(cache, name).at[rows[:, None], :, slots, :].set(
            q[name].transpose(0, 2, 1, 3), mode="drop")
    for name in ("v_upper", "v_lower"):  # [B, KV, hd/2, S]
        out[name] = getattr(cache, name).at[rows[:, None], :, :, slots].set(
            q[name].transpose(0, 2, 1, 3), mode="drop")
    for name in ("k_scale", "k_min"):  # [B, KV, S/G, hd] <- [B, KV, hd]
        out[name] = getattr(cache, name).at[rows, :, gi, :].set(q[name], mode="drop")
    for name in ("v_scale", "v_min"):  # [B, KV, S] <- [B, KV, G]
        out[name] = getattr(cache, name).at[rows[:, None], :, slots].set(q[name].transpose(0, 2, 1), mode="drop")
    return out


def flush(cache: HierarchicalKV, lengths: jax.Array, headroom: int = 1) -> HierarchicalKV:
    """After acceptance has set `lengths`: quantize each row's next group once all its tokens are
    accepted, and drop the buffer's oldest group once no query at or past `lengths` reads it
    (module docstring). `headroom` (gamma + 1) is only checked. Work runs under lax.cond."""
    return flush_layers((cache,), lengths, headroom)[0]


def flush_layers(caches: tuple, lengths: jax.Array, headroom: int = 1) -> tuple:
    """`flush` of every layer's cache (all layers share lengths, q_len and r_start): one lax.cond
    for the quantization; dropping a group moves r_start. Lengths advance by at most headroom <= G
    per call, so at most one group per row is due for each."""
    c0 = caches[0]
    err = capacity_error(c0.group, c0.window, c0.delay, headroom)
    if err:
        raise ValueError(f"flush: {err}")
    G = c0.group
    due_q = lengths >= c0.q_len + G  # [B]: group q_len / G is complete
    caches = jax.lax.cond(jnp.any(due_q), lambda cs: tuple(_quantize_rows(c, due_q) for c in cs),
                          lambda cs: cs, tuple(caches))
    due_s = c0.cuts(lengths) >= c0.r_start + G  # [B]: no query at >= lengths reads the oldest group
    return tuple(c.replace(r_start=c.r_start + jnp.where(due_s, G, 0)) for c in caches)


def _quantize_rows(cache: HierarchicalKV, due: jax.Array) -> HierarchicalKV:
    """Quantize the buffered group at positions [q_len, q_len + G) of the `due` rows into the planes."""
    G, S = cache.group, cache.max_len
    idx = ((cache.q_len[:, None] + jnp.arange(G)) % cache.window)[:, None, :, None]  # [B, 1, G, 1]
    take = lambda buf: jnp.take_along_axis(buf, idx, axis=2)
    q = quantize_group(take(cache.k_recent), take(cache.v_recent), cache.k_scale.dtype)
    planes = _store_group(cache, q, jnp.where(due, cache.q_len, S))
    return cache.replace(**planes, q_len=cache.q_len + jnp.where(due, G, 0))


def prefill(cache: HierarchicalKV, k: jax.Array, v: jax.Array, lengths: jax.Array, headroom: int = 1) -> HierarchicalKV:
    """Fill an empty cache from a prompt's k, v [B, KV, P, hd] (row b valid for positions < lengths[b]).

    Each row quantizes all its full groups (q_len = G * floor(lengths / G)) and keeps positions
    [c(lengths), lengths) in the buffer (r_start = c(lengths)): the state `flush` would have reached.
    `headroom` (gamma + 1) is only checked.
    """
    B, KV, P, hd = k.shape
    G, R, S = cache.group, cache.window, cache.max_len
    err = capacity_error(G, R, cache.delay, headroom)
    if err:
        raise ValueError(f"prefill: {err}")
    q_len = lengths // G * G  # [B]
    r_start = cache.cuts(lengths)
    n_groups = min(-(-P // G), S // G)
    if n_groups:
        pad = n_groups * G - P
        kp = jnp.pad(k, ((0, 0), (0, 0), (0, max(pad, 0)), (0, 0)))[:, :, : n_groups * G]
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, max(pad, 0)), (0, 0)))[:, :, : n_groups * G]
        # All groups at once: [B, KV, n, G, hd]; groups at or past q_len are stored but never read.
        q = quantize_group(kp.reshape(B, KV * n_groups, G, hd), vp.reshape(B, KV * n_groups, G, hd),
                           cache.k_scale.dtype)
        planes = {}
        for name in ("k_upper", "k_lower"):
            planes[name] = getattr(cache, name).at[:, :, : n_groups * G].set(q[name].reshape(B, KV, n_groups * G, hd // 2))
        for name in ("v_upper", "v_lower"):  # transposed: [B, KV, hd/2, S]
            planes[name] = getattr(cache, name).at[:, :, :, : n_groups * G].set(
                jnp.swapaxes(q[name].reshape(B, KV, n_groups * G, hd // 2), -1, -2))
        for name in ("k_scale", "k_min"):
            planes[name] = getattr(cache, name).at[:, :, :n_groups].set(q[name].reshape(B, KV, n_groups, hd))
        for name in ("v_scale", "v_min"):
            planes[name] = getattr(cache, name).at[:, :, : n_groups * G].set(q[name].reshape(B, KV, n_groups * G))
        cache = cache.replace(**planes)
    pos = cache.replace(r_start=r_start).slot_positions()  # [B, R]
    idx = jnp.clip(pos, 0, P - 1)[:, None, :, None]

    def gather(x, buf):
        got = jnp.take_along_axis(x, idx, axis=2).astype(buf.dtype)
        return jnp.where((pos < P)[:, None, :, None], got, 0)

    return cache.replace(k_recent=gather(k, cache.k_recent), v_recent=gather(v, cache.v_recent), q_len=q_len,
                         r_start=r_start)


# ---------------------------------------------------------------- attention


def attention(cache: HierarchicalKV, q: jax.Array, q_pos: jax.Array, *, view: str = "int8",
              backend: str = "auto", **tiling) -> jax.Array:
    """Decode attention of q [B, T, H, hd] at positions q_pos [B, T] over the planes (int8: the
    verifier, int4: the draft) and the full-precision buffer, each query split at its own cut c(p)
    (module docstring); the new tokens must already be written. Returns [B, T, H, hd]."""
    if view not in ("int8", "int4"):
        raise ValueError(f"the hierarchical cache is read as 'int8' or 'int4', got {view!r}")
    return decode_attention(q, q_pos, cache.planes(), cache.q_len, variant=view,
                            recent=(cache.k_recent, cache.v_recent), recent_start=cache.r_start,
                            cut=cache.cut, recent_ring=True, backend=backend, v_layout=V_LAYOUT, **tiling)


# ---------------------------------------------------------------- the cache of all layers


@struct.dataclass
class HierarchicalKVCache:
    """QuantSpec's INT8 KV cache, the hierarchical implementation of the cache interface
    (qspec_jax/kv_cache.py): one `HierarchicalKV` per layer plus each row's length.

    `attend`'s view: "int8" (both planes: the verifier and plain decoding) or "int4" (the upper
    plane only: the draft). New K/V always go to the recent buffer; `flush` (after acceptance has
    set `lengths`) quantizes each group once all its tokens are accepted and drops it from the
    buffer once no query needs it there. A prompt is prefilled by a plain causal pass and
    `from_prompt`.
    """

    layers: tuple  # num_layers x HierarchicalKV
    lengths: jax.Array  # [batch] int32

    @classmethod
    def from_prompt(cls, config: LlamaConfig, k: tuple, v: tuple, lengths: jax.Array, max_len: int, *,
                    headroom: int, group: int = KV_GROUP, window: int = KV_WINDOW, delay=None,
                    dtype=jnp.bfloat16) -> "HierarchicalKVCache":
        """A cache of `max_len` positions per row filled from a prompt's per-layer k, v
        [B, KV, P, hd] (e.g. a bf16 `KVCache`'s buffers after a causal prefill); `headroom` is the
        most tokens a cycle writes (gamma + 1), only checked; `delay` D defaults to group // 2."""
        b = k[0].shape[0]
        layers = tuple(
            prefill(create(b, config.num_kv_heads, config.head_dim, max_len, group=group, window=window,
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

    def write(self, i: int, k: jax.Array, v: jax.Array, starts: jax.Array) -> "HierarchicalKVCache":
        """New K/V go to layer i's recent buffer (`write`); drafts never reach the planes."""
        return self.replace(layers=replace_at(self.layers, i, write(self.layers[i], k, v, starts)))

    def attend(self, i: int, q: jax.Array, positions: jax.Array, view: str = "int8") -> jax.Array:
        return attention(self.layers[i], q, positions, view=view)

    def flush(self, headroom: int) -> "HierarchicalKVCache":
        """After acceptance has set `lengths`: quantize each row's newly completed group, drop
        buffered groups no query reads any more (`flush_layers`; `headroom` = gamma + 1 is only
        checked)."""
        return self.replace(layers=flush_layers(self.layers, self.lengths, headroom))

    def dense(self, i: int, view: str = "int8") -> tuple:
        """(k, v) f32 [B, KV, S, hd]: what a query at each row's length reads, the dequantized
        `view` below its cut and the buffer from there (slots past the length are stale)."""
        c = self.layers[i]
        k, v = dequantize(c, view)
        pos = jnp.arange(c.max_len)
        in_buf = (pos[None, :] >= c.cuts(self.lengths)[:, None])[:, None, :, None]  # [B, 1, S, 1]
        idx = (pos % c.window)[None, None, :, None]  # the ring slot of each position
        from_buf = lambda buf: jnp.take_along_axis(buf, idx, axis=2).astype(jnp.float32)
        return jnp.where(in_buf, from_buf(c.k_recent), k), jnp.where(in_buf, from_buf(c.v_recent), v)


def check_cache(config: LlamaConfig, batch: int, max_len: int, *, headroom: int, group: int, window: int,
                delay=None):
    """Host-side capacity check of a `HierarchicalKVCache` before generation (clear ValueError)."""
    try:
        shapes = jax.eval_shape(lambda: create(batch, config.num_kv_heads, config.head_dim, max_len,
                                               group=group, window=window, delay=delay))
        check_capacity(shapes, headroom, max_len)
    except ValueError as e:
        raise ValueError(f"kv='int8' (group {group}, window {window}, gamma + 1 = {headroom}): {e}") from None
