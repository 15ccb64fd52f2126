"""W4A4 / W4A8 matmul: activations quantized per token per group, int8 x int8 -> int32 dots.

Hopper has no int4 tensor-core instruction, so 4-bit activations and the unpacked int4 weights
are both held in int8 and multiplied with the int8 MMA into int32; act_bits=8 (mode w4a8) is the
same kernel with qmax 127. The integer dots are exact, so the plain-jnp reference gives the same
numbers up to the order of the f32 sums over groups.

quantize_activations runs as one XLA fusion before the kernel, which reads int8 x and the
per-token scales. On the H100 this beat quantizing inside the matmul at every M measured
(benchmarks/kernels/README.md), decode sizes included; that fused variant (Tiles.fuse_quant) was
never chosen and is gone since commit 09cc211.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import check_inputs, col_mask, k_loop, launch, load, row_mask, store_tile, unpack_block
from .packing import resolve_groups, unpack_int4
from .tiling import Tiles, plan_call
from .w4a16 import resolve_backend


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits}")
    return 7 if bits == 4 else 127


# Fraction of max|x| that maps to qmax. Clipping the few largest 4-bit activations buys finer steps
# for all the others: on real SmolLM2 text (rotated, groups of 64; benchmarks/quality/NOTES.md)
# 0.95 raised W4A4's top-1 agreement with W4A16 from 62.5% to 67.3% and its perplexity from 24.3
# to 18.9 (0.9: 65.8% / 20.4, 0.8: 64.7% / 21.2). 8-bit activations are not clipped.
ACT_CLIP = {7: 0.95, 127: 1.0}  # by qmax


def _act_scale(amax, qmax):
    # clip * max|x| / qmax, written as a multiply by one f32 constant: XLA rewrites a division by a
    # constant into a multiply, Triton would not, so spelling it out keeps every backend
    # bit-identical.
    s = amax * jnp.float32(ACT_CLIP[qmax] / qmax)
    return jnp.where(s == 0, 1.0, s)  # an all-zero row or group quantizes to zeros


def _inv_scale(scale):
    return jnp.ones_like(scale) / scale


def _quantize(x, inv, qmax):
    """clip(round_half_even(x * inv), -qmax, qmax) as int8; inv = 1 / scale (both f32).

    Two IEEE f32 operations, a multiply and a rounding, that no compiler can contract: with
    floor(x * inv + 0.5) XLA:GPU fuses the multiply and the add into one FMA, which moves a value
    sitting at a rounding boundary to the other integer than XLA:CPU computes. XLA on CPU and on
    GPU therefore produce the same integers.
    """
    return jnp.clip(jnp.round(x * inv), -qmax, qmax).astype(jnp.int8)


def quantize_activations(x, group_size: int, bits: int):
    """Symmetric per-token, per-group quantization of x [M, K].

    group_size: the weight's group size (-1: one group over all of K). Returns
    (q int8 [M, K] in -qmax..qmax, scales f32 [M, G]) with qmax = 7 (bits=4) or 127 (bits=8),
    all in f32: scale = max|x| * (ACT_CLIP/qmax) (0 -> 1), q = clip(round_half_even(x * (1/scale)),
    -qmax, qmax); ACT_CLIP is 0.95 for 4 bits (the largest values saturate) and 1 for 8 bits.
    Spelled the way every backend computes it bit-identically.
    """
    qmax = _qmax(bits)
    M, K = x.shape
    group_size, G = resolve_groups(K, group_size)
    xg = x.astype(jnp.float32).reshape(M, G, group_size)
    scales = _act_scale(jnp.max(jnp.abs(xg), axis=-1), qmax)
    q = _quantize(xg, _inv_scale(scales)[..., None], qmax)
    return q.reshape(M, K), scales


def _w4a4_kernel(
    x_ref,  # [bm, K] int8 quantized activations; rows past M are masked
    xs_ref,  # [bm, G] f32 activation scales per token per group
    w_ref,  # [K/2, bn] int8: packed nibbles of this N tile (packing.py)
    s_ref,  # [G, bn] f32 weight scales
    o_ref,  # [bm, bn] x's dtype, or this K range's f32 partial sums when split > 1
    *, half, blocks, unroll, grouped, M, N,
):
    bm, bn = o_ref.shape
    rmask, cmask = row_mask(bm, M), col_mask(bn, N)
    first = pl.program_id(2) * blocks

    def block(b, acc):
        k0 = b * 2 * half
        xl = load(x_ref.at[:, pl.ds(k0, half)], rmask)  # [bm, half]; rows past M read as 0
        xh = load(x_ref.at[:, pl.ds(k0 + half, half)], rmask)
        wl, wh = unpack_block(w_ref, b, half, cmask)  # [half, bn] each
        d = jnp.dot(xl, wl, preferred_element_type=jnp.int32) + jnp.dot(xh, wh, preferred_element_type=jnp.int32)
        if not grouped:  # per channel: exact int32 over the whole K range
            return acc + d
        a_s = load(xs_ref.at[:, pl.ds(b, 1)], rmask)  # [bm, 1]
        w_s = load(s_ref.at[pl.ds(b, 1), :], cmask)  # [1, bn]
        return acc + d.astype(jnp.float32) * (a_s * w_s)

    acc = k_loop(first, blocks, unroll, block, jnp.zeros((bm, bn), jnp.float32 if grouped else jnp.int32))
    if not grouped:  # one rescale at the end
        a_s = load(xs_ref.at[:, pl.ds(0, 1)], rmask)
        acc = acc.astype(jnp.float32) * (a_s * load(s_ref.at[pl.ds(0, 1), :], cmask))
    store_tile(o_ref, acc, rmask, cmask)


def w4a4_reference(x, qw, act_bits: int = 4):
    """Plain-jnp W4A4/W4A8 with the kernel's math (exact integer dots, f32 rescale per group)."""
    K, N, G, gs, pb = check_inputs(x, qw, kernel=False)
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    xq, xs = quantize_activations(x2, gs, act_bits)
    wq = unpack_int4(qw["packed"], pb)
    w_s = qw["scales"].astype(jnp.float32)
    # Integer products summed over at most K terms stay below 2^24, so an f32 dot of the integer
    # values is exact and equals the int32 dot; XLA:CPU runs f32 dots far faster than integer ones.
    exact_in_f32 = (K if G == 1 else gs) * _qmax(act_bits) * 8 < 2**24
    acc = jnp.float32 if exact_in_f32 else jnp.int32
    if exact_in_f32:
        xq, wq = xq.astype(jnp.float32), wq.astype(jnp.float32)
    prec = jax.lax.Precision.HIGHEST
    if G == 1:
        d = jnp.dot(xq, wq, preferred_element_type=acc, precision=prec)
        y = d.astype(jnp.float32) * (xs * w_s)
    else:
        d = jnp.einsum(
            "mgk,gkn->mgn", xq.reshape(-1, G, gs), wq.reshape(G, gs, N),
            preferred_element_type=acc, precision=prec,
        )
        y = (d.astype(jnp.float32) * (xs[:, :, None] * w_s[None])).sum(axis=1)
    return y.astype(x.dtype).reshape(*lead, N)


