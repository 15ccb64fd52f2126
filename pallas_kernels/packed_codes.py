"""Nibble planes -> f16 codes in Mosaic GPU registers, four bytes at a time (attention_mosaic v5).

Left to layout inference, a [rows, 64] uint8 plane tile is loaded in wgmma's register layout, two
bytes a thread per load, and unpacked one 16-bit code at a time (about 14 instructions a code in
the ninth session's PTX). Here the tile is loaded in `WGMMA_UPCAST_2X`, four consecutive bytes a
thread per 32-bit load, and each 32-bit word is unpacked with word-wide integer ops:

- INT4 view (one plane): lo = w & 0x0F0F0F0F, hi = (w >> 4) & 0x0F0F0F0F, the low-nibble and the
  high-nibble channels' codes as bytes;
- INT8 view (upper u, lower l): lo = ((u << 4) & 0xF0F0F0F0) | (l & 0x0F0F0F0F) and
  hi = (u & 0xF0F0F0F0) | ((l >> 4) & 0x0F0F0F0F), the codes 16 u + l as bytes (ptxas fuses each
  and/or pair into one lop3);
- each pair of code bytes b0, b1 then becomes the f16 pair (1024 + b0, 1024 + b1) by one `prmt`
  that interleaves them with the byte 0x64 (f16 bits 0x64XX are 1024 + XX exactly, XX < 256).

So eight codes cost 7-8 integer instructions and no conversion. The codes stay in UPCAST_2X
(vectors of four f16). `as_wgmma` hands them to wgmma as its A operand by relabelling registers,
not moving them: each thread's UPCAST_2X vector (row r, columns c..c+3) is read as two WGMMA
vectors (row r, two column pairs). That relabelling permutes the columns of every 16-column block
by `COLUMN_ORDER` (bits 1 and 3 of the column index swapped: an involution), the same permutation
for every row and thread, so a product A @ B over those columns is right when B's rows are
permuted the same way (the caller permutes the query channels; tests/test_packed_codes.py checks
the permutation against Mosaic's own layout definitions).

Only the compiled path exists: the interpreter has no register layouts, so there the caller
emulates the column order with jnp (attention_mosaic, "v5").
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

F16_BASE = 1024.0  # the f16 value of the bits 0x6400: codes come out as 1024 + code


def column_order(n: int) -> np.ndarray:
    """Position p of an n-column tile (n a multiple of 16) holds column COLUMN_ORDER[p] after
    `as_wgmma`: bits 1 and 3 of p swapped."""
    if n % 16:
        raise ValueError(f"tiles of 16 columns, got {n}")
    p = np.arange(n)
    return (p & ~0b1010) | ((p >> 2) & 0b10) | ((p << 2) & 0b1000)


def in_column_order(x):
    """x [..., n] with its last axis in column_order (jnp: a reshape and a transpose, no gather)."""
    *lead, n = x.shape
    if n % 16:
        raise ValueError(f"tiles of 16 columns, got {n}")
    x = x.reshape(*lead, n // 16, 2, 2, 2, 2)  # column bits (3, 2, 1, 0) of each 16-column block
    return jnp.swapaxes(x, -4, -2).reshape(*lead, n)


def _mlir():
    """Mosaic GPU's MLIR modules, imported where a kernel is lowered (not needed on import)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    return ir, arith, llvm, vector, mgpu


