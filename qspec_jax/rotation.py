"""Orthogonal rotations for QuaRot-style outlier removal, and the online transform.

Two kinds of rotation make 4-bit activations work (DESIGN.md, "Model and modes"):

- `residual_rotation(D, seed)`: a dense orthogonal Q for the residual stream, folded into the
  weights offline (qspec_jax.quantize.rotate_params), never applied at run time.
- the online transform before `o_proj` and `down_proj`: T = kron(R, H_p) / sqrt(p) with n = m * p,
  p a power of two, R a small [m, m] orthogonal factor stored in the params and H_p the Sylvester
  Hadamard matrix. `online_transform` applies it as two small matmuls (H_p split as
  kron(H_a, H_b)); T^T is folded into the rows of `wo` / `w_down` offline. `fwht` is the butterfly
  form of the same Hadamard product.

Hadamard matrices of orders that are not powers of two are built here (Paley I and II from primes,
then Sylvester doubling); where none can be built the small factor is a random orthogonal matrix.
Matrices are built once, offline, in numpy float64 and returned as float32.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import hadamard as hadamard_kernel


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """[q, q] matrix chi(j - i) of the quadratic character mod a prime q (chi(0) = 0)."""
    chi = -np.ones(q)
    chi[0] = 0
    chi[(np.arange(1, q) ** 2) % q] = 1
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _hadamard_int(n: int) -> Optional[np.ndarray]:
    """A ±1 Hadamard matrix of order n (H H^T = n I), or None if this module cannot build one."""
    if _is_pow2(n):
        # Sylvester order, the one the fast transform computes.
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return h
    if n % 4:
        return None  # Hadamard matrices only exist for orders 1, 2 and multiples of 4
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        # Paley I: the Jacobsthal matrix is skew; bordering it gives a skew conference matrix S.
        s = np.zeros((n, n))
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(n) + s
    q = n // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        # Paley II: symmetric conference matrix C of order q + 1, doubled.
        c = np.zeros((q + 1, q + 1))
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1), [[1, -1], [-1, -1]])
    half = _hadamard_int(n // 2)
    if half is not None:
        return np.block([[half, half], [half, -half]])  # Sylvester doubling
    return None


def hadamard(n: int) -> Optional[np.ndarray]:
    """Normalized (orthogonal) Hadamard matrix of order n as float32, or None if not constructible."""
    h = _hadamard_int(n)
    return None if h is None else (h / np.sqrt(n)).astype(np.float32)


def walsh_hadamard(n: int) -> np.ndarray:
    """Normalized Sylvester (Walsh-Hadamard) matrix of a power-of-two order n, float32."""
    if not _is_pow2(n):
        raise ValueError(f"Walsh-Hadamard matrices need a power-of-two order, got {n}")
    return hadamard(n)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal [n, n] matrix (QR of a Gaussian with the sign fix), float32."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


_MAX_FACTOR = 256  # the small factor costs n * m per row online; keep m small


def split_pow2(n: int) -> tuple[int, int]:
    """Split n = m * p with p the largest power of two dividing n."""
    if n < 1:
        raise ValueError(f"dimension must be positive, got {n}")
    p = n & -n
    return n // p, p


def small_factor(n: int, seed: int = 0) -> np.ndarray:
    """The small [m, m] orthogonal factor R of n = m * 2^k used by the online transform.

    m is the odd part of n times the fewest powers of two for which a Hadamard matrix of order m can
    be built (1536 -> 12, 576 -> 36, 14336 -> 28); the remaining power of two goes to the fast
    Walsh-Hadamard transform. Hadamard factors spread outliers best (every entry ±1/sqrt(m)); where
    none can be built (11008 = 43 * 256) R is a random orthogonal matrix of order m = odd part.
    """
    odd, p = split_pow2(n)
    if odd == 1:
        return np.ones((1, 1), np.float32)
    m = odd
    while n % m == 0 and m <= _MAX_FACTOR:
        h = hadamard(m)
        if h is not None:
            return h
        m *= 2
    return random_orthogonal(odd, seed)


def residual_rotation(n: int, seed: int = 0) -> np.ndarray:
    """Orthogonal [n, n] rotation of the residual stream: a randomized Hadamard.

    Q = diag(s) @ kron(R, H_p) with s random ±1, R = small_factor(n) (a constructed Hadamard matrix
    of order 12, 20, 36, ... or a random orthogonal matrix of the odd part) and H_p the normalized
    Walsh-Hadamard matrix of the power-of-two remainder. For a power of two n this is the classic
    randomized Hadamard diag(s) @ H_n.
    """
    r = small_factor(n, seed + 1)
    h = np.kron(r.astype(np.float64), _hadamard_int(n // r.shape[0]) / np.sqrt(n // r.shape[0]))
    s = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return (s[:, None] * h).astype(np.float32)


def online_matrix(n: int, rotation) -> np.ndarray:
    """The dense [n, n] matrix T with `online_transform(x, rotation) == x @ T` (for folding, tests)."""
    r = np.asarray(rotation, np.float64)
    m = r.shape[0]
    if r.shape != (m, m) or n % m or not _is_pow2(n // m):
        raise ValueError(f"rotation of shape {r.shape} does not fit n={n} = m * 2^k")
    p = n // m
    return np.kron(r, _hadamard_int(p) / np.sqrt(p)).astype(np.float32)


def fwht(x: jax.Array) -> jax.Array:
    """Unnormalized fast Walsh-Hadamard transform along the last axis (x @ H_p, Sylvester order)."""
    p = x.shape[-1]
    if not _is_pow2(p):
        raise ValueError(f"fwht needs a power-of-two last axis, got {p}")
    lead = x.shape[:-1]
    h = 1
    while h < p:
        # Butterfly on index pairs (j, j + h) inside blocks of 2h; reshapes only, no matmul.
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, p)
        h *= 2
    return x


# Widest Hadamard factor applied as one dense matmul: H_512 is 512 KB in bf16 and stays in L2.
HADAMARD_BLOCK = 512
# Up to this many rows (tokens) the GPU runs the transform as one Pallas Triton launch
# (pallas_kernels.hadamard) instead of XLA's two GEMMs and their transposes; "reference" forces XLA,
# "interpret" runs the kernel on the CPU (tests).
KERNEL_MAX_ROWS = 64
KERNEL_BACKEND = "auto"


def online_transform(x: jax.Array, rotation: jax.Array) -> jax.Array:
    """x @ kron(rotation, H_p) / sqrt(p) over the last axis (n = m * p), accumulated in f32.

    `rotation` is the small [m, m] orthogonal factor (a [1, 1] array for a power-of-two n). With
    H_p = kron(H_a, H_b) (b = min(p, HADAMARD_BLOCK)) the transform is two matmuls over x viewed as
    [m * a, b]: by the ±1 matrix H_b on the right (exact products in x's dtype, f32 sums), then by
    kron(rotation, H_a) / sqrt(p) on the left in f32. The log2(p) butterfly passes of `fwht` were
    ten to twenty XLA kernels a layer (0.65 ms of a 3.7 ms Llama-3-8B step on the H100); as XLA
    ops the two GEMMs and their transposes are still four to six (benchmarks/engine/README.md), so
    at decode sizes on the GPU (<= KERNEL_MAX_ROWS rows) both products run in one Pallas Triton
    launch (pallas_kernels.hadamard). Returns x's dtype.
    """
    n = x.shape[-1]
    m = rotation.shape[0]
    if rotation.shape != (m, m) or n % m or not _is_pow2(n // m):
        raise ValueError(f"rotation of shape {rotation.shape} does not fit last axis {n} = m * 2^k")
    p = n // m
    b = min(p, HADAMARD_BLOCK)
    a = p // b
    lead = x.shape[:-1]
    # ±1 entries are exact in bf16/f16, so a 16-bit x multiplies them exactly on the MMA
    dt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    left = jnp.kron(jnp.asarray(rotation, jnp.float32), jnp.asarray(_hadamard_int(a), jnp.float32))
    left = left * (1.0 / np.sqrt(p))
    rows, backend = math.prod(lead), pallas_kernels.resolve_backend(KERNEL_BACKEND)
    if 0 < rows <= KERNEL_MAX_ROWS and b >= 16 and m * a <= 128 and backend in ("triton", "interpret"):
        y = hadamard_kernel.online_hadamard(x.reshape(rows, m * a, b), left, interpret=backend == "interpret",
                                            block_cols=hadamard_kernel.BLOCK_COLS)
        return y.reshape(x.shape)
    h_b = jnp.asarray(_hadamard_int(b), dt)
    y = jnp.matmul(x.reshape(*lead, m * a, b).astype(dt), h_b,
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    # HIGHEST: f32 matmuls default to TF32 on GPU, which would spoil exact orthogonality.
    y = jnp.einsum("...ic,ij->...jc", y, left, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n).astype(x.dtype)
