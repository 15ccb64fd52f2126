"""QSpec: draft in W4A4 (or W4A8), verify in W4A16, one weight pytree, one KV cache, one program.

A cycle, for every row at once:
  1. `gamma` draft steps in the draft mode, each writing its K/V at the row's next slot;
  2. one verify forward in W4A16 over the pending token and the `gamma` drafts, which overwrites
     those same slots with the verifier's K/V;
  3. acceptance: the longest drafted prefix the verifier agrees with, plus the verifier's own next
     token (a correction, or a bonus token when everything was accepted).
The whole generation (prefill, then a `lax.while_loop` over cycles) is one jitted function. With
`gamma=0` there are no drafts and a cycle is one plain decode step in `verify_mode`: that is how the
autoregressive baselines (bf16, w4a16, w4a4, w4a8) run, through the same loop.

Rows are right-padded; each row keeps its own length, accepts its own count and stops on EOS or
its token budget, after which it is masked.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qspec_jax.config import LlamaConfig
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import MODES, forward
from qspec_jax.sampling import greedy_accept, probabilities, sample, speculative_accept

POLICIES = ("greedy", "sampling", "replay")


@struct.dataclass
class GenerationResult:
    """Generated tokens and statistics, all per row.

    tokens: [B, max_new_tokens] int32, -1 past `num_tokens`; num_tokens: [B];
    drafted / accepted: drafted and accepted draft tokens; cycles: verify passes after prefill;
    trace: [B, max_new_tokens] accepted count of each cycle (-1 where the row was not active),
    the input of the `replay` policy.
    """

    tokens: jax.Array
    num_tokens: jax.Array
    drafted: jax.Array
    accepted: jax.Array
    cycles: jax.Array
    trace: jax.Array

    def acceptance_rate(self) -> np.ndarray:
        """Accepted over drafted tokens per row (NaN where nothing was drafted)."""
        drafted = np.asarray(self.drafted, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(drafted > 0, np.asarray(self.accepted) / drafted, np.nan)

    def summary(self) -> dict:
        """Totals over the batch: drafted, accepted, cycles, acceptance rate, tokens per cycle."""
        drafted, accepted = int(np.sum(self.drafted)), int(np.sum(self.accepted))
        cycles, new = int(np.sum(self.cycles)), int(np.sum(self.num_tokens))
        return {
            "new_tokens": new,
            "drafted": drafted,
            "accepted": accepted,
            "cycles": cycles,
            "acceptance_rate": accepted / drafted if drafted else None,
            # the first token comes from prefill, every later one from a cycle
            "tokens_per_cycle": (new - len(np.asarray(self.num_tokens))) / cycles if cycles else None,
        }


def cache_length(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Slots a row needs: its prompt, its budget and the `gamma + 1` slack a last cycle may write."""
    return prompt_len + max_new_tokens + gamma + 1


def _choose(key, logits, policy, temperature, top_p):
    """Verifier's pick for a single position: argmax, or a sample under the sampling policy."""
    if policy == "sampling":
        return sample(key, probabilities(logits, temperature, top_p))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _write_rows(buf, block, starts):
    """buf[b, starts[b] : starts[b] + block.shape[1]] = block[b], per row."""
    return jax.vmap(lambda row, blk, s: jax.lax.dynamic_update_slice(row, blk, (s,)))(buf, block, starts)


