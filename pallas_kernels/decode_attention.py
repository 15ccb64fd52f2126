"""Decode attention (flash-decoding) over a bf16 KV cache or QuantSpec's hierarchical INT8/INT4 planes.

One program per (batch row, kv head, sequence split). It holds all `rep = H // KV` query heads of its
kv head and all T query positions of the row (T = gamma + 1 in a verify pass, 1 in a draft step) as
one [M, hd] block, M = rep*T padded to a power of 2 >= 16 (tt.dot needs 16 rows), so grouped-query
heads share each K/V load and no KV is repeated. Each program runs an online softmax over its blocks
of `block_k` slots and writes unnormalized partials (o, m, l); `merge_partials` combines the splits
(and any other launch, e.g. the full-precision recent buffer) with a logsumexp merge in jnp.

Splits are dynamic: the blocks a row can see (`slot < kv_len` and `position <= max query position`)
are divided evenly among `splits` programs, so a short row does not leave most programs idle or
read slots past its length. The default split count fills the GPU with `programs_per_sm` programs
per SM.

Latency (issue 11): on the H200 the INT4 view ran no faster per block than bf16 (159 us at batch 16
x 8k for a quarter of the bytes): each program waits for a block's loads, then computes, so few
bytes are in flight. The launch knobs attack that, each measured by `scripts/bench_attention.py
--sweep` before it becomes a default (DEFAULTS): every load of a block (K and V) is issued at the
top of an iteration; quantized blocks may span several key groups (`block_k` > G: one sub-block per
group, one softmax rescale per block), so an iteration moves more bytes; `programs_per_sm`,
`num_warps` and `num_stages` set occupancy and Triton's own pipelining. (Register prefetch, swapped
dot operands, stage ablations and a channels-major value layout were measured with the kernel of
commit 09cc211 and lost or were diagnostics only; they are gone.)

Masking: key slot j of the main cache is at position `j`, slot r of the recent buffer at
`recent_start + r`, or with `recent_ring` (the hierarchical cache's ring: no shift when its oldest
group leaves) at the position in [recent_start, recent_start + R) that is r modulo R; a query at
position p sees keys at positions <= p, and only main-cache slots below `kv_len` (the caller has
written the row's new tokens before attending). With `cut=(G, D)` (the hierarchical cache) each
query row also has its own cut c(p) (kv_cut.py): it reads positions < c(p) from the main cache
(planes) and positions in [c(p), p] from the recent buffer, so what a query sees depends on its
position only, not on how far the cache's maintenance has got or which other queries share its block.

Variants:
- "bf16": plain k, v [B, KV, S, hd] in any float dtype;
- "int8": both 4-bit planes of a `QuantKV` (the verifier's view);
- "int4": the upper plane only (the draft's view: half the code bytes of int8, a quarter of bf16).

QuantKV format (written by qspec_jax.hierarchical_kv): an 8-bit code per element split into an upper
nibble u (asymmetric 4-bit: scale s, minimum m) and a lower nibble l (the residual at scale s/16,
offset by 8): value = u*s + (l-8)*s/16 + m = (16u + l - 8) * s/16 + m; the INT4 view is u*s + m.
Planes are packed along head_dim: byte i holds channel i in its low nibble and channel i + hd/2 in
its high nibble, so a block is two dots over contiguous halves. Keys have one (s, m) per channel per
group of G tokens, values one per token. Scales are folded into the small operand of each dot (q for
keys, the probabilities for values) and the minimum enters as a bias, so the codes go to the tensor
cores as exact small integers and are never dequantized elementwise.

How codes become 16-bit dot operands (`unpack`; f32 queries always convert): "convert" computes the
integer code (u, or 16u + l - 8) and converts it; "bits" builds U = B + u and L = B + l from bits
(bitfloat.py: no int -> float conversion) and uses 16u + l - 8 = 16 U + L - (17 B + 8), i.e. INT8 is
dot(16 qs, U) + dot(qs, L) minus (17 B + 8) times the row sum of qs (the same on the value side with
the scaled probabilities), INT4 dot(qs, U) minus B times it; "asm" builds the same bits by inline
PTX (prmt + lop3, four bytes per instance), on the Triton backend only (interpret mode runs "bits").

Value planes are stored transposed, [B, KV, hd/2, S] (`V_LAYOUT` = "tokens"; byte (i, t) holds
channel i of token t in its low nibble and channel i + hd/2 in its high nibble: the same nibble
packing with the axes swapped). A value tile is loaded as [hd/2, sub], contiguous along the slots,
the axis p @ V reduces over, converted exactly like a key tile and used as dot(p, tile^T), mirroring
the key side's dot(qs, codes^T); so the codes converted in registers need no re-layout before the
MMA. Against the keys' channels-major layout it cut INT8 by 22-29% on the H200
(benchmarks/kv/h200_attention_vlayout.json, measured with the kernel of commit 09cc211).
v_scale / v_min stay [B, KV, S].
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .bitfloat import FLOAT_BASE, asm_nibble_floats, nibble_floats
from .common import compute_dtype, dot_precision, pow2_at_least
from .kv_cut import cut_position
from .tiling import NUM_SMS
from .w4a16 import resolve_backend

VARIANTS = ("bf16", "int8", "int4")
NEG = -1e30  # finite "minus infinity": a fully masked row keeps m finite and p = 0


class QuantKV(NamedTuple):
    """The quantized planes of one layer's hierarchical cache (see the module docstring)."""

    k_upper: jax.Array  # [B, KV, S, hd/2] uint8: upper nibbles, channel i low / i + hd/2 high
    k_lower: jax.Array  # [B, KV, S, hd/2] uint8: lower nibbles, same packing
    k_scale: jax.Array  # [B, KV, S/G, hd] upper-plane scale per channel per group of G tokens
    k_min: jax.Array  # [B, KV, S/G, hd] minimum per channel per group
    v_upper: jax.Array  # [B, KV, hd/2, S] uint8: transposed (V_LAYOUT), channel i low / i + hd/2 high
    v_lower: jax.Array  # [B, KV, hd/2, S] uint8: lower nibbles, same packing
    v_scale: jax.Array  # [B, KV, S] upper-plane scale per token
    v_min: jax.Array  # [B, KV, S] minimum per token


