"""Which int4 kernels run the quantized modes, and the weight layout they read.

- "triton": Pallas Triton kernels (pallas_kernels/w4a16.py, w4a4.py) on packing.py's layout
  ({"packed": int8 [K//2, N], "scales"}): every NVIDIA GPU since Ampere, and the CPU reference.
- "mosaic": Pallas Mosaic GPU kernels for Hopper (pallas_kernels/int4_mosaic.py) on the layout
  they read ({"w": int4 [N, K], "scales"}): wgmma with the int4 weights converted in registers.
- "auto": "mosaic" on sm_90 (H100 / H200) for runs whose quantized modes are all W4A16 (plain
  w4a16 decoding, QuantSpec's draft), where it measured faster (benchmarks/engine/README.md), else
  "triton". The Mosaic W4A8 / W4A4 kernel faults on the GPU so far, so QSpec's int8-activation
  drafts, and with them its verifier (one pytree), stay on Triton.

The choice is made once, on the weights (`arrange_weights`): `model.linear` dispatches on the
layout it is handed, so one pytree still serves every mode.
"""

from __future__ import annotations

import jax

from pallas_kernels.int4_mosaic import INT8_FAULT, int8_on_gpu, is_mosaic_layout, to_mosaic_layout

KERNELS = ("auto", "mosaic", "triton")
INT8_MODES = ("w4a8", "w4a4")  # int8-held activations: the Mosaic kernel for them does not run yet


def is_hopper() -> bool:
    """Whether the default device is an sm_90 GPU."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def resolve_kernels(kernels: str = "auto", modes=()) -> str:
    """The kernel family for a run that uses the quantized `modes`: 'auto' -> 'mosaic' on Hopper
    unless a mode needs int8 activations, else 'triton'; other names are checked and returned."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    int8 = any(m in INT8_MODES for m in modes)
    if kernels == "auto":
        return "mosaic" if is_hopper() and not int8 else "triton"
    if kernels == "mosaic" and int8 and jax.default_backend() == "gpu" and not int8_on_gpu():
        raise ValueError(INT8_FAULT)
    return kernels


def _is_packed(w) -> bool:
    return isinstance(w, dict) and "packed" in w and "scales" in w


def arrange_weights(params, kernels: str = "auto", modes=("w4a16",)):
    """params with every int4 weight in the layout the kernels for `modes` read (float leaves
    unchanged); see resolve_kernels.

    Call once, outside jit, after fuse_projections / unstack_layers. Weights already in the
    wanted layout pass through; moving Mosaic weights back to "triton" is not supported.
    """
    kernels = resolve_kernels(kernels, modes)
    if kernels == "triton":
        if any(is_mosaic_layout(w) for w in jax.tree.leaves(params, is_leaf=is_mosaic_layout)):
            raise ValueError("these weights are in the Mosaic layout; load them again for 'triton'")
        return params
    return jax.tree.map(lambda w: to_mosaic_layout(w) if _is_packed(w) else w, params,
                        is_leaf=lambda w: _is_packed(w) or is_mosaic_layout(w))
