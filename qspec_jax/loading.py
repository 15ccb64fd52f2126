"""Loading a model for generation: float or int4 params (converted once, kept in the conversion cache),
the GPTQ calibration batch, and prompts encoded to token ids. The CLI and the scripts import this.

    config, params = load_params("smollm2-135m", quantized=True)

Conversions go to the conversion cache (`conversion_cache.resolve_cache_dir`: --cache-dir /
`cache_dir`, else $QSPEC_JAX_CACHE, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

CALIBRATION_TOKENS = 8192  # GPTQ calibration: 32 ShareGPT rows of 256 tokens
CALIBRATION_ROW = 256


def load_params(model: str, *, quantized: bool, group_size=None, rotate=True, dtype=None, cache_dir=None,
                calibration_tokens: int = CALIBRATION_TOKENS):
    """(config, params) for `model`: float, or the shared int4 pytree (converted once, then cached).

    calibration_tokens > 0: the int4 weights are rounded with GPTQ on that many tokens of ShareGPT
    text (conversations the evaluation scripts do not use), when the model has a tokenizer;
    0 or a model without one (generated presets): round to nearest.
    Either way q/k/v and gate/up come back fused (model.fuse_projections): fewer, wider matmuls.
    """
    from qspec_jax.model import fuse_projections

    config, params = _load_params(model, quantized=quantized, group_size=group_size, rotate=rotate,
                                  dtype=dtype, cache_dir=cache_dir, calibration_tokens=calibration_tokens)
    return config, fuse_projections(params)


def calibration_batch(model: str, config, n_tokens: int):
    """[n_tokens / 256, 256] token ids of ShareGPT calibration text, or None (no tokenizer / n = 0)."""
    from qspec_jax.datasets import sharegpt_calibration_texts
    from qspec_jax.gptq import calibration_tokens
    from qspec_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model) if n_tokens else None
    if tokenizer is None:
        return None
    rows = n_tokens // CALIBRATION_ROW
    return calibration_tokens(tokenizer, sharegpt_calibration_texts(4 * rows), rows, CALIBRATION_ROW,
                              config.bos_token_id)


def weight_rounding(calibration_tokens: int) -> str:
    """How the int4 weights were rounded, for result files."""
    if calibration_tokens:
        return f"gptq on {calibration_tokens} ShareGPT calibration tokens"
    return "round to nearest"


def check_conversion(model: str, *, group_size=None, calibration_tokens: int = 0):
    """Refuse settings an int4 conversion of `model` would fail on, before anything is converted:
    the group size against the model's input dims (read from its header), the calibration count."""
    from types import SimpleNamespace

    from qspec_jax import checkpoint, quantize

    if calibration_tokens < 0 or calibration_tokens % CALIBRATION_ROW:
        raise ValueError(f"calibration tokens must be a multiple of {CALIBRATION_ROW} (0: off), "
                         f"got {calibration_tokens}")
    config = checkpoint.load_config(model)
    if config is None:
        return
    if group_size is None:
        quantize.default_group_size(config)  # raises when none fits
        return
    shapes = checkpoint.param_shapes(config)["layers"]
    quantize._check_group_size(group_size, {"layers": {n: SimpleNamespace(shape=shapes[n])
                                                       for n in quantize.PROJECTIONS}})


def _load_params(model, *, quantized, group_size, rotate, dtype, cache_dir, calibration_tokens):
    import jax.numpy as jnp

    from qspec_jax import checkpoint, conversion_cache, quantize

    if not quantized:
        config, params = checkpoint.load_model(model, dtype=jnp.float32, cache_dir=cache_dir)
        return config, params if dtype is None else _cast_floats(params, dtype)
    source = checkpoint.model_source(model)
    name = os.path.basename(os.path.normpath(model))
    root = conversion_cache.resolve_cache_dir(cache_dir)
    announced = []

    def convert():
        with _stage("reading the weights", announced):
            config, params = checkpoint.load_model(model, dtype=jnp.float32, cache_dir=root)
        with _stage(f"tokenizing {calibration_tokens} calibration tokens", announced if calibration_tokens else []):
            calib = calibration_batch(model, config, calibration_tokens)
        how = "GPTQ" if calib is not None else "round to nearest"
        with _stage(f"quantizing {config.num_layers} layers to int4 ({how})", announced):
            return config, quantize.quantize_params(params, config, group_size=group_size, rotate=rotate,
                                                    dtype=jnp.float32, calibration=calib)

    if source is None:  # generated presets are cheaper to rebuild than to store
        config, qparams = convert()
        return config, _cast_floats(qparams, dtype or jnp.float32)
    check_conversion(model, group_size=group_size, calibration_tokens=calibration_tokens)
    # Only real weights are cached, and they have tokenizers: the name need not load one to know.
    entry_name, fields = cache_entry(model, source, root, group_size=group_size, rotate=rotate,
                                     calibration_tokens=calibration_tokens)

    def tell(entry):
        gptq = f" with GPTQ on {calibration_tokens} calibration tokens" if calibration_tokens else ""
        where = f"once; cached in {entry}" if entry else "not cached"
        print(f"converting {name} to int4{gptq} ({where}):", file=sys.stderr, flush=True)
        announced.append(True)

    config, qparams = conversion_cache.load_or_convert(root, entry_name, fields, convert, on_convert=tell)
    return config, _cast_floats(qparams, dtype or jnp.float32)


def cache_entry(model: str, source: str, root: str, *, group_size, rotate: bool, calibration_tokens: int):
    """(entry name, key fields) of the int4 conversion of `model` (read from `source`) in the cache
    `root`: every setting is in the key, the number of calibration tokens included."""
    from qspec_jax import conversion_cache

    name = os.path.basename(os.path.normpath(model))
    rounding = f"-gptq{calibration_tokens}" if calibration_tokens else ""
    entry_name = f"{name}-int4-g{group_size or 'auto'}-{'rot' if rotate else 'norot'}{rounding}"
    calibration = {"tokens": calibration_tokens, "row": CALIBRATION_ROW} if calibration_tokens else None
    return entry_name, conversion_cache.int4_fields(source, root, group_size=group_size, rotate=rotate,
                                                    calibration=calibration)


@contextlib.contextmanager
def _stage(text: str, announced: list):
    """With a conversion announced: "  text ..." on stderr, and "  text: N s" once it is done."""
    if not announced:
        yield
        return
    print(f"  {text} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"  {text}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _cast_floats(tree, dtype):
    """Cast floating leaves except quantization scales, which stay f32."""
    import jax
    import jax.numpy as jnp

    def cast(path, x):
        last = getattr(path[-1], "key", None)
        if jnp.issubdtype(x.dtype, jnp.floating) and last != "scales":
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, tree)


def encode_prompts(tokenizer, prompts, chat: bool):
    """Token ids of each prompt (through the chat template when `chat` and the tokenizer has one).

    transformers' "sequence length is longer than the maximum" warning is held back: a prompt too
    long for the model gets the generation's own error instead."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (a checkpoint saved by qspec_jax keeps none); for text "
                         "use smollm2-135m, an HF Llama directory or a .gguf file")
    out = []
    with _quiet_logger("transformers.tokenization_utils_base"):
        for p in prompts:
            if chat and getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer.encode(p)
            out.append([int(t) for t in ids])
    return out


@contextlib.contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
