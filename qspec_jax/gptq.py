"""GPTQ rounding of the int4 weights (Frantar et al., arXiv 2210.17323), after rotation.

Round-to-nearest treats every input channel alike. GPTQ rounds the input rows of a weight one at a
time and moves each row's rounding error onto the rows not yet rounded, weighted by the inverse
Hessian H = X^T X of the layer's calibration inputs X, so the output error ||X W - X Q|| is what
gets minimized rather than ||W - Q||. On SmolLM2 that matters: a few massive residual directions
carry most of the energy of every input (benchmarks/quality/NOTES.md), and H tells the rounding
which directions the model actually uses.

    grams = calibration_grams(rotated_params, tokens, config)   # one float pass over the layers
    qw = gptq_quantize(w, grams["attn"][layer], group_size)      # same format as quantize_weight

The Hessians come from the rotated float model in one pass (not layer by layer through the
already-quantized layers as in the paper): simpler, and what the quantized model is meant to match.
Scales are MSE-searched per group from the weights as updated when the group is reached
(per channel: once, from the original weights). The output is the usual
`{"packed": int8 [K//2, N], "scales": f32 [G, N]}`, so the kernels and checkpoints are unchanged.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

import pallas_kernels
from qspec_jax.config import LlamaConfig
from qspec_jax.int4 import mse_scales, round_int4
from qspec_jax.kv_cache import NoCache
from qspec_jax.model import decoder_layer, layer_params, linear

DAMP = 0.01  # H += DAMP * mean(diag H) * I, the paper's default: keeps the inverse well conditioned

# Which calibration input each projection reads (q/k/v share the normed stream, as do gate/up).
INPUT_OF = {"wq": "attn", "wk": "attn", "wv": "attn", "wqkv": "attn", "wo": "o",
            "w_gate": "mlp", "w_up": "mlp", "w_gate_up": "mlp", "w_down": "down"}


@partial(jax.jit, static_argnames=("config",))
def calibration_grams(params: dict, tokens: jax.Array, config: LlamaConfig) -> dict:
    """{input kind: f32 [L, K, K]} Gram matrices X^T X of every projection input, summed over the
    rows of `tokens` [B, T] (unpadded calibration sequences) run through float `params`.

    The model's own layers (`model.decoder_layer`, causal, no cache) run with a projection that
    records its input's Gram matrix before the float matmul; `forward` itself knows nothing of it.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    grams = []  # per layer: {input kind: [K, K]}

    def observed(x, lp, name):
        kind = INPUT_OF[name]
        if kind not in grams[-1]:  # q/k/v (gate/up) read the same input: one Gram matrix
            xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            grams[-1][kind] = jnp.dot(xf.T, xf, precision=jax.lax.Precision.HIGHEST)
        return linear(x, lp[name], "bf16")

    x, delta, kv = params["embed"][tokens], None, NoCache()
    for i, lp in enumerate(layer_params(params, config.num_layers)):
        grams.append({})
        x, delta, kv = decoder_layer(x, delta, lp, i, kv, positions, config=config, params=params, project=observed)
    return {kind: jnp.stack([g[kind] for g in grams]) for kind in grams[0]}


def _upper_inverse_cholesky(gram):
    """Upper-triangular U with U^T U = (H + damp)^-1, and the mask of dead (never-used) inputs."""
    K = gram.shape[0]
    diag = jnp.diag(gram)
    dead = diag == 0
    h = gram + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + DAMP * jnp.mean(jnp.diag(h)) * jnp.eye(K, dtype=h.dtype)
    h_inv = jnp.linalg.inv(h)
    h_inv = (h_inv + h_inv.T) / 2  # exact symmetry for the Cholesky factorization
    return jnp.linalg.cholesky(h_inv).T, dead


@partial(jax.jit, static_argnames=("group_size",))
def gptq_quantize(w, gram, group_size: int) -> dict:
    """GPTQ int4 quantization of w [K, N] (y = x @ w) given the Gram matrix [K, K] of its inputs.

    group_size as in pallas_kernels.quantize_weight (-1: one scale per output channel).
    """
    w = jnp.asarray(w, jnp.float32)
    K, N = w.shape
    gs = K if group_size == -1 else group_size
    G = K // gs
    u, dead = _upper_inverse_cholesky(jnp.asarray(gram, jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    # Per channel: one scale per column over all of K, fixed before any error is moved.
    fixed_scale = mse_scales(w[None])[0] if G == 1 else None
    # The rows of a group are rounded one by one (each error spread over the group's later rows);
    # the group's errors then update all later rows in one matmul (the paper's lazy batch update).
    step = gs if gs <= 128 else next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if gs % d == 0)
    rows = jnp.arange(step)

    def chunk(c, carry):
        w, q, scales = carry
        r0 = c * step
        block = jax.lax.dynamic_slice(w, (r0, 0), (step, N))
        u_rows = jax.lax.dynamic_slice(u, (r0, 0), (step, K))
        u_blk = jax.lax.dynamic_slice(u_rows, (0, r0), (step, step))
        g = r0 // gs
        if fixed_scale is None:  # a new group starts here: its scale from the updated weights
            fresh = mse_scales(jax.lax.dynamic_slice(w, (g * gs, 0), (gs, N))[None])[0]
            scale = jnp.where(r0 % gs == 0, fresh, scales[g])
        else:
            scale = fixed_scale

        def row(i, c2):
            block, qb, err = c2
            wi = block[i]
            qi = round_int4(wi, scale)
            ei = (wi - qi * scale) / u_blk[i, i]
            block = block - jnp.where(rows[:, None] > i, u_blk[i][:, None] * ei[None, :], 0.0)
            return block, qb.at[i].set(qi), err.at[i].set(ei)

        zeros = jnp.zeros((step, N), jnp.float32)
        block, qb, err = jax.lax.fori_loop(0, step, row, (block, zeros, zeros))
        later = (jnp.arange(K) >= r0 + step)[:, None]
        w = w - jnp.where(later, jnp.dot(u_rows.T, err, precision=jax.lax.Precision.HIGHEST), 0.0)
        w = jax.lax.dynamic_update_slice(w, block, (r0, 0))
        q = jax.lax.dynamic_update_slice(q, qb, (r0, 0))
        scales = scales.at[g].set(scale)
        return w, q, scales

    init = (w, jnp.zeros((K, N), jnp.float32), jnp.ones((G, N), jnp.float32))
    _, q, scales = jax.lax.fori_loop(0, K // step, chunk, init)
    q = q.astype(jnp.int8)
    return {"packed": pallas_kernels.pack_int4(q, pallas_kernels.pack_block(K, G)), "scales": scales}


def calibration_tokens(tokenizer, texts, rows: int, length: int, bos) -> jax.Array:
    """int32 [rows, length] calibration batch: `texts` tokenized, joined end to end (each text
    opened by `bos` when the model has one) and cut into full rows, so no row is padded."""
    ids = []
    for text in texts:
        ids += ([bos] if bos is not None else []) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= rows * length:
            break
    if len(ids) < rows * length:
        raise ValueError(f"calibration texts hold {len(ids)} tokens, {rows} x {length} wanted")
    return jnp.asarray(ids[: rows * length], jnp.int32).reshape(rows, length)
