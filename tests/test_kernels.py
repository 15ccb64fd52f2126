"""Int4 packing and the W4A16 / W4A4 / W4A8 kernels, on CPU.

The kernels run with backend="interpret" (the Pallas kernel executed by XLA on CPU) and are
checked, like the plain-jnp "reference" backend, against float64 NumPy of the same dequantized
math. Tolerances are relative Frobenius errors:
- f32 activations: 2e-6 (f32 accumulation over K <= 576 gives ~1e-7);
- bf16 activations: 6e-3 vs float64 of the bf16-rounded inputs: the dot itself is exact-ish
  (int4 values are exact in bf16, f32 accumulation), the error is the final rounding of the
  output to bf16 (relative 2^-9 per element, ~1.6e-3 in Frobenius norm).
W4A4 quantizes activations with f32 arithmetic in both the kernel and the NumPy check (the
contract: f32 scales, round-half-even(x * (1/scale))), so the integer values agree exactly; float64
quantization could flip a value sitting within an f32 ulp of a rounding boundary.

The lowering check exports each kernel for CUDA with jax.export, which with jax 0.10.2 runs the
real Pallas -> Triton IR lowering without a GPU; the Triton module is also MLIR-verified. It does
not run Triton's own compiler (ptxas etc.), which needs the GPU plugin.
"""

import dataclasses
import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    Tiles,
    choose_tiles,
    dequantize_weight,
    pack_block,
    pack_int4,
    quantize_activations,
    quantize_weight,
    unpack_int4,
    w4a4_matmul,
    w4a16_matmul,
)
from pallas_kernels.w4a16 import dequantize_kernel
from pallas_kernels.w4a4 import ACT_CLIP

# On a GPU the compiled Triton kernels are checked too, against the same float64 references.
from conftest import kernel_backends  # noqa: E402

