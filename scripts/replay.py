"""Replayed acceptance, for speed runs only: an acceptance rule that accepts recorded counts.

Speed depends on shapes, not weight values, so speed runs use generated weights, on which acceptance
is meaningless; they replay acceptance traces recorded on the real model instead (the QSpec paper does
the same), and say so in their output. The tokens such a run emits are meaningless.

`Replay` implements `qspec_jax.acceptance.Rule`; the loop does not know it exists. Its trace is part
of the rule's value (static: a program is compiled per trace; a trace is a few KB).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qspec_jax.acceptance import Rule, accept_at


@dataclasses.dataclass(frozen=True)
class Replay(Rule):
    """Accept exactly the recorded counts: row b's cycle c accepts trace[b][c % len_b] drafts (len_b:
    the row's counts before its -1 padding, cycled), clipped to the drafts the cycle made, then takes
    the verifier's argmax after them. trace: a `GenerationResult.trace` ([B, C], -1 past a row's end)."""

    trace: tuple  # rows of ints (hashable); build with `Replay.of(array)`

    @classmethod
    def of(cls, trace) -> "Replay":
        t = np.asarray(trace)
        if t.ndim != 2 or t.shape[1] < 1 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"a replay trace must be a [batch, cycles] integer array, got shape {t.shape}")
        return cls(tuple(tuple(int(x) for x in row) for row in t))

    def check(self, batch: int) -> None:
        if len(self.trace) != batch:
            raise ValueError(f"replay trace must be [batch={batch}, cycles], got {len(self.trace)} rows")

    def accept(self, key, drafts, q, logits, limit=None, cycles=None):
        trace = jnp.asarray(self.trace, jnp.int32)
        length = jnp.maximum(jnp.sum(trace >= 0, axis=1), 1)
        forced = jnp.take_along_axis(trace, (cycles % length)[:, None], axis=1)[:, 0]
        return accept_at(jnp.clip(forced, 0, drafts.shape[1] if limit is None else limit), logits)
