"""QSpec: draft in W4A4 (or W4A8), verify in W4A16, one weight pytree, one KV cache, one program.

A cycle, for every row at once:
  1. `gamma` draft steps in the draft mode, each writing its K/V at the row's next slot;
  2. one verify forward in W4A16 over the pending token and the `gamma` drafts, which overwrites
     those same slots with the verifier's K/V;
  3. acceptance: the longest drafted prefix the verifier agrees with, plus the verifier's own next
     token (a correction, or a bonus token when everything was accepted).
Each step is a module-level function (`draft`, `verify`, `accept`, then `advance` for the
bookkeeping) over a named carry, `LoopState`. The whole generation (prefill, then a
`lax.while_loop` over cycles) is one jitted function, `generate_jit`. With
`gamma=0` there are no drafts and a cycle is one plain decode step in `verify_mode`: that is how the
autoregressive baselines (bf16, w4a16, w4a4, w4a8) run, through the same loop.

KV cache (`kv`, static): "bf16" (`KVCache`), or "int8", QuantSpec's hierarchical cache
(`HierarchicalKVCache`: two 4-bit planes + a full-precision recent buffer per layer). With "int8" the
prompt is prefilled with plain causal attention and then quantized, the drafts read the INT4 view
(upper plane), the verify pass (and gamma=0 plain decoding) the INT8 view, and the cache is flushed
after each acceptance, so only accepted tokens are quantized. What a query reads from it depends on
its position only (planes below a cut c(p), the buffer from there), so greedy QSpec on the int8 cache
equals plain greedy decoding on the int8 cache token for token.

Rows are right-padded; each row keeps its own length, accepts its own count and stops on EOS or
its token budget, after which it is masked.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qspec_jax.config import LlamaConfig
from qspec_jax.hierarchical_kv import HierarchicalKVCache, check_cache
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import MODES, forward, unstack_layers
from qspec_jax.policy import AdaptiveGamma, pick_gamma
from qspec_jax.sampling import greedy_accept, probabilities, sample, speculative_accept

POLICIES = ("greedy", "sampling", "replay")
KV_CACHES = ("bf16", "int8")


@struct.dataclass
class GenerationResult:
    """Generated tokens and statistics, all per row (device arrays; `summary()` totals them).

    tokens: [B, max_new_tokens] int32, -1 past `num_tokens`; num_tokens: [B];
    drafted / accepted: drafted and accepted draft tokens; cycles: verify passes after prefill;
    accepted_at: [B, gamma] cycles whose draft at position j was accepted (a draft counts only with
    all drafts before it, so the counts never rise with j; they sum to `accepted`);
    gamma_cycles: [B, gamma + 1] cycles run at each gamma 0..gamma (one bucket while gamma is fixed);
    reached_at: [B, gamma] cycles that drafted position j after accepting every draft before it (the
    denominator of position j's conditional acceptance rate, accepted_at[j] / reached_at[j]);
    trace: [B, max_new_tokens] accepted count of each cycle (-1 where the row was not active),
    the input of the `replay` policy;
    policy: the `policy.Choice` behind `gamma="auto"` (static data, not an array), else None.
    """

    tokens: jax.Array
    num_tokens: jax.Array
    drafted: jax.Array
    accepted: jax.Array
    cycles: jax.Array
    trace: jax.Array
    accepted_at: jax.Array
    gamma_cycles: jax.Array
    reached_at: jax.Array
    policy: Optional[object] = struct.field(pytree_node=False, default=None)

    def acceptance_rate(self) -> np.ndarray:
        """Accepted over drafted tokens per row (NaN where nothing was drafted)."""
        drafted = np.asarray(self.drafted, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(drafted > 0, np.asarray(self.accepted) / drafted, np.nan)

    def mean_accepted_length(self) -> np.ndarray:
        """Accepted drafts per cycle, per row (NaN where nothing was drafted). One more than this is
        what some engines call the mean acceptance length (the verifier's own token included)."""
        cycles = np.asarray(self.cycles, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.asarray(self.drafted) > 0, np.asarray(self.accepted) / cycles, np.nan)

    def summary(self) -> dict:
        """Totals over the batch, JSON-friendly (ints, floats, None, lists, str-keyed dicts).

        acceptance_rate: accepted / drafted; tokens_per_cycle: tokens emitted per cycle (cut at EOS
        and budget); mean_accepted_length: accepted drafts per cycle; accepted_at_position[j]: cycles
        that accepted the draft at position j; acceptance_at_position[j]: that over the cycles that
        drafted a position j; conditional_acceptance_at_position[j]: that over the cycles that reached
        position j (drafted it with every draft before it accepted); gamma_histogram: {gamma: cycles
        run at it}; policy: what gamma="auto" chose (gamma, draft, predicted_speedup, policy_source,
        batch, context, adaptive), else None.
        """
        drafted, accepted = int(np.sum(self.drafted)), int(np.sum(self.accepted))
        cycles, new = int(np.sum(self.cycles)), int(np.sum(self.num_tokens))
        at = np.sum(np.asarray(self.accepted_at), axis=0)  # [gamma]
        reached = np.sum(np.asarray(self.reached_at), axis=0)  # [gamma]
        per_gamma = np.sum(np.asarray(self.gamma_cycles), axis=0)  # [gamma + 1]
        drafted_at = np.cumsum(per_gamma[::-1])[::-1][1:]  # cycles that ran at a gamma > j
        return {
            "new_tokens": new,
            "drafted": drafted,
            "accepted": accepted,
            "cycles": cycles,
            "acceptance_rate": accepted / drafted if drafted else None,
            # the first token comes from prefill, every later one from a cycle
            "tokens_per_cycle": (new - len(np.asarray(self.num_tokens))) / cycles if cycles else None,
            "mean_accepted_length": accepted / cycles if drafted else None,
            "accepted_at_position": [int(a) for a in at],
            "acceptance_at_position": [float(a) / d if d else None for a, d in zip(at, drafted_at)],
            "conditional_acceptance_at_position": [float(a) / r if r else None for a, r in zip(at, reached)],
            "gamma_histogram": {str(g): int(c) for g, c in enumerate(per_gamma) if c},
            "policy": None if self.policy is None else self.policy.as_dict(),
        }


@struct.dataclass
class LoopState:
    """The carry of the generation loop: what a cycle reads and returns (B rows, N = max_new_tokens).

    The counters are per row and count only cycles the row was active in.
    """

    cache: KVCache  # or HierarchicalKVCache; lengths: slots with the verifier's K/V (all but `pending`)
    pending: jax.Array  # [B] int32: the last emitted token, not yet in the cache; the next cycle's first input
    out: jax.Array  # [B, N + gamma + 1] int32: emitted tokens (-1 unwritten); the tail takes a last cycle's overhang
    n_out: jax.Array  # [B] int32: tokens emitted so far, at most N
    done: jax.Array  # [B] bool: the row emitted EOS or its N tokens; it is masked from then on
    key: jax.Array  # PRNG key of the draft samples and the acceptance draws
    step: jax.Array  # [] int32: cycles run, the column of `trace` the next cycle writes
    accepted_at: jax.Array  # [B, gamma] int32: cycles that accepted the draft at position j
    reached_at: jax.Array  # [B, gamma] int32: cycles that drafted position j with every draft before it accepted
    gamma_cycles: jax.Array  # [B, gamma + 1] int32: cycles run at each gamma
    trace: jax.Array  # [B, N] int32: accepted count of each cycle, -1 where the row was not active

    @classmethod
    def start(cls, cache, first, key, *, gamma: int, max_new_tokens: int, eos_ids: tuple) -> "LoopState":
        """The state after prefill: `first` [B] emitted and pending, `cache.lengths` = prompt lengths."""
        b = first.shape[0]
        n_out = jnp.ones((b,), jnp.int32)
        return cls(
            cache=cache, pending=first, n_out=n_out, key=key, step=jnp.int32(0),
            out=jnp.full((b, max_new_tokens + gamma + 1), -1, jnp.int32).at[:, 0].set(first),
            done=is_eos(first, eos_ids) | (n_out >= max_new_tokens),
            accepted_at=jnp.zeros((b, gamma), jnp.int32), reached_at=jnp.zeros((b, gamma), jnp.int32),
            gamma_cycles=jnp.zeros((b, gamma + 1), jnp.int32),
            trace=jnp.full((b, max_new_tokens), -1, jnp.int32),
        )

    def result(self) -> GenerationResult:
        """Tokens cut at each row's count; drafted / accepted / cycles totalled from the counts."""
        n = self.trace.shape[1]
        tokens = jnp.where(jnp.arange(n) < self.n_out[:, None], self.out[:, :n], -1)
        gammas = jnp.arange(self.gamma_cycles.shape[1], dtype=jnp.int32)
        return GenerationResult(
            tokens=tokens, num_tokens=self.n_out, drafted=self.gamma_cycles @ gammas,
            accepted=jnp.sum(self.accepted_at, axis=1), cycles=jnp.sum(self.gamma_cycles, axis=1),
            trace=self.trace, accepted_at=self.accepted_at, gamma_cycles=self.gamma_cycles, reached_at=self.reached_at,
        )


def cache_length(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Slots a row needs: its prompt, its budget and the `gamma + 1` slack a last cycle may write."""
    return prompt_len + max_new_tokens + gamma + 1


CACHE_MULTIPLE = 128  # the decode-attention kernel reads the cache in blocks of up to 128 slots


def cache_slots(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Slots a bf16 cache is allocated with: `cache_length` rounded up to CACHE_MULTIPLE, so the
    decode-attention kernel's blocks tile it (the slots past `cache_length` are never written)."""
    return -(-cache_length(prompt_len, max_new_tokens, gamma) // CACHE_MULTIPLE) * CACHE_MULTIPLE


def bf16_cache_slots(prompt_len: int, max_new_tokens: int, gamma: int, prefill_chunk: int) -> int:
    """Slots `generate_jit` gives a bf16 cache: `cache_slots`, and room for a padded last prefill
    chunk when the prompt is prefilled in chunks."""
    slots = cache_slots(prompt_len, max_new_tokens, gamma)
    if 0 < prefill_chunk < prompt_len:
        slots = max(slots, -(-prompt_len // prefill_chunk) * prefill_chunk)
    return slots


def _choose(key, logits, policy, temperature, top_p):
    """Verifier's pick for a single position: argmax, or a sample under the sampling policy."""
    if policy == "sampling":
        return sample(key, probabilities(logits, temperature, top_p))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _write_rows(buf, block, starts):
    """buf[b, starts[b] : starts[b] + block.shape[1]] = block[b], per row."""
    return jax.vmap(lambda row, blk, s: jax.lax.dynamic_update_slice(row, blk, (s,)))(buf, block, starts)


def is_eos(tokens: jax.Array, eos_ids: tuple) -> jax.Array:
    """Boolean mask of `tokens` that are in the static `eos_ids` (all False when it is empty)."""
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


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


def draft(params, cache, pending, key, temperature, *, config, mode, gamma, sampling, top_p):
    """`gamma` draft steps in `mode` from each row's pending token, each writing its K/V at the
    row's next slot. Returns (drafts [B, gamma] int32, q, cache, key): q [B, gamma, V] are the draft
    distributions when `sampling` (the drafts are drawn from them), else None (drafts are argmaxes)."""
    if gamma == 0:
        return jnp.zeros((pending.shape[0], 0), jnp.int32), None, cache, key

    def step(carry, j):
        cache, tok, key = carry
        nxt, q, cache, key = draft_step(params, cache, tok, key, temperature, j, config=config, mode=mode,
                                        sampling=sampling, top_p=top_p)
        return (cache, nxt, key), (nxt, q)

    (cache, _, key), (drafts, q) = jax.lax.scan(step, (cache, pending, key), jnp.arange(gamma))
    return drafts.T, None if q is None else jnp.swapaxes(q, 0, 1), cache, key


def draft_step(params, cache, tok, key, temperature, j, *, config, mode, sampling, top_p):
    """One draft step: token `tok` [B] at each row's slot lengths + j. Returns (next [B], q, cache,
    key); q [B, V] is the distribution `next` was drawn from when `sampling`, else None (argmax)."""
    logits, cache = forward(params, tok[:, None], (cache.lengths + j)[:, None], cache, config=config, mode=mode,
                            kv_view="int4")  # a hierarchical cache's draft view (ignored by bf16)
    if not sampling:
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), None, cache, key
    key, k = jax.random.split(key)
    q = probabilities(logits[:, 0], temperature, top_p)
    return sample(k, q), q, cache, key


def draft_upto(params, cache, pending, key, temperature, n, *, config, mode, width, sampling, top_p):
    """`draft` for a traced number of steps `n` <= `width` (an adaptive loop's cycle; a loop of that
    many iterations, not a scan). Returns (drafts [B, width], q [B, width, V] or None, cache, key);
    entries from position n on are zeros and are never read."""
    b = pending.shape[0]
    drafts = jnp.zeros((b, width), jnp.int32)
    q = jnp.zeros((b, width, config.vocab_size), jnp.float32) if sampling else None

    def step(j, carry):
        cache, tok, key, drafts, q = carry
        nxt, qj, cache, key = draft_step(params, cache, tok, key, temperature, j, config=config, mode=mode,
                                         sampling=sampling, top_p=top_p)
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, nxt[:, None], j, axis=1)
        if sampling:
            q = jax.lax.dynamic_update_slice_in_dim(q, qj[:, None], j, axis=1)
        return cache, nxt, key, drafts, q

    cache, _, key, drafts, q = jax.lax.fori_loop(0, n, step, (cache, pending, key, drafts, q))
    return drafts, q, cache, key


def verify(params, cache, pending, drafts, *, config, mode):
    """One forward in `mode` over each row's pending token and its drafts at the row's next
    `gamma + 1` slots (overwriting the drafts' K/V). Returns (logits [B, gamma + 1, V], cache)."""
    block = jnp.concatenate([pending[:, None], drafts], axis=1)
    positions = cache.lengths[:, None] + jnp.arange(block.shape[1], dtype=jnp.int32)
    return forward(params, block, positions, cache, config=config, mode=mode, kv_view="int8")


def accept(key, drafts, q, logits, temperature, forced, *, policy, top_p, limit=None):
    """Per row, how many drafts to keep and the verifier's next token: (n_accepted [B], next [B]).

    drafts [B, g], q their distributions (sampling only), logits [B, g + 1, V] the verifier's.
    greedy: the drafted prefix that matches the verifier's argmax; sampling: speculative sampling
    at temperature / top_p (output distributed as the verifier's sampling); replay: the `forced`
    counts [B] (clipped to 0..g), then the verifier's argmax after them. limit (traced, <= g): only
    the first `limit` drafts are real (an adaptive loop's cycle); the rest are never accepted.
    """
    g = drafts.shape[1]
    if policy == "sampling":
        p = probabilities(logits, temperature, top_p)
        if g == 0:
            return jnp.zeros(drafts.shape[:1], jnp.int32), sample(key, p[:, 0])
        return speculative_accept(key, drafts, q, p, limit)
    if policy == "replay":
        n_acc = jnp.clip(forced, 0, g if limit is None else limit)
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return n_acc, jnp.take_along_axis(target, n_acc[:, None], axis=1)[:, 0]
    return greedy_accept(drafts, logits, limit)


def advance(state: LoopState, drafts, n_acc, nxt, *, eos_ids: tuple, max_new_tokens: int, drafted=None) -> LoopState:
    """Bookkeeping after acceptance: each active row emits its accepted drafts and then `nxt`, cut
    after an EOS and at its budget; its cache length grows by what it emitted, so a finished row's
    later (masked) writes stay inside the `cache_length` slots. drafted: the cycle's gamma when only
    the first `drafted` (traced) of `drafts` were drafted (an adaptive loop); default: all of them.
    `drafts` may be narrower than the state's counters (plain decoding after an adaptive loop)."""
    g = drafts.shape[1] if drafted is None else drafted
    active = ~state.done
    idx = jnp.arange(drafts.shape[1] + 1)
    emitted = jnp.where(idx < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])  # [B, width + 1]
    stops = is_eos(emitted, eos_ids) & (idx <= n_acc[:, None])
    hit_eos = jnp.any(stops, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(stops, axis=1) + 1, n_acc + 1)
    count = jnp.where(active, jnp.minimum(count, max_new_tokens - state.n_out), 0)
    n_out = state.n_out + count
    at = jnp.where(active, state.n_out, max_new_tokens)  # a finished row writes -1s into the overhang
    pos = jnp.arange(state.accepted_at.shape[1])  # draft positions the counters hold
    return state.replace(
        cache=state.cache.replace(lengths=state.cache.lengths + count),
        pending=jnp.where(active, nxt, state.pending),
        out=_write_rows(state.out, jnp.where(active[:, None], emitted, -1), at),
        n_out=n_out,
        done=state.done | (active & (hit_eos | (n_out >= max_new_tokens))),
        step=state.step + 1,
        accepted_at=state.accepted_at + (active[:, None] & (pos < n_acc[:, None])),
        reached_at=state.reached_at + (active[:, None] & (pos < g) & (pos <= n_acc[:, None])),
        gamma_cycles=state.gamma_cycles.at[:, g].add(active.astype(jnp.int32)),
        trace=state.trace.at[:, state.step].set(jnp.where(active, n_acc, -1)),
    )


def replay_counts(replay_trace, state: LoopState):
    """The `replay` policy's accepted count for each row's next cycle: its trace, cycled."""
    cycles = jnp.sum(state.gamma_cycles, axis=1)
    length = jnp.maximum(jnp.sum(replay_trace >= 0, axis=1), 1)
    return jnp.take_along_axis(replay_trace, (cycles % length)[:, None], axis=1)[:, 0]


@partial(
    jax.jit,
    static_argnames=(
        "config", "max_new_tokens", "gamma", "draft_mode", "verify_mode", "policy", "top_p", "eos_ids", "prefill_chunk",
        "kv", "kv_group", "kv_window",
    ),
)
def generate_jit(
    params, prompts, prompt_lens, key, temperature, replay_trace, draft_params=None, adaptive=None, *,
    config: LlamaConfig, max_new_tokens: int, gamma: int, draft_mode: str, verify_mode: str,
    policy: str, top_p: float, eos_ids: tuple, prefill_chunk: int = 0, kv: str = "bf16", kv_group: int = 128,
    kv_window: int = 256,
) -> GenerationResult:
    """The compiled program behind `generate` (inputs already validated; see there): prefill, then
    draft -> verify -> accept cycles in one `lax.while_loop` until every row is done. The drafts run
    on `draft_params` when given (QuantSpec: int4 drafts, a float verifier), else on `params`. With
    `adaptive` (`policy.AdaptiveGamma.arrays()`) each cycle picks its gamma in 0..gamma (`decode_loop`)."""
    b, p = prompts.shape
    max_len = bf16_cache_slots(p, max_new_tokens, gamma, prefill_chunk)
    dtype = params["embed"].dtype
    if kv == "int8":  # prefill into a bf16 cache of the prompt's slots, then quantize it
        pre_len = -(-p // prefill_chunk) * prefill_chunk if 0 < prefill_chunk < p else p
        cache = KVCache.create(config, b, pre_len, dtype)
    else:
        cache = KVCache.create(config, b, max_len, dtype)

    # Prefill in the verifier's mode; logits only at each row's last prompt token.
    logits, cache = prefill(params, prompts, prompt_lens, cache, config=config, mode=verify_mode, chunk=prefill_chunk)
    if kv == "int8":
        cache = HierarchicalKVCache.from_prompt(config, cache.k, cache.v, prompt_lens, cache_length(p, max_new_tokens, gamma),
                                                headroom=gamma + 1, group=kv_group, window=kv_window, dtype=dtype)
    key, k0 = jax.random.split(key)
    first = _choose(k0, logits, policy, temperature, top_p)
    return decode(params, cache.replace(lengths=prompt_lens), first, key, temperature, replay_trace, draft_params,
                  adaptive, config=config, max_new_tokens=max_new_tokens, gamma=gamma, draft_mode=draft_mode,
                  verify_mode=verify_mode, policy=policy, top_p=top_p, eos_ids=eos_ids)


DECODE_STATIC = ("config", "max_new_tokens", "gamma", "draft_mode", "verify_mode", "policy", "top_p", "eos_ids")


def decode(params, cache, first, key, temperature, replay_trace, draft_params=None, adaptive=None,
           **static) -> GenerationResult:
    """The decode half of a generation: draft -> verify -> accept cycles in one `lax.while_loop`,
    from a prefilled cache, until every row is done (`decode_loop`'s result).

    params (and draft_params) as `prepare` returns them (per-layer buffers, `model.unstack_layers`);
    cache: a `KVCache` or `HierarchicalKVCache` whose `lengths` are the rows' prompt lengths and
    with room for `cache_length(prompt, max_new_tokens, gamma)` slots; first: [B] the token each row
    emitted from its prompt (it counts as the first of `max_new_tokens`); replay_trace: [B, C]
    (policy "replay", else ignored); adaptive: `policy.AdaptiveGamma.arrays()` or None (fixed gamma);
    `static`: DECODE_STATIC, as `generate_jit` takes them.
    `generate_jit` is `prefill` followed by this; `decode_jit` compiles it alone (see there).
    """
    return decode_loop(params, cache, first, key, temperature, replay_trace, draft_params, adaptive, **static).result()


def decode_loop(
    params, cache, first, key, temperature, replay_trace, draft_params=None, adaptive=None, *,
    config: LlamaConfig, max_new_tokens: int, gamma: int, draft_mode: str, verify_mode: str,
    policy: str, top_p: float, eos_ids: tuple,
) -> LoopState:
    """`decode`'s while loop, returning its final `LoopState` (cache included).

    Fixed gamma (`adaptive` None): every cycle is `draft` (a scan of `gamma` steps), `verify`,
    `accept`, `advance`. Adaptive: a first loop runs while the in-loop policy (`policy.pick_gamma`
    over the counts so far) picks some g in 1..gamma: it drafts g tokens (`draft_upto`), verifies at
    the full width gamma + 1 and accepts at most g (no conditional: XLA would copy the cache that a
    branch updates in place). Once the policy picks 0, a second loop decodes plainly to the end.
    Every cycle ends with a cache flush at the widest cycle's headroom."""
    state = LoopState.start(cache, first, key, gamma=gamma, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    drafter = params if draft_params is None else draft_params  # QuantSpec: its own int4 weights
    sampling = policy == "sampling"

    def finish(state: LoopState, drafts, q, drafted=None) -> LoopState:
        """Verify `drafts` (and the pending token; `state` holds the cache the drafts wrote), accept at
        most `drafted` of them (default: all), advance, flush."""
        logits, cache = verify(params, state.cache, state.pending, drafts, config=config, mode=verify_mode)
        key, k = jax.random.split(state.key)
        forced = replay_counts(replay_trace, state) if policy == "replay" else None
        n_acc, nxt = accept(k, drafts, q, logits, temperature, forced, policy=policy, top_p=top_p, limit=drafted)
        state = advance(state.replace(cache=cache, key=key), drafts, n_acc, nxt, eos_ids=eos_ids,
                        max_new_tokens=max_new_tokens, drafted=drafted)
        return state.replace(cache=state.cache.flush(gamma + 1))  # int8: quantize accepted groups; bf16: as is

    def fixed_cycle(g: int):
        def cycle(state: LoopState) -> LoopState:
            drafts, q, cache, key = draft(drafter, state.cache, state.pending, state.key, temperature, config=config,
                                          mode=draft_mode, gamma=g, sampling=sampling, top_p=top_p)
            return finish(state.replace(cache=cache, key=key), drafts, q)
        return cycle

    def running(state: LoopState):
        return jnp.any(~state.done) & (state.step < max_new_tokens)

    if adaptive is None:
        return jax.lax.while_loop(running, fixed_cycle(gamma), state)

    def chosen(state: LoopState):
        return pick_gamma(adaptive, state.accepted_at, state.reached_at)

    def adaptive_cycle(state: LoopState) -> LoopState:
        g = chosen(state)
        drafts, q, cache, key = draft_upto(drafter, state.cache, state.pending, state.key, temperature, g,
                                           config=config, mode=draft_mode, width=gamma, sampling=sampling, top_p=top_p)
        return finish(state.replace(cache=cache, key=key), drafts, q, drafted=g)

    state = jax.lax.while_loop(lambda s: running(s) & (chosen(s) > 0), adaptive_cycle, state)
    return jax.lax.while_loop(running, fixed_cycle(0), state)


@partial(jax.jit, static_argnames=DECODE_STATIC, donate_argnames=("cache",))
def decode_jit(params, cache, first, key, temperature, replay_trace, draft_params=None, adaptive=None, **static):
    """`decode` compiled alone: (GenerationResult, the final cache). The cache is donated and the
    loop works in its buffers (returned as the final cache), so a cache of most of the device's
    memory is not copied. Long-context speed runs time this over a cache built directly instead of
    prefilled (scripts/bench_long_context.py); research code can continue from the returned cache."""
    state = decode_loop(params, cache, first, key, temperature, replay_trace, draft_params, adaptive, **static)
    return state.result(), state.cache


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


def generate(params: dict, prompts: jax.Array, prompt_lens: jax.Array, *, auto=None, adapt: bool = True,
             **settings) -> GenerationResult:
    """Generate up to `max_new_tokens` per row with QSpec (or plain decoding when `gamma=0`).

    prompts: [B, P] int32 right-padded token ids (see `pad_prompts`); prompt_lens: [B] lengths.
    Settings (keywords, see `prepare`): config, max_new_tokens, gamma=3, draft_mode="w4a4",
    verify_mode="w4a16", policy="greedy", temperature=1.0, top_p=1.0, seed=0, eos_ids=None,
    replay_trace=None, prefill_chunk=512, kv="bf16", kv_group=128, kv_window=256, draft_params=None
    (a second weight pytree for the drafts; default: the drafts share `params`; see `quantspec`),
    adaptive=None (a `policy.AdaptiveGamma`: each cycle drafts a gamma in 0..gamma chosen from the
    acceptance so far; `gamma="auto"` builds one).
    Compiled once per shapes and static settings; a second call with the same padded shapes does
    not recompile.

    gamma="auto": the draft and a gamma are chosen on the host before compiling by `auto` (a
    `policy.AutoGamma`; default: the current device's), from its cost table and acceptance estimates
    (`policy.py`); an explicit draft_mode restricts the choice to that draft. Gamma 0 (plain
    verify_mode decoding) when no setting is predicted to pay. Where a cost table priced a gamma > 0
    and `adapt` (default), the loop then re-chooses gamma in 0..that every cycle from the acceptance
    it sees (`policy.AdaptiveGamma`); adapt=False keeps the host's gamma fixed.
    Greedy output is plain W4A16's whatever gamma runs. The result's `policy` (and summary()) records
    the choice; `gamma_cycles` what ran; pass the result to `auto.update` to learn acceptance from it.
    """
    choice = None
    if isinstance(settings.get("gamma"), str) and settings["gamma"] == "auto":
        settings, choice = resolve_auto(prompts, prompt_lens, settings, auto, adapt=adapt)
    args, static = prepare(params, prompts, prompt_lens, **settings)
    result = generate_jit(*args, **static)
    return result if choice is None else result.replace(policy=choice)


QUANTSPEC_GAMMA = 3  # the CLI's fixed-gamma default; gamma="auto" prices only the w4a16 verifier


def quantspec(float_params: dict, int4_params: dict, prompts: jax.Array, prompt_lens: jax.Array,
              **settings) -> GenerationResult:
    """QuantSpec's own system: the bf16 (float-weight) model verifies on the INT8 view of the
    hierarchical KV cache, a W4A16 draft on the int4 weights drafts on its INT4 view.

    Holds both weight copies (about 1.25x the bf16 model's weight memory, against QSpec's one int4
    pytree). float_params and int4_params must be the same model (`quantize.quantize_params` of it;
    its rotation leaves the K/V the cache holds unchanged). `settings` as `generate`'s; defaults
    verify_mode="bf16", draft_mode="w4a16", kv="int8", gamma=3. Greedy output is plain greedy bf16
    decoding on the same cache kind, token for token.
    """
    if "draft_params" in settings:
        raise ValueError("quantspec takes the draft weights as int4_params, not draft_params")
    settings = {"verify_mode": "bf16", "draft_mode": "w4a16", "kv": "int8", "gamma": QUANTSPEC_GAMMA, **settings}
    return generate(float_params, prompts, prompt_lens, draft_params=int4_params, **settings)


def resolve_auto(prompts, prompt_lens, settings: dict, auto=None, *, adapt: bool = True):
    """`settings` with gamma="auto" replaced by the policy's integer gamma and draft (and, with
    `adapt`, the `adaptive` policy that lets the loop re-choose gamma each cycle, where a cost table priced a
    gamma > 0: gamma is then the largest candidate); returns (settings, policy.Choice). Needs the
    w4a16 verifier. A replay trace (speed runs) is replayed with each cycle's count clipped to its gamma."""
    from qspec_jax import policy as policy_lib

    settings = dict(settings)
    if settings.get("verify_mode", "w4a16") != "w4a16":
        raise ValueError("gamma='auto' chooses QSpec settings for the w4a16 verifier, not "
                         f"{settings['verify_mode']!r}")
    lens = np.asarray(prompt_lens)
    batch = int(np.shape(prompts)[0]) if np.ndim(prompts) == 2 else 0
    context = int(lens.max()) + int(settings.get("max_new_tokens", 0)) // 2 if lens.size else 0
    auto = auto if auto is not None else policy_lib.AutoGamma.for_device(kv=settings.get("kv", "bf16"))
    choice = policy_lib.resolve(auto, batch, context, settings.get("draft_mode"))
    adaptive = auto.adaptive(choice) if adapt else None
    if adaptive is not None:
        choice = dataclasses.replace(choice, adaptive=True)
        settings["adaptive"] = adaptive
    settings["gamma"] = choice.gamma
    settings["draft_mode"] = choice.draft or settings.get("draft_mode") or "w4a16"
    return settings, choice


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
    kv: str = "bf16",
    kv_group: int = 128,
    kv_window: int = 256,
    draft_params: Optional[dict] = None,
    adaptive: Optional[AdaptiveGamma] = None,
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
    kv: "bf16" or "int8" (QuantSpec's hierarchical cache, see the module docstring): keys quantized
    per channel over groups of `kv_group` tokens; a query reads its last D .. D + kv_group - 1 tokens
    (D = kv_group // 2) in full precision; needs gamma + 1 <= D and
    kv_window >= kv_group + D + gamma - 1 (qspec_jax/hierarchical_kv.py).
    draft_params: weights the drafts run `draft_mode` on (prefill and verify still run `verify_mode`
    on `params`); the same model (config and shapes), e.g. its int4 pytree beside float `params`.
    None (default): the drafts share `params` and the program is QSpec's single-pytree one.
    adaptive: a `policy.AdaptiveGamma` whose largest gamma is `gamma`: each cycle drafts the gamma in
    0..gamma it picks from the acceptance so far (verifying at width gamma + 1), and plain decoding
    takes over once it picks 0; None: every cycle drafts `gamma`. With policy "replay" each cycle's
    count is clipped to the gamma it drafted.
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
    if kv not in KV_CACHES:
        raise ValueError(f"unknown kv {kv!r}; expected one of {KV_CACHES}")
    if kv == "int8":  # on the host: a cycle's writes must fit the recent buffer
        check_cache(config, b, cache_length(p, max_new_tokens, gamma), headroom=int(gamma) + 1,
                           group=int(kv_group), window=int(kv_window))
    eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    args = (
        unstack_layers(params),  # per-layer buffers: the compiled loop reads weights where they lie
        jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32), jax.random.PRNGKey(seed),
        jnp.float32(temperature), replay_trace,
    )
    if draft_params is not None:  # a 7th argument only when given: the shared-pytree program is unchanged
        _check_draft_params(params, draft_params, config)
        args += (unstack_layers(draft_params),)
    if adaptive is not None:
        if not isinstance(adaptive, AdaptiveGamma):
            raise ValueError(f"adaptive must be a policy.AdaptiveGamma, got {type(adaptive).__name__}")
        if adaptive.max_gamma != gamma:
            raise ValueError(f"gamma ({gamma}) must be the adaptive policy's largest gamma ({adaptive.max_gamma})")
        args += (None,) * (7 - len(args)) + (adaptive.arrays(),)
    static = dict(
        config=config, max_new_tokens=int(max_new_tokens), gamma=int(gamma), draft_mode=draft_mode,
        verify_mode=verify_mode, policy=policy, top_p=float(top_p), eos_ids=eos, prefill_chunk=int(prefill_chunk),
        kv=kv, kv_group=int(kv_group) if kv == "int8" else 128, kv_window=int(kv_window) if kv == "int8" else 256,
    )
    return args, static


def _model_shape(params: dict, config: LlamaConfig) -> dict:
    """What the drafts and the verifier must agree on to share one KV cache: the embedding's shape,
    the layer count and each layer's K/V width (float or int4 weights, stacked or per layer, fused or not)."""
    layers = params.get("layers") if isinstance(params, dict) else None
    if layers is None or "embed" not in params:
        return {"structure": "not a model weight pytree (no 'embed' / 'layers')"}
    if isinstance(layers, (list, tuple)):
        n, first = len(layers), (layers[0] if layers else {})
    else:
        n, first = int(jax.tree_util.tree_leaves(layers)[0].shape[0]), layers

    def width(name):
        w = first.get(name)
        if isinstance(w, dict):  # quantized: packed [K//2, N] or Mosaic-layout w [N, K]
            return int(w["packed"].shape[-1] if "packed" in w else w["w"].shape[0])
        return None if w is None else int(w.shape[-1])

    kv = 2 * width("wk") if "wk" in first else (width("wqkv") or 0) - config.num_heads * config.head_dim
    return {"embed": tuple(np.shape(params["embed"])), "layers": n, "kv width": kv}


def _check_draft_params(params: dict, draft_params: dict, config: LlamaConfig) -> None:
    """Refuse draft weights that are not the verifier's model: they share its KV cache."""
    want = {"embed": (config.vocab_size, config.hidden_size), "layers": config.num_layers,
            "kv width": 2 * config.num_kv_heads * config.head_dim}
    for name, tree in (("params", params), ("draft_params", draft_params)):
        got = _model_shape(tree, config)
        if got != want:
            bad = ", ".join(f"{k} {got.get(k)} (config: {want.get(k)})" for k in sorted(set(got) | set(want))
                            if got.get(k) != want.get(k))
            raise ValueError(f"{name} do not match the config (drafts and verifier share one KV cache, so they "
                             f"must be the same model, e.g. its float and int4 weights): {bad}")


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
    if isinstance(gamma, str) and gamma == "auto":
        raise ValueError("gamma='auto' is resolved by `generate` (or `resolve_auto`) before `prepare`, which "
                         "takes the resolved integer")
    if not isinstance(gamma, (int, np.integer)) or isinstance(gamma, bool) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative integer or 'auto', got {gamma!r}")
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
