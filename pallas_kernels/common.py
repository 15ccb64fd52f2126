"""Helpers shared by the Pallas Triton kernels: dot dtypes, the matmuls' input check, row and column
masks with masked loads and stores, the interpret-mode atomic add, and the int4 matmuls' K loop,
nibble unpacking and launch; and `is_hopper`, which the Triton / Mosaic GPU choices ask.

Every GPU `pallas_call` here passes `plt.CompilerParams` (without it jax picks the Mosaic GPU
backend); ragged edges go through `plt.load` / `plt.store` with masks (Triton lowers no
non-power-of-2 block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .packing import weight_layout

if TYPE_CHECKING:
    from .tiling import CallPlan


def is_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100 / H200): where the Mosaic GPU kernels run."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def pow2_at_least(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def compute_dtype(dtype):
    """Dot operand dtype: 16-bit activations stay 16-bit; anything else runs in f32."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def dot_precision(cdt):
    # f32 operands: ask for true f32 (Triton would otherwise use TF32).
    return lax.Precision.HIGHEST if cdt == jnp.float32 else None


def check_inputs(x, qw, kernel: bool):
    """Validate an int4 matmul's shapes; return (K, N, G, group_size, pb) of the weight."""
    K, N, G, gs, pb = weight_layout(qw)
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {x.shape} but the weight expects K={K} input features")
    if kernel and (pb < 64 or pb & (pb - 1)):
        raise ValueError(
            f"the Pallas kernels need a power-of-2 packing block (group size) >= 64, got {pb}; "
            "use backend='reference'"
        )
    return K, N, G, gs, pb


# ---------------------------------------------------------------- masks, loads, stores


def row_mask(bm: int, M: int, axis: int = 0):
    """[bm, 1] mask of the valid rows of the M tile that grid axis `axis` indexes, or None when
    M % bm == 0."""
    if M % bm == 0:
        return None
    rows = pl.program_id(axis) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return rows < M


def col_mask(bn: int, N: int, axis: int = 1):
    """[1, bn] mask of the valid columns of the N tile that grid axis `axis` indexes, or None when
    N % bn == 0."""
    if N % bn == 0:
        return None
    cols = pl.program_id(axis) * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    return cols < N


def load(ref, mask):
    """Load a block; masked-off elements (rows past M, columns past N) read as 0."""
    if mask is None:
        return ref[...]
    return plt.load(ref, mask=mask, other=0)


def store_tile(ref, val, rmask, cmask):
    """Store an output tile in ref's dtype, leaving rows past M and columns past N untouched."""
    mask = rmask if cmask is None else cmask if rmask is None else rmask & cmask
    val = val.astype(ref.dtype)
    if mask is None:
        ref[...] = val
    else:
        plt.store(ref, val, mask=mask)


def atomic_add(ref, idx, val, mask, interpret: bool):
    """ref[idx] += val atomically where `mask` (None: everywhere). Triton's tt.atomic_rmw wants a
    mask of the value's full shape; interpret mode's atomic add takes no mask, so there the
    masked-off values are zeroed instead (its blocks are padded, so the edge stays in bounds)."""
    if mask is not None:
        mask = jnp.broadcast_to(mask, val.shape)
        if interpret:
            val, mask = jnp.where(mask, val, 0), None
    plt.atomic_add(ref, idx, val, mask=mask)


# ---------------------------------------------------------------- int4 matmul building blocks


def k_loop(first, blocks: int, unroll: int, block_fn, acc):
    """acc = block_fn(b, acc) for b in first .. first+blocks-1, `unroll` blocks per iteration.

    The unrolled blocks are separate loads in one loop body (a static Python loop: Triton lowers
    no fori_loop(unroll>1)), so the software pipeline keeps `unroll` times the bytes in flight.
    """

    def body(t, acc):
        for u in range(unroll):
            acc = block_fn(first + t * unroll + u, acc)
        return acc

    return lax.fori_loop(0, blocks // unroll, body, acc)


def unpack_block(w_ref, b, half: int, mask):
    """Low and high int4 nibbles (int8) of packing block b: rows [b*pb, b*pb + pb/2) and the rest."""
    p = load(w_ref.at[pl.ds(b * half, half), :], mask)  # [pb/2, bn] int8
    return (p << 4) >> 4, p >> 4  # arithmetic shifts on int8 sign-extend


def launch(kernel, plan: CallPlan, x2, qw, out_dtype, *, interpret: bool, extra_in=()):
    """The int4 matmuls' pallas_call: grid (M tiles, N tiles, K splits).

    kernel(x_ref, *extra_refs, w_ref, s_ref, o_ref) gets x2 and every array of extra_in as [bm, *]
    row blocks (M is not padded: the kernels mask the rows past M, which saves a pad op per call),
    w_ref [K/2, bn], s_ref [G, bn] and o_ref [bm, bn]. With split > 1 each K range writes its f32
    partial sums into [split, M, N], summed here in one small XLA fusion.
    """
    M, N, K, G, tiles = plan.M, plan.N, plan.K, plan.G, plan.tiles
    bm, bn, split = tiles.bm, tiles.bn, tiles.split
    row_specs = [pl.BlockSpec((bm, a.shape[1]), lambda i, j, s: (i, 0)) for a in (x2, *extra_in)]
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, M, N), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(M, bm), pl.cdiv(N, bn), split),
        in_specs=row_specs + [
            pl.BlockSpec((K // 2, bn), lambda i, j, s: (0, j)),
            pl.BlockSpec((G, bn), lambda i, j, s: (0, j)),
        ],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=getattr(kernel, "func", kernel).__name__,
    )(x2, *extra_in, qw["packed"], qw["scales"])
    if split > 1:
        y = y.sum(axis=0)
    return y.astype(out_dtype)
