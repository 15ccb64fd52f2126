"""QSpec: draft in W4A4 (or W4A8), verify in W4A16, one weight pytree, one KV cache, one program.

One cycle, for every row at once (`cycle`, below; each step a module-level function over the named
loop state `LoopState`, testable alone):
  1. `draft`: gamma draft steps in the draft mode, each writing its K/V at the row's next slot;
  2. `verify`: one forward in the verify mode over the pending token and the drafts, overwriting
     those same slots with the verifier's K/V;
  3. `accept`: the acceptance rule (`acceptance.Greedy`, `acceptance.Sampling`) keeps the longest
     drafted prefix it agrees with, plus the verifier's own next token;
  4. `advance`: emit the kept tokens, cut at EOS and the budget, count. The cache's after-accept
     bookkeeping (`cache.flush`) opens the next cycle, and follows the last.
The whole generation (prefill, then a `lax.while_loop` over cycles) is one jitted function,
`generate_jit`, whose single static argument is a `spec.GenerationSpec`. With gamma 0 there are no
drafts and a cycle is one plain decode step in the verify mode: that is how the autoregressive
baselines (bf16, w4a16, w4a4, w4a8) run, through the same loop.

KV cache (`spec.kv`): "bf16" (`KVCache`), or "int8", QuantSpec's hierarchical cache
(`HierarchicalKVCache`: two 4-bit planes + a full-precision recent buffer per layer). With "int8" the
prompt is prefilled with plain causal attention and then quantized, the drafts read the INT4 view
(upper plane), the verify pass (and gamma=0 plain decoding) the INT8 view, and the cache is flushed
after each acceptance (before the next cycle's reads), so only accepted tokens are quantized. What a
query reads from it depends on its position only (planes below a cut c(p), the buffer from there), so
greedy QSpec on the int8 cache equals plain greedy decoding on the int8 cache token for token.

Rows are right-padded; each row keeps its own length, accepts its own count and stops on EOS or
its token budget, after which it is masked.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qspec_jax.hierarchical_kv import HierarchicalKVCache
from qspec_jax.kv_cache import KVCache
from qspec_jax.model import forward, unstack_layers
from qspec_jax.policy import AdaptiveGamma, pick_gamma
from qspec_jax.spec import GenerationSpec, cache_length, default, validate

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
    what a benchmark's replay rule replays (scripts/replay.py);
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
    def start(cls, cache, first, key, spec: GenerationSpec) -> "LoopState":
        """The state after prefill: `first` [B] emitted and pending, `cache.lengths` = prompt lengths."""
        b, n, g = first.shape[0], spec.max_new_tokens, spec.gamma
        n_out = jnp.ones((b,), jnp.int32)
        return cls(
            cache=cache, pending=first, n_out=n_out, key=key, step=jnp.int32(0),
            out=jnp.full((b, n + g + 1), -1, jnp.int32).at[:, 0].set(first),
            done=is_eos(first, spec.eos_ids) | (n_out >= n),
            accepted_at=jnp.zeros((b, g), jnp.int32), reached_at=jnp.zeros((b, g), jnp.int32),
            gamma_cycles=jnp.zeros((b, g + 1), jnp.int32), trace=jnp.full((b, n), -1, jnp.int32),
        )

    def running(self, spec: GenerationSpec) -> jax.Array:
        """The loop's condition: some row is still active (and a cycle is left in `trace`)."""
        return jnp.any(~self.done) & (self.step < spec.max_new_tokens)

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


class Drafts(NamedTuple):
    """A cycle's drafts: tokens [B, width] int32, q [B, width, V] their distributions (only where the
    rule keeps them, else None), count: how many were drafted (an int equal to width, or a traced
    scalar <= width in an adaptive cycle, the entries from `count` on then padding, never accepted)."""

    tokens: jax.Array
    q: Optional[jax.Array]
    count: Union[int, jax.Array]


class Verdict(NamedTuple):
    """The rule's decision per row: n_accepted [B] drafts kept, next [B] the verifier's token after them."""

    n_accepted: jax.Array
    next: jax.Array


# --------------------------------------------------------------------------------------------------
# The cycle


def flushed(state: LoopState, spec: GenerationSpec) -> LoopState:
    """The cache's bookkeeping after acceptance has set its lengths (int8: quantize accepted groups,
    retire the buffer's oldest; bf16: nothing)."""
    return state.replace(cache=state.cache.flush(spec.gamma + 1))


