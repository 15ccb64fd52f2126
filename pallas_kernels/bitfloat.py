"""4-bit codes packed two per byte -> 16-bit floats built from bits, for the kernels' dot operands.

OR-ing a nibble u (0..15) into the bits of 2^7 (bf16) or 2^10 (f16) gives exactly BASE + u as a
float, with integer ops only: no int -> float conversion (a quarter of the integer rate). A dot over
such an operand carries BASE times the row sums of the other operand, which the kernel subtracts
once per block. XOR-ing `magic = bits | 8` instead reads the nibble as a signed int4 n: BASE + 8 + n.

`nibble_floats` builds the values with jnp integer ops (any backend); `asm_nibble_floats` with inline
PTX (Marlin's trick), four packed bytes per instance: two `prmt` spread bytes 0,1 (and 2,3) into the
low halves of 16-bit lanes (after a right shift by 4 for the high nibbles), one `lop3` per pair of
lanes computes (lanes & 0x000F000F) ^ magic: 4-5 instructions for four values. One asm per nibble
plane (Pallas lowers only single-result asm). The PTX needs the Triton backend: interpret mode
cannot run it and must use `nibble_floats`.

The W4A16 weight kernel (w4a16.py) builds its signed weight nibbles with these too (magic = bits | 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

# (bits, BASE): OR-ing u (0..15) into `bits` gives BASE + u exactly; 128.0 in bf16, 1024.0 in f16.
FLOAT_BASE = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}

_PTX = """{
.reg .b32 z, s, t0, t1;
mov.b32 z, 0;
shr.u32 s, $2, SHIFT;
prmt.b32 t0, s, z, 0x4140;
prmt.b32 t1, s, z, 0x4342;
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0x6A;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0x6A;
}"""


def nibble_floats(p, shift: int, magic: int, cdt):
    """p (int8 / uint8, any shape) -> cdt values with the 16-bit pattern ((byte >> shift) & 15) ^ magic."""
    nib = (p.astype(jnp.int16) >> shift) & 15
    return lax.bitcast_convert_type(nib ^ jnp.int16(magic), cdt)


def asm_nibble_floats(p, shift: int, magic: int, cdt):
    """nibble_floats by inline PTX (Triton backend only); p's size must be a multiple of 4."""
    asm = _PTX.replace("SHIFT", str(shift)).replace("MAGIC", f"{magic * 0x10001:#010x}")  # both lanes
    [out] = plt.elementwise_inline_asm(asm, args=[p], constraints="=r,=r,r", pack=4,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, cdt)])
    return out
