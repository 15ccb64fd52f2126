"""Pallas Triton int4 matmul kernels (W4A16, W4A4/W4A8), each beside a plain-jnp reference.

Weights are used as y = x @ W with W [K, N] quantized by quantize_weight into
{"packed": int8 [K//2, N], "scales": f32 [G, N]} (see packing.py for the nibble layout).
"""

from .packing import (
    dequantize_weight,
    pack_block,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_layout,
)
from .tiling import Tiles, choose_tiles
from .w4a16 import w4a16_matmul, w4a16_reference
from .w4a4 import quantize_activations, w4a4_matmul, w4a4_reference

__all__ = [
    "Tiles",
    "choose_tiles",
    "dequantize_weight",
    "pack_block",
    "pack_int4",
    "quantize_activations",
    "quantize_weight",
    "unpack_int4",
    "w4a16_matmul",
    "w4a16_reference",
    "w4a4_matmul",
    "w4a4_reference",
    "weight_layout",
]
