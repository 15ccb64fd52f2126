"""A decoder layer's residual add and the RMSNorm after it in one Pallas Triton launch, fed by a
split-K matmul's partial sums.

Every layer adds o_proj's and down_proj's outputs to the residual stream and normalizes the sum
for the next projection. With the Mosaic int4 kernels at decode sizes those outputs leave the
kernel unsummed: each K range's f32 partial sums as two 16-bit halves (int4_mosaic.SplitKHalves,
see int4_mosaic.TRANSPOSED_STORE). XLA joined and summed them inside the add's fusion, and the norm ran
as a second kernel: two launches of 2-3.5 us each, 64 of each in a Llama-3-8B decode step on the
H100 (benchmarks/engine/README.md). Here it is one launch: a program per row joins and sums the
partials, rounds the sum to x's dtype, adds it to x (the new residual stream) and normalizes that
row in f32, with the roundings of model.py's XLA path: x + round(sum), rounded, then the norm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import pow2_at_least
from .int4_mosaic import SplitKHalves, join_f32_halves


def _kernel(x_ref, *refs, d: int, split: int, halves: bool, eps: float, has_weight: bool):
    # one row, each ref [DP]: x, then split x (upper, lower) halves or one summed delta, the weight if
    # any, and the two outputs; columns >= d lie past the arrays
    n_in = 2 * split if halves else 1
    part_refs, rest = refs[:n_in], refs[n_in:]
    w_ref, x_out_ref, h_out_ref = rest if has_weight else (None, *rest)
    dp = x_ref.shape[0]
    cols = lax.broadcasted_iota(jnp.int32, (dp,), 0) < d
    loaded = [plt.load(r, mask=cols, other=0) for r in part_refs]
    if halves:  # the K ranges' sums added in order, as SplitKHalves.join
        total = functools.reduce(jnp.add, [join_f32_halves(u, lo) for u, lo in zip(loaded[::2], loaded[1::2])])
    else:
        total = loaded[0].astype(jnp.float32)
    x = plt.load(x_ref, mask=cols, other=0)
    x = (x.astype(jnp.float32) + total.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    xf = x.astype(jnp.float32)
    scale = lax.rsqrt(jnp.sum(xf * xf) / d + eps)
    h = (xf * scale).astype(x.dtype)
    if has_weight:
        h = (h.astype(jnp.float32) * plt.load(w_ref, mask=cols, other=0).astype(jnp.float32)).astype(x.dtype)
    plt.store(x_out_ref, x, mask=cols)
    plt.store(h_out_ref, h, mask=cols)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps"))
def residual_rmsnorm(x, delta, weight, eps: float, *, interpret: bool = False, num_warps: int = 4):
    """(x + delta, rms_norm(x + delta) * weight) for x [M, D] and delta a `SplitKHalves` of M rows
    or an [M, D] array, in one launch; `weight` [D] or None (a norm gain folded into the next
    projection). Returns both in x's dtype; delta's sum is rounded to x's dtype before the add."""
    m, d = x.shape
    halves = isinstance(delta, SplitKHalves)
    # the halves travel as int16: a bf16 lower half can read as a subnormal or a NaN, which the
    # interpreter's masked load (a select on XLA's CPU) would flush or quiet
    parts = lax.bitcast_convert_type(delta.halves, jnp.int16) if halves else delta
    rows = delta.rows if halves else parts.shape[0]
    if (rows, parts.shape[-1]) != (m, d):
        raise ValueError(f"delta of {(rows, parts.shape[-1])} rows x columns does not match x {x.shape}")
    if weight is not None and weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got {weight.shape}")
    dp = pow2_at_least(d)
    row_spec = pl.BlockSpec((None, dp), lambda r: (r, 0))
    if halves:  # the one array passed once per (K range, half): each block is a row of one plane
        split = parts.shape[0]
        part_specs = [pl.BlockSpec((None, None, None, dp), lambda r, s=s, h=h: (s, h, r, 0))
                      for s in range(split) for h in range(2)]
    else:
        split, part_specs = 1, [row_spec]
    has_weight = weight is not None
    kernel = functools.partial(_kernel, d=d, split=split, halves=halves, eps=eps, has_weight=has_weight)
    return pl.pallas_call(
        kernel,
        grid=(m,),
        in_specs=[row_spec, *part_specs] + ([pl.BlockSpec((dp,), lambda r: (0,))] if has_weight else []),
        out_specs=[row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="residual_rmsnorm",
    )(x, *[parts] * len(part_specs), *([weight] if has_weight else []))
