"""W4A16 for decode sizes (M <= 8 rows): int4 weights times 16-bit activations without tensor cores.

At M = 1..8 an MMA tile of 16 rows is mostly padding and the product is bound by reading the
weights; what limits a kernel is the per-weight ALU work. Converting an int4 nibble with an
int -> float instruction runs at a quarter of the FMA rate, so the nibble is turned into an f32 by
bits instead: OR-ing the offset nibble u = n + 8 (0..15) into the bits of 2^23 gives exactly
2^23 + u, and one subtraction of 2^23 + 8 leaves n (the and/xor/or chain is one LOP3 after ptxas).
Each program owns `bn` output columns and one K range (split-K); per packing block it loads the
packed int8 rows once and, for every row of x, multiplies the block's two nibble planes by the
row's two contiguous halves (the packing of packing.py) and accumulates.

`reduce_each_block` picks where the K reduction happens: across the block's rows every block, so
each row keeps a [bn] accumulator (small registers, any M); or once at the end, keeping a
[pb/2, bn] accumulator per row and multiplying the group scale onto every product instead of onto
each group's sum (fewer shuffles, more registers: M = 1 only).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import atomic_add, col_mask, load
from .packing import weight_layout

MAX_M = 8
_MAGIC = 0x4B000000  # the bits of 2^23 as an f32
_OFFSET = float(2**23 + 8)


class GemvTiles(NamedTuple):
    """Launch plan: `bn` output columns per program, K cut into `split` ranges (atomic adds)."""

    bn: int = 128
    split: int = 4
    num_warps: int = 4
    num_stages: int = 3
    reduce_each_block: bool = True


def choose_gemv_tiles(M: int, N: int, K: int, pb: int) -> GemvTiles:
    """128 columns per program and K cut into up to 16 ranges (>= 2 packing blocks each).

    H200 sweep (benchmarks/engine/h200_kernels.json, Llama-3-8B, M = 1): bn 128 with split 16 was
    fastest on gate_up (50.9 us) and down (33.5 us); the per-block reduction won where a K range is
    short (gate_up, K = 4096), the final one where it is long (down, K = 14336).
    """
    nblocks = K // pb
    split = max(d for d in range(1, 17) if nblocks % d == 0 and nblocks // d >= 2) if nblocks >= 2 else 1
    return GemvTiles(bn=128, split=split, reduce_each_block=M > 1 or nblocks // split < 4)


def nibbles_as_f32(p):
    """Low and high int4 nibbles of packed int8 `p` as exact f32 values, with integer ops only."""
    p = p.astype(jnp.int32)

    def as_float(bits):
        return lax.bitcast_convert_type(((bits & 15) ^ 8) | _MAGIC, jnp.float32) - _OFFSET

    return as_float(p), as_float(p >> 4)


def _gemv_kernel(
    x_ref,  # [M, K] 16-bit activations
    w_ref,  # [K/2, bn] int8: packed nibbles of this program's columns
    s_ref,  # [G, bn] f32 scales
    o_ref,  # [M, bn] f32, zeroed: each K range adds its partial sums atomically
    *, half, blocks, grouped, M, N, reduce_each_block, interpret,
):
    bn = o_ref.shape[1]
    cmask = col_mask(bn, N, axis=0)
    first = pl.program_id(1) * blocks

    def block(b, accs):
        w_lo, w_hi = nibbles_as_f32(load(w_ref.at[pl.ds(b * half, half), :], cmask))
        s = load(s_ref.at[pl.ds(b if grouped else 0, 1), :], cmask)  # [1, bn]
        out = []
        for m in range(M):
            xl = x_ref[pl.ds(m, 1), pl.ds(b * 2 * half, half)].astype(jnp.float32).T  # [half, 1]
            xh = x_ref[pl.ds(m, 1), pl.ds(b * 2 * half + half, half)].astype(jnp.float32).T
            prod = w_lo * xl + w_hi * xh  # [half, bn]
            if reduce_each_block:
                part = jnp.sum(prod, axis=0, keepdims=True)  # [1, bn]
                out.append(accs[m] + (part * s if grouped else part))
            else:
                out.append(accs[m] + (prod * s if grouped else prod))
        return tuple(out)

    shape = (1, bn) if reduce_each_block else (half, bn)
    accs = lax.fori_loop(first, first + blocks, block, tuple(jnp.zeros(shape, jnp.float32) for _ in range(M)))
    s_end = None if grouped else load(s_ref, cmask)
    for m in range(M):
        acc = accs[m] if reduce_each_block else jnp.sum(accs[m], axis=0, keepdims=True)
        if s_end is not None:
            acc = acc * s_end
        atomic_add(o_ref, (pl.ds(m, 1), pl.ds(0, bn)), acc, cmask, interpret)


def w4a16_gemv(x2, qw, *, tiles: GemvTiles | None = None, interpret: bool = False):
    """y [M, N] (x2's dtype) = x2 [M, K] @ dequantize_weight(qw) for 1 <= M <= MAX_M."""
    M, K = x2.shape
    Kw, N, G, gs, pb = weight_layout(qw)
    if K != Kw or not 1 <= M <= MAX_M:
        raise ValueError(f"w4a16_gemv takes [M <= {MAX_M}, K={Kw}] activations, got {x2.shape}")
    tiles = tiles or choose_gemv_tiles(M, N, K, pb)
    nblocks = K // pb
    if nblocks % tiles.split:
        raise ValueError(f"split={tiles.split} does not divide the {nblocks} packing blocks")
    kernel = functools.partial(
        _gemv_kernel, half=pb // 2, blocks=nblocks // tiles.split, grouped=G > 1, M=M, N=N,
        reduce_each_block=tiles.reduce_each_block, interpret=interpret,
    )
    bn = tiles.bn
    out_spec = pl.BlockSpec((M, bn), lambda j, s: (0, j))
    y = pl.pallas_call(
        lambda x, w, sc, _, o: kernel(x, w, sc, o),  # the zeroed accumulator is aliased to o
        grid=(pl.cdiv(N, bn), tiles.split),
        in_specs=[
            pl.BlockSpec((M, K), lambda j, s: (0, 0)),
            pl.BlockSpec((K // 2, bn), lambda j, s: (0, j)),
            pl.BlockSpec((G, bn), lambda j, s: (0, j)),
            out_spec,
        ],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((M, N), jnp.float32),
        input_output_aliases={3: 0},
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="w4a16_gemv",
    )(x2, qw["packed"], qw["scales"], jnp.zeros((M, N), jnp.float32))
    return y.astype(x2.dtype)