KERNEL_BACKENDS = kernel_backends()
BACKENDS = KERNEL_BACKENDS + ["reference"]
F32_TOL = 2e-6
BF16_TOL = 6e-3


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed (shown on failure) and can be pinned
    with QSPEC_TEST_SEED to reproduce a failure."""
    seed = int(os.environ.get("QSPEC_TEST_SEED", secrets.randbits(32)))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def rel_err(y, ref):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def make_weight(rng, K, N, gs):
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    return w, quantize_weight(w, gs)


def np_dequant(qw):
    """float64 weights from the packed dict, decoded independently of the package."""
    packed = np.asarray(qw["packed"]).astype(np.int16)
    scales = np.asarray(qw["scales"], np.float64)
    K, N = 2 * packed.shape[0], packed.shape[1]
    G = scales.shape[0]
    pb = K // G if G > 1 else (128 if K % 128 == 0 else 64)
    low = packed & 0xF
    low = np.where(low >= 8, low - 16, low)
    high = (packed >> 4) & 0xF
    high = np.where(high >= 8, high - 16, high)
    q = np.concatenate(
        [low.reshape(K // pb, pb // 2, N), high.reshape(K // pb, pb // 2, N)], axis=1
    ).reshape(K, N)
    return (q.reshape(G, K // G, N) * scales[:, None, :]).reshape(K, N)


def np_quantize_activations(x, gs, bits):
    """Independent NumPy per-token per-group quantization (f32 arithmetic, as the contract)."""
    qmax = np.float32(7 if bits == 4 else 127)
    M, K = x.shape
    gs = K if gs == -1 else gs
    xg = x.astype(np.float32).reshape(M, K // gs, gs)
    scale = np.max(np.abs(xg), axis=-1) * np.float32(ACT_CLIP[int(qmax)] / int(qmax))  # f64 -> f32 constant
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    inv = np.float32(1) / scale
    q = np.clip(np.rint(xg * inv[..., None]), -qmax, qmax)
    return q.reshape(M, K), scale


# ---------------------------------------------------------------- packing and quantization


@pytest.mark.parametrize("pb", [64, 128])
def test_pack_unpack_every_value_every_nibble(pb):
    vals = np.arange(-8, 8)
    lo, hi = np.meshgrid(vals, vals, indexing="ij")  # all 256 (low, high) pairs, one per column
    lo, hi = lo.ravel(), hi.ravel()
    K, N = 2 * pb, lo.size
    q = np.empty((K, N), np.int8)
    for b in range(K // pb):  # every row position inside both blocks holds the pair
        q[b * pb : b * pb + pb // 2] = lo
        q[b * pb + pb // 2 : (b + 1) * pb] = hi
    packed = np.asarray(pack_int4(jnp.asarray(q), pb))
    assert packed.dtype == np.int8 and packed.shape == (K // 2, N)
    expect = ((lo & 0xF) | (hi << 4)).astype(np.uint8).view(np.int8)
    assert (packed == expect[None, :]).all()
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), pb)), q)


def test_pack_layout_formula(rng):
    K, N, pb = 256, 8, 128
    q = rng.integers(-8, 8, (K, N)).astype(np.int8)
    qu = q.view(np.uint8) & 0xF  # two's-complement nibbles
    packed = np.asarray(pack_int4(jnp.asarray(q), pb)).view(np.uint8)
    for b in range(K // pb):
        for r in range(pb // 2):
            expect = qu[b * pb + r] | (qu[b * pb + pb // 2 + r] << 4)
            assert (packed[b * pb // 2 + r] == expect).all()


def test_pack_block():
    assert pack_block(576, 9) == 64
    assert pack_block(256, 2) == 128
    assert pack_block(4096, 1) == 128
    assert pack_block(576, 1) == 64
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_block(100, 1)


@pytest.mark.parametrize("K,N,gs", [(576, 48, 64), (256, 40, 128), (576, 40, -1), (512, 24, -1)])
def test_quantize_weight_error_bound(rng, K, N, gs):
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel: scale guarded to 1, values 0
    qw = quantize_weight(w, gs)
    G = 1 if gs == -1 else K // gs
    assert qw["packed"].shape == (K // 2, N) and qw["packed"].dtype == jnp.int8
    assert qw["scales"].shape == (G, N) and qw["scales"].dtype == jnp.float32
    scales = np.asarray(qw["scales"])
    np.testing.assert_array_equal(scales[:, 3], 1.0)
    deq = np.asarray(dequantize_weight(qw))
    np.testing.assert_allclose(deq, np_dequant(qw), rtol=1e-6, atol=0)
    bound = np.repeat(scales, K // G, axis=0) / 2
    assert (np.abs(w - deq) <= bound * (1 + 1e-6)).all()


# ---------------------------------------------------------------- errors


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_weight(jnp.ones((100, 8)), 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_weight(jnp.ones((96, 8)), -1)
    qw = quantize_weight(jnp.ones((256, 64)), 128)
    x = jnp.ones((3, 128))
    for backend in ("reference", "interpret"):
        with pytest.raises(ValueError, match="K=256"):
            w4a16_matmul(x, qw, backend=backend)
        with pytest.raises(ValueError, match="K=256"):
            w4a4_matmul(x, qw, backend=backend)
    with pytest.raises(ValueError, match="bits"):
        w4a4_matmul(jnp.ones((3, 256)), qw, act_bits=3, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        w4a16_matmul(jnp.ones((3, 256)), qw, backend="cuda")
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_activations(jnp.ones((2, 100)), 64, 4)
    with pytest.raises(ValueError, match="does not divide"):
        w4a16_matmul(jnp.ones((3, 256)), qw, backend="interpret", tiles=Tiles(16, 64, split=3))
    qw32 = quantize_weight(jnp.ones((128, 64)), 32)  # valid weights, too small a group for the kernel
    with pytest.raises(ValueError, match=">= 64"):
        w4a16_matmul(jnp.ones((3, 128)), qw32, backend="interpret")
    assert w4a16_matmul(jnp.ones((3, 128)), qw32, backend="reference").shape == (3, 64)


# ---------------------------------------------------------------- W4A16

# (M, K, N, group_size): M off the tile, SmolLM2's K=576 in groups of 64, per channel (pb 64 and
# 128), N not a multiple of 128 (192, 1600) or of 32 (200: masked edge tile), a wide M (bm 128).
SHAPES = [
    (1, 576, 192, 64),
    (5, 576, 1600, 64),
    (33, 256, 200, 128),
    (5, 256, 192, 128),
    (1, 576, 192, -1),
    (33, 512, 1600, -1),
    (70, 256, 128, 128),
    (32, 256, 192, 128),  # M a multiple of the tile: no row mask
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,gs", SHAPES)
def test_w4a16_matches_float64(rng, backend, M, K, N, gs):
    _, qw = make_weight(rng, K, N, gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = w4a16_matmul(jnp.asarray(x), qw, backend=backend)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    assert rel_err(y, x.astype(np.float64) @ np_dequant(qw)) < F32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("M,K,N,gs", [SHAPES[1], SHAPES[2], SHAPES[5], SHAPES[6]])
def test_w4a16_bf16(rng, backend, dtype, M, K, N, gs):
    """16-bit activations; M = 33 and 70 take the bit-built dequantization and transposed tiles."""
    _, qw = make_weight(rng, K, N, gs)
    xb = jnp.asarray(rng.standard_normal((M, K)), dtype)
    y = w4a16_matmul(xb, qw, backend=backend)
    assert y.dtype == dtype
    ref = np.asarray(xb.astype(jnp.float32), np.float64) @ np_dequant(qw)
    assert rel_err(y, ref) < BF16_TOL


@pytest.mark.parametrize(
    "M,K,N,gs,tiles",
    [
        (5, 576, 192, 64, Tiles(16, 128, split=9)),  # split-K, masked N edge, one block each
        (33, 512, 200, -1, Tiles(32, 64, split=2)),  # per channel, split-K, masked N edge
        (3, 256, 192, 128, Tiles(16, 64, split=1)),  # split off
        (5, 1024, 200, 64, Tiles(16, 128, split=4, unroll=2)),  # unrolled split-K
        (33, 512, 192, -1, Tiles(32, 64, split=2, unroll=2)),  # per channel, unrolled split-K
        (17, 1024, 192, 128, Tiles(16, 64, split=1, unroll=4)),  # unrolled K loop, M edge
        (40, 576, 200, 64, Tiles(64, 64, split=3, swap=True)),  # transposed product
        (9, 512, 192, -1, Tiles(16, 64, split=2, swap=True)),  # transposed, per channel
        (5, 1024, 200, 64, Tiles(16, 128, split=4, bias_dequant=True)),  # bit-built weights
        (40, 576, 192, -1, Tiles(64, 64, split=3, bias_dequant=True, swap=True)),
        (70, 576, 200, 64, Tiles(16, 128, dequant=True)),  # dequantize + XLA dot, masked N edge
        (9, 512, 1600, -1, Tiles(16, 128, dequant=True)),  # per channel
    ],
)
def test_w4a16_tile_variants(rng, M, K, N, gs, tiles):
    _, qw = make_weight(rng, K, N, gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    for backend in KERNEL_BACKENDS:
        y = w4a16_matmul(jnp.asarray(x), qw, backend=backend, tiles=tiles)
        assert rel_err(y, x.astype(np.float64) @ np_dequant(qw)) < F32_TOL, backend


def test_prefill_size_m_takes_the_dequantize_path(rng):
    from pallas_kernels.tiling import DEQUANT_MIN_M
    for M in (1, 64, DEQUANT_MIN_M - 1):
        assert not choose_tiles(M, 1024, 4096, 128, "w4a16").dequant
    assert choose_tiles(DEQUANT_MIN_M, 1024, 4096, 128, "w4a16").dequant
    assert not choose_tiles(4096, 1024, 4096, 128, "w4a4").dequant  # W4A4 keeps its integer dot
    _, qw = make_weight(rng, 256, 192, 128)
    x = rng.standard_normal((DEQUANT_MIN_M + 3, 256)).astype(np.float32)
    y = w4a16_matmul(jnp.asarray(x), qw, backend="interpret")
    assert rel_err(y, x.astype(np.float64) @ np_dequant(qw)) < F32_TOL


@pytest.mark.parametrize("K,N,gs", [(576, 200, 64), (512, 1600, -1), (1024, 256, 128)])
def test_dequantize_kernel(rng, K, N, gs):
    """The prefill path's dequantization: exact in f32, one rounding of the f32 product in 16 bits."""
    _, qw = make_weight(rng, K, N, gs)
    want = np_dequant(qw)
    for backend in KERNEL_BACKENDS:
        w = dequantize_kernel(qw, jnp.float32, interpret=backend == "interpret")
        assert w.shape == (K, N) and np.array_equal(np.asarray(w, np.float64), want.astype(np.float32)), backend
        wb = dequantize_kernel(qw, jnp.bfloat16, interpret=backend == "interpret")
        assert wb.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(wb.astype(jnp.float32)),
                              np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)))


