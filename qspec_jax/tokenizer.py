"""Tokenizers: built from GGUF metadata with the `tokenizers` library, or an HF directory's own files.

transformers' GGUF tokenizer path imports torch; this one does not (torch is a test-only dependency).
It also misses SmolLM2's pre-tokenizer (`tokenizer.ggml.pre = "smollm"`: every digit is split off
before the GPT-2 byte-level split, as llama.cpp and SmolLM2's own tokenizer.json do), so text with
whitespace before a digit tokenizes differently there.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from qspec_jax.config import PRESETS


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advice, and nothing else.

    We use transformers for tokenizers only, which need no torch (a test-only dependency here), so the
    notice is noise that reads like an error on every CLI run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# Set on transformers' library logger before any import of transformers (the notice is logged on that
# logger while `import transformers` runs, and the logger object outlives the import).
logging.getLogger("transformers").addFilter(_NoTorchNotice())

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) that split each digit off, then apply the GPT-2
# regex. The same rule appears in llama.cpp's vocab code for all of these.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def load_tokenizer(name_or_path: str):
    """A transformers `PreTrainedTokenizerFast` for a model name or path, or None if it has none.

    - "smollm2-135m" or a `.gguf` file: built from the GGUF's vocabulary, merges and chat template;
    - an HF directory: `AutoTokenizer.from_pretrained` on its own files (offline);
    - other presets (generated weights) and `save_params` directories: None (no tokenizer).
    """
    from qspec_jax import checkpoint

    name = os.fspath(name_or_path)
    if name == checkpoint.DEFAULT_MODEL:
        return gguf_tokenizer(checkpoint.smollm2_gguf_path())
    if name in PRESETS:
        return None
    if not os.path.exists(name):
        raise FileNotFoundError(f"no such file or directory (and not a preset): {name}")
    if os.path.isdir(name):
        if checkpoint.is_saved_params(name):
            return None
        if not any(os.path.isfile(os.path.join(name, f))
                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ValueError(f"{name}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{name}: cannot load its tokenizer ({e})") from None
    return gguf_tokenizer(name)


def gguf_tokenizer(path: str):
    """Build a `PreTrainedTokenizerFast` from a GGUF file's byte-level BPE tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from qspec_jax.checkpoint import read_gguf_metadata

    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    meta = read_gguf_metadata(path, keep_arrays=arrays)
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    if "tokenizer.ggml.tokens" not in meta or "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path}: GGUF has no tokenizer vocabulary or merges")
    if pre in _DIGIT_SPLIT_PRE:
        split = [pre_tokenizers.Digits(individual_digits=True)]
    elif pre in _GPT2_PRE:
        split = []
    else:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported "
                         f"(known: {', '.join(_DIGIT_SPLIT_PRE + _GPT2_PRE)})")

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # GPT-2 regex split with byte-to-unicode mapping; no prefix space (add_space_prefix is false).
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Control tokens (<|im_start|>, ...) and user-defined ones match whole in text, as in llama.cpp.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    def token(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )
