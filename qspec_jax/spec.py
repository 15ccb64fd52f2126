"""The generation spec: every static setting of a generation in one hashable value, its defaults and
its validation.

`GenerationSpec` is the single static argument of the compiled programs (`speculative.generate_jit`,
`speculative.decode_jit`): two requests with equal specs and equal array shapes share one program.
Its fields are checked when it is built; `validate` adds the checks that need the request's arrays
(prompts, weights, the adaptive gamma chooser). Nothing is checked inside the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from qspec_jax.acceptance import Greedy, Rule
from qspec_jax.config import LlamaConfig
from qspec_jax.hierarchical_kv import check_cache
from qspec_jax.model import MODES
from qspec_jax.policy import AdaptiveGamma

KV_CACHES = ("bf16", "int8")
# QuantSpec's hierarchical cache (kv="int8"): keys quantized per channel over groups of KV_GROUP tokens,
# a full-precision recent buffer of KV_WINDOW slots (qspec_jax/hierarchical_kv.py).
from qspec_jax.hierarchical_kv import KV_GROUP, KV_WINDOW  # noqa: E402  (one definition)


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """What a generation runs (static: hashable, compared by value).

    draft_mode drafts `gamma` tokens a cycle, verify_mode (w4a16: QSpec's verifier) checks them; gamma 0
    is plain verify_mode decoding. rule: the acceptance rule (`acceptance.Greedy()`, `Sampling(t, top_p)`).
    eos_ids: None -> the config's; () never stops early. prefill_chunk: prompts longer than this are
    prefilled that many positions at a time (0: one pass). kv: "bf16" or "int8" (QuantSpec's hierarchical
    cache: keys quantized per channel over groups of `kv_group` tokens; a query reads its last
    D .. D + kv_group - 1 tokens (D = kv_group // 2) in full precision; needs gamma + 1 <= D and
    kv_window >= kv_group + D + gamma - 1); with "bf16" group and window are ignored and held at their
    defaults, so they never split one program into two. adaptive: the loop re-chooses gamma in
    0..gamma every cycle (`policy.AdaptiveGamma`, passed as arrays). separate_draft: the drafts run on
    their own weight pytree (QuantSpec's int4 copy beside float verifier weights).
    """

    config: LlamaConfig
    max_new_tokens: int
    gamma: int = 3
    draft_mode: str = "w4a4"
    verify_mode: str = "w4a16"
    rule: Rule = Greedy()
    eos_ids: Optional[tuple] = None
    prefill_chunk: int = 512
    kv: str = "bf16"
    kv_group: int = KV_GROUP
    kv_window: int = KV_WINDOW
    adaptive: bool = False
    separate_draft: bool = False

    def __post_init__(self):
        if not isinstance(self.rule, Rule):
            raise ValueError(f"unknown rule {self.rule!r}; expected an acceptance rule, e.g. acceptance.Greedy() "
                             "or acceptance.Sampling(temperature, top_p)")
        for name in ("draft_mode", "verify_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {MODES}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.gamma, str) and self.gamma == "auto":
            raise ValueError("gamma='auto' is resolved by `generate` (or `resolve_auto`) before `prepare`, which "
                             "takes the resolved integer")
        if not _is_int(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be a non-negative integer or 'auto', got {self.gamma!r}")
        if not _is_int(self.prefill_chunk) or self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be a non-negative integer, got {self.prefill_chunk!r}")
        if self.kv not in KV_CACHES:
            raise ValueError(f"unknown kv {self.kv!r}; expected one of {KV_CACHES}")
        eos = self.config.eos_token_ids if self.eos_ids is None else self.eos_ids
        fixed = dict(max_new_tokens=int(self.max_new_tokens), gamma=int(self.gamma),
                     prefill_chunk=int(self.prefill_chunk), eos_ids=tuple(int(e) for e in eos),
                     kv_group=int(self.kv_group) if self.kv == "int8" else KV_GROUP,
                     kv_window=int(self.kv_window) if self.kv == "int8" else KV_WINDOW,
                     adaptive=bool(self.adaptive), separate_draft=bool(self.separate_draft))
        for name, value in fixed.items():
            object.__setattr__(self, name, value)

    def cache_length(self, prompt_len: int) -> int:
        return cache_length(prompt_len, self.max_new_tokens, self.gamma)


def cache_length(prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Slots a row needs: its prompt, its budget and the `gamma + 1` slack a last cycle may write."""
    return prompt_len + max_new_tokens + gamma + 1


def default(name: str):
    """The default of one `GenerationSpec` field (the single place each default is written)."""
    return GenerationSpec.__dataclass_fields__[name].default


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate(spec: GenerationSpec, params, prompts, prompt_lens, draft_params=None,
             adaptive: Optional[AdaptiveGamma] = None) -> tuple:
    """The checks that need the request's arrays, on the host, so bad input fails here with a clear
    message and never inside the loop. Returns the prompts' shape (batch, padded length)."""
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
    config = spec.config
    toks = np.asarray(prompts)
    if toks.min() < 0 or toks.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got [{toks.min()}, {toks.max()}]")
    longest = int(lens.max()) + spec.max_new_tokens
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({int(lens.max())} tokens) plus max_new_tokens ({spec.max_new_tokens}) = {longest} exceeds the "
            f"model's context of {config.max_position_embeddings} tokens"
        )
    spec.rule.check(shape[0])
    if spec.kv == "int8":  # a cycle's writes must fit the recent buffer
        check_cache(config, shape[0], spec.cache_length(shape[1]), headroom=spec.gamma + 1,
                           group=spec.kv_group, window=spec.kv_window)
    if spec.separate_draft != (draft_params is not None):
        raise ValueError(f"spec.separate_draft is {spec.separate_draft} but draft_params "
                         f"{'were' if draft_params is not None else 'were not'} given")
    if draft_params is not None:
        _check_draft_params(params, draft_params, config)
    if spec.adaptive != (adaptive is not None):
        raise ValueError(f"spec.adaptive is {spec.adaptive} but no policy.AdaptiveGamma was given"
                         if spec.adaptive else "an AdaptiveGamma was given for a spec with adaptive=False")
    if adaptive is not None:
        if not isinstance(adaptive, AdaptiveGamma):
            raise ValueError(f"adaptive must be a policy.AdaptiveGamma, got {type(adaptive).__name__}")
        if adaptive.max_gamma != spec.gamma:
            raise ValueError(f"gamma ({spec.gamma}) must be the adaptive policy's largest gamma ({adaptive.max_gamma})")
    return shape


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