def cycle(state: LoopState, params, drafter, gamma, spec: GenerationSpec) -> LoopState:
    """flush -> draft -> verify -> accept -> advance. gamma: an int (fixed), or a traced scalar in
    0..spec.gamma (an adaptive cycle). `drafter`: the drafts' weights (`params` unless separate).

    The previous cycle's flush runs first (a prefilled cache is already flushed; `decode_loop`
    flushes after its last cycle): flushing after this cycle's attention read the planes made XLA
    copy a layer's planes every cycle, in the conditional's branches and the loop body, to order
    the update after the reads (the compiled program of tests/test_hierarchical_kv.py)."""
    state = flushed(state, spec)
    drafts, state = draft(drafter, state, gamma, spec)
    logits, state = verify(params, state, drafts, spec)
    verdict, state = accept(state, drafts, logits, spec)
    return advance(state, drafts, verdict, spec)


def decode_loop(params, cache, first, key, draft_params=None, adaptive=None, *, spec: GenerationSpec) -> LoopState:
    """Cycles in a `lax.while_loop` until every row is done; returns the final `LoopState`.

    Fixed gamma: every cycle drafts spec.gamma. Adaptive (`adaptive`: `policy.AdaptiveGamma.arrays()`):
    a first loop runs while `policy.pick_gamma` over the counts so far picks some g in 1..gamma; it
    drafts g, verifies at the full width gamma + 1 and accepts at most g (no conditional: XLA would
    copy the cache that a branch updates in place). Once it picks 0, plain decoding runs to the end."""
    state = LoopState.start(cache, first, key, spec)
    drafter = draft_params if spec.separate_draft else params  # QuantSpec: its own int4 weights
    if not spec.adaptive:
        state = jax.lax.while_loop(lambda s: s.running(spec), lambda s: cycle(s, params, drafter, spec.gamma, spec), state)
        return flushed(state, spec)
    chosen = lambda s: pick_gamma(adaptive, s.accepted_at, s.reached_at)
    state = jax.lax.while_loop(lambda s: s.running(spec) & (chosen(s) > 0),
                               lambda s: cycle(s, params, drafter, chosen(s), spec), state)
    state = jax.lax.while_loop(lambda s: s.running(spec), lambda s: cycle(s, params, drafter, 0, spec), state)
    return flushed(state, spec)


# --------------------------------------------------------------------------------------------------
# The cycle's steps


def draft(params, state: LoopState, gamma, spec: GenerationSpec):
    """`gamma` draft steps from each row's pending token, each writing its K/V at the row's next slot.
    Returns (Drafts, state with the cache and key they moved on). A fixed gamma is a scan of that many
    steps; a traced one (<= spec.gamma) a loop of that many iterations into buffers of width spec.gamma."""
    if not isinstance(gamma, int):
        return _draft_upto(params, state, gamma, spec)
    if gamma == 0:
        return Drafts(jnp.zeros((state.pending.shape[0], 0), jnp.int32), None, 0), state

    def scan_step(carry, j):
        cache, tok, key = carry
        nxt, q, cache, key = draft_step(params, cache, tok, key, j, spec)
        return (cache, nxt, key), (nxt, q)

    (cache, _, key), (tokens, q) = jax.lax.scan(scan_step, (state.cache, state.pending, state.key), jnp.arange(gamma))
    q = None if q is None else jnp.swapaxes(q, 0, 1)
    return Drafts(tokens.T, q, gamma), state.replace(cache=cache, key=key)


def _draft_upto(params, state: LoopState, gamma, spec: GenerationSpec):
    """`draft` for a traced gamma <= spec.gamma (an adaptive cycle): a loop of that many steps; the
    entries from `gamma` on stay zeros and are never accepted."""
    b, width = state.pending.shape[0], spec.gamma
    tokens = jnp.zeros((b, width), jnp.int32)
    q = jnp.zeros((b, width, spec.config.vocab_size), jnp.float32) if spec.rule.keeps_q else None

    def loop_step(j, carry):
        cache, tok, key, tokens, q = carry
        nxt, qj, cache, key = draft_step(params, cache, tok, key, j, spec)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], j, axis=1)
        if q is not None:
            q = jax.lax.dynamic_update_slice_in_dim(q, qj[:, None], j, axis=1)
        return cache, nxt, key, tokens, q

    cache, _, key, tokens, q = jax.lax.fori_loop(0, gamma, loop_step, (state.cache, state.pending, state.key, tokens, q))
    return Drafts(tokens, q, gamma), state.replace(cache=cache, key=key)


