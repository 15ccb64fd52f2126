"""Offline quantization: norm folding, QuaRot-style rotation, int4 packing -> one weight pytree.

    params = quantize_params(params, config)            # rotate + int4, group size by shape
    logits, _ = forward(params, ..., mode="w4a4")       # or "w4a16", "w4a8", "bf16"

Steps (DESIGN.md, "Model and modes"):
1. `fold_norms`: RMSNorm gains go into the rows of the projections that read the normed stream
   (a tied head becomes an untied `lm_head`), so the residual stream can be rotated.
2. `rotate_params`: the residual stream is rotated by an orthogonal Q (embed @ Q, Q^T @ W for the
   readers, W @ Q for the writers, Q^T @ lm_head); RMSNorm commutes with Q, so the model is
   unchanged. The inputs of o_proj and down_proj get an online Hadamard-type transform T at run
   time (qspec_jax.rotation.online_transform) whose inverse T^T is folded into the rows of wo and
   w_down. Rotated activations have no outlier channels, which is what makes 4-bit activations work.
3. every projection is quantized to symmetric int4 (pallas_kernels' layout; with rotation the
   scales are MSE-searched, see `quantize_weight_mse`; with `calibration` tokens the rounding is
   GPTQ's, see qspec_jax.gptq), stacked on the layer axis:
   `{"packed": int8 [L, K//2, N], "scales": f32 [L, G, N]}`.

Why W4A4 quality on SmolLM2 is what it is: benchmarks/quality/NOTES.md.

All per-layer work runs in one jitted `lax.map` over the layer axis, in f32, so a Llama-3-8B
shape fits on one GPU (only one layer's f32 temporaries exist at a time).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

import pallas_kernels
from qspec_jax.config import LlamaConfig
from qspec_jax.gptq import INPUT_OF, calibration_grams, gptq_quantize
from qspec_jax.int4 import mse_scales, quantize_weight_mse, round_int4  # noqa: F401 (re-exported)
from qspec_jax.rotation import online_transform, residual_rotation, small_factor

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_READERS = ("wq", "wk", "wv", "w_gate", "w_up")  # read the (normed) residual stream
_NORM_OF = {"wq": "attn_norm", "wk": "attn_norm", "wv": "attn_norm",
            "w_gate": "mlp_norm", "w_up": "mlp_norm"}
_HI = jax.lax.Precision.HIGHEST  # offline folds: true f32 (no TF32 on GPU)


def _f32(a):
    return jnp.asarray(a, jnp.float32)


@jax.jit
def _fold_layers(layers):
    def one(lp):
        out = {k: v for k, v in lp.items() if k not in ("attn_norm", "mlp_norm")}
        for name, norm in _NORM_OF.items():
            if norm in lp:
                out[name] = (_f32(lp[norm])[:, None] * _f32(lp[name])).astype(lp[name].dtype)
        return out

    return jax.lax.map(one, layers)


def fold_norms(params: dict) -> dict:
    """Fold the RMSNorm gains into the following projections and drop the gain keys.

    attn_norm scales the rows of wq/wk/wv, mlp_norm those of w_gate/w_up, final_norm those of the
    head; a tied model gets `lm_head = diag(final_norm) @ embed.T`. The function the model computes
    is unchanged (up to rounding in the params' dtype). Already folded gains are left alone.
    """
    params = dict(params)
    params["layers"] = _fold_layers(dict(params["layers"]))
    if "final_norm" in params:
        g = params.pop("final_norm")
        head = params["lm_head"] if "lm_head" in params else params["embed"].T
        params["lm_head"] = (_f32(g)[:, None] * _f32(head)).astype(head.dtype)
    return params


def _rows_transform(w, rot):
    """T^T @ w for the online transform T = online_matrix(K, rot), computed as (w^T T)^T."""
    return online_transform(w.T, rot).T


@jax.jit
def _rotate_arrays(params, q, rot_o, rot_d):
    layers = params["layers"]

    def one(lp):
        out = dict(lp)
        for name in _READERS:
            out[name] = jnp.dot(q.T, _f32(lp[name]), precision=_HI)
        out["wo"] = jnp.dot(_rows_transform(_f32(lp["wo"]), rot_o), q, precision=_HI)
        out["w_down"] = jnp.dot(_rows_transform(_f32(lp["w_down"]), rot_d), q, precision=_HI)
        return {k: v.astype(lp[k].dtype) for k, v in out.items()}

    out = dict(params)
    out["layers"] = jax.lax.map(one, layers)
    out["embed"] = jnp.dot(_f32(params["embed"]), q, precision=_HI).astype(params["embed"].dtype)
    out["lm_head"] = jnp.dot(q.T, _f32(params["lm_head"]), precision=_HI).astype(params["lm_head"].dtype)
    return out


def rotation_factors(config: LlamaConfig, seed: int = 0):
    """(Q [D, D], R_o_proj, R_down_proj): the residual rotation and the online transforms' factors."""
    q = residual_rotation(config.hidden_size, seed)
    rot_o = small_factor(config.num_heads * config.head_dim, seed + 1)
    rot_d = small_factor(config.intermediate_size, seed + 2)
    return q, rot_o, rot_d


def rotate_params(params: dict, config: LlamaConfig, seed: int = 0) -> dict:
    """Fold the norms, rotate the residual stream and fold the online transforms' inverses.

    Returns float params (each array in its input dtype, the math in f32) with
    `params["online_rotation"] = {"o_proj": R1, "down_proj": R2}` (small f32 factors) that compute
    the same function as the input. `seed` picks the random signs of the residual rotation.
    """
    if "online_rotation" in params:
        raise ValueError("params are already rotated (they have 'online_rotation')")
    if any(isinstance(params["layers"][n], dict) for n in PROJECTIONS):
        raise ValueError("params are already quantized; rotate float params before quantizing")
    _check_shapes(params, config)
    params = fold_norms(params)
    q, rot_o, rot_d = (jnp.asarray(a) for a in rotation_factors(config, seed))
    out = _rotate_arrays(params, q, rot_o, rot_d)
    out["online_rotation"] = {"o_proj": rot_o, "down_proj": rot_d}
    return out


def _check_shapes(params: dict, config: LlamaConfig):
    d, f, o = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    want = {"wq": (d, o), "wk": (d, kv), "wv": (d, kv), "wo": (o, d),
            "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    for name, shape in want.items():
        w = params["layers"][name]
        got = (2 * w["packed"].shape[-2], w["packed"].shape[-1]) if isinstance(w, dict) else w.shape[-2:]
        if tuple(got) != shape:
            raise ValueError(f"layers/{name} has shape {tuple(got)}, config expects {shape}")


def default_group_size(config: LlamaConfig) -> int:
    """128 where every projection's K is a multiple of 128, else 64 (SmolLM2's 576)."""
    ks = (config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size)
    for g in (128, 64):
        if all(k % g == 0 for k in ks):
            return g
    raise ValueError(f"no default group size fits the input dims {ks}; pass group_size explicitly")


def _check_group_size(group_size: int, params: dict):
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per channel), got {group_size}")
    for name in PROJECTIONS:
        k = params["layers"][name].shape[-2]
        if group_size == -1:
            if k % 64:
                raise ValueError(f"per-channel int4 needs K % 64 == 0, but {name} has K={k}")
        elif k % group_size or group_size % 2:
            raise ValueError(f"group_size={group_size} does not divide K={k} of {name}")


@partial(jax.jit, static_argnames=("group_size", "search"))
def _quantize_stack(w, group_size, search):
    fn = quantize_weight_mse if search else pallas_kernels.quantize_weight
    return jax.lax.map(partial(fn, group_size=group_size), w)


@partial(jax.jit, static_argnames=("group_size",))
def _gptq_stack(w, grams, group_size):
    return jax.lax.map(lambda wg: gptq_quantize(wg[0], wg[1], group_size), (w, grams))


def quantize_params(
    params: dict,
    config: LlamaConfig,
    *,
    group_size: int | None = None,
    rotate: bool = True,
    seed: int = 0,
    dtype=jnp.bfloat16,
    search_scales: bool | None = None,
    calibration=None,
) -> dict:
    """Float params -> the quantized pytree every quantized mode (w4a16, w4a4, w4a8) runs on.

    rotate=True: `rotate_params` first (norm folding, residual rotation, online transforms);
    rotate=False: the plain model is quantized as is (round-to-nearest baseline). Every projection
    becomes `{"packed": int8 [L, K//2, N], "scales": f32 [L, G, N]}` with one scale per
    `group_size` input rows per output channel (None: `default_group_size`; -1: per output
    channel). Embedding, head and norm gains stay float in `dtype`; `online_rotation` stays f32.
    search_scales (default: = rotate): MSE-searched weight scales (`quantize_weight_mse`) instead
    of max|w| / 7; on SmolLM2 it lowers rotated W4A16 perplexity a lot and hurts unrotated weights
    (whose values already sit on the GGUF's 4-bit grid).
    calibration: token ids [B, T] of unpadded calibration text; when given, the weights are
    rounded with GPTQ (qspec_jax.gptq) on Hessians from the (rotated) float model over these tokens,
    with MSE-searched group scales, instead of round-to-nearest.
    """
    if search_scales is None:
        search_scales = rotate
    if group_size is None:
        group_size = default_group_size(config)
    _check_shapes(params, config)
    _check_group_size(group_size, params)
    if rotate:
        params = rotate_params(params, config, seed)
    grams = None
    if calibration is not None:
        f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        grams = calibration_grams(f32, jnp.asarray(calibration, jnp.int32), config)
        del f32
    out = {k: v for k, v in params.items() if k != "layers"}
    layers = {}
    for name, w in params["layers"].items():
        if name in PROJECTIONS and grams is not None:
            layers[name] = _gptq_stack(w, grams[INPUT_OF[name]], group_size)
        elif name in PROJECTIONS:
            layers[name] = _quantize_stack(w, group_size, search_scales)
        else:
            layers[name] = jnp.asarray(w, dtype)
    out["layers"] = layers
    for name in ("embed", "lm_head", "final_norm"):
        if name in out:
            out[name] = jnp.asarray(out[name], dtype)
    return out