def test_w4a16_jit_and_leading_dims(rng):
    _, qw = make_weight(rng, 256, 192, 128)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
    ref = np.asarray(x, np.float64).reshape(6, 256) @ np_dequant(qw)
    for backend in BACKENDS:
        f = jax.jit(lambda x, qw: w4a16_matmul(x, qw, backend=backend))
        y = f(x, qw)
        assert y.shape == (2, 3, 192)
        assert rel_err(y.reshape(6, 192), ref) < F32_TOL, backend
        g = jax.jit(lambda x, qw: w4a4_matmul(x, qw, backend=backend))
        assert g(x, qw).shape == (2, 3, 192)


# ---------------------------------------------------------------- W4A4 / W4A8


def test_activation_ties_round_to_even(rng):
    """With 8 bits and max|x| = 127 the scale is exactly 1, so 2.5, -3.5, 0.5 and 1.5 are exact ties:
    every path rounds them to even (no path may compute floor(t + 0.5), which XLA:GPU turns into
    an FMA)."""
    x = rng.uniform(-100, 100, (2, 64)).astype(np.float32)
    x[0, :5] = [127.0, 2.5, -3.5, 0.5, 1.5]
    q, s = quantize_activations(jnp.asarray(x), 64, 8)
    assert float(s[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q[0, :5]), [127, 2, -4, 0, 2])
    _, qw = make_weight(rng, 64, 128, 64)
    ref = w4a4_matmul(jnp.asarray(x), qw, act_bits=8, backend="reference")
    for backend in KERNEL_BACKENDS:
        y = w4a4_matmul(jnp.asarray(x), qw, act_bits=8, backend=backend, tiles=Tiles(16, 128))
        assert rel_err(y, np.asarray(ref, np.float64)) < 1e-6, backend