def draft_step(params, cache, tok, key, j, spec: GenerationSpec):
    """One draft step: token `tok` [B] at each row's slot lengths + j, on the cache's draft view (the
    INT4 view of a hierarchical cache). Returns (next [B], q [B, V] or None, cache, key)."""
    logits, cache = forward(params, tok[:, None], (cache.lengths + j)[:, None], cache, config=spec.config,
                            mode=spec.draft_mode, kv_view="int4")  # ignored by a bf16 cache
    key, k = jax.random.split(key)
    nxt, q = spec.rule.draft(k, logits[:, 0])
    return nxt, q, cache, key


def verify(params, state: LoopState, drafts: Drafts, spec: GenerationSpec):
    """One forward in the verify mode over each row's pending token and its drafts at the row's next
    width + 1 slots (overwriting the drafts' K/V), on the cache's verify view (INT8 for a hierarchical
    cache). Returns (logits [B, width + 1, V], state with that cache)."""
    block = jnp.concatenate([state.pending[:, None], drafts.tokens], axis=1)
    positions = state.cache.lengths[:, None] + jnp.arange(block.shape[1], dtype=jnp.int32)
    logits, cache = forward(params, block, positions, state.cache, config=spec.config, mode=spec.verify_mode,
                            kv_view="int8")
    return logits, state.replace(cache=cache)


def accept(state: LoopState, drafts: Drafts, logits, spec: GenerationSpec):
    """The rule's verdict on the drafts given the verifier's logits [B, width + 1, V]: (Verdict, state
    with its key moved on). An adaptive cycle's padding past `drafts.count` is never accepted."""
    key, k = jax.random.split(state.key)
    limit = None if isinstance(drafts.count, int) else drafts.count
    cycles = jnp.sum(state.gamma_cycles, axis=1)
    n_acc, nxt = spec.rule.accept(k, drafts.tokens, drafts.q, logits, limit=limit, cycles=cycles)
    return Verdict(n_acc, nxt), state.replace(key=key)


def advance(state: LoopState, drafts: Drafts, verdict: Verdict, spec: GenerationSpec) -> LoopState:
    """Bookkeeping after acceptance: each active row emits its accepted drafts and then the verifier's
    token, cut after an EOS and at its budget; its cache length grows by what it emitted, so a finished
    row's later (masked) writes stay inside the `cache_length` slots. `drafts` may be narrower than the
    state's counters (plain decoding after an adaptive loop)."""
    n_acc, nxt, g, n = verdict.n_accepted, verdict.next, drafts.count, spec.max_new_tokens
    active = ~state.done
    idx = jnp.arange(drafts.tokens.shape[1] + 1)
    emitted = jnp.where(idx < n_acc[:, None], jnp.pad(drafts.tokens, ((0, 0), (0, 1))), nxt[:, None])  # [B, width + 1]
    stops = is_eos(emitted, spec.eos_ids) & (idx <= n_acc[:, None])
    hit_eos = jnp.any(stops, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(stops, axis=1) + 1, n_acc + 1)
    count = jnp.where(active, jnp.minimum(count, n - state.n_out), 0)
    n_out = state.n_out + count
    at = jnp.where(active, state.n_out, n)  # a finished row writes -1s into the overhang
    pos = jnp.arange(state.accepted_at.shape[1])  # draft positions the counters hold
    return state.replace(
        cache=state.cache.replace(lengths=state.cache.lengths + count),
        pending=jnp.where(active, nxt, state.pending),
        out=_write_rows(state.out, jnp.where(active[:, None], emitted, -1), at),
        n_out=n_out,
        done=state.done | (active & (hit_eos | (n_out >= n))),
        step=state.step + 1,
        accepted_at=state.accepted_at + (active[:, None] & (pos < n_acc[:, None])),
        reached_at=state.reached_at + (active[:, None] & (pos < g) & (pos <= n_acc[:, None])),
        gamma_cycles=state.gamma_cycles.at[:, g].add(active.astype(jnp.int32)),
        trace=state.trace.at[:, state.step].set(jnp.where(active, n_acc, -1)),
    )


