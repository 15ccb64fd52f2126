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

from .bitfloat import FLOAT_BASE, asm_nibble_floats, nibble_floats
from .packing import unpack_int4, weight_layout
from . import tiling
from .tiling import Tiles, choose_tiles
from .w4a16_gemv import GemvTiles, w4a16_gemv

BACKENDS = ("auto", "triton", "interpret", "reference")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'triton' on GPU, else 'reference'; other names are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if jax.default_backend() == "gpu" else "reference"
    return backend


def compute_dtype(dtype):
    """Dot operand dtype: 16-bit activations stay 16-bit; anything else runs in f32."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def dot_precision(cdt):
    # f32 operands: ask for true f32 (Triton would otherwise use TF32).
    return lax.Precision.HIGHEST if cdt == jnp.float32 else None


def check_inputs(x, qw, kernel: bool):
    """Validate shapes; return (K, N, G, group_size, pb) of the weight."""
    K, N, G, gs, pb = weight_layout(qw)
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {x.shape} but the weight expects K={K} input features")
    if kernel and (pb < 64 or pb & (pb - 1)):
        raise ValueError(
            f"the Pallas kernels need a power-of-2 packing block (group size) >= 64, got {pb}; "
            "use backend='reference'"
        )
    return K, N, G, gs, pb


def launch(kernel, x2, qw, tiles: Tiles, N: int, K: int, G: int, out_dtype, interpret: bool,
           extra_in=()):
    """Shared pallas_call for the int4 kernels: grid (M tiles, N tiles, K splits).

    x2 and every array of extra_in are [M, *] row-blocked activation inputs; M is not padded
    (the kernels mask the rows past M, which saves a pad op per call). The kernel takes a keyword
    `atomic` and finishes its tile with `finish`. With split > 1 it either writes f32 partials
    [split, M, N] that are summed here in one small XLA fusion, or (tiles.atomic) adds its partial
    sum into one zeroed f32 [M, N] output.
    """
    M = x2.shape[0]
    bm, bn, split = tiles.bm, tiles.bn, tiles.split
    # Interpret mode's atomic add takes no mask (its blocks are padded, so zeroed edges suffice).
    atomic = "" if not (tiles.atomic and split > 1) else "unmasked" if interpret else "masked"
    grid = (pl.cdiv(M, bm), pl.cdiv(N, bn), split)
    row_specs = [pl.BlockSpec((bm, a.shape[1]), lambda i, j, s: (i, 0)) for a in (x2, *extra_in)]
    in_specs = row_specs + [
        pl.BlockSpec((K // 2, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((G, bn), lambda i, j, s: (0, j)),
    ]
    operands = [x2, *extra_in, qw["packed"], qw["scales"]]
    aliases = {}
    body = functools.partial(kernel, atomic=atomic)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    elif atomic:
        out_shape = jax.ShapeDtypeStruct((M, N), jnp.float32)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
        # The zeroed accumulator is an input aliased to the output; the kernel ignores its ref.
        in_specs.append(out_spec)
        aliases = {len(operands): 0}
        operands.append(jnp.zeros((M, N), jnp.float32))
        body = functools.partial(_drop_aliased_input, body)
    else:
        out_shape = jax.ShapeDtypeStruct((split, M, N), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        body,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=getattr(kernel, "func", kernel).__name__,
    )(*operands)
    if split > 1 and not atomic:
        y = y.sum(axis=0)
    return y.astype(out_dtype)


def _drop_aliased_input(kernel, *refs):
    *ins, _, o_ref = refs
    kernel(*ins, o_ref)


def col_mask(bn: int, N: int):
    """[1, bn] mask of the valid columns of this program's N tile, or None when N % bn == 0."""
    if N % bn == 0:
        return None
    cols = pl.program_id(1) * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    return cols < N


def row_mask(bm: int, M: int):
    """[bm, 1] mask of the valid rows of this program's M tile, or None when M % bm == 0."""
    if M % bm == 0:
        return None
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return rows < M


