"""Model configuration: read from an HF config.json or GGUF metadata, or picked by preset name."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model. Frozen and hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and head counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "LlamaConfig":
        """Build from the dict of an HF `config.json` of a Llama model."""
        arch = cfg.get("model_type")
        if arch not in (None, "llama"):
            raise ValueError(f"not a Llama config: model_type is {arch!r}")
        try:
            heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            rs = cfg.get("rope_scaling") or None
            scaling = None
            if rs is not None:
                kind = rs.get("rope_type", rs.get("type"))
                if kind not in ("llama3", "default"):
                    raise ValueError(f"unsupported rope_scaling type {kind!r}")
                if kind == "llama3":
                    scaling = RopeScaling(
                        factor=float(rs["factor"]),
                        low_freq_factor=float(rs["low_freq_factor"]),
                        high_freq_factor=float(rs["high_freq_factor"]),
                        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                    )
            eos = cfg.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=cfg.get("rope_theta", 10000.0),
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos,
            )
        except KeyError as e:
            raise ValueError(f"Llama config.json is missing the field {e.args[0]!r}") from None

    @classmethod
    def from_hf_json(cls, path: str) -> "LlamaConfig":
        """Read an HF `config.json` file (or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "LlamaConfig":
        """Build from GGUF key/value metadata (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF architecture is {arch!r}, expected 'llama'")
        try:
            hidden = int(meta["llama.embedding_length"])
            heads = int(meta["llama.attention.head_count"])
            vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
            eos = meta.get("tokenizer.ggml.eos_token_id")
            return cls(
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(meta["llama.feed_forward_length"]),
                num_layers=int(meta["llama.block_count"]),
                num_heads=heads,
                num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
                head_dim=int(meta.get("llama.attention.key_length", hidden // heads)),
                max_position_embeddings=int(meta.get("llama.context_length", 2048)),
                rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
                tie_word_embeddings=bool(meta.get("_tied_embeddings", False)),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=() if eos is None else (int(eos),),
            )
        except KeyError as e:
            raise ValueError(f"GGUF metadata is missing the key {e.args[0]!r}") from None


# Real shapes for speed work (weights are generated from a seed); smollm2-135m is the real default.
PRESETS = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama2-13b": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
        num_kv_heads=40, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
    ),
    # A tiny random Llama for tests and --smoke runs (dimensions multiples of 64 so every kernel path runs).
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def get_preset(name: str) -> LlamaConfig:
    """Return a named preset, or raise ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
