"""Which int4 kernels run the quantized modes, and the weight layout they read.

- "triton": Pallas Triton kernels (pallas_kernels/w4a16.py, w4a4.py) on packing.py's layout
  ({"packed": int8 [K//2, N], "scales"}): every NVIDIA GPU since Ampere, and the CPU reference.
- "mosaic": Pallas Mosaic GPU kernels for Hopper (pallas_kernels/int4_mosaic.py) on the layout
  they read ({"w": int4 [N, K], "scales"}): wgmma with the int4 weights converted in registers.
- "auto": "mosaic" on sm_90 (H100 / H200), where both kernels measured faster than the Triton
  ones at every decode and verify size up to 128 rows (benchmarks/engine/README.md), else "triton".

The choice is made once, on the weights (`arrange_weights`): `model.linear` dispatches on the
layout it is handed, so one pytree still serves every mode.
"""

from __future__ import annotations

import jax

from pallas_kernels.common import is_hopper
from pallas_kernels.int4_mosaic import is_mosaic_layout, to_mosaic_layout

KERNELS = ("auto", "mosaic", "triton")


def resolve_kernels(kernels: str = "auto") -> str:
    """The kernel family: 'auto' -> 'mosaic' on Hopper, else 'triton'; other names are checked
    and returned."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "mosaic" if is_hopper() else "triton"
    return kernels


def _is_packed(w) -> bool:
    return isinstance(w, dict) and "packed" in w and "scales" in w


def arrange_weights(params, kernels: str = "auto"):
    """params with every int4 weight in the layout the `kernels` read (float leaves unchanged);
    see resolve_kernels.

    Call once, outside jit, after fuse_projections / unstack_layers. Weights already in the
    wanted layout pass through; moving Mosaic weights back to "triton" is not supported.
    """
    kernels = resolve_kernels(kernels)
    if kernels == "triton":
        if any(is_mosaic_layout(w) for w in jax.tree.leaves(params, is_leaf=is_mosaic_layout)):
            raise ValueError("these weights are in the Mosaic layout; load them again for 'triton'")
        return params
    return jax.tree.map(lambda w: to_mosaic_layout(w) if _is_packed(w) else w, params,
                        is_leaf=lambda w: _is_packed(w) or is_mosaic_layout(w))