def unpack_bytes(planes):
    """One or two uint8 [rows, cols] plane tiles in WGMMA_UPCAST_2X (plgpu.load(..., layout=...))
    -> (lo, hi) f16 [rows, cols] in WGMMA_UPCAST_2X holding 1024 + code: the low-nibble channels'
    codes and the high-nibble channels' codes (INT4: u; INT8: 16 u + l)."""
    if len(planes) not in (1, 2):
        raise ValueError(f"one or two planes, got {len(planes)}")
    up = plgpu.Layout.WGMMA_UPCAST_2X
    out = plgpu.ShapeDtypeStruct(planes[0].shape, jnp.float16, up)

    @plgpu.inline_mgpu(arg_types=(up,) * len(planes), return_type=(out, out))
    def unpack(_, *arrays):
        ir, arith, llvm, vector, mgpu = _mlir()
        i32, f16 = ir.IntegerType.get_signless(32), ir.F16Type.get()
        const = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))  # noqa: E731
        word_vec = ir.VectorType.get((1,), i32)

        def word(reg):  # vector<4 x i8> -> i32
            return vector.extract(vector.bitcast(word_vec, reg), dynamic_position=[], static_position=[0])

        def f16_pair(b, selector):  # bytes (b0, b1) or (b2, b3) of b -> f16 bits (0x64b0, 0x64b1)
            return llvm.inline_asm(i32, [b], f"prmt.b32 $0, $1, 0x64646464, {selector:#x};", "=r,r")

        def codes(b):  # a word of four code bytes -> vector<4 x f16> of 1024 + code
            pairs = llvm.mlir_undef(ir.VectorType.get((2,), i32))
            for i, sel in enumerate((0x4140, 0x4342)):
                pairs = llvm.insertelement(pairs, f16_pair(b, sel), arith.constant(i32, i))
            return vector.bitcast(ir.VectorType.get((4,), f16), pairs)

        low, high = const(0x0F0F0F0F), const(0xF0F0F0F0)
        four = const(4)
        lo_regs = np.empty(arrays[0].registers.shape, dtype=object)
        hi_regs = np.empty_like(lo_regs)
        for idx in np.ndindex(lo_regs.shape):
            words = [word(a.registers[idx]) for a in arrays]
            if len(words) == 1:
                (w,) = words
                lo = arith.andi(w, low)
                hi = arith.andi(arith.shrui(w, four), low)
            else:
                u, l = words
                lo = arith.ori(arith.andi(arith.shli(u, four), high), arith.andi(l, low))
                hi = arith.ori(arith.andi(u, high), arith.andi(arith.shrui(l, four), low))
            lo_regs[idx], hi_regs[idx] = codes(lo), codes(hi)
        layout = mgpu.WGMMA_LAYOUT_UPCAST_2X
        return (mgpu.FragmentedArray(_registers=lo_regs, _layout=layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=hi_regs, _layout=layout, _is_signed=None))

    return unpack(*planes)


def source_register(idx, src_ndim: int):
    """as_wgmma's relabelling: the WGMMA register at idx (shape [row tiles, 8-column tiles, 1, 1, 2,
    1, 1, 1, 1], two elements each) is elements first, first + 1 of the UPCAST_2X register at src
    (shape [row tiles, 16-column tiles, 1, 1, 2, 1, 1, 1, 1, 1], four elements each)."""
    rows, cols, _, _, half_rows = idx[:5]
    return (rows, cols // 2, 0, 0, half_rows) + (0,) * (src_ndim - 5), 2 * (cols % 2)


def as_wgmma(x):
    """A 16-bit [rows, cols] array in WGMMA_UPCAST_2X -> the same registers read as WGMMA's layout
    (wgmma's A operand), columns permuted by column_order within each 16-column block. No
    instructions: each four-element vector is split into two two-element ones."""
    out = plgpu.ShapeDtypeStruct(x.shape, x.dtype, plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_2X,), return_type=out)
    def relabel(_, array):
        ir, arith, llvm, vector, mgpu = _mlir()
        layout = mgpu.WGMMA_LAYOUT
        regs = np.empty(layout.registers_shape(array.shape), dtype=object)
        for idx in np.ndindex(regs.shape):
            src, first = source_register(idx, array.registers.ndim)
            regs[idx] = mgpu.utils.vector_slice(array.registers[src], slice(first, first + 2))
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=array.is_signed)

    return relabel(x)