def test_four_bit_activations_clip_the_largest_values(rng):
    """4-bit scales map ACT_CLIP * max|x| to 7, so the largest value saturates at 7."""
    x = rng.standard_normal((3, 128)).astype(np.float32)
    q, s = quantize_activations(jnp.asarray(x), 64, 4)
    amax = np.abs(x.reshape(3, 2, 64)).max(-1)
    np.testing.assert_allclose(np.asarray(s), amax * ACT_CLIP[7] / 7, rtol=1e-6)
    assert ACT_CLIP[7] < 1 and np.abs(np.asarray(q)).max() == 7


def test_quantize_activations_matches_numpy(rng):
    for gs, bits in [(64, 4), (128, 8), (-1, 4), (-1, 8)]:
        x = rng.standard_normal((7, 256)).astype(np.float32) * 3
        x[2] = 0.0  # all-zero token: scale 1, values 0
        q, s = quantize_activations(jnp.asarray(x), gs, bits)
        q_np, s_np = np_quantize_activations(x, gs, bits)
        assert q.dtype == jnp.int8 and s.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(q), q_np)
        np.testing.assert_array_equal(np.asarray(s), s_np)
        qmax = 7 if bits == 4 else 127
        assert np.abs(np.asarray(q)).max() == qmax


W4A4_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[5], SHAPES[6]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K,N,gs", W4A4_SHAPES)
def test_w4a4_matches_float64_and_reference(rng, bits, M, K, N, gs):
    _, qw = make_weight(rng, K, N, gs)
    x = rng.standard_normal((M, K)).astype(np.float32)
    q, s = np_quantize_activations(x, gs, bits)
    G = s.shape[1]
    xdq = (q.reshape(M, G, -1) * s[..., None].astype(np.float64)).reshape(M, K)
    ref64 = xdq @ np_dequant(qw)
    ys = {}
    for backend in BACKENDS:
        ys[backend] = w4a4_matmul(jnp.asarray(x), qw, act_bits=bits, backend=backend)
        assert ys[backend].shape == (M, N) and ys[backend].dtype == jnp.float32
        assert rel_err(ys[backend], ref64) < F32_TOL, backend
    # Integer dots are exact: only the f32 order of the group sums may differ.
    for backend in KERNEL_BACKENDS:
        assert rel_err(ys[backend], np.asarray(ys["reference"], np.float64)) < 1e-6, backend


@pytest.mark.parametrize(
    "M,K,N,gs,tiles",
    [
        (5, 576, 192, 64, Tiles(16, 128, split=3)),
        (33, 512, 200, -1, Tiles(32, 64, split=4)),
        (33, 512, 200, -1, Tiles(64, 128, split=1)),
        (1, 576, 192, -1, Tiles(16, 64, split=9)),
        (5, 1024, 200, 64, Tiles(16, 128, split=4, unroll=2)),
        (33, 512, 192, -1, Tiles(32, 64, split=2, unroll=2)),
        (17, 1024, 192, 128, Tiles(16, 64, split=1, unroll=4)),
        (17, 576, 200, 64, Tiles(16, 128, split=3)),
        (33, 512, 192, -1, Tiles(16, 64, split=2)),
    ],
)
def test_w4a4_tile_variants(rng, M, K, N, gs, tiles):
    _, qw = make_weight(rng, K, N, gs)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    for bits in (4, 8):
        ref = np.asarray(w4a4_matmul(x, qw, act_bits=bits, backend="reference"), np.float64)
        for backend in KERNEL_BACKENDS:
            y = w4a4_matmul(x, qw, act_bits=bits, backend=backend, tiles=tiles)
            assert rel_err(y, ref) < 1e-6, backend


