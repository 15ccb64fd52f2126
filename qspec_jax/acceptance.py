"""Acceptance rules: how a cycle picks tokens from logits and how many drafts it keeps.

A rule is a small frozen dataclass (hashable: it is part of the static `spec.GenerationSpec`, so the
compiled loop is specialised to it and never branches on it at run time). The loop calls three methods:

  pick(key, logits [B, V]) -> [B]                      the verifier's token at one position
                                                       (the token after the prompt);
  draft(key, logits [B, V]) -> (token [B], q)          a draft step's token and, where the rule
                                                       needs it to accept, the distribution q [B, V]
                                                       it was drawn from (else None);
  accept(key, drafts [B, g], q [B, g, V] | None, logits [B, g+1, V], limit, cycles)
      -> (n_accepted [B], next [B])                    the drafted prefix kept and the verifier's own
                                                       next token (a correction, or a bonus token).

limit (traced, <= g, or None): only the first `limit` drafts are real (an adaptive cycle); the rest are
never accepted. cycles [B]: cycles each row has run so far (read only by a replayed rule).
`check(batch)` is called on the host before compiling; `keeps_q` says whether `draft` returns q.

Greedy and Sampling are the two real rules. A benchmark-only rule that replays recorded acceptance
counts lives beside the benchmarks (scripts/replay.py): the loop knows nothing of it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from qspec_jax.sampling import greedy_accept, probabilities, sample, speculative_accept


class Rule(abc.ABC):
    """The interface every acceptance rule implements (see the module docstring)."""

    keeps_q: ClassVar[bool] = False  # `draft` returns the draft distribution q, which `accept` reads

    def check(self, batch: int) -> None:
        """Host-side check against the request's batch size (raise ValueError); nothing by default."""

    def pick(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draft(self, key: jax.Array, logits: jax.Array):
        return self.pick(key, logits), None

    @abc.abstractmethod
    def accept(self, key, drafts, q, logits, limit=None, cycles=None):
        """(n_accepted [B], next [B]): see the module docstring."""


@dataclasses.dataclass(frozen=True)
class Greedy(Rule):
    """Top-1 match (the QSpec paper's rule): output equals the verifier's greedy decoding."""

    def accept(self, key, drafts, q, logits, limit=None, cycles=None):
        return greedy_accept(drafts, logits, limit)


@dataclasses.dataclass(frozen=True)
class Sampling(Rule):
    """Speculative sampling (Leviathan et al.) at `temperature` and `top_p`: output is distributed
    exactly as the verifier's own sampling at those settings. Drafts are sampled at the same settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    keeps_q: ClassVar[bool] = True

    def __post_init__(self):
        t, p = float(self.temperature), float(self.top_p)
        if not (t > 0 and math.isfinite(t)):  # nan and inf fail here too
            raise ValueError(f"sampling needs temperature > 0 and finite, got {self.temperature}")
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)

    def probs(self, logits: jax.Array) -> jax.Array:
        return probabilities(logits, self.temperature, self.top_p)

    def pick(self, key, logits):
        return sample(key, self.probs(logits))

    def draft(self, key, logits):
        q = self.probs(logits)
        return sample(key, q), q

    def accept(self, key, drafts, q, logits, limit=None, cycles=None):
        p = self.probs(logits)
        if drafts.shape[1] == 0:  # plain decoding: sample the one position
            return jnp.zeros(drafts.shape[:1], jnp.int32), sample(key, p[:, 0])
        return speculative_accept(key, drafts, q, p, limit)


def accept_at(n_accepted: jax.Array, logits: jax.Array):
    """(n_accepted, the verifier's argmax right after them): the verdict of a rule that fixes the
    count some other way (e.g. a replayed trace) and then continues greedily."""
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return n_accepted, jnp.take_along_axis(target, n_accepted[:, None], axis=1)[:, 0]
