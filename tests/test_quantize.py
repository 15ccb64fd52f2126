"""Rotation and offline quantization: orthogonality, the fast online transform, function-preserving
norm folding and rotation (tiny random model and the real SmolLM2), the quantized pytree."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels
from qspec_jax import checkpoint, rotation
from qspec_jax.config import get_preset
from qspec_jax.model import MODES, forward, fuse_projections
from qspec_jax.quantize import (
    PROJECTIONS,
    default_group_size,
    fold_norms,
    quantize_params,
    quantize_weight_mse,
    rotate_params,
)
from test_kernels import _export_cuda, verify_triton_modules  # noqa: F401 (fixture)

TINY = get_preset("tiny")
_fwd = jax.jit(forward, static_argnames=("config", "mode"))


def tiny_params(untied=False, seed=0):
    """Tiny random f32 params with norm gains far from 1 (so folding is really tested)."""
    rng = np.random.default_rng(seed)
    c = TINY
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def lin(*s):
        return jnp.asarray(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-2]))

    def gain(*s):
        return jnp.asarray((1 + 0.5 * rng.standard_normal(s)).astype(np.float32))

    p = {"embed": jnp.asarray(rng.standard_normal((V, D)).astype(np.float32)),
         "layers": {"attn_norm": gain(L, D), "wq": lin(L, D, q), "wk": lin(L, D, kv), "wv": lin(L, D, kv),
                    "wo": lin(L, q, D), "mlp_norm": gain(L, D), "w_gate": lin(L, D, F),
                    "w_up": lin(L, D, F), "w_down": lin(L, F, D)},
         "final_norm": gain(D)}
    if untied:
        p["lm_head"] = lin(D, V)
    return p


def tokens_positions(batch, t, vocab, seed=1):
    tok = jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (batch, t)), jnp.int32)
    return tok, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))


def logits(params, config, tok, pos, mode="bf16"):
    return np.asarray(_fwd(params, tok, pos, None, config=config, mode=mode)[0])


# ------------------------------------------------------------------------------------ rotation


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 60, 108])
def test_constructed_hadamard_matrices(n):
    h = rotation._hadamard_int(n)
    assert h is not None and set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [1, 64, 128, 576, 1536, 43 * 16, 9])
def test_rotations_are_orthogonal(n):
    for m in (rotation.residual_rotation(n, seed=3), rotation.random_orthogonal(n, seed=3),
              rotation.online_matrix(n, rotation.small_factor(n, seed=3))):
        assert m.shape == (n, n) and m.dtype == np.float32
        np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-5)
    if n & (n - 1) == 0:
        np.testing.assert_allclose(rotation.walsh_hadamard(n) @ rotation.walsh_hadamard(n).T, np.eye(n), atol=1e-6)


def test_small_factor_choice():
    # Hadamard factors where one can be built, the odd part's random orthogonal otherwise.
    assert rotation.small_factor(4096).shape == (1, 1)
    assert rotation.small_factor(576).shape == (36, 36)
    assert rotation.small_factor(1536).shape == (12, 12)
    assert rotation.small_factor(14336).shape == (28, 28)
    assert rotation.small_factor(11008).shape == (43, 43)
    np.testing.assert_allclose(np.abs(rotation.small_factor(1536)), 1 / np.sqrt(12), rtol=1e-6)
    # the residual rotation depends on the seed (random signs), deterministically
    a, b = rotation.residual_rotation(576, 0), rotation.residual_rotation(576, 1)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, rotation.residual_rotation(576, 0))


@pytest.mark.parametrize("n", [64, 576, 1536, 43 * 16])
def test_online_transform_matches_dense_matrix(n):
    r = rotation.small_factor(n, seed=5)
    x = np.random.default_rng(0).standard_normal((2, 3, n)).astype(np.float32)
    y = jax.jit(rotation.online_transform)(jnp.asarray(x), jnp.asarray(r))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x @ rotation.online_matrix(n, r), atol=2e-5, rtol=1e-5)
    yb = rotation.online_transform(jnp.asarray(x, jnp.bfloat16), jnp.asarray(r))
    assert yb.dtype == jnp.bfloat16


def test_online_transform_rejects_mismatched_factor():
    with pytest.raises(ValueError, match="does not fit"):
        rotation.online_transform(jnp.ones((2, 576)), jnp.eye(5))
    with pytest.raises(ValueError, match="does not fit"):
        rotation.online_transform(jnp.ones((2, 576)), jnp.eye(3))  # 576 / 3 = 192 is not 2^k


# ------------------------------------------------------------------------- fold and rotate (float)


@pytest.mark.parametrize("untied", [False, True])
def test_fold_and_rotate_preserve_the_function(untied):
    """Tolerance: 2e-5 of the largest |logit| (float32 rounding of a few extra matmuls)."""
    p = tiny_params(untied)
    tok, pos = tokens_positions(2, 12, TINY.vocab_size)
    ref = logits(p, TINY, tok, pos)
    scale = np.abs(ref).max()

    folded = fold_norms(p)
    assert "final_norm" not in folded and "lm_head" in folded
    assert "attn_norm" not in folded["layers"] and "mlp_norm" not in folded["layers"]
    np.testing.assert_allclose(logits(folded, TINY, tok, pos), ref, atol=2e-5 * scale)

    rot = rotate_params(p, TINY, seed=1)
    assert set(rot["online_rotation"]) == {"o_proj", "down_proj"}
    assert not np.allclose(np.asarray(rot["embed"]), np.asarray(p["embed"]))
    np.testing.assert_allclose(logits(rot, TINY, tok, pos), ref, atol=2e-5 * scale)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_params(rot, TINY)


def test_rotated_smollm2_computes_the_same_logits(smollm2):
    """The real model: rotated float logits within 1e-4 of the largest |logit| (f32, 30 layers)."""
    config, params = smollm2
    tok, pos = tokens_positions(1, 24, config.vocab_size, seed=2)
    ref = logits(params, config, tok, pos)
    rot = rotate_params(params, config)
    assert rot["online_rotation"]["o_proj"].shape == (36, 36)
    assert rot["online_rotation"]["down_proj"].shape == (12, 12)
    out = logits(rot, config, tok, pos)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
    assert (out.argmax(-1) == ref.argmax(-1)).all()


# --------------------------------------------------------------------------------- quantization


def test_default_group_size():
    assert default_group_size(get_preset("tiny")) == 128
    assert default_group_size(get_preset("smollm2-135m")) == 64
    assert default_group_size(get_preset("llama3-8b")) == 128
    assert default_group_size(get_preset("llama2-7b")) == 128


@pytest.mark.parametrize("gs", [48, 0, -2, 3])
def test_bad_group_size_is_rejected(gs):
    with pytest.raises(ValueError, match="group_size"):
        quantize_params(tiny_params(), TINY, group_size=gs)


def test_mse_scales_never_worse_than_max_scales():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32))
    for gs in (64, -1):
        a = pallas_kernels.quantize_weight(w, gs)
        b = quantize_weight_mse(w, gs)
        assert b["packed"].shape == a["packed"].shape and b["scales"].shape == a["scales"].shape
        err_a = jnp.sum((pallas_kernels.dequantize_weight(a) - w) ** 2)
        err_b = jnp.sum((pallas_kernels.dequantize_weight(b) - w) ** 2)
        assert float(err_b) <= float(err_a) * 0.999


@pytest.fixture(scope="module")
def tiny_quantized():
    p = tiny_params()
    return p, {(gs, rot): quantize_params(p, TINY, group_size=gs, rotate=rot)
               for gs in (64, -1) for rot in (True, False)}


def test_quantized_pytree_layout(tiny_quantized):
    _, qs = tiny_quantized
    c = TINY
    L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
    o, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"wq": (D, o), "wk": (D, kv), "wv": (D, kv), "wo": (o, D),
              "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    for (gs, rot), q in qs.items():
        for name in PROJECTIONS:
            k, n = shapes[name]
            w = q["layers"][name]
            assert w["packed"].shape == (L, k // 2, n) and w["packed"].dtype == jnp.int8
            g = 1 if gs == -1 else k // gs
            assert w["scales"].shape == (L, g, n) and w["scales"].dtype == jnp.float32
        assert q["embed"].dtype == jnp.bfloat16
        if rot:
            assert q["lm_head"].dtype == jnp.bfloat16 and "final_norm" not in q
            assert q["online_rotation"]["o_proj"].dtype == jnp.float32
            assert set(q["layers"]) == set(PROJECTIONS)
        else:
            assert "online_rotation" not in q and q["layers"]["attn_norm"].dtype == jnp.bfloat16


def test_every_mode_runs_and_w4a16_is_close(tiny_quantized):
    """bf16-dequantized and w4a16 logits agree (same weights); w4a16 near the float model (loose:
    relative L2 error < 0.3, int4 on random Gaussian weights measures 0.17-0.20); w4a8 near w4a16;
    w4a4 within 0.4 of w4a16, and closer with rotation than without."""
    p, qs = tiny_quantized
    tok, pos = tokens_positions(2, 10, TINY.vocab_size)
    ref = logits(p, TINY, tok, pos)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    a4_err = {}
    for (gs, rot), q in qs.items():
        out = {m: logits(q, TINY, tok, pos, m) for m in MODES}
        assert all(np.isfinite(v).all() and v.shape == ref.shape for v in out.values())
        assert rel(out["w4a16"], out["bf16"]) < 0.02, (gs, rot)
        assert rel(out["w4a16"], ref) < 0.3, (gs, rot)
        assert rel(out["w4a8"], out["w4a16"]) < 0.05, (gs, rot)
        a4_err[gs, rot] = rel(out["w4a4"], out["w4a16"])
        assert a4_err[gs, rot] < 0.4, (gs, rot)
    for gs in (64, -1):
        assert a4_err[gs, True] < a4_err[gs, False]


def test_fused_projections_compute_the_same_logits(tiny_quantized):
    """q/k/v and gate/up concatenated: same logits in every mode, float and quantized, and the
    fused layout has 4 projections per layer."""
    p, qs = tiny_quantized
    tok, pos = tokens_positions(2, 9, TINY.vocab_size, seed=5)
    fp = fuse_projections(p)
    assert {"wqkv", "w_gate_up"} <= set(fp["layers"]) and "wq" not in fp["layers"]
    # f32 dots of a different width may sum in another order: float tolerance, not bit equality
    np.testing.assert_allclose(logits(fp, TINY, tok, pos), logits(p, TINY, tok, pos), rtol=1e-4, atol=1e-4)
    # f32 activations: with bf16 ones XLA's excess precision rounds differently in the two graphs,
    # and 4-bit activation quantization turns one-ulp differences into visible ones.
    q = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, qs[(64, True)])
    fq = fuse_projections(q)
    assert fq["layers"]["wqkv"]["packed"].shape[-1] == sum(q["layers"][n]["packed"].shape[-1] for n in ("wq", "wk", "wv"))
    for mode in ("w4a16", "w4a4", "w4a8"):
        np.testing.assert_allclose(logits(fq, TINY, tok, pos, mode), logits(q, TINY, tok, pos, mode),
                                   rtol=1e-4, atol=1e-4, err_msg=mode)
    assert fuse_projections(fq)["layers"].keys() == fq["layers"].keys()  # idempotent


def test_quantized_params_save_restore_bit_for_bit(tiny_quantized, tmp_path):
    _, qs = tiny_quantized
    q = qs[(64, True)]
    checkpoint.save_params(q, str(tmp_path / "q"), TINY, metadata={"group_size": 64, "rotate": True})
    config, back = checkpoint.restore_params(str(tmp_path / "q"))
    assert config == TINY
    assert jax.tree.structure(back) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    tok, pos = tokens_positions(1, 6, TINY.vocab_size)
    np.testing.assert_array_equal(logits(q, TINY, tok, pos, "w4a4"), logits(back, TINY, tok, pos, "w4a4"))


@pytest.mark.parametrize("n,rows", [(576, 3), (1536, 2), (4096, 1), (43 * 16, 2)])
def test_online_transform_kernel_matches_float64(n, rows, monkeypatch):
    """The one-launch transform (pallas_kernels.hadamard, interpreted) against the dense float64
    matrix, for f32 and bf16 rows (43 * 16: a [43, 16] view, the smallest b the kernel takes)."""
    monkeypatch.setattr(rotation, "KERNEL_BACKEND", "interpret")
    r = rotation.small_factor(n, seed=3)
    x = np.random.default_rng(n).standard_normal((rows, n)).astype(np.float32)
    assert "pallas_call" in str(jax.make_jaxpr(rotation.online_transform)(jnp.asarray(x), jnp.asarray(r)))
    want = x.astype(np.float64) @ rotation.online_matrix(n, r).astype(np.float64)
    y = rotation.online_transform(jnp.asarray(x), jnp.asarray(r))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = rotation.online_transform(xb, jnp.asarray(r))
    wantb = np.asarray(xb, np.float64) @ rotation.online_matrix(n, r).astype(np.float64)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float64), wantb, atol=1e-2 * np.abs(wantb).max(), rtol=0)


def test_online_hadamard_rejects_bad_shapes():
    from pallas_kernels.hadamard import online_hadamard

    with pytest.raises(ValueError, match="needs left"):
        online_hadamard(jnp.ones((1, 4, 64)), jnp.eye(3), interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        online_hadamard(jnp.ones((1, 4, 48)), jnp.eye(4), interpret=True)


@pytest.mark.parametrize("rows,m,b,dtype", [(1, 8, 512, jnp.bfloat16), (16, 28, 512, jnp.bfloat16),
                                            (3, 9, 64, jnp.float32)])
def test_online_hadamard_lowers_for_cuda(verify_triton_modules, rows, m, b, dtype):
    """The kernel through the real Triton lowering on the CPU (MLIR-verified), at Llama-3-8B's o_proj
    and down_proj views and SmolLM2's, both column-block choices (one row: 16 columns)."""
    from pallas_kernels.hadamard import online_hadamard

    n0 = len(verify_triton_modules)
    _export_cuda(lambda x, left: online_hadamard(x, left), jax.ShapeDtypeStruct((rows, m, b), dtype),
                 jax.ShapeDtypeStruct((m, m), jnp.float32))
    assert len(verify_triton_modules) == n0 + 1, "no Triton kernel was lowered"
