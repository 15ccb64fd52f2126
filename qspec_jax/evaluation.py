"""Shared pieces of the evaluation and benchmark scripts: teacher-forced NLL and run metadata."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig
from qspec_jax.model import forward


def tokenize_texts(tok, texts: Sequence[str], max_len: int, bos: Optional[int]):
    """Right-padded int32 tokens [N, max_len] and a bool mask of real tokens (BOS first if given)."""
    tokens = np.zeros((len(texts), max_len), np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, text in enumerate(texts):
        ids = ([bos] if bos is not None else []) + list(tok(text, add_special_tokens=False)["input_ids"])
        ids = ids[:max_len]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


@partial(jax.jit, static_argnames=("config", "mode"))
def _nll_and_top1(params, tokens, *, config: LlamaConfig, mode: str):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = forward(params, tokens, pos, None, config=config, mode=mode)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits[:, :-1], axis=-1)


def next_token_nll(params, config: LlamaConfig, mode: str, tokens: np.ndarray, batch: int = 8):
    """Per-position NLL of the next token and the greedy prediction, each [N, T-1], in batches."""
    nll, top = [], []
    for i in range(0, len(tokens), batch):
        a, b = _nll_and_top1(params, jnp.asarray(tokens[i : i + batch]), config=config, mode=mode)
        nll.append(np.asarray(a))
        top.append(np.asarray(b))
    return np.concatenate(nll), np.concatenate(top)


def perplexity(nll: np.ndarray, mask: np.ndarray) -> float:
    """exp of the mean NLL over positions whose target token is real (mask[:, 1:])."""
    m = mask[:, 1:]
    return float(np.exp(nll[m].mean()))


def copy_bandwidth(nbytes: int = 2**30, iters: int = 20) -> float:
    """Device-to-device bandwidth (bytes read + written per second) of an elementwise pass, timed
    as one compiled loop: the HBM figure the benchmarks compare against."""
    a = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    run = jax.jit(lambda a: jax.lax.fori_loop(0, iters, lambda i, a: a + 1, a))
    run(a).block_until_ready()
    t0 = time.perf_counter()
    run(a).block_until_ready()
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def git_commit() -> Optional[str]:
    """HEAD of the repository holding this file, or None outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_metadata() -> dict:
    """Device, jax version, commit and host: what every result file records."""
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
        "commit": git_commit(), "machine": platform.machine(),
    }
