"""A functional Llama: `forward(params, tokens, positions, cache, *, config, mode)`.

`mode` (static) picks how every projection runs on the one weight pytree:
  "bf16"  - unquantized float matmuls in the params' dtype (quantized weights are dequantized first);
  "w4a16" - int4 weights, 16-bit activations (Pallas kernel on GPU, jnp reference on CPU);
  "w4a4"  - int4 weights, activations quantized per token and group to 4 bits, integer dots;
  "w4a8"  - the same kernel with 8-bit activations.
Embedding, norms, attention and the head stay in float in every mode.

Rows are right-padded and a token at position p is cached in slot p. The cache is any
implementation of the interface in kv_cache.py (write a layer's K/V, attend, flush): the bf16
`KVCache` or QuantSpec's `hierarchical_kv.HierarchicalKVCache` (INT8 = two 4-bit planes + a
full-precision recent buffer); `forward` never asks which. The static `kv_view` says how a forward
reads a hierarchical cache: "int8" (both planes: the verifier, plain decoding) or "int4" (upper
plane only: the draft). `mode` alone cannot say which: a W4A16 verify and a W4A16 draft read
different views.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.int4_mosaic import SplitKHalves, dequantize_mosaic, is_mosaic_layout, mosaic_matmul
from pallas_kernels.residual_norm import residual_rmsnorm
from qspec_jax.config import LlamaConfig
from qspec_jax.kv_cache import NoCache
from qspec_jax.rotation import online_transform

MODES = ("bf16", "w4a16", "w4a4", "w4a8")
KV_VIEWS = ("int8", "int4")  # how a forward reads a HierarchicalKVCache (ignored by a bf16 KVCache)
# The projections whose output joins the residual stream. With FUSED_RESIDUAL_NORM, `forward` asks
# them for unjoined split-K partials, and `residual_norm` adds and normalizes those in one Pallas
# launch (GPU, Mosaic int4 kernels with halved split-K partials: jax >= 0.11). Off until timed in a
# decode step (bench_engine.py's "residual_norm" step variant).
RESIDUAL_PROJECTIONS = ("wo", "w_down")
FUSED_RESIDUAL_NORM = False


def is_quantized(w) -> bool:
    """A quantized weight is a dict of int4 values and `scales`: packed for the Triton kernels
    (`packed`) or laid out for the Mosaic kernels (`w`, see qspec_jax/kernel_choice.py)."""
    return isinstance(w, dict) and ("packed" in w or "w" in w)


def linear(x: jax.Array, w, mode: str, unjoined: bool = False):
    """`x @ w` in the given mode; `w` is a float `[K, N]` array or a quantized weight dict.

    `unjoined`: where a Mosaic int4 kernel leaves split-K partials as halves, return those
    (int4_mosaic.SplitKHalves, x's rows flattened) for `residual_norm`; otherwise ignored."""
    if not is_quantized(w):
        if mode != "bf16":
            raise ValueError(f"mode {mode!r} needs quantized weights: run qspec_jax.quantize first")
        return jnp.dot(x, w.astype(x.dtype))
    if is_mosaic_layout(w):
        if mode == "bf16":
            return jnp.dot(x, dequantize_mosaic(w, x.dtype))
        return mosaic_matmul(x, w, mode, unjoined=unjoined)
    if mode == "bf16":
        return jnp.dot(x, pallas_kernels.dequantize_weight(w).astype(x.dtype))
    if mode == "w4a16":
        return pallas_kernels.w4a16_matmul(x, w)
    return pallas_kernels.w4a4_matmul(x, w, act_bits=4 if mode == "w4a4" else 8)


FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def _fuse_layer(layer: dict) -> dict:
    layer = dict(layer)
    for fused, parts in FUSED.items():
        if fused in layer or not all(p in layer for p in parts):
            continue
        ws = [layer.pop(p) for p in parts]
        if is_quantized(ws[0]):  # outputs are the last axis, but Mosaic's w is [..., N, K]
            layer[fused] = {k: jnp.concatenate([w[k] for w in ws], axis=-2 if k == "w" else -1)
                            for k in ws[0]}
        else:
            layer[fused] = jnp.concatenate(ws, axis=-1)
    return layer


def fuse_projections(params: dict) -> dict:
    """Concatenate q/k/v and gate/up along their outputs, so a layer runs 4 matmuls instead of 7.

    Works on float and quantized (per-column packed int4 + scales) weights alike, stacked or per
    layer; `forward` accepts either layout. At decode sizes every matmul call has a fixed cost, so
    fewer and wider calls are faster; the math per output column is unchanged.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return {**params, "layers": tuple(_fuse_layer(lp) for lp in layers)}
    return {**params, "layers": _fuse_layer(layers)}


def unstack_layers(params: dict) -> dict:
    """Stacked layer weights (`params["layers"]`: a dict of [num_layers, ...] arrays, the stored
    layout) -> a tuple of per-layer dicts, each leaf its own buffer.

    Do this once, outside jit, before decoding: `forward` then reads every weight where it lies.
    Inside a compiled program, a layer's slice of a stacked array is copied into a fresh buffer
    before a Pallas kernel or dot reads it (measured on the H200: a W4A16 step 7.64 -> 5.31 ms, bf16
    11.62 -> 4.47 ms at batch 1). Per-layer params pass through unchanged.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(layer_params(params, n))}


def layer_params(params: dict, num_layers: int) -> list:
    """The per-layer weight dicts of either layout (stacked layers are sliced: fine for calibration
    and tests, but decode with `unstack_layers` first)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        if len(layers) != num_layers:
            raise ValueError(f"params hold {len(layers)} layers but the config says {num_layers}")
        return list(layers)
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(num_layers)]


def rms_norm(x: jax.Array, weight: Optional[jax.Array], eps: float) -> jax.Array:
    """RMSNorm computed in f32; `weight=None` when the gain was folded into the next projection."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else y * weight.astype(x.dtype)


