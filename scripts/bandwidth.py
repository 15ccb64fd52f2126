"""The copy bandwidth the benchmark scripts measure floors and fractions against."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qspec_jax.evaluation import copy_bandwidth  # noqa: E402


def best_copy_bandwidth(smoke: bool = False, use_torch: bool = True) -> tuple:
    """(best, xla) bytes per second: XLA's own copy loop, and the larger of it and PyTorch's
    device-to-device memcpy when torch with CUDA is there (the best measured copy: XLA's loop
    reaches only about 0.73 of it on the H200). PyTorch's copy runs first and gives its buffers back:
    called before JAX first touches the GPU, it then does not compete with a large preallocated
    pool (XLA_CLIENT_MEM_FRACTION=0.95 leaves too little for its 4 GiB)."""
    peer = None
    if use_torch:
        try:
            import torch_peer

            peer = torch_peer.copy_bandwidth()
        except Exception:  # noqa: BLE001 - no torch or no CUDA: XLA's copy only
            peer = None
    xla = copy_bandwidth(2**24 if smoke else 2**30)
    return max(xla, peer or 0.0), xla