def load(ref, mask):
    """Load a block; masked-off elements (rows past M, columns past N) read as 0."""
    if mask is None:
        return ref[...]
    return plt.load(ref, mask=mask, other=0)


def finish(ref, val, rmask, cmask, atomic: str):
    """Store an output tile, leaving rows past M and columns past N untouched; for atomic split-K
    ("masked" on Triton, "unmasked" in interpret mode) add it atomically instead."""
    mask = rmask if cmask is None else cmask if rmask is None else rmask & cmask
    val = val.astype(ref.dtype)
    if atomic:
        bm, bn = ref.shape
        if mask is not None:  # tt.atomic_rmw wants a mask of the value's full shape
            mask = jnp.broadcast_to(mask, val.shape)
            if atomic == "unmasked":
                val, mask = jnp.where(mask, val, 0), None
        plt.atomic_add(ref, (pl.ds(0, bm), pl.ds(0, bn)), val, mask=mask)
    elif mask is None:
        ref[...] = val
    else:
        plt.store(ref, val, mask=mask)


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
    p = load(w_ref.at[pl.ds(b * half, half), :], mask)
    return (p << 4) >> 4, p >> 4  # arithmetic shifts on int8 sign-extend


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


def _w4a16_kernel(x_ref, w_ref, s_ref, o_ref, *, half, blocks, unroll, grouped, M, N, cdt,
                  atomic, swap, bias_dequant, asm_dequant=False):
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
    finish(o_ref, acc.T if swap else acc, rmask, cmask, atomic)


def _dequant_kernel(w_ref, s_ref, o_ref, *, half, N):
    bn = o_ref.shape[1]
    cmask = col_mask(bn, N)
    s = load(s_ref, cmask)  # [1, bn]: this block's group scale (or the per-channel scale)
    wl, wh = unpack_block(w_ref, 0, half, cmask)
    for rows, w in ((pl.ds(0, half), wl), (pl.ds(half, half), wh)):
        finish(o_ref.at[rows, :], w.astype(jnp.float32) * s, None, cmask, atomic="")


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


def plan_call(x, qw, tiles, kind):
    """Shapes of a kernel call and its tiles: (K, N, G, gs, pb, lead, x2 [M, K], M, tiles, K blocks)."""
    K, N, G, gs, pb = check_inputs(x, qw, kernel=True)
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    M = x2.shape[0]
    tiles = tiles or choose_tiles(M, N, K, pb, kind)
    nblocks = K // pb
    if nblocks % tiles.split:
        raise ValueError(f"split={tiles.split} does not divide the {nblocks} packing blocks")
    if (nblocks // tiles.split) % tiles.unroll:
        raise ValueError(f"unroll={tiles.unroll} does not divide the {nblocks // tiles.split} "
                         "packing blocks of a K range")
    return K, N, G, gs, pb, lead, x2, M, tiles, nblocks


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
    K, N, G, gs, pb, lead, x2, M, tiles, nblocks = plan_call(x, qw, tiles, "w4a16")
    cdt = compute_dtype(x.dtype)
    if tiles.dequant:  # prefill-size M: the dot is compute-bound, so cuBLAS on 16-bit weights wins
        w = dequantize_kernel(qw, cdt, interpret=backend == "interpret")
        y = jnp.dot(x2.astype(cdt), w, preferred_element_type=jnp.float32, precision=dot_precision(cdt))
        return y.astype(x.dtype).reshape(*lead, N)
    kernel = functools.partial(
        _w4a16_kernel,
        half=pb // 2,
        blocks=nblocks // tiles.split,
        unroll=tiles.unroll,
        grouped=G > 1,
        M=M,
        N=N,
        cdt=cdt,
        swap=tiles.swap,
        bias_dequant=(tiles.bias_dequant or tiles.asm_dequant) and cdt != jnp.float32,
        asm_dequant=tiles.asm_dequant and backend == "triton",
    )
    y = launch(kernel, x2, qw, tiles, N, K, G, x.dtype, interpret=backend == "interpret")
    return y.reshape(*lead, N)
