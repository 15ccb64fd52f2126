"""Pallas Triton kernels, each beside a plain-jnp reference: int4 matmuls (W4A16, W4A4/W4A8) and
decode attention over bf16 or hierarchical INT8/INT4 KV (decode_attention.py).

Weights are used as y = x @ W with W [K, N] quantized by quantize_weight into
{"packed": int8 [K//2, N], "scales": f32 [G, N]} (see packing.py for the nibble layout).
"""

from .decode_attention import QuantKV, decode_attention, decode_attention_reference
from .packing import (
    dequantize_weight,
    pack_block,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_layout,
)
from .tiling import Tiles, choose_tiles
from .w4a16 import resolve_backend, w4a16_matmul, w4a16_reference
from .w4a4 import quantize_activations, w4a4_matmul, w4a4_reference

__all__ = [
    "QuantKV",
    "Tiles",
    "choose_tiles",
    "decode_attention",
    "decode_attention_reference",
    "dequantize_weight",
    "pack_block",
    "pack_int4",
    "quantize_activations",
    "quantize_weight",
    "resolve_backend",
    "unpack_int4",
    "w4a16_matmul",
    "w4a16_reference",
    "w4a4_matmul",
    "w4a4_reference",
    "weight_layout",
]
