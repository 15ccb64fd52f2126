"""W4A16 matmul: y = x @ dequant(W) with int4 weights dequantized inside the kernel.

Each program owns one (bm, bn) output tile and one K range (split-K). Per packing block it loads
the packed int8 rows once, unpacks the low and high nibbles with arithmetic shifts into the dot
dtype (int4 values are exact in bf16), and runs two dots over the block's contiguous halves. The
group scale multiplies the f32 partial sum of each group, not every weight element; per-channel
weights accumulate over all of K and are rescaled once at the end.

From M = 256 rows on (prefill chunks, large verify passes) the product is compute-bound and cuBLAS's
16-bit MMA beats this kernel's, so `Tiles.dequant` instead writes the weight in x's dtype with a
small Pallas kernel (`dequantize_kernel`) and hands the product to XLA's dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import tiling
from .bitfloat import FLOAT_BASE, asm_nibble_floats, nibble_floats
from .common import (
    check_inputs, col_mask, compute_dtype, dot_precision, k_loop, launch, load, row_mask, store_tile,
    unpack_block,
)
from .packing import unpack_int4, weight_layout
from .tiling import Tiles, plan_call
from .w4a16_gemv import GemvTiles, w4a16_gemv

BACKENDS = ("auto", "triton", "interpret", "reference")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'triton' on GPU, else 'reference'; other names are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if jax.default_backend() == "gpu" else "reference"
    return backend


# Bit-built dequantization (Tiles.bias_dequant, pallas_kernels/bitfloat.py): XOR-ing a signed nibble
# n with (bits | 8) gives the float BASE + 8 + n exactly, with integer ops only (no int -> float
# conversion, which runs at a quarter of the integer rate); the dot then carries an offset of
# BIAS * sum(x) that is subtracted once per block. Tiles.asm_dequant builds the same bits with inline
# PTX (Marlin's prmt + lop3, four packed bytes per instance); interpret mode uses the jnp bit ops.
_BIAS_BITS = {dt: (bits, base + 8) for dt, (bits, base) in FLOAT_BASE.items()}  # signed: u = n + 8


def bias_dequant_block(w_ref, b, half: int, mask, cdt, convert=nibble_floats):
    """Low and high nibbles of packing block b as cdt values n + BIAS, and BIAS."""
    bits, bias = _BIAS_BITS[jnp.dtype(cdt)]
    p = load(w_ref.at[pl.ds(b * half, half), :], mask)
    return convert(p, 0, bits | 8, cdt), convert(p, 4, bits | 8, cdt), bias


def asm_dequant_block(w_ref, b, half: int, mask, cdt):
    """bias_dequant_block's values converted by inline PTX."""
    return bias_dequant_block(w_ref, b, half, mask, cdt, convert=asm_nibble_floats)


def _w4a16_kernel(
    x_ref,  # [bm, K] activations; rows past M are masked
    w_ref,  # [K/2, bn] int8: packed nibbles of this N tile (packing.py)
    s_ref,  # [G, bn] f32 scales
    o_ref,  # [bm, bn] x's dtype, or this K range's f32 partial sums when split > 1
    *, half, blocks, unroll, grouped, M, N, cdt, swap, bias_dequant, asm_dequant=False,
):
    bm, bn = o_ref.shape
    rmask, cmask = row_mask(bm, M), col_mask(bn, N)
    prec = dot_precision(cdt)
    first = pl.program_id(2) * blocks  # first packing block of this program's K range

    def dot(x, w):
        if swap:  # [bn, bm] = w^T x^T: the unpacked weights are the MMA's register operand
            return jnp.dot(w.T, x.T, preferred_element_type=jnp.float32, precision=prec)
        return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=prec)

    def scale(b):
        s = load(s_ref.at[pl.ds(b, 1), :], cmask)
        return s.T if swap else s

    def block(b, acc):
        k0 = b * 2 * half
        xl = load(x_ref.at[:, pl.ds(k0, half)], rmask).astype(cdt)
        xh = load(x_ref.at[:, pl.ds(k0 + half, half)], rmask).astype(cdt)
        if bias_dequant:
            dequant_block = asm_dequant_block if asm_dequant else bias_dequant_block
            wl, wh, bias = dequant_block(w_ref, b, half, cmask, cdt)
            part = dot(xl, wl) + dot(xh, wh)
            xsum = jnp.sum(xl.astype(jnp.float32), axis=1) + jnp.sum(xh.astype(jnp.float32), axis=1)
            part = part - bias * (xsum[None, :] if swap else xsum[:, None])
        else:
            wl, wh = unpack_block(w_ref, b, half, cmask)
            part = dot(xl, wl.astype(cdt)) + dot(xh, wh.astype(cdt))
        if grouped:  # one group per packing block: scale the group's partial sum
            part = part * scale(b)
        return acc + part

    acc = k_loop(first, blocks, unroll, block, jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32))
    if not grouped:  # per channel: one rescale at the end
        acc = acc * scale(0)
    store_tile(o_ref, acc.T if swap else acc, rmask, cmask)