def prefill(params, prompts, prompt_lens, cache, *, config, mode, chunk):
    """Run the prompts into the cache; return (logits [B, V] at each row's last prompt token, cache).

    With 0 < chunk < P the prompt goes through in chunks of `chunk` positions (a fori_loop), so
    attention scores are [B, H, chunk, S] instead of [B, H, P, S]: long prompts fit in memory.
    The cache needs `chunks * chunk` slots (see `generate_jit`).
    """
    b, p = prompts.shape
    last = prompt_lens - 1
    if not 0 < chunk < p:
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        logits, cache = forward(params, prompts, positions, cache, config=config, mode=mode, logit_index=last[:, None])
        return logits[:, 0], cache
    n = -(-p // chunk)
    prompts = jnp.pad(prompts, ((0, 0), (0, n * chunk - p)))

    def body(i, carry):
        cache, out = carry
        start = i * chunk
        toks = jax.lax.dynamic_slice_in_dim(prompts, start, chunk, axis=1)
        positions = start + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        idx = jnp.clip(last - start, 0, chunk - 1)[:, None]
        logits, cache = forward(params, toks, positions, cache, config=config, mode=mode, logit_index=idx)
        mine = (last >= start) & (last < start + chunk)  # this chunk holds the row's last token
        return cache, jnp.where(mine[:, None], logits[:, 0], out)

    out = jnp.zeros((b, config.vocab_size), jnp.float32)
    cache, out = jax.lax.fori_loop(0, n, body, (cache, out))
    return out, cache


@partial(
    jax.jit,
    static_argnames=(
        "config", "max_new_tokens", "gamma", "draft_mode", "verify_mode", "policy", "top_p", "eos_ids", "prefill_chunk",
    ),
)
def generate_jit(
    params, prompts, prompt_lens, key, temperature, replay_trace, *,
    config: LlamaConfig, max_new_tokens: int, gamma: int, draft_mode: str, verify_mode: str,
    policy: str, top_p: float, eos_ids: tuple, prefill_chunk: int = 0,
) -> GenerationResult:
    """The compiled program behind `generate` (inputs already validated; see there)."""
    b, p = prompts.shape
    g = gamma
    max_len = cache_length(p, max_new_tokens, g)
    if 0 < prefill_chunk < p:  # room for the padded last chunk
        max_len = max(max_len, -(-p // prefill_chunk) * prefill_chunk)
    cache = KVCache.create(config, b, max_len, params["embed"].dtype)
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)  # -2 never occurs

    # Prefill in the verifier's mode; logits only at each row's last prompt token.
    logits, cache = prefill(params, prompts, prompt_lens, cache, config=config, mode=verify_mode, chunk=prefill_chunk)
    cache = cache.replace(lengths=prompt_lens)
    key, k0 = jax.random.split(key)
    first = _choose(k0, logits, policy, temperature, top_p)
    out = jnp.full((b, max_new_tokens + g + 1), -1, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((b,), jnp.int32)
    done = jnp.isin(first, eos) | (n_out >= max_new_tokens)
    zeros = jnp.zeros((b,), jnp.int32)
    trace = jnp.full((b, max_new_tokens), -1, jnp.int32)
    replay_len = jnp.maximum(jnp.sum(replay_trace >= 0, axis=1), 1)

    def draft_step(carry, j):
        cache, tok, key = carry
        pos = (cache.lengths + j)[:, None]
        logits, cache = forward(params, tok[:, None], pos, cache, config=config, mode=draft_mode)
        logits = logits[:, 0]
        if policy == "sampling":
            key, k = jax.random.split(key)
            q = probabilities(logits, temperature, top_p)
            nxt = sample(k, q)
        else:
            q = jnp.zeros((b, 0), jnp.float32)  # distributions are only needed for sampling
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, nxt, key), (nxt, q)

    def cycle(state):
        cache, pending, out, n_out, done, key, step, drafted, accepted, cycles, trace = state
        active = ~done
        if g > 0:
            (cache, _, key), (drafts, qs) = jax.lax.scan(draft_step, (cache, pending, key), jnp.arange(g))
            drafts, qs = drafts.T, jnp.swapaxes(qs, 0, 1)
        else:
            drafts, qs = jnp.zeros((b, 0), jnp.int32), None
        block = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, g+1]
        positions = cache.lengths[:, None] + jnp.arange(g + 1, dtype=jnp.int32)
        vlogits, cache = forward(params, block, positions, cache, config=config, mode=verify_mode)

        key, k = jax.random.split(key)
        if policy == "sampling" and g > 0:
            n_acc, nxt = speculative_accept(k, drafts, qs, probabilities(vlogits, temperature, top_p))
        elif policy == "sampling":
            n_acc, nxt = zeros, _choose(k, vlogits[:, 0], policy, temperature, top_p)
        else:
            n_acc, nxt = greedy_accept(drafts, vlogits)
            if policy == "replay":
                n_acc = jnp.clip(jnp.take_along_axis(replay_trace, (cycles % replay_len)[:, None], axis=1)[:, 0], 0, g)
                nxt = jnp.take_along_axis(jnp.argmax(vlogits, axis=-1).astype(jnp.int32), n_acc[:, None], axis=1)[:, 0]

        # Emitted this cycle: the accepted drafts, then the verifier's token; cut at EOS and budget.
        idx = jnp.arange(g + 1)
        drafts_ext = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        emitted = jnp.where(idx < n_acc[:, None], drafts_ext, nxt[:, None])
        is_eos = jnp.isin(emitted, eos) & (idx <= n_acc[:, None])
        hit_eos = jnp.any(is_eos, axis=1)
        count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, n_acc + 1)
        count = jnp.where(active, jnp.minimum(count, max_new_tokens - n_out), 0)
        out = _write_rows(out, jnp.where(active[:, None], emitted, -1), jnp.where(active, n_out, max_new_tokens))
        n_out = n_out + count
        cache = cache.replace(lengths=jnp.where(active, cache.lengths + n_acc + 1, cache.lengths))
        pending = jnp.where(active, nxt, pending)
        trace = trace.at[:, step].set(jnp.where(active, n_acc, -1))
        done = done | (active & (hit_eos | (n_out >= max_new_tokens)))
        drafted = drafted + jnp.where(active, g, 0)
        accepted = accepted + jnp.where(active, n_acc, 0)
        cycles = cycles + active.astype(jnp.int32)
        return cache, pending, out, n_out, done, key, step + 1, drafted, accepted, cycles, trace

    def not_finished(state):
        done, step = state[4], state[6]
        return jnp.any(~done) & (step < max_new_tokens)

    state = (cache, first, out, n_out, done, key, jnp.int32(0), zeros, zeros, zeros, trace)
    state = jax.lax.while_loop(not_finished, cycle, state)
    _, _, out, n_out, _, _, _, drafted, accepted, cycles, trace = state
    tokens = jnp.where(jnp.arange(max_new_tokens) < n_out[:, None], out[:, :max_new_tokens], -1)
    return GenerationResult(tokens, n_out, drafted, accepted, cycles, trace)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
    """Right-pad token lists into `[B, P]` int32 (P rounded up to `multiple`) and their lengths."""
    if not prompts:
        raise ValueError("no prompts given")
    lens = [len(t) for t in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty: every prompt needs at least one token")
    width = -(-max(lens) // multiple) * multiple
    arr = np.full((len(prompts), width), pad_id, np.int32)
    for i, t in enumerate(prompts):
        arr[i, : len(t)] = t
    return jnp.asarray(arr), jnp.asarray(lens, jnp.int32)


def generate(params: dict, prompts: jax.Array, prompt_lens: jax.Array, **settings) -> GenerationResult:
    """Generate up to `max_new_tokens` per row with QSpec (or plain decoding when `gamma=0`).

    prompts: [B, P] int32 right-padded token ids (see `pad_prompts`); prompt_lens: [B] lengths.
    Settings (keywords, see `prepare`): config, max_new_tokens, gamma=3, draft_mode="w4a4",
    verify_mode="w4a16", policy="greedy", temperature=1.0, top_p=1.0, seed=0, eos_ids=None,
    replay_trace=None, prefill_chunk=512. Compiled once per shapes and static settings; a second call with the same
    padded shapes does not recompile.
    """
    args, static = prepare(params, prompts, prompt_lens, **settings)
    return generate_jit(*args, **static)


def prepare(
    params: dict,
    prompts: jax.Array,
    prompt_lens: jax.Array,
    *,
    config: LlamaConfig,
    max_new_tokens: int,
    gamma: int = 3,
    draft_mode: str = "w4a4",
    verify_mode: str = "w4a16",
    policy: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Optional[Sequence[int]] = None,
    replay_trace: Optional[jax.Array] = None,
    prefill_chunk: int = 512,
):
    """Validate a generation request; return `(args, static_kwargs)` for `generate_jit`.

    Split out so callers can compile ahead of time (`generate_jit.lower(*args, **static).compile()`)
    and time compilation and generation separately.

    draft_mode drafts `gamma` tokens a cycle, verify_mode (w4a16: QSpec's verifier) checks them.
    policy: "greedy" (top-1 match; output equals plain `verify_mode` greedy decoding), "sampling"
    (speculative sampling at `temperature` / `top_p`; output distributed as `verify_mode` sampling),
    or "replay" (accept exactly the counts of `replay_trace: [B, C]`, a `GenerationResult.trace`
    recorded on a real model: for speed runs with generated weights; the tokens are meaningless).
    eos_ids default to the config's; pass () to never stop early.
    prefill_chunk: prompts longer than this are prefilled `prefill_chunk` positions at a time
    (bounds prefill memory for long prompts); 0 prefills the whole prompt in one pass.
    """
    b, p = _validate(
        prompts, prompt_lens, config, max_new_tokens, gamma, draft_mode, verify_mode, policy, temperature, top_p,
        prefill_chunk,
    )
    if policy == "replay":
        if replay_trace is None:
            raise ValueError("policy 'replay' needs replay_trace (a GenerationResult.trace)")
        replay_trace = jnp.asarray(replay_trace, jnp.int32)
        if replay_trace.ndim != 2 or replay_trace.shape[0] != b:
            raise ValueError(f"replay_trace must be [batch={b}, cycles], got shape {replay_trace.shape}")
    else:
        replay_trace = jnp.zeros((b, 1), jnp.int32)
    eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    args = (
        params, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32), jax.random.PRNGKey(seed),
        jnp.float32(temperature), replay_trace,
    )
    static = dict(
        config=config, max_new_tokens=int(max_new_tokens), gamma=int(gamma), draft_mode=draft_mode,
        verify_mode=verify_mode, policy=policy, top_p=float(top_p), eos_ids=eos, prefill_chunk=int(prefill_chunk),
    )
    return args, static


def _validate(
    prompts, prompt_lens, config, max_new_tokens, gamma, draft_mode, verify_mode, policy, temperature, top_p,
    prefill_chunk,
):
    """Host-side checks, so bad input fails here with a clear message and never inside the loop."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    for name, mode in (("draft_mode", draft_mode), ("verify_mode", verify_mode)):
        if mode not in MODES:
            raise ValueError(f"unknown {name} {mode!r}; expected one of {MODES}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(gamma, (int, np.integer)) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative integer, got {gamma!r}")
    if policy == "sampling" and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be a non-negative integer, got {prefill_chunk!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    shape = np.shape(prompts)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"prompts must be a non-empty [batch, length] array, got shape {shape}")
    lens = np.asarray(prompt_lens)
    if lens.shape != (shape[0],):
        raise ValueError(f"prompt_lens must have shape ({shape[0]},), got {lens.shape}")
    if lens.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(lens))} is empty: every prompt needs at least one token")
    if lens.max() > shape[1]:
        raise ValueError(f"a prompt length ({lens.max()}) exceeds the padded width {shape[1]}")
    toks = np.asarray(prompts)
    if toks.min() < 0 or toks.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got [{toks.min()}, {toks.max()}]")
    longest = int(lens.max()) + max_new_tokens
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({int(lens.max())} tokens) plus max_new_tokens ({max_new_tokens}) = {longest} exceeds the "
            f"model's context of {config.max_position_embeddings} tokens"
        )
    return shape
