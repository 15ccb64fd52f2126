"""Contract 1: bf16-mode `forward` (f32 params -> f32 compute) matches transformers' LlamaForCausalLM.

Both sides run the same float weights: SmolLM2's dequantized GGUF floats (the HF model is built from
our params), and a tiny random Llama-3-style HF directory (HF loads it itself; we load it through
`load_hf_dir`). Logits are compared over real prompts, then 32 greedy tokens must be identical.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import forward

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # the peer's speed does not matter; 2 threads on a busy 2-core machine crawl

# One jitted forward for every test (config is a frozen dataclass: hashable, so static).
fwd = jax.jit(forward, static_argnames=("config", "mode"))

# Max |logit difference| allowed between our f32 forward and transformers' f32 eager forward.
# Measured on CPU: 1.1e-4 for SmolLM2 (logits up to ~48, i.e. ~2e-6 relative) and 5e-6 for the tiny
# model (printed by the tests); f32 summation order differs between XLA and torch, nothing more.
LOGIT_ATOL = 5e-4
NEW_TOKENS = 32


def hf_model_from_params(config, params):
    """transformers LlamaForCausalLM (f32, eager attention) holding exactly our params."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    c = config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope.update(rope_type="llama3", **vars(c.rope_scaling))
    hf_cfg = HFLlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids), attn_implementation="eager",
    )
    model = LlamaForCausalLM(hf_cfg).float().eval()
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    lp = params["layers"]
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"])}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(lp["attn_norm"][i])
        sd[p + "post_attention_layernorm.weight"] = t(lp["mlp_norm"][i])
        for ours, hf in names.items():
            sd[p + hf + ".weight"] = t(lp[ours][i]).T.contiguous()  # [in, out] -> HF [out, in]
    sd["lm_head.weight"] = t(params["embed"]) if c.tie_word_embeddings else t(params["lm_head"]).T.contiguous()
    model.load_state_dict(sd, strict=True)
    return model


def our_logits(config, params, rows):
    """Full forward (no cache) of right-padded rows in one batch; padding cannot reach earlier positions."""
    T = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    logits, _ = fwd(params, jnp.asarray(tokens), jnp.asarray(positions), None, config=config, mode="bf16")
    return np.asarray(logits)


def hf_logits(model, rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def our_greedy(config, params, prompt, n):
    """Prefill into a KV cache, then n-1 single-token decode steps, argmax each time."""
    step = partial(fwd, config=config, mode="bf16")
    max_len = -(-(len(prompt) + n) // 128) * 128  # a round size, so prompts share compiled programs
    cache = KVCache.create(config, 1, max_len, dtype=params["embed"].dtype)
    tokens = jnp.asarray([prompt], jnp.int32)
    logits, cache = step(params, tokens, jnp.arange(len(prompt), dtype=jnp.int32)[None], cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    for i in range(n - 1):
        pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
        logits, cache = step(params, jnp.asarray([[out[-1]]], jnp.int32), pos, cache)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def hf_greedy(model, prompt, n):
    model.generation_config.eos_token_id = None  # run the full n tokens, as our loop does
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def compare_logits(config, params, model, rows, label):
    ours, ref = our_logits(config, params, rows), hf_logits(model, rows)
    err = max(float(np.abs(ours[i, : len(r)] - ref[i, : len(r)]).max()) for i, r in enumerate(rows))
    scale = max(float(np.abs(ref[i, : len(r)]).max()) for i, r in enumerate(rows))
    print(f"\n{label}: max |logit error| vs transformers = {err:.2e} (logits up to {scale:.1f}; tolerance {LOGIT_ATOL})")
    assert err < LOGIT_ATOL
    for i, r in enumerate(rows):  # the same next-token choice at every position
        assert np.array_equal(ours[i, : len(r)].argmax(-1), ref[i, : len(r)].argmax(-1))


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return hf_model_from_params(*smollm2)


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_tokenizer, real_texts):
    """Chat-formatted ShareGPT questions and raw HumanEval code prompts, tokenized with our tokenizer."""
    tok = smollm2_tokenizer
    chats = [t[:300] for t in real_texts["chat"][::2][:3]]
    rows = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in chats]
    rows = [tok.encode(r) for r in rows] + [tok.encode(t)[:96] for t in real_texts["code"][:3]]
    return rows


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf, smollm2_prompts):
    config, params = smollm2
    compare_logits(config, params, smollm2_hf, smollm2_prompts, "SmolLM2-135M")


def test_smollm2_greedy_generation_matches_transformers(smollm2, smollm2_hf, smollm2_prompts, smollm2_tokenizer):
    config, params = smollm2
    for prompt in (smollm2_prompts[0], smollm2_prompts[3]):
        ours = our_greedy(config, params, prompt, NEW_TOKENS)
        ref = hf_greedy(smollm2_hf, prompt, NEW_TOKENS)
        print(f"\ngreedy: {smollm2_tokenizer.decode(ours)!r}")
        assert ours == ref


def test_smollm2_answers_sensibly(smollm2, smollm2_tokenizer):
    """A sanity check of the whole path (GGUF -> params -> forward -> tokenizer) on its own."""
    config, params = smollm2
    tok = smollm2_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    answer = tok.decode(our_greedy(config, params, tok.encode(text), 12))
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    config, params = checkpoint.load_hf_dir(tiny_hf_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert model.config.rope_parameters["rope_type"] == "llama3"  # HF read the same scaling
    return config, params, model


def test_tiny_llama3_logits_match_transformers(tiny):
    config, params, model = tiny
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (90, 57, 13)]
    compare_logits(config, params, model, rows, "tiny Llama-3 (GQA, rope scaling, untied)")
    # The same model built from our params gives the same HF logits: our loader kept HF's layout.
    rebuilt = hf_model_from_params(config, params)
    assert np.array_equal(hf_logits(rebuilt, rows[:1]), hf_logits(model, rows[:1]))


def test_tiny_llama3_greedy_generation_matches_transformers(tiny):
    config, params, model = tiny
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, 40).tolist()
    assert our_greedy(config, params, prompt, NEW_TOKENS) == hf_greedy(model, prompt, NEW_TOKENS)
