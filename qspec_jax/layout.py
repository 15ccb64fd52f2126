"""The parameter pytree every checkpoint format is read into: shapes, checks, generated weights.

Plain nested dicts of arrays, weights stored as [in, out], layers stacked on a leading axis L:

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*hd], "wk": [L, D, KV*hd], "wv": [L, D, KV*hd],
                "wo": [L, H*hd, D], "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F],
                "w_down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}          # only when embeddings are untied

Q and K follow HF's rotate-half RoPE layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from qspec_jax.config import LlamaConfig

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def param_shapes(config: LlamaConfig) -> dict:
    """The expected shape of every leaf of the parameter pytree for `config`."""
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D), "wq": (L, D, q), "wk": (L, D, kv), "wv": (L, D, kv), "wo": (L, q, D),
            "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def check_shapes(params: dict, config: LlamaConfig, source: str) -> None:
    """Raise ValueError naming every leaf whose shape disagrees with the config (or is missing)."""
    expected = param_shapes(config)
    flat_exp = {"/".join(str(k.key) for k in p): s for p, s in
                jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]}
    flat_got = {"/".join(str(k.key) for k in p): tuple(x.shape) for p, x in
                jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"{k}: missing" for k in flat_exp if k not in flat_got]
    problems += [f"{k}: shape {flat_got[k]}, config expects {s}" for k, s in flat_exp.items()
                 if k in flat_got and flat_got[k] != s]
    problems += [f"{k}: not expected by the config" for k in flat_got if k not in flat_exp]
    if problems:
        raise ValueError(f"{source}: parameters do not match the config:\n  " + "\n  ".join(problems))


def check_layer_shapes(layers: list, config: LlamaConfig, source: str) -> None:
    """Per-layer shape check, before np.stack (whose own error on ragged shapes names no tensor)."""
    expected = param_shapes(config)["layers"]
    for i, layer in enumerate(layers):
        for k, w in layer.items():
            if tuple(w.shape) != expected[k][1:]:
                raise ValueError(f"{source}: layer {i} {k} has shape {tuple(w.shape)}, "
                                 f"config expects {expected[k][1:]}")


def stack_layers(per_layer: list, dtype) -> dict:
    """[{key: np.ndarray} per layer] -> {key: jnp [L, ...]}."""
    return {k: jnp.asarray(np.stack([layer[k] for layer in per_layer]), dtype=dtype) for k in LAYER_KEYS}


def is_plain_params(tree: Any) -> bool:
    """True for float params in the layout above (not a quantized pytree)."""
    return isinstance(tree, dict) and isinstance(tree.get("layers"), dict) and all(
        not isinstance(v, dict) for v in tree["layers"].values())


def cast_floats(params: dict, dtype) -> dict:
    """Every floating leaf cast to `dtype` (integer leaves unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


# --------------------------------------------------------------------------- generated weights


def random_params(config: LlamaConfig, seed: int = 0, dtype=jnp.bfloat16) -> dict:
    """Generated weights with the shapes of `config`, for speed runs (values are meaningless).

    Linear weights ~ N(0, 1/fan_in) (std 0.016 at width 4096, like a real init), embeddings and
    head N(0, 0.02^2), norm gains 1 + N(0, 0.05^2) so norm folding is exercised. Each leaf is drawn
    by one jitted call on the default device, so a Llama-3-8B-sized tree is made on the GPU.
    """
    shapes = param_shapes(config)
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    treedef = jax.tree_util.tree_structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
    key = jax.random.key(seed)
    out = []
    for i, (path, shape) in enumerate(zip(paths, leaves)):
        name = path[-1].key
        if name in ("embed", "lm_head"):
            mean, std = 0.0, 0.02
        elif "norm" in name:
            mean, std = 1.0, 0.05
        else:
            mean, std = 0.0, 1.0 / np.sqrt(shape[-2])  # fan_in: weights are [..., in, out]
        out.append(_normal(jax.random.fold_in(key, i), shape, jnp.dtype(dtype), float(mean), float(std)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _normal_impl(key, mean, std, shape, dtype):
    # Drawn in f32 and cast: bf16 sampling directly would quantize the normal's tails coarsely.
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_normal_jit = jax.jit(_normal_impl, static_argnums=(3, 4))


def _normal(key, shape, dtype, mean, std):
    return _normal_jit(key, jnp.float32(mean), jnp.float32(std), tuple(shape), dtype)
