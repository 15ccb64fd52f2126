"""The decode step reads weights and KV cache where they lie (issue 10, item 0).

A `lax.scan` over stacked layer weights made XLA copy each layer's weights and KV slice into fresh
buffers before a Pallas call or dot read them (1.4x-2.6x of a decode step on the H200). The model
now unrolls its layers over per-layer buffers. These tests hold that layout: the lowered program
has no loop over layers and never slices a parameter or cache argument, the compiled program copies
no weight- or cache-sized buffer, and the per-layer layout computes what the stacked one does.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import checkpoint, quantize
from qspec_jax.config import LlamaConfig
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import forward, fuse_projections, unstack_layers

from conftest import TEST_SEED  # noqa: E402  (printed with every test)

CFG = LlamaConfig(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
)
BATCH, SLOTS = 2, 64


@pytest.fixture(scope="module")
def qparams():
    params = checkpoint.random_params(CFG, seed=TEST_SEED, dtype=jnp.float32)
    return fuse_projections(quantize.quantize_params(params, CFG, group_size=64, dtype=jnp.float32))


def _step(params, cache, mode):
    tokens = jnp.asarray([[5], [7]], jnp.int32)
    positions = jnp.asarray([[3], [9]], jnp.int32)
    # The cache is donated, as in the generate loop's carry: its writes then happen in place.
    step = jax.jit(lambda p, c: forward(p, tokens, positions, c, config=CFG, mode=mode), donate_argnums=1)
    return step, (params, cache)


@pytest.mark.parametrize("mode", ["w4a16", "bf16"])
def test_decode_step_slices_no_weight_or_cache_argument(qparams, mode):
    params = unstack_layers(qparams)
    cache = KVCache.create(CFG, BATCH, SLOTS, jnp.float32)
    step, args = _step(params, cache, mode)
    text = step.lower(*args).as_text()
    assert "stablehlo.while" not in text, "the layers must not run as a loop over stacked weights"
    # Every weight and cache buffer is a function argument; none may be sliced (a slice of an argument
    # is what XLA materializes as a copy before a custom call reads it).
    sliced = re.findall(r"stablehlo\.(?:dynamic_slice|slice) %arg\d+", text)
    assert not sliced, f"arguments sliced in the decode step: {sliced}"

    if jax.default_backend() != "gpu":
        return  # on CPU the int4 matmuls are jnp references that unpack (copy) weights by design
    # On the GPU (Pallas kernels) the compiled program copies nothing weight- or cache-sized.
    big = min(CFG.hidden_size * CFG.hidden_size // 2, BATCH * CFG.num_kv_heads * SLOTS * CFG.head_dim)
    compiled = step.lower(*args).compile().as_text()
    copies = [m for m in re.finditer(r"= (\w+)\[([\d,]*)\][^\n]*? copy\(", compiled)
              if m.group(2) and np.prod([int(d) for d in m.group(2).split(",")]) >= big]
    assert not copies, f"weight- or cache-sized copies: {[c.group(0) for c in copies]}"


def test_stacked_scan_layout_would_fail_the_check(qparams):
    # The check has power: slicing stacked weights inside the program is what it rejects.
    cache = KVCache.create(CFG, BATCH, SLOTS, jnp.float32)
    step, args = _step(qparams, cache, "w4a16")
    text = step.lower(*args).as_text()
    assert re.findall(r"stablehlo\.(?:dynamic_slice|slice) %arg\d+", text)


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_per_layer_and_stacked_layouts_agree(qparams, mode):
    rng = np.random.default_rng(TEST_SEED)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (BATCH, 5)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (BATCH, 5))
    outs = []
    for params in (qparams, unstack_layers(qparams)):
        cache = KVCache.create(CFG, BATCH, SLOTS, jnp.float32)
        logits, cache = jax.jit(lambda p, c: forward(p, tokens, positions, c, config=CFG, mode=mode))(params, cache)
        outs.append((logits, cache))
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    for a, b in zip(outs[0][1].k + outs[0][1].v, outs[1][1].k + outs[1][1].v):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(outs[0][1].k[-1][:, :, :5]).max()) > 0  # the last layer's cache was written


def test_unstack_is_idempotent_and_checks_the_layer_count(qparams):
    per_layer = unstack_layers(qparams)
    assert len(per_layer["layers"]) == CFG.num_layers
    assert unstack_layers(per_layer) is per_layer
    short = {**per_layer, "layers": per_layer["layers"][:2]}
    cache = KVCache.create(CFG, BATCH, SLOTS, jnp.float32)
    with pytest.raises(ValueError, match="3"):
        forward(short, jnp.zeros((BATCH, 1), jnp.int32) + 4, jnp.zeros((BATCH, 1), jnp.int32), cache,
                config=CFG, mode="w4a16")