def w4a4_matmul(x, qw, *, act_bits: int = 4, backend: str = "auto", tiles: Tiles | None = None):
    """y = dequant(quantize_activations(x)) @ dequantize_weight(qw), in x.dtype.

    Activations are quantized per token over the weight's K groups (act_bits 4: mode w4a4, 8: mode
    w4a8); per group an int8 x int8 -> int32 dot is rescaled by act_scale[m, g] * w_scale[g, n] and
    summed in f32; per-channel weights (G = 1) accumulate int32 over all of K and rescale once.
    x: [..., K]; backend and tiles as in w4a16_matmul.
    """
    _qmax(act_bits)  # refuses act_bits other than 4 and 8
    backend = resolve_backend(backend)
    if backend == "reference":
        return w4a4_reference(x, qw, act_bits)
    plan = plan_call(x, qw, tiles, "w4a4")
    xq, xs = quantize_activations(plan.x2, plan.gs, act_bits)
    kernel = functools.partial(
        _w4a4_kernel,
        half=plan.pb // 2,
        blocks=plan.nblocks // plan.tiles.split,
        unroll=plan.tiles.unroll,
        grouped=plan.G > 1,
        M=plan.M,
        N=plan.N,
    )
    y = launch(kernel, plan, xq, qw, x.dtype, interpret=backend == "interpret", extra_in=(xs,))
    return y.reshape(*plan.lead, plan.N)
