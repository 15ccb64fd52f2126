"""The orbax store: save and restore any pytree of arrays (float params or a quantized pytree),
the config and a metadata dict as JSON beside it.

    directory/state/              the orbax checkpoint
    directory/qspec_params.json   {"format", "config", "metadata"}; written last, so its presence
                                  marks a complete save
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Tuple

import jax

from qspec_jax.config import LlamaConfig, RopeScaling
from qspec_jax.layout import check_shapes, is_plain_params

META_FILE = "qspec_params.json"
STATE_DIR = "state"
FORMAT = "qspec_jax.params/1"


def config_to_dict(config: LlamaConfig) -> dict:
    """LlamaConfig -> JSON-able dict (inverse of `config_from_dict`)."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> LlamaConfig:
    """Dict written by `config_to_dict` -> LlamaConfig."""
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return LlamaConfig(**d)


def save_params(params: Any, directory: str, config: Optional[LlamaConfig] = None,
                metadata: Optional[dict] = None) -> None:
    """Save a pytree of arrays (params, or a quantized pytree) with orbax, config as JSON beside it.

    Layout: `directory/state/` (orbax) and `directory/qspec_params.json` (config and `metadata`,
    any JSON-able dict, e.g. quantization settings). An existing save in `directory` is replaced.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted overwrite must not look complete
    with ocp.StandardCheckpointer() as ckptr:  # closing waits for the async write to finish
        ckptr.save(os.path.join(directory, STATE_DIR), params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "config": None if config is None else config_to_dict(config),
            "metadata": metadata or {}}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)


def is_saved_params(directory: str) -> bool:
    """True when `directory` holds a complete `save_params` save."""
    return os.path.isfile(os.path.join(directory, META_FILE))


def _read_meta(directory: str) -> dict:
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{directory}: not a qspec_jax params checkpoint (no {META_FILE})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        return meta
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{meta_path}: corrupt checkpoint metadata ({e})") from None


def load_metadata(directory: str) -> dict:
    """The `metadata` dict given to `save_params`."""
    return _read_meta(os.fspath(directory)).get("metadata") or {}


def restore_params(directory: str) -> Tuple[Optional[LlamaConfig], Any]:
    """Restore `(config, pytree)` saved by `save_params` (config is None if none was saved).

    Arrays come back with their saved dtypes, on the default device (whatever device saved them).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.exists(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    meta = _read_meta(directory)
    try:
        config = None if meta.get("config") is None else config_from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory}: corrupt config in {META_FILE} ({e})") from None
    state = os.path.join(directory, STATE_DIR)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            item = ckptr.metadata(state).item_metadata
            if item is None:
                raise ValueError("its array metadata is missing or damaged")
            tree = item.tree
            # Restore onto the local default device, not the saved sharding (it may name another platform).
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
                                  is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
            params = ckptr.restore(state, target)
    except Exception as e:  # orbax / tensorstore raise many kinds on damaged files
        raise ValueError(f"{directory}: corrupt orbax checkpoint ({type(e).__name__}: {e})") from None
    if config is not None and is_plain_params(params):
        check_shapes(params, config, directory)
    return config, params
