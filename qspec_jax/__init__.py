"""qspec_jax: QSpec self-speculative decoding (W4A4 draft, W4A16 verify) for Llama models in JAX.

Modules: config (LlamaConfig, presets), checkpoint (GGUF / HF / orbax loading), tokenizer,
model (functional forward with a static `mode`), kv_cache, quantize and rotation (int4 weights,
QuaRot-style rotation), sampling, speculative (the draft-verify loop), generate (the CLI).
"""

__version__ = "0.1.0"