def _write_rows(buf, block, starts):
    """buf[b, starts[b] : starts[b] + block.shape[1]] = block[b], per row."""
    return jax.vmap(lambda row, blk, s: jax.lax.dynamic_update_slice(row, blk, (s,)))(buf, block, starts)


def is_eos(tokens: jax.Array, eos_ids: tuple) -> jax.Array:
    """Boolean mask of `tokens` that are in the static `eos_ids` (all False when it is empty)."""
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


# --------------------------------------------------------------------------------------------------
# Prefill and the compiled programs

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



@partial(jax.jit, static_argnames="spec")
def generate_jit(params, prompts, prompt_lens, key, draft_params=None, adaptive=None, *,
                 spec: GenerationSpec) -> GenerationResult:
    """The compiled program behind `generate` (inputs already validated by `prepare`, which returns
    these arguments): prefill in the verify mode, the first token by the rule, then `decode`.
    draft_params: the drafts' own weights (spec.separate_draft), else None; adaptive:
    `policy.AdaptiveGamma.arrays()` (spec.adaptive), else None. None is an empty pytree: a program
    without them has no such inputs."""
    b, p = prompts.shape
    chunk, dtype = spec.prefill_chunk, params["embed"].dtype
    if spec.kv == "int8":  # prefill into a bf16 cache of the prompt's slots, then quantize it
        cache = KVCache.create(spec.config, b, -(-p // chunk) * chunk if 0 < chunk < p else p, dtype)
    else:
        cache = KVCache.create(spec.config, b, bf16_cache_slots(p, spec.max_new_tokens, spec.gamma, chunk), dtype)
    logits, cache = prefill(params, prompts, prompt_lens, cache, config=spec.config, mode=spec.verify_mode, chunk=chunk)
    if spec.kv == "int8":
        cache = HierarchicalKVCache.from_prompt(spec.config, cache.k, cache.v, prompt_lens, spec.cache_length(p),
                                                headroom=spec.gamma + 1, group=spec.kv_group, window=spec.kv_window,
                                                dtype=dtype)
    key, k0 = jax.random.split(key)
    first = spec.rule.pick(k0, logits)
    return decode(params, cache.replace(lengths=prompt_lens), first, key, draft_params, adaptive, spec=spec)


def decode(params, cache, first, key, draft_params=None, adaptive=None, *, spec: GenerationSpec) -> GenerationResult:
    """The decode half of a generation: cycles from a prefilled cache until every row is done.

    params (and draft_params) as `prepare` returns them (per-layer buffers, `model.unstack_layers`);
    cache: a `KVCache` or `HierarchicalKVCache` whose `lengths` are the rows' prompt lengths, with
    room for `spec.cache_length(prompt)` slots; first: [B] the token each row emitted from its prompt
    (the first of `max_new_tokens`); draft_params / adaptive as `generate_jit` takes them.
    `generate_jit` is `prefill` followed by this; `decode_jit` compiles it alone (see there).
    """
    return decode_loop(params, cache, first, key, draft_params, adaptive, spec=spec).result()


@partial(jax.jit, static_argnames="spec", donate_argnames=("cache",))
def decode_jit(params, cache, first, key, draft_params=None, adaptive=None, *, spec: GenerationSpec):
    """`decode` compiled alone: (GenerationResult, the final cache). The cache is donated and the
    loop works in its buffers (returned as the final cache), so a cache of most of the device's
    memory is not copied. Long-context speed runs time this over a cache built directly instead of
    prefilled (scripts/bench_long_context.py); research code can continue from the returned cache."""
    state = decode_loop(params, cache, first, key, draft_params, adaptive, spec=spec)
    return state.result(), state.cache


# --------------------------------------------------------------------------------------------------
# The host API


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
    Settings (keywords): the fields of `spec.GenerationSpec` (config, max_new_tokens, gamma=3,
    draft_mode="w4a4", verify_mode="w4a16", rule=acceptance.Greedy() or acceptance.Sampling(temperature,
    top_p), eos_ids=None, prefill_chunk=512, kv="bf16", kv_group, kv_window) and `prepare`'s seed=0,
    draft_params=None (a second weight pytree for the drafts; see `quantspec`) and adaptive=None (a
    `policy.AdaptiveGamma`: each cycle drafts a gamma in 0..gamma chosen from the acceptance so far).
    Compiled once per shapes and spec; a second call with the same padded shapes does not recompile.

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
QUANTSPEC = dict(verify_mode="bf16", draft_mode="w4a16", kv="int8", gamma=QUANTSPEC_GAMMA)  # `quantspec`'s defaults


def quantspec(float_params: dict, int4_params: dict, prompts: jax.Array, prompt_lens: jax.Array,
              **settings) -> GenerationResult:
    """QuantSpec's own system: the bf16 (float-weight) model verifies on the INT8 view of the
    hierarchical KV cache, a W4A16 draft on the int4 weights drafts on its INT4 view.

    Holds both weight copies (about 1.25x the bf16 model's weight memory, against QSpec's one int4
    pytree). float_params and int4_params must be the same model (`quantize.quantize_params` of it;
    its rotation leaves the K/V the cache holds unchanged). `settings` as `generate`'s; defaults
    QUANTSPEC (verify_mode="bf16", draft_mode="w4a16", kv="int8", gamma=3). Greedy output is plain
    greedy bf16 decoding on the same cache kind, token for token.
    """
    if "draft_params" in settings:
        raise ValueError("quantspec takes the draft weights as int4_params, not draft_params")
    return generate(float_params, prompts, prompt_lens, draft_params=int4_params, **{**QUANTSPEC, **settings})


def resolve_auto(prompts, prompt_lens, settings: dict, auto=None, *, adapt: bool = True):
    """`settings` with gamma="auto" replaced by the gamma policy's integer gamma and draft (and, with
    `adapt`, the `adaptive` chooser that lets the loop re-choose gamma each cycle, where a cost table
    priced a gamma > 0: gamma is then the largest candidate); returns (settings, policy.Choice). Needs
    the w4a16 verifier. A replayed rule (speed runs) has each cycle's count clipped to its gamma."""
    from qspec_jax import policy as policy_lib

    settings = dict(settings)
    if settings.get("verify_mode", default("verify_mode")) != "w4a16":
        raise ValueError("gamma='auto' chooses QSpec settings for the w4a16 verifier, not "
                         f"{settings['verify_mode']!r}")
    lens = np.asarray(prompt_lens)
    batch = int(np.shape(prompts)[0]) if np.ndim(prompts) == 2 else 0
    context = int(lens.max()) + int(settings.get("max_new_tokens", 0)) // 2 if lens.size else 0
    auto = auto if auto is not None else policy_lib.AutoGamma.for_device(kv=settings.get("kv", default("kv")))
    choice = policy_lib.resolve(auto, batch, context, settings.get("draft_mode"))
    adaptive = auto.adaptive(choice) if adapt else None
    if adaptive is not None:
        choice = dataclasses.replace(choice, adaptive=True)
        settings["adaptive"] = adaptive
    settings["gamma"] = choice.gamma
    settings["draft_mode"] = choice.draft or settings.get("draft_mode") or "w4a16"
    return settings, choice


def prepare(params: dict, prompts: jax.Array, prompt_lens: jax.Array, *, seed: int = 0,
            draft_params: Optional[dict] = None, adaptive: Optional[AdaptiveGamma] = None, **fields):
    """Validate a generation request; return `(args, {"spec": GenerationSpec})` for `generate_jit`.

    Split out so callers can compile ahead of time (`generate_jit.lower(*args, **static).compile()`,
    then `compiled(*args)`) and time compilation and generation separately. `fields`: the spec's
    (see `spec.GenerationSpec`); seed: the PRNG seed of sampling rules; draft_params: weights the drafts
    run `draft_mode` on (prefill and verify still run `verify_mode` on `params`), the same model, e.g.
    its int4 pytree beside float `params`; None: the drafts share `params` (QSpec's single pytree).
    adaptive: a `policy.AdaptiveGamma` whose largest gamma is `gamma` (each cycle drafts the gamma in
    0..gamma it picks, verifying at width gamma + 1); None: every cycle drafts `gamma`.
    args: (params, prompts, prompt_lens, key, draft_params or None, adaptive arrays or None).
    """
    spec = GenerationSpec(**fields, adaptive=adaptive is not None, separate_draft=draft_params is not None)
    validate(spec, params, prompts, prompt_lens, draft_params, adaptive)
    args = (
        unstack_layers(params),  # per-layer buffers: the compiled loop reads weights where they lie
        jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32), jax.random.PRNGKey(seed),
        None if draft_params is None else unstack_layers(draft_params),
        None if adaptive is None else adaptive.arrays(),
    )
    return args, {"spec": spec}
