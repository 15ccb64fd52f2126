"""Token-choice math: temperature / top-p probabilities, sampling, and the two speculative acceptance
rules (greedy top-1 match, speculative sampling) that `acceptance.py`'s rule values call."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def probabilities(logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """Softmax of `logits / temperature` over the last axis, restricted to the top-p nucleus."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
    # Keep the smallest set of most likely tokens whose mass reaches top_p (the top token always).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_probs, 1.0), axis=-1, keepdims=True)
    kept = jnp.where(probs >= cutoff, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """Draw one token id per row from `probs: [..., V]`."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def greedy_accept(draft: jax.Array, target_logits: jax.Array, limit=None):
    """Top-1 acceptance (the QSpec paper's rule; `acceptance.Greedy`).

    draft: [B, g] drafted tokens; target_logits: [B, g+1, V] the verifier's logits at the g+1 positions.
    Returns (n_accepted [B], next_token [B]): the drafted prefix that matches the verifier's argmax,
    and the verifier's own token right after it (the correction, or a bonus token if all matched).
    limit (traced, <= g): only the first `limit` drafts are real; the rest are padding, never accepted.
    """
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    n_acc = jnp.sum(jnp.cumprod(draft == target[:, :-1], axis=1), axis=1).astype(jnp.int32)
    if limit is not None:
        n_acc = jnp.minimum(n_acc, limit)
    return n_acc, jnp.take_along_axis(target, n_acc[:, None], axis=1)[:, 0]


def speculative_accept(key: jax.Array, draft: jax.Array, q: jax.Array, p: jax.Array, limit=None):
    """Speculative sampling (Leviathan et al. 2023): output tokens are distributed exactly as under p.

    draft: [B, g] tokens sampled from the draft distributions q: [B, g, V]; p: [B, g+1, V] the
    verifier's distributions. Token j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the
    first rejection the next token is drawn from normalize(max(p_j - q_j, 0)); if all g are accepted
    it is drawn from p_g. Returns (n_accepted [B], next_token [B]). limit (traced, <= g): only the
    first `limit` drafts are real, as if g were `limit` (the padding is never accepted, and the token
    after `limit` accepted drafts is drawn from p_limit).
    """
    b, g = draft.shape
    k_accept, k_next = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :g], draft[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (b, g))
    accepted = u * q_d < p_d  # u < p/q without dividing by a zero q
    limit = g if limit is None else limit
    n_acc = jnp.sum(jnp.cumprod(accepted & (jnp.arange(g) < limit), axis=1), axis=1).astype(jnp.int32)
    pick = lambda a: jnp.take_along_axis(a, jnp.minimum(n_acc, a.shape[1] - 1)[:, None, None], axis=1)[:, 0]
    p_n = pick(p)
    # Past the last real draft (every one accepted) q counts as zero: the residual is p_n itself.
    q_n = jnp.where((n_acc < limit)[:, None], pick(q), 0.0)
    residual = jnp.maximum(p_n - q_n, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_n)
    return n_acc, sample(k_next, residual)