def residual_norm(x: jax.Array, delta, weight: Optional[jax.Array], eps: float) -> tuple:
    """The residual add and the RMSNorm after it: (x + delta, rms_norm(x + delta, weight)).

    `delta` is a projection's output [..., D], None (nothing to add), or a SplitKHalves from
    `linear(..., unjoined=True)`: those partials are summed, added and normalized in one Pallas
    launch (pallas_kernels.residual_norm) with the same roundings."""
    if isinstance(delta, SplitKHalves):
        d = x.shape[-1]
        w = None if weight is None else weight.astype(x.dtype)
        x2, h = residual_rmsnorm(x.reshape(-1, d), delta, w, eps, interpret=jax.default_backend() != "gpu")
        return x2.reshape(x.shape), h.reshape(x.shape)
    if delta is not None:
        x = x + delta.astype(x.dtype)
    return x, rms_norm(x, weight, eps)


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
    """Inverse RoPE frequencies, with Llama-3 scaling when the config has it."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / s.factor, jnp.where(wavelen < high_wavelen, inv, blended))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout). x: [B, T, heads, hd]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _online_rotation(params, name):
    """The online transform before `o_proj` / `down_proj` of a rotated model, or None."""
    rot = params.get("online_rotation")
    return None if rot is None else partial(online_transform, rotation=rot[name])


def decoder_layer(x, delta, lp, i, cache, positions, *, config: LlamaConfig, params: dict, project,
                  kv_view="int8"):
    """Layer i of the model: attention through `cache`'s layer i, then the MLP.

    x: [B, T, D], the residual stream without `delta`, the previous layer's MLP output (None before
    the first layer), which joins it here, in one step with this layer's norm (`residual_norm`).
    Returns (x, delta, cache), this layer's MLP output left for the next layer or the final norm.
    lp: the layer's weights; `project(x, lp, name)` applies projection `name` ("wqkv" or
    "wq"/"wk"/"wv", "wo", "w_gate_up" or "w_gate"/"w_up", "w_down"): `forward` runs it in its mode,
    GPTQ's calibration (qspec_jax.gptq) also records what each projection reads.
    """
    b, t, _ = x.shape
    nh, nkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    inv_freq = rope_inv_freq(config)
    rot_o, rot_down = _online_rotation(params, "o_proj"), _online_rotation(params, "down_proj")
    x, h = residual_norm(x, delta, lp.get("attn_norm"), config.rms_norm_eps)
    if "wqkv" in lp:
        q, k, v = jnp.split(project(h, lp, "wqkv"), [nh * hd, (nh + nkv) * hd], axis=-1)
    else:
        q, k, v = project(h, lp, "wq"), project(h, lp, "wk"), project(h, lp, "wv")
    q = apply_rope(q.reshape(b, t, nh, hd), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, nkv, hd), positions, inv_freq).transpose(0, 2, 1, 3)
    v = v.reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
    cache = cache.write(i, k, v, positions[:, 0])
    a = cache.attend(i, q, positions, view=kv_view).reshape(b, t, nh * hd)
    if rot_o is not None:
        a = rot_o(a)
    x, h = residual_norm(x, project(a, lp, "wo"), lp.get("mlp_norm"), config.rms_norm_eps)
    if "w_gate_up" in lp:
        gate, up = jnp.split(project(h, lp, "w_gate_up"), 2, axis=-1)
    else:
        gate, up = project(h, lp, "w_gate"), project(h, lp, "w_up")
    g = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    if rot_down is not None:
        g = rot_down(g)
    return x, project(g, lp, "w_down"), cache


def forward(
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    cache,  # None, or a cache of the kv_cache.py interface: KVCache, hierarchical_kv.HierarchicalKVCache
    *,
    config: LlamaConfig,
    mode: str = "bf16",
    kv_view: str = "int8",
    logit_index: Optional[jax.Array] = None,
):
    """Run the model over `tokens: [B, T]` at `positions: [B, T]` (int32). Returns `(logits f32, cache)`.

    With a cache, each layer writes its new K/V at positions `positions[:, 0] + arange(T)` and
    attends over the cache (`kv_view`: how a hierarchical cache is read, "int8" or "int4"); the
    caller keeps `positions[:, 0] + T <= cache.max_len` and sets the returned cache's `lengths`.
    With `cache=None` it is a plain causal forward over the given tokens (and returns None).
    `logit_index: [B, n]` picks which of the T positions get logits (saves the head's cost in
    prefill).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if kv_view not in KV_VIEWS:
        raise ValueError(f"unknown kv_view {kv_view!r}; expected one of {KV_VIEWS}")
    kv = NoCache() if cache is None else cache
    x, delta = params["embed"][tokens], None
    def project(x, lp, name):
        return linear(x, lp[name], mode, unjoined=FUSED_RESIDUAL_NORM and name in RESIDUAL_PROJECTIONS)

    # The layers unrolled in Python over separate per-layer buffers (see unstack_layers): a
    # lax.scan over stacked weights made XLA copy every layer's weights and KV slice each step.
    for i, lp in enumerate(layer_params(params, config.num_layers)):
        x, delta, kv = decoder_layer(x, delta, lp, i, kv, positions, config=config, params=params,
                                     project=project, kv_view=kv_view)
    _, h = residual_norm(x, delta, params.get("final_norm"), config.rms_norm_eps)
    if logit_index is not None:
        h = jnp.take_along_axis(h, logit_index[..., None], axis=1)
    head = params["lm_head"] if "lm_head" in params else params["embed"].T
    logits = jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits, None if cache is None else kv