def plane_names(variant: str) -> list:
    """The QuantKV fields a quantized variant reads, in order (INT4: no lower planes)."""
    return [name for name in QuantKV._fields if variant != "int4" or not name.endswith("_lower")]


def unpack_planes(packed: jax.Array) -> jax.Array:
    """[..., hd/2] packed nibbles -> [..., hd] int32 codes 0..15."""
    p = packed.astype(jnp.int32)
    return jnp.concatenate([p & 15, (p >> 4) & 15], axis=-1)


V_LAYOUT = "tokens"  # the value planes' only layout: [B, KV, hd/2, S] (module docstring)


def _check_v_layout(v_layout: str):
    # Callers may still name the layout (qspec_jax.hierarchical_kv does); only "tokens" exists.
    if v_layout != V_LAYOUT:
        raise ValueError(f"v_layout must be {V_LAYOUT!r} (value planes [B, KV, hd/2, S]), got {v_layout!r}")


def dequantize_planes(kv: QuantKV, variant: str, v_layout: str = V_LAYOUT):
    """(k, v) f32 [B, KV, S, hd] of the int8 (both planes) or int4 (upper plane) view; the value
    planes [B, KV, hd/2, S] are transposed back."""
    _check_v_layout(v_layout)
    kv = kv._replace(v_upper=jnp.swapaxes(kv.v_upper, -1, -2), v_lower=jnp.swapaxes(kv.v_lower, -1, -2))
    k_scale = jnp.repeat(kv.k_scale.astype(jnp.float32), kv.k_upper.shape[2] // kv.k_scale.shape[2], axis=2)
    k_min = jnp.repeat(kv.k_min.astype(jnp.float32), kv.k_upper.shape[2] // kv.k_min.shape[2], axis=2)
    v_scale, v_min = kv.v_scale.astype(jnp.float32)[..., None], kv.v_min.astype(jnp.float32)[..., None]

    def value(upper, lower, s, m):
        u = unpack_planes(upper).astype(jnp.float32)
        if variant == "int4":
            return u * s + m
        return (16 * u + unpack_planes(lower).astype(jnp.float32) - 8) * (s / 16) + m

    return value(kv.k_upper, kv.k_lower, k_scale, k_min), value(kv.v_upper, kv.v_lower, v_scale, v_min)


# ---------------------------------------------------------------- kernel

UNPACKS = ("convert", "bits", "asm")


def _decode_kernel(
    row_pos_ref,  # [M] int32: query position of each query row, -1 on padding rows
    n_ref,  # [] int32: slots [0, n) may be read
    off_ref,  # [] int32: position of slot 0
    q_ref,  # [M, hd] the query rows of one kv head
    *refs,  # bf16: k, v [S, hd]; int8: ku, kl [S, hd/2], ks, km [S/G, hd], vu, vl [hd/2, S], vs, vm [S];
    #         int4: the same without kl and vl; then the outputs o [M, hd] f32, m [M] f32, l [M] f32
    variant: str,
    bk: int,
    sub: int,
    splits: int,
    sm_scale: float,
    cdt,
    unpack: str = "convert",
    cut_side: Optional[str] = None,  # None; "below": slots at positions < c(p); "from": positions >= c(p)
    cut_group: int = 1,
    cut_delay: int = 0,
    ring: bool = False,  # slot j holds position p = j (mod S) in [off, off + S), off a multiple of bk
):
    *kv_refs, o_ref, m_ref, l_ref = refs
    M, hd = q_ref.shape
    hd2 = hd // 2
    S = kv_refs[0].shape[0]
    prec = dot_precision(cdt)
    row_pos = row_pos_ref[...]
    n, off = n_ref[...], off_ref[...]

    def cut_of(pos):  # c(p): kv_cut.py
        return cut_position(pos, cut_group, cut_delay)

    end = jnp.minimum(n, jnp.max(row_pos) - off + 1)  # slots past `end` are masked for every row
    if cut_side is not None:
        row_cut = cut_of(row_pos)  # [M]
        if cut_side == "below":  # c is monotone: the last query row's cut bounds every row's
            end = jnp.minimum(end, cut_of(jnp.max(row_pos)) - off)
    total = (jnp.maximum(end, 0) + bk - 1) // bk
    per = (total + splits - 1) // splits
    first = pl.program_id(2) * per
    count = jnp.clip(total - first, 0, per)

    def dot(a, b):  # a @ b.T, f32 accumulation
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=prec)

    def pdot(p, v):  # p @ v
        return jnp.dot(p, v, preferred_element_type=jnp.float32, precision=prec)

    def rowsum(x):  # [M, *] -> [M, 1] f32
        return jnp.sum(x.astype(jnp.float32), axis=1)[:, None]

    # Dot operands of a tile of packed codes (keys [sub, hd/2], values [hd/2, sub]): a list of
    # (weight, low-half channels, high-half channels) whose weighted dots sum to the codes' dot minus
    # `offset` times the row sum of the small operand. "convert": the exact integer code (u, or
    # 16u + l - 8) converted to cdt, offset 0. "bits" / "asm": U = B + u and L = B + l built from bits
    # (bitfloat.py), so 16u + l - 8 = 16 U + L - (17 B + 8): two dots and no integer arithmetic per element.
    if unpack == "convert":
        offset = 0.0
    else:
        bits, base = FLOAT_BASE[jnp.dtype(cdt)]
        offset = base if variant == "int4" else 17 * base + 8
        nibbles = asm_nibble_floats if unpack == "asm" else nibble_floats

    def planes(u, lo):
        if unpack != "convert":
            ops = [(1.0 if variant == "int4" else 16.0, nibbles(u, 0, bits, cdt), nibbles(u, 4, bits, cdt))]
            if variant == "int8":
                ops.append((1.0, nibbles(lo, 0, bits, cdt), nibbles(lo, 4, bits, cdt)))
            return ops
        u = u.astype(jnp.int32)
        c_lo, c_hi = u & 15, (u >> 4) & 15
        if variant == "int8":
            lo = lo.astype(jnp.int32)
            c_lo, c_hi = 16 * c_lo + (lo & 15) - 8, 16 * c_hi + ((lo >> 4) & 15) - 8
        return [(1.0, c_lo.astype(cdt), c_hi.astype(cdt))]

    def weighted(x, w):  # x * w in cdt: a power of 2, exact
        return x if w == 1.0 else x * jnp.asarray(w, x.dtype)

    cs = 1.0 if variant == "int4" else 1.0 / 16  # code scale: value = code * cs * s + m
    if variant == "bf16":
        k_ref, v_ref = kv_refs
        q = q_ref[...].astype(cdt)
    else:
        if variant == "int8":
            ku_ref, kl_ref, ks_ref, km_ref, vu_ref, vl_ref, vs_ref, vm_ref = kv_refs
        else:
            ku_ref, ks_ref, km_ref, vu_ref, vs_ref, vm_ref = kv_refs
            kl_ref = vl_ref = None
        group = S // ks_ref.shape[0]
        q_lo = q_ref.at[:, pl.ds(0, hd2)][...].astype(jnp.float32)  # [M, hd/2]
        q_hi = q_ref.at[:, pl.ds(hd2, hd2)][...].astype(jnp.float32)

    def fetch(blk):
        """Every load of block blk (clamped into the cache), one tuple per sub-block of `sub` slots,
        issued together at the top of an iteration so K's and V's bytes are in flight at once."""
        t0 = jnp.clip(blk, 0, S // bk - 1) * bk
        if ring:  # block blk holds positions off + t0 .. at slots (off + t0) mod S: whole blocks
            t0 = lax.rem(t0 + off, S)
        out = []
        for j in range(bk // sub):
            rows = pl.ds(t0 + j * sub, sub)
            if variant == "bf16":
                out.append((k_ref.at[rows, :][...], v_ref.at[rows, :][...]))  # [sub, hd] each
                continue
            g = (t0 + j * sub) // group  # sub divides the group: one (scale, min) row per sub-block
            half = lambda r, h: r.at[pl.ds(g, 1), pl.ds(h * hd2, hd2)][...]  # noqa: E731  [1, hd/2]
            cols = pl.ds(pl.multiple_of(t0 + j * sub, sub), sub)  # value tiles [hd/2, sub]
            out.append((ku_ref.at[rows, :][...], None if kl_ref is None else kl_ref.at[rows, :][...],
                        half(ks_ref, 0), half(ks_ref, 1), half(km_ref, 0), half(km_ref, 1),
                        vu_ref.at[:, cols][...], None if vl_ref is None else vl_ref.at[:, cols][...],
                        vs_ref.at[rows][...], vm_ref.at[rows][...]))
        return out

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def scores(raw):  # [M, sub] scaled logits of one sub-block
        if variant == "bf16":
            return dot(q, raw[0].astype(cdt)) * sm_scale
        ku, kl, ks_lo, ks_hi, km_lo, km_hi = raw[:6]
        qs_lo = (q_lo * (f32(ks_lo) * (cs * sm_scale))).astype(cdt)
        qs_hi = (q_hi * (f32(ks_hi) * (cs * sm_scale))).astype(cdt)
        s = None
        for w, x_lo, x_hi in planes(ku, kl):
            part = dot(weighted(qs_lo, w), x_lo) + dot(weighted(qs_hi, w), x_hi)
            s = part if s is None else s + part
        if offset:
            s -= offset * (rowsum(qs_lo) + rowsum(qs_hi))
        kmin = jnp.sum(q_lo * f32(km_lo), axis=1) + jnp.sum(q_hi * f32(km_hi), axis=1)
        return s + (kmin * sm_scale)[:, None]

    def compute(blk, raw, carry):
        """Online-softmax update with block blk: one rescale for all its sub-blocks."""
        o_lo, o_hi, m_prev, l_prev = carry
        t0 = blk * bk
        ss, masks = [], []
        rows_cut = None if cut_side is None else row_cut[:, None]
        for j in range(bk // sub):
            slots = t0 + j * sub + lax.broadcasted_iota(jnp.int32, (M, sub), 1)
            mask = (slots < n) & (off + slots <= row_pos[:, None])  # [M, sub]
            if cut_side == "below":
                mask &= off + slots < rows_cut
            elif cut_side == "from":
                mask &= off + slots >= rows_cut
            ss.append(jnp.where(mask, scores(raw[j]), NEG))
            masks.append(mask)
        m_next = m_prev
        for s in ss:
            m_next = jnp.maximum(m_next, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        l_next = l_prev * corr
        o_lo = o_lo * corr[:, None]
        if variant != "bf16":
            o_hi = o_hi * corr[:, None]
        for j in range(bk // sub):
            p = jnp.where(masks[j], jnp.exp(ss[j] - m_next[:, None]), 0.0)  # [M, sub] f32
            l_next = l_next + jnp.sum(p, axis=1)
            if variant == "bf16":
                o_lo = o_lo + pdot(p.astype(cdt), raw[j][1].astype(cdt))
                continue
            vu, vl, vs, vm = raw[j][6:]
            ps = (p * (vs.astype(jnp.float32)[None, :] * cs)).astype(cdt)
            pm = rowsum(p * vm.astype(jnp.float32)[None, :])  # [M, 1]: the minimum's share
            if offset:
                pm -= offset * rowsum(ps)
            for w, x_lo, x_hi in planes(vu, vl):  # ps [M, sub] @ x^T, x [hd/2, sub] (as dot(qs, codes^T))
                o_lo = o_lo + dot(weighted(ps, w), x_lo)
                o_hi = o_hi + dot(weighted(ps, w), x_hi)
            o_lo, o_hi = o_lo + pm, o_hi + pm
        return o_lo, o_hi, m_next, l_next

    init = (
        jnp.zeros((M, hd if variant == "bf16" else hd2), jnp.float32),
        jnp.zeros((M, hd2 if variant != "bf16" else 1), jnp.float32),
        jnp.full((M,), NEG, jnp.float32),
        jnp.zeros((M,), jnp.float32),
    )
    o_lo, o_hi, m, l = lax.fori_loop(0, count, lambda i, c: compute(first + i, fetch(first + i), c), init)
    if variant == "bf16":
        o_ref[...] = o_lo
    else:
        o_ref.at[:, pl.ds(0, hd2)][...] = o_lo
        o_ref.at[:, pl.ds(hd2, hd2)][...] = o_hi
    m_ref[...] = m
    l_ref[...] = l


# Launch defaults per variant (scripts/bench_attention.py --sweep measures the alternatives):
# block_k: preferred K block (halved until it divides the cache and fits the key group); quantized
#   blocks larger than the key group run as sub-blocks of one group each under one softmax rescale;
# programs_per_sm: how many programs an SM holds at once (its register / shared-memory limit, read
#   with ncu: scripts/ncu_probe.py); pick_splits sizes the grid in whole waves of that many;
# num_warps, num_stages: Triton's; unpack: how 4-bit codes become dot operands ("convert", "bits",
#   "asm"; see _decode_kernel).
LAUNCH_KNOBS = ("programs_per_sm", "num_warps", "num_stages", "unpack")
# From the H200 sweep (benchmarks/kv/h200_attention_sweep.json, batch 16 at 8k and 32k tokens): for
# both quantized views the best of 14 configurations at both contexts (int4 147.7 / 485.7 us, int8
# 254.7 / 914.1 us, against 197.5 / 640.0 and 340.8 / 1182.6 with the previous defaults); bf16 kept
# (its best differed by 2% and not at both contexts). programs_per_sm is what ncu read for these
# launches on the H200 (benchmarks/kv/h200_ncu_attention.txt): bf16 3 (73.7 KB of shared memory
# each), int8 / int4 2 (220 / 206 registers per thread). INT4 then moved to 64-slot blocks: 152
# registers, 3 programs per SM (h200_ncu_occupancy.txt), 139 -> 132 us at 8k and 476 -> 443 us at
# 32k (h200_attention_occupancy.json); INT8 gained nothing from the same change (168 registers).
DEFAULTS = {
    "bf16": dict(block_k=128, programs_per_sm=3, num_warps=4, num_stages=2, unpack="convert"),
    "int8": dict(block_k=128, programs_per_sm=2, num_warps=4, num_stages=3, unpack="asm"),
    "int4": dict(block_k=64, programs_per_sm=3, num_warps=4, num_stages=3, unpack="asm"),
}


def pick_block_k(S: int, group: Optional[int], block_k: Optional[int], preferred: int = 128) -> int:
    """The K block: given, or the largest power of 2 <= `preferred` that fits. A block must divide
    the cache length S and either divide the key group or be a multiple of it (then the group is
    its sub-block, at least 16 slots for tt.dot)."""

    def fits(bk):
        return S % bk == 0 and (group is None or group % bk == 0 or (bk % group == 0 and group >= 16))

    if block_k is None:
        block_k = preferred
        while block_k > 16 and not fits(block_k):
            block_k //= 2
    if block_k < 16 or block_k & (block_k - 1) or not fits(block_k):
        raise ValueError(
            f"block_k must be a power of 2 >= 16 dividing the cache length {S}"
            + ("" if group is None else f" and dividing, or a multiple of, the key group {group}")
            + f"; got {block_k}"
        )
    return block_k


# A program's fixed cost (start, pipeline fill, writing its partials) in units of one block's time:
# an assumption that keeps the split count from growing for a one-block gain.
PROGRAM_OVERHEAD_BLOCKS = 2


def pick_splits(batch: int, kv_heads: int, blocks: int, programs_per_sm: float = 2) -> int:
    """Sequence splits per (row, kv head) on an H100/H200 (132 SMs) holding `programs_per_sm`
    programs at once per SM. A grid that overfills the GPU runs in waves, and a partial last wave
    costs a whole one (at batch 16 x 8k, filling the GPU ~4 times over ran INT8 in 2.42 waves of 2
    programs per SM), so the choice minimizes the makespan in blocks: waves x (blocks per program +
    PROGRAM_OVERHEAD_BLOCKS); ties go to fewer splits (less to merge)."""
    rows = batch * kv_heads
    resident = max(1, int(programs_per_sm * NUM_SMS))  # programs the GPU runs at once

    def makespan(s):
        return -(-rows * s // resident) * (-(-blocks // s) + PROGRAM_OVERHEAD_BLOCKS)

    return min(range(1, max(1, blocks) + 1), key=lambda s: (makespan(s), s))


def attention_partials(q_rows, row_pos, kv, n, off, *, variant, sm_scale, block_k=None, splits=None,
                       programs_per_sm=None, num_warps=None, num_stages=None, unpack=None, interpret=False,
                       cut=None, cut_side=None, ring=False):
    """One launch: unnormalized partials over the slots [0, n) of `kv`, slot j at position off + j;
    with `ring`, over positions [off, off + n) at slots (position mod S), off a multiple of the block.
    With cut=(G, D) and cut_side "below" / "from", a query row at position p reads only the positions
    below / from its cut c(p) (module docstring). Launch knobs left None take DEFAULTS[variant].

    q_rows: [B, KV, M, hd] query blocks; row_pos: [B, M] int32 query positions (-1 for padding);
    kv: (k, v) [B, KV, S, hd] for "bf16" or a QuantKV (value planes [B, KV, hd/2, S]); n, off: [B] int32.
    Returns o [B, KV, P, M, hd] f32 (unnormalized), m and l [B, KV, P, M] f32.
    """
    B, KV, M, hd = q_rows.shape
    knobs = dict(block_k=block_k, programs_per_sm=programs_per_sm, num_warps=num_warps, num_stages=num_stages,
                 unpack=unpack)
    knobs = {name: DEFAULTS[variant].get(name) if val is None else val for name, val in knobs.items()}
    if knobs["unpack"] not in UNPACKS:
        raise ValueError(f"unpack must be one of {UNPACKS}, got {knobs['unpack']!r}")
    if variant == "bf16":
        k, v = kv
        S, group = k.shape[2], None
        operands = [k, v]
        specs = [pl.BlockSpec((None, None, S, hd), lambda b, h, s: (b, h, 0, 0))] * 2
    else:
        S = kv.k_upper.shape[2]
        group = S // kv.k_scale.shape[2]
        operands = [getattr(kv, name) for name in plane_names(variant)]
        specs = [pl.BlockSpec((None, None, *a.shape[2:]), lambda b, h, s, nd=a.ndim: (b, h) + (0,) * (nd - 2))
                 for a in operands]
    bk = pick_block_k(S, group, block_k, knobs["block_k"])
    P = splits or pick_splits(B, KV, S // bk, knobs["programs_per_sm"])
    cdt = compute_dtype(q_rows.dtype)
    unpack = knobs["unpack"]
    if variant == "bf16" or jnp.dtype(cdt) not in FLOAT_BASE:  # nothing to unpack / no 16-bit bit pattern
        unpack = "convert"
    elif unpack == "asm" and interpret:  # interpret mode cannot run PTX: the same bits from jnp ops
        unpack = "bits"
    scalar = pl.BlockSpec((None,), lambda b, h, s: (b,))
    if (cut is None) != (cut_side is None) or cut_side not in (None, "below", "from"):
        raise ValueError(f"cut (G, D) and cut_side ('below' / 'from') go together, got {cut}, {cut_side!r}")
    kernel = functools.partial(_decode_kernel, variant=variant, bk=bk, sub=min(bk, group or bk), splits=P,
                               sm_scale=sm_scale, cdt=cdt, unpack=unpack, cut_side=cut_side,
                               cut_group=int(cut[0]) if cut else 1, cut_delay=int(cut[1]) if cut else 0,
                               ring=ring)
    return pl.pallas_call(
        kernel,
        grid=(B, KV, P),
        in_specs=[pl.BlockSpec((None, M), lambda b, h, s: (b, 0)), scalar, scalar,
                  pl.BlockSpec((None, None, M, hd), lambda b, h, s: (b, h, 0, 0)), *specs],
        out_specs=[
            pl.BlockSpec((None, None, None, M, hd), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, M), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, M), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, KV, P, M, hd), jnp.float32),
            jax.ShapeDtypeStruct((B, KV, P, M), jnp.float32),
            jax.ShapeDtypeStruct((B, KV, P, M), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=knobs["num_warps"], num_stages=knobs["num_stages"]),
        interpret=interpret,
        name=f"decode_attention_{variant}",
    )(row_pos, n.astype(jnp.int32), off.astype(jnp.int32), q_rows, *operands)


def merge_partials(parts):
    """Logsumexp merge of [(o, m, l), ...] partials (split axis 2) -> normalized [B, KV, M, hd] f32."""
    o = jnp.concatenate([p[0] for p in parts], axis=2)
    m = jnp.concatenate([p[1] for p in parts], axis=2)
    l = jnp.concatenate([p[2] for p in parts], axis=2)
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_max)  # [B, KV, P, M]
    l_sum = jnp.sum(l * w, axis=2)
    o_sum = jnp.sum(o * w[..., None], axis=2)
    return jnp.where(l_sum[..., None] > 0, o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)


# ---------------------------------------------------------------- API


def _check(q, q_pos, kv, variant, recent, cut=None):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    B, T, H, hd = q.shape
    if q_pos.shape != (B, T):
        raise ValueError(f"q_pos has shape {q_pos.shape}, expected {(B, T)}")
    if variant == "bf16":
        if isinstance(kv, QuantKV):
            raise ValueError("variant 'bf16' takes (k, v) arrays, not QuantKV planes")
        KV, S = kv[0].shape[1], kv[0].shape[2]
        if kv[0].shape != (B, KV, S, hd) or kv[1].shape != kv[0].shape:
            raise ValueError(f"k, v must be [B, KV, S, hd] = [{B}, KV, S, {hd}], got {kv[0].shape}, {kv[1].shape}")
    else:
        if not isinstance(kv, QuantKV):
            raise ValueError(f"variant {variant!r} takes QuantKV planes")
        KV, S = kv.k_upper.shape[1], kv.k_upper.shape[2]
        if kv.k_upper.shape != (B, KV, S, hd // 2) or S % kv.k_scale.shape[2]:
            raise ValueError(f"k_upper must be [{B}, KV, S, {hd // 2}] with S a multiple of the group, "
                             f"got {kv.k_upper.shape} and k_scale {kv.k_scale.shape}")
        want = (B, KV, hd // 2, S)
        for name in ("v_upper",) + (("v_lower",) if variant == "int8" else ()):
            if getattr(kv, name).shape != want:
                raise ValueError(f"{name} must be [B, KV, hd/2, S] (transposed) = {list(want)}, "
                                 f"got {list(getattr(kv, name).shape)}")
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} kv heads")
    if hd < 32 or hd & (hd - 1):
        raise ValueError(f"head_dim must be a power of 2 >= 32, got {hd}")
    if recent is not None and (recent[0].shape[:2] != (B, KV) or recent[0].shape[3] != hd):
        raise ValueError(f"recent k, v must be [{B}, {KV}, R, {hd}], got {recent[0].shape}")
    if cut is not None and (recent is None or len(cut) != 2 or int(cut[0]) < 1 or int(cut[1]) < 1):
        raise ValueError(f"cut must be (group >= 1, delay >= 1) with a recent buffer, got {cut}")
    return B, T, H, KV, hd


def decode_attention(
    q,  # [B, T, H, hd]
    q_pos,  # [B, T] int32 positions of the queries
    kv,  # (k, v) [B, KV, S, hd] for "bf16"; QuantKV for "int8" / "int4"
    kv_len,  # [B] int32: slots [0, kv_len) of kv may be read; slot j is at position j
    *,
    variant: str = "bf16",
    recent=None,  # optional (k, v) [B, KV, R, hd] full precision, slot r at position recent_start + r
    recent_start=None,  # [B] int32
    cut=None,  # optional (G, D): per-query split between kv (positions < c(p)) and recent (>= c(p))
    recent_ring: bool = False,  # with cut: the buffer is a ring, position p in slot p mod R
    sm_scale: Optional[float] = None,
    block_k: Optional[int] = None,
    splits: Optional[int] = None,
    backend: str = "auto",
    v_layout: str = V_LAYOUT,  # the only layout: the QuantKV's value planes are [B, KV, hd/2, S]
    kernel: str = "auto",
    **launch,  # programs_per_sm, num_warps, num_stages, unpack (LAUNCH_KNOBS)
):
    """Attention of T query positions per row over the cache (+ the recent buffer): [B, T, H, hd].

    A query at position p sees the keys at positions <= p (main-cache slots below kv_len, recent
    slots at recent_start + r). With cut=(G, D), a query at p reads main-cache positions below c(p)
    (kv_cut.py) and recent positions from c(p) to p (the hierarchical cache; the caller keeps
    c(p) <= kv_len and the buffer holding [c(p), p]). With `recent_ring` (and a cut) the buffer is
    a ring: position p sits in slot p mod R, recent_start is a multiple of G, and R and G share a
    power-of-2 factor of at least 16 (the kernel turns whole blocks of it). backend: "auto" (triton
    on GPU, else reference), "triton", "interpret", "reference". block_k, splits and `launch` tune
    the main launch (attention_partials); the recent buffer runs bf16's DEFAULTS.
    kernel: which kernel runs the main launch on the "triton" / "interpret" backends: "triton"
    (this module's), "mosaic" (attention_mosaic.py, Hopper; its config from
    attention_mosaic.FASTER, else FORCED: v7 at 64-token steps) or "auto" (`attention_mosaic.choose`:
    FASTER's Mosaic configs on sm_90 for the INT8 / INT4 planes from batch x slots = 16 x 8192,
    where they measured faster, else Triton).

    A QuantKV's value planes are [B, KV, hd/2, S] (module docstring); v_layout may only be "tokens".
    """
    _check_v_layout(v_layout)
    B, T, H, KV, hd = _check(q, q_pos, kv, variant, recent, cut)
    unknown = set(launch) - set(LAUNCH_KNOBS)
    if unknown:
        raise TypeError(f"unknown launch knobs {sorted(unknown)}; known: {LAUNCH_KNOBS}")
    sm_scale = 1.0 / math.sqrt(hd) if sm_scale is None else sm_scale
    backend = resolve_backend(backend)
    if recent_ring and cut is None:
        raise ValueError("recent_ring needs cut=(G, D): the ring turns by whole key groups")
    if backend == "reference":
        return decode_attention_reference(q, q_pos, kv, kv_len, variant=variant, recent=recent,
                                          recent_start=recent_start, cut=cut, sm_scale=sm_scale,
                                          recent_ring=recent_ring)
    rep = H // KV
    M = max(16, pow2_at_least(rep * T))
    # Query rows of a kv head: row r*T + t is query head (kv head, r) at position t.
    q_rows = q.reshape(B, T, KV, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, rep * T, hd)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, M - rep * T), (0, 0)))
    row_pos = jnp.pad(jnp.tile(q_pos.astype(jnp.int32), (1, rep)), ((0, 0), (0, M - rep * T)), constant_values=-1)
    interpret = backend == "interpret"
    run = functools.partial(attention_partials, q_rows, row_pos, sm_scale=sm_scale, interpret=interpret)
    sides = ("below", "from") if cut is not None else (None, None)
    from . import attention_mosaic  # it imports this module

    zero = jnp.zeros((B,), jnp.int32)
    rows = rep * T  # the real query rows: the Mosaic kernel pads them itself (to 8 from v8, else 16)
    config = attention_mosaic.choose(kernel, variant, rows, kv, splits, interpret)
    if config is None:
        parts = [run(kv, kv_len, zero, variant=variant, block_k=block_k, splits=splits, cut=cut, cut_side=sides[0],
                     **launch)]
    else:
        mosaic = attention_mosaic.attention_partials
        mosaic = mosaic if attention_mosaic.JIT else mosaic.__wrapped__
        parts = [mosaic(q_rows[:, :, :rows], row_pos[:, :rows], kv, kv_len, zero, variant=variant, sm_scale=sm_scale,
                        splits=splits, interpret=interpret, cut=cut, cut_side=sides[0], **config)]
    if recent is not None:
        R = recent[0].shape[2]
        parts.append(run(recent, jnp.full((B,), R, jnp.int32), recent_start, variant="bf16", splits=1,
                         cut=cut, cut_side=sides[1], ring=recent_ring,
                         block_k=ring_block(R, cut[0]) if recent_ring else None))
    parts = [(o[..., :rows, :], m[..., :rows], l[..., :rows]) for o, m, l in parts]  # the real rows
    out = merge_partials(parts)  # [B, KV, rep*T, hd]
    return out.reshape(B, KV, rep, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd).astype(q.dtype)


def ring_positions(start: jax.Array, window: int) -> jax.Array:
    """[B, window] int32: the position each slot of a ring holds, the one in
    [start[b], start[b] + window) that is the slot's index mod window."""
    r = jnp.arange(window, dtype=jnp.int32)[None, :]
    return start[:, None] + (r - start[:, None]) % window


def ring_block(window: int, group: int) -> int:
    """The K block of a ring buffer of `window` slots whose start moves by `group`: the largest
    power of 2 (at most 128) dividing both, so each block's slots stay contiguous as the ring turns."""
    bk = 128
    while bk >= 16 and (window % bk or group % bk):
        bk //= 2
    if bk < 16:
        raise ValueError(f"a ring buffer's window ({window}) and key group ({group}) must share a power-of-2 "
                         "factor of at least 16 for the attention kernel")
    return bk


def decode_attention_reference(q, q_pos, kv, kv_len, *, variant="bf16", recent=None, recent_start=None,
                               cut=None, sm_scale=None, v_layout=V_LAYOUT, recent_ring=False):
    """Plain jnp of the same math in f32: dequantize, mask by position (and cut), softmax."""
    _check_v_layout(v_layout)
    B, T, H, KV, hd = _check(q, q_pos, kv, variant, recent, cut)
    sm_scale = 1.0 / math.sqrt(hd) if sm_scale is None else sm_scale
    k, v = (kv if variant == "bf16" else dequantize_planes(kv, variant))
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    S = k.shape[2]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    valid = k_pos < kv_len[:, None]
    if recent is not None:
        R = recent[0].shape[2]
        k = jnp.concatenate([k, recent[0].astype(jnp.float32)], axis=2)
        v = jnp.concatenate([v, recent[1].astype(jnp.float32)], axis=2)
        r_pos = (ring_positions(recent_start, R) if recent_ring
                 else recent_start[:, None] + jnp.arange(R, dtype=jnp.int32))
        k_pos = jnp.concatenate([k_pos, r_pos], axis=1)
        valid = jnp.concatenate([valid, jnp.ones((B, R), bool)], axis=1)
    rep = H // KV
    qf = q.astype(jnp.float32).reshape(B, T, KV, rep, hd)
    hp = lax.Precision.HIGHEST
    s = jnp.einsum("btgrd,bgsd->bgrts", qf, k, precision=hp) * sm_scale
    mask = valid[:, None, None, None, :] & (k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None])
    if cut is not None:  # main-cache keys below the query's cut, buffer keys from it
        c = cut_position(q_pos.astype(jnp.int32), *cut)[:, None, None, :, None]  # [B, 1, 1, T, 1]
        in_buf = (jnp.arange(k.shape[2]) >= S)[None, None, None, None, :]
        kp = k_pos[:, None, None, None, :]
        mask &= jnp.where(in_buf, kp >= c, kp < c)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bgrts,bgsd->btgrd", p, v, precision=hp)
    return out.reshape(B, T, H, hd).astype(q.dtype)