def _dequant_kernel(
    w_ref,  # [pb/2, bn] int8: one packing block's nibbles
    s_ref,  # [1, bn] f32: its group scale (or the per-channel scale)
    o_ref,  # [pb, bn] the dequantized weight rows, in the requested dtype
    *, half, N,
):
    bn = o_ref.shape[1]
    cmask = col_mask(bn, N)
    s = load(s_ref, cmask)
    wl, wh = unpack_block(w_ref, 0, half, cmask)
    for rows, w in ((pl.ds(0, half), wl), (pl.ds(half, half), wh)):
        store_tile(o_ref.at[rows, :], w.astype(jnp.float32) * s, None, cmask)


def dequantize_kernel(qw, dtype, *, interpret: bool = False):
    """dequantize_weight(qw) in `dtype` as one Pallas kernel: [K, N], one program per packing block
    and 256 (or 128) columns, each weight rounded once from the f32 product q * scale."""
    K, N, G, gs, pb = weight_layout(qw)
    half = pb // 2
    bn = 256 if N % 256 == 0 else 128
    grouped = G > 1
    return pl.pallas_call(
        functools.partial(_dequant_kernel, half=half, N=N),
        grid=(K // pb, pl.cdiv(N, bn)),
        in_specs=[
            pl.BlockSpec((half, bn), lambda b, j: (b, j)),
            pl.BlockSpec((1, bn), lambda b, j: (b if grouped else 0, j)),
        ],
        out_specs=pl.BlockSpec((pb, bn), lambda b, j: (b, j)),
        out_shape=jax.ShapeDtypeStruct((K, N), dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="dequantize_int4",
    )(qw["packed"], qw["scales"])


def w4a16_reference(x, qw):
    """Plain-jnp W4A16 with the kernel's math: per-group dot in f32, then the group scale."""
    K, N, G, gs, pb = check_inputs(x, qw, kernel=False)
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    # f32 operands: 16-bit x times int4 is exact in f32, so this is the kernel's 16-bit dot with
    # f32 accumulation (XLA:CPU also has no batched bf16 x bf16 -> f32 dot).
    cdt = jnp.float32
    prec = lax.Precision.HIGHEST
    q = unpack_int4(qw["packed"], pb).astype(cdt)
    scales = qw["scales"].astype(jnp.float32)
    if G == 1:
        y = jnp.dot(x2.astype(cdt), q, preferred_element_type=jnp.float32, precision=prec)
        y = y * scales[0]
    else:
        parts = jnp.einsum(
            "mgk,gkn->mgn",
            x2.astype(cdt).reshape(-1, G, gs),
            q.reshape(G, gs, N),
            preferred_element_type=jnp.float32,
            precision=prec,
        )
        y = (parts * scales[None]).sum(axis=1)
    return y.astype(x.dtype).reshape(*lead, N)


def w4a16_matmul(x, qw, *, backend: str = "auto", tiles: Tiles | None = None):
    """y = x @ dequantize_weight(qw) with f32 accumulation, returned in x.dtype.

    x: [..., K] (bf16, f16 or f32); qw: {"packed": int8 [K//2, N], "scales": f32 [G, N]}.
    backend: "auto" (triton on GPU, else reference), "triton", "interpret" (the same kernel run
    on CPU) or "reference" (plain jnp). bf16/f16 x runs 16-bit dots; f32 x runs f32 dots.
    tiles: override the per-shape choice of tiling.choose_tiles (tests, tuning); a GemvTiles
    forces the GEMV kernel, a Tiles the tensor-core kernel. By default M <= tiling.GEMV_MAX_M rows
    run the GEMV kernel (w4a16_gemv.py).
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return w4a16_reference(x, qw)
    K = check_inputs(x, qw, kernel=True)[0]
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    if isinstance(tiles, GemvTiles) or (tiles is None and x2.shape[0] <= tiling.GEMV_MAX_M):
        # decode sizes: no tensor cores (w4a16_gemv.py)
        gemv_tiles = tiles if isinstance(tiles, GemvTiles) else None
        y = w4a16_gemv(x2, qw, tiles=gemv_tiles, interpret=backend == "interpret")
        return y.reshape(*lead, y.shape[-1])
    plan = plan_call(x, qw, tiles, "w4a16")
    tiles, cdt = plan.tiles, compute_dtype(x.dtype)
    if tiles.dequant:  # prefill-size M: the dot is compute-bound, so cuBLAS on 16-bit weights wins
        w = dequantize_kernel(qw, cdt, interpret=backend == "interpret")
        y = jnp.dot(plan.x2.astype(cdt), w, preferred_element_type=jnp.float32, precision=dot_precision(cdt))
        return y.astype(x.dtype).reshape(*plan.lead, plan.N)
    kernel = functools.partial(
        _w4a16_kernel,
        half=plan.pb // 2,
        blocks=plan.nblocks // tiles.split,
        unroll=tiles.unroll,
        grouped=plan.G > 1,
        M=plan.M,
        N=plan.N,
        cdt=cdt,
        swap=tiles.swap,
        bias_dequant=(tiles.bias_dequant or tiles.asm_dequant) and cdt != jnp.float32,
        asm_dequant=tiles.asm_dequant and backend == "triton",
    )
    y = launch(kernel, plan, plan.x2, qw, x.dtype, interpret=backend == "interpret")
    return y.reshape(*plan.lead, plan.N)
