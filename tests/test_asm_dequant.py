"""W4A16 with the int4 -> 16-bit conversion in inline PTX (Tiles.asm_dequant).

PTX runs only on a GPU: there the compiled kernel is checked against float64 NumPy; on CPU the
Triton lowering is checked (jax 0.10.2 export, see test_kernels.py) and interpret mode is checked to
fall back to the same values through jnp bit operations.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Tiles, choose_tiles, pack_block, quantize_weight, w4a16_matmul
from test_kernels import BF16_TOL, F32_TOL, KERNEL_BACKENDS, _export_cuda, np_dequant, rel_err, rng, verify_triton_modules  # noqa: F401

CASES = [(1, 512, 384, 128), (16, 576, 576, 64), (64, 1024, 256, 128), (5, 256, 200, -1)]


def asm_tiles(M, K, N, gs):
    G = 1 if gs == -1 else K // gs
    return dataclasses.replace(choose_tiles(M, N, K, pack_block(K, G)), asm_dequant=True, dequant=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("M,K,N,gs", CASES)
def test_asm_dequant_matches_float64(rng, backend, dtype, M, K, N, gs):
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    qw = quantize_weight(w, gs)
    x = jnp.asarray(rng.standard_normal((M, K)).astype(np.float32), dtype)
    y = w4a16_matmul(x, qw, backend=backend, tiles=asm_tiles(M, K, N, gs))
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(qw)
    assert y.dtype == dtype and rel_err(y, ref) < BF16_TOL


def test_asm_dequant_leaves_f32_activations_exact(rng):
    # f32 x never takes a 16-bit bit-built path
    M, K, N, gs = 3, 512, 256, 128
    w = rng.standard_normal((K, N)).astype(np.float32)
    qw = quantize_weight(w, gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = w4a16_matmul(jnp.asarray(x), qw, backend=KERNEL_BACKENDS[-1], tiles=asm_tiles(M, K, N, gs))
    assert rel_err(y, x.astype(np.float64) @ np_dequant(qw)) < F32_TOL


@pytest.mark.parametrize("M,K,N,gs", CASES)
def test_asm_dequant_triton_lowering(verify_triton_modules, M, K, N, gs):
    qw = jax.eval_shape(lambda: quantize_weight(jnp.zeros((K, N)), gs))
    for swap in (False, True):
        tiles = dataclasses.replace(asm_tiles(M, K, N, gs), swap=swap)
        x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
        n = len(verify_triton_modules)
        exp = _export_cuda(lambda x, qw, t=tiles: w4a16_matmul(x, qw, backend="triton", tiles=t), x, qw)
        assert len(verify_triton_modules) == n + 1
        assert "prmt.b32" in exp.mlir_module() or "lop3.b32" in str(verify_triton_modules[-1].module)


def test_tiles_default_is_off():
    assert Tiles(16, 128).asm_dequant is False
