"""HF Llama directories (config.json + safetensors) -> LlamaConfig + the parameter pytree.

Tensors are read with the format's own library (`safetensors.numpy`); weights are transposed from
HF's [out, in] to [in, out] (qspec_jax.layout); Q/K stay in HF's rotate-half layout.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Tuple

import numpy as np

import jax.numpy as jnp

from qspec_jax.config import LlamaConfig
from qspec_jax.layout import check_layer_shapes, check_shapes, stack_layers

_HF_LAYER = {  # our key -> HF name inside model.layers.N.
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_NORMS = ("attn_norm", "mlp_norm")


def _hf_config_dict(cfg: dict) -> dict:
    """Adapt a config.json written by transformers 5 (`rope_parameters`) to the v4 keys config.py reads."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in cfg:
        cfg = dict(cfg)
        if "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return cfg


def load_hf_config(path: str) -> LlamaConfig:
    """LlamaConfig from the config.json of an HF Llama directory, with clear errors."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: not an HF Llama checkpoint: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: config.json is not a JSON object")
    if cfg.get("model_type") not in (None, "llama"):
        raise ValueError(f"{path}: not a Llama checkpoint: model_type is {cfg.get('model_type')!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported (Llama without biases only)")
    try:
        return LlamaConfig.from_hf_dict(_hf_config_dict(cfg))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _read_safetensors(path: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_hf_dir(path: str, dtype=jnp.float32) -> Tuple[LlamaConfig, dict]:
    """Load an HF Llama directory: `config.json` plus one or more `*.safetensors` files.

    Weights are transposed from HF's [out, in] to [in, out]; Q/K stay in HF's rotate-half layout.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config = load_hf_config(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: unreadable safetensors index ({e})") from None
        files = [os.path.join(path, f) for f in files]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{path}: shards listed in the index are missing: {missing}")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    tensors = {}
    for f in files:
        tensors.update(_read_safetensors(f))

    c = config
    used = set()

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            return None
        used.add(name)
        return tensors[name]

    missing = []

    def need(name: str) -> np.ndarray:
        w = get(name)
        if w is None:
            missing.append(name)
        return w

    layers = []
    for i in range(c.num_layers):
        layer = {}
        for k, hf in _HF_LAYER.items():
            w = need(f"model.layers.{i}.{hf}")
            if w is not None:
                layer[k] = w if k in _NORMS else w.T
        layers.append(layer)
    embed = need("model.embed_tokens.weight")
    final_norm = need("model.norm.weight")
    lm_head = get("lm_head.weight")  # ignored when tied (some tied checkpoints still store it)
    if not c.tie_word_embeddings and lm_head is None:
        missing.append("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(f"{path}: not a complete Llama checkpoint: missing tensors {shown}")
    extra = [n for n in tensors if n not in used and n != "lm_head.weight"
             and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"{path}: unexpected tensors (unsupported Llama variant?): {sorted(extra)[:8]}")
    check_layer_shapes(layers, c, path)
    params = {
        "embed": jnp.asarray(embed, dtype),
        "layers": stack_layers(layers, dtype),
        "final_norm": jnp.asarray(final_norm, dtype),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(lm_head.T, dtype)
    check_shapes(params, c, path)
    return c, params
