"""The online transform of a rotated model in one Pallas Triton kernel, for decode and verify sizes.

A rotated model (qspec_jax.rotation) multiplies the inputs of o_proj and down_proj by
kron(left, H_b): each row x [n] is viewed as [m, b] (b a power of 2, m = n / b), and
y = left^T (x H_b), H_b the ±1 Sylvester Hadamard matrix and left a small f32 [m, m] factor. As XLA
ops that is two small GEMMs and, from batch 16, the transposes around the second one: four to eight
kernels a layer, 0.26 ms of a 2.9 ms Llama-3-8B decode step at batch 1 and about 0.6 of 3.9 ms at
batch 16 on an H200 (benchmarks/engine/README.md). Here it is one launch.

One program per (row, column block of BC): the row's [MP, b] tile (m padded to MP, a power of 2
>= 16, by masked loads) times H_b's [b, BC] block, built in registers from the bits of its indices
and K-looped over BD rows with f32 accumulation (±1 entries: the products are exact in x's 16-bit
dtype), then left^T [MP, MP] times that [MP, BC] in true f32. The plain-XLA form of the same math
is qspec_jax.rotation.online_transform's other path; tests compare both with rotation.online_matrix
in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import compute_dtype, dot_precision, pow2_at_least

BLOCK_COLS = None  # BC, output columns per program; None: choose_block_cols(rows)
BLOCK_K = 128  # BD: H_b rows per K step


def choose_block_cols(rows: int) -> int:
    """BC by the H100's CUPTI times (benchmarks/engine/h100_hadamard_77660be.json): at one row, 16
    columns (32 programs) took 2.2 / 2.9 us at o_proj / down_proj widths against 2.7 / 4.1 with 64;
    at 16 and 64 rows 64 columns were fastest. Rows between 2 and 16 are not measured."""
    return 16 if rows <= 2 else 64


def _sign(i, j):
    """H[i, j] of Sylvester's order: (-1) ** popcount(i & j), as +-1 f32 (i, j < 2 ** 16)."""
    v = i & j
    for shift in (8, 4, 2, 1):  # fold the parity of 16 bits into bit 0
        v = v ^ (v >> shift)
    return (1 - 2 * (v & 1)).astype(jnp.float32)


def _kernel(x_ref, left_ref, y_ref, *, m: int, b: int, bd: int, cdt):
    # x_ref [MP, b], left_ref [MP, MP], y_ref [MP, BC]; rows >= m lie past the arrays
    mp, bc = y_ref.shape
    rows = lax.broadcasted_iota(jnp.int32, (mp, 1), 0) < m
    prec = dot_precision(cdt)
    # H_b is built in registers, not read: from memory its 512 KB came from DRAM in every call of a
    # decode step (the weights stream through L2 between calls), and the loads' latency doubled the
    # kernel's time. Rows d0 + i (i < bd, d0 a multiple of bd) share the bits of i: H[d0 + i, c] =
    # H[i, c] * H[d0, c], so one [bd, BC] block and a sign per column and K step.
    cols = pl.program_id(1) * bc + lax.broadcasted_iota(jnp.int32, (1, bc), 1)
    block = _sign(lax.broadcasted_iota(jnp.int32, (bd, bc), 0), cols).astype(cdt)
    acc = jnp.zeros(y_ref.shape, jnp.float32)
    for d0 in range(0, b, bd):
        xt = plt.load(x_ref.at[:, pl.ds(d0, bd)], mask=rows, other=0).astype(cdt)
        part = jnp.dot(xt, block, preferred_element_type=jnp.float32, precision=prec)
        acc += part if d0 == 0 else part * _sign(jnp.full((1, bc), d0, jnp.int32), cols)
    left_cols = lax.broadcasted_iota(jnp.int32, (1, mp), 1) < m
    left = plt.load(left_ref, mask=rows & left_cols, other=0.0)
    y = lax.dot_general(left, acc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST)
    plt.store(y_ref, y.astype(y_ref.dtype), mask=rows)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "block_cols"))
def online_hadamard(x, left, *, interpret: bool = False, num_warps: int = 4, block_cols: int | None = None):
    """y = left^T (x H_b) for every row of x [R, m, b], H_b the Sylvester ±1 matrix of order b (a
    power of 2, 16 <= b <= 2 ** 16), m <= 128, left [m, m] f32: one launch. Returns x's dtype."""
    R, m, b = x.shape
    if left.shape != (m, m):
        raise ValueError(f"x [R, m, b] = {x.shape} needs left [{m}, {m}], got {left.shape}")
    if b < 16 or b > 2**16 or b & (b - 1) or m > 128:
        raise ValueError(f"the kernel needs b a power of 2 >= 16 and m <= 128, got b={b}, m={m}")
    mp = max(16, pow2_at_least(m))
    bc, bd = min(block_cols or choose_block_cols(R), b), min(BLOCK_K, b)
    cdt = compute_dtype(x.dtype)
    kernel = functools.partial(_kernel, m=m, b=b, bd=bd, cdt=cdt)
    return pl.pallas_call(
        kernel,
        grid=(R, b // bc),
        in_specs=[pl.BlockSpec((None, mp, b), lambda r, c: (r, 0, 0)),
                  pl.BlockSpec((mp, mp), lambda r, c: (0, 0))],
        out_specs=pl.BlockSpec((None, mp, bc), lambda r, c: (r, 0, c)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="online_hadamard",
    )(x, left.astype(jnp.float32))