def test_w4a4_bf16(rng):
    M, K, N, gs = 5, 576, 192, 64
    _, qw = make_weight(rng, K, N, gs)
    xb = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    q, s = np_quantize_activations(np.asarray(xb.astype(jnp.float32)), gs, 4)
    xdq = (q.reshape(M, -1, gs) * s[..., None].astype(np.float64)).reshape(M, K)
    ref = w4a4_matmul(xb, qw, backend="reference")
    for backend in KERNEL_BACKENDS:
        y = w4a4_matmul(xb, qw, backend=backend)
        assert y.dtype == jnp.bfloat16
        assert rel_err(y, xdq @ np_dequant(qw)) < BF16_TOL, backend
        assert rel_err(y, np.asarray(ref.astype(jnp.float32), np.float64)) < BF16_TOL, backend


# ---------------------------------------------------------------- Triton lowering (no GPU)


@pytest.fixture
def verify_triton_modules(monkeypatch):
    """Count the Triton modules lowered and MLIR-verify each one (private jax API, 0.10.2)."""
    from jax._src.pallas.triton import lowering

    seen = []
    orig = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        res = orig(*args, **kwargs)
        with res.module.context:
            assert res.module.operation.verify(), "Triton module failed MLIR verification"
        seen.append(res)
        return res

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return seen


TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def _export_cuda(fn, *args):
    if jax.__version_info__ > (0, 10, 2) and jax.default_backend() != "gpu":
        pytest.skip("jax > 0.10.2 needs a GPU to lower Triton kernels for export")
    return jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        # The Triton custom call has no export compatibility guarantee; we only want lowering.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS],
    )(*args)


LOWER_WEIGHTS = [(576, 576, 64), (4096, 1024, 128), (576, 1536, -1), (4096, 1024, -1)]


@pytest.mark.parametrize("kind", ["w4a16", "w4a4", "w4a8"])
@pytest.mark.parametrize("K,N,gs", LOWER_WEIGHTS)
@pytest.mark.parametrize("M", [1, 300])
def test_triton_lowering(verify_triton_modules, kind, K, N, gs, M):
    qw = jax.eval_shape(lambda: quantize_weight(jnp.zeros((K, N)), gs))
    G = qw["scales"].shape[0]
    pb = pack_block(K, G)
    auto = dataclasses.replace(choose_tiles(M, N, K, pb), dequant=False)  # the matmul kernel
    nblocks = K // pb
    variants = [
        auto,
        dataclasses.replace(auto, split=1),  # split-K off
        dataclasses.replace(auto, split=max(d for d in (2, 3, 4) if nblocks % d == 0)),  # on
        Tiles(16, 128, split=1, num_warps=4, num_stages=3),  # N edge masked when N % 128
    ]
    on = variants[2]
    unroll = 2 if (nblocks // on.split) % 2 == 0 else 1
    variants.append(dataclasses.replace(on, unroll=unroll))  # unrolled split-K
    if kind == "w4a16":
        variants.append(dataclasses.replace(auto, swap=True))  # transposed product
        variants.append(dataclasses.replace(auto, dequant=True))  # dequantize + XLA dot
    for dtype in (jnp.bfloat16, jnp.float32) if kind == "w4a16" else (jnp.bfloat16,):
        x = jax.ShapeDtypeStruct((M, K), dtype)
        for tiles in variants:
            if kind == "w4a16":
                fn = lambda x, qw, t=tiles: w4a16_matmul(x, qw, backend="triton", tiles=t)
            else:
                bits = 4 if kind == "w4a4" else 8
                fn = lambda x, qw, t=tiles: w4a4_matmul(
                    x, qw, act_bits=bits, backend="triton", tiles=t
                )
            n = len(verify_triton_modules)
            exp = _export_cuda(fn, x, qw)
            assert len(verify_triton_modules) == n + 1, "no Triton kernel was lowered"
            assert any(t in exp.mlir_module() for t in TRITON_TARGETS)
