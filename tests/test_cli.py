"""`python -m qspec_jax.generate`: a real run on the default model and clear errors on bad input."""

import json

import pytest

from qspec_jax.generate import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_with_the_default_model(capsys, tmp_path, monkeypatch):
    from qspec_jax import speculative

    lowered = []
    real_lower = speculative.generate_jit.lower
    monkeypatch.setattr(speculative.generate_jit, "lower", lambda *a, **k: lowered.append(1) or real_lower(*a, **k))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    code, out, err = run_cli(capsys, "--prompt", "Name a color.", "--prompts-file", str(prompts),
                             "--max-new-tokens", "6", "--json", "--cache-dir", str(tmp_path / "ckpt"),
                             "--batch-size", "1",  # two batches of one padded shape: one compiled program
                             "--calibration-tokens", "512")  # GPTQ on two rows: the path, kept quick
    assert code == 0, err
    assert len(lowered) == 1, f"{len(lowered)} programs compiled for two batches of the same shape"
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Name a color.", "What is 2 + 2?"]
    for r in rows:
        assert 1 <= r["stats"]["new_tokens"] == len(r["tokens"]) <= 6
        assert r["stats"]["tokens_per_s"] > 0 and r["stats"]["seconds"] > 0
        assert r["stats"]["cycles"] >= 1 and 0 <= r["stats"]["accepted"] <= r["stats"]["drafted"]
        assert isinstance(r["text"], str)
    # The quantized pytree was cached for the next run.
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if "int4" in p.name] == ["smollm2-135m-int4-gauto-rot-gptq512"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "   "], "prompt 0 is empty"),
    ([], "no prompt given"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--prompt", "hi", "--model", "llama-9000"], "not a preset"),
    (["--prompt", "hi", "--gamma", "0"], "--gamma must be at least 1"),
    (["--prompt", "hi", "--max-new-tokens", "9000", "--calibration-tokens", "0"],  # RTN: a quicker conversion
     "exceeds the model's context"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "prompts file not found"),
    (["--prompt", "hi", "--calibration-tokens", "100"], "must be a multiple of 256"),
])
def test_bad_input_gives_a_clear_error(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, "--cache-dir", str(tmp_path / "ckpt"))
    assert code == 2
    assert message in err and "Traceback" not in err


def test_unknown_kernels_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "hi", "--kernels", "cuda"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err


def test_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    code, _, err = run_cli(capsys, "--prompt", "hi", "--model", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and err.startswith("error: ")


# --- issue 13: the CLI refuses early and explains; the README matches the code ------------------

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from qspec_jax import generate  # noqa: E402
from qspec_jax.generate import parse_args, read_prompts, validate_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme(path="README.md"):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the CLI starts building or loading weights."""
    from qspec_jax import checkpoint

    def refuse(*a, **k):
        raise AssertionError("the CLI loaded weights before refusing")

    monkeypatch.setattr(checkpoint, "load_model", refuse)
    monkeypatch.setattr(checkpoint, "random_params", refuse)


@pytest.mark.parametrize("preset", ["llama3-8b", "llama2-7b", "llama2-13b", "tiny"])
def test_size_presets_are_refused_at_once_with_their_purpose(capsys, tmp_path, no_weights, preset):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--model", preset, "--cache-dir", str(tmp_path))
    assert code == 2
    assert "size preset" in err and "no tokenizer" in err and "bench_throughput" in err


def test_gamma_is_capped(capsys, tmp_path, no_weights):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--gamma", "1000", "--cache-dir", str(tmp_path))
    assert code == 2 and f"at most {generate.MAX_GAMMA}" in err and "1000" in err
    validate_args(parse_args(["--gamma", str(generate.MAX_GAMMA)]))  # the cap itself is allowed


@pytest.mark.parametrize("argv", [
    ["--mode", "w4a16", "--gamma", "0"],
    ["--mode", "bf16", "--gamma", "1000"],
    ["--top-p", "0"],                      # greedy: top-p is not used
    ["--temperature", "0", "--top-p", "7"],
])
def test_options_a_mode_does_not_use_are_not_errors(argv):
    validate_args(parse_args(argv))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_temperature_must_be_a_finite_number(capsys, tmp_path, no_weights, value):
    """nan once ran greedy and inf sampled noise at "acceptance 1.00": both are refused."""
    code, _, err = run_cli(capsys, "--prompt", "hi", f"--temperature={value}", "--cache-dir", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --temperature must be a finite number >= 0") and value.lstrip("-") in err
    validate_args(parse_args(["--temperature", "1e-3"]))  # a small finite temperature stays allowed


def test_a_long_prompt_gets_no_transformers_warning(caplog, smollm2_tokenizer):
    """Encoding a prompt longer than the model's context logs nothing: the generation's own error
    follows. The same encode straight through transformers warns (the check can fail)."""
    from qspec_jax.loading import encode_prompts
    from qspec_jax.tokenizer import load_tokenizer

    long_text = "word " * (smollm2_tokenizer.model_max_length + 10)
    for chat in (False, True):
        caplog.clear()
        ids = encode_prompts(load_tokenizer("smollm2-135m"), [long_text], chat=chat)
        assert len(ids[0]) > smollm2_tokenizer.model_max_length and caplog.records == []
    load_tokenizer("smollm2-135m").encode(long_text)  # a fresh tokenizer: its warning is not spent yet
    assert "Token indices sequence length is longer" in caplog.text


def test_json_summary_holds_plain_numbers():
    """--json's batch summary and stats are plain Python numbers: no np.float64(...) in their repr."""
    import numpy as np

    summary = {"acceptance_rate": np.float64(0.5), "at": np.arange(3), "nested": {"n": np.int64(4)}, "none": None}
    plain = generate._plain(summary)
    assert plain == {"acceptance_rate": 0.5, "at": [0, 1, 2], "nested": {"n": 4}, "none": None}
    assert "np." not in repr(plain) and type(plain["nested"]["n"]) is int
    assert "np." in repr(summary)  # the check can fail


_INTERRUPTED = """
import sys, time
sys.path.insert(0, {root!r})
from qspec_jax import generate, quantize, tokenizer

class Tok:
    chat_template = None
    def encode(self, text): return [5, 6, 7]
    def decode(self, ids, skip_special_tokens=True): return ""

def slow(*a, **k):
    print("quantizing", file=sys.stderr, flush=True)
    time.sleep(600)

tokenizer.load_tokenizer = lambda model: Tok()
quantize.quantize_params = slow
sys.exit(generate.main(["--prompt", "hi", "--model", {path!r}, "--cache-dir", {cache!r}, "--calibration-tokens", "0"]))
"""


def test_ctrl_c_during_conversion_stops_at_once_with_one_line(tmp_path):
    """SIGINT while the conversion runs (here: a sleep standing in for a long compiled call): exit 130
    within seconds, one line, no traceback, and no lock file or tmp folder left in the cache."""
    import dataclasses
    import signal
    import time

    from conftest import TINY_HF_CONFIG, random_hf_weights
    from test_checkpoint import write_tiny_gguf

    config = dataclasses.replace(TINY_HF_CONFIG, rope_scaling=None)
    path, cache = str(tmp_path / "model.gguf"), str(tmp_path / "cache")
    write_tiny_gguf(path, config, random_hf_weights(config))
    code = _INTERRUPTED.format(root=ROOT, path=path, cache=cache)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.strip() == "quantizing":
            break
    else:
        proc.wait(30)
        pytest.fail(f"the conversion never started: {lines}")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130 and time.monotonic() - t0 < 10, rest
    tail = [line for line in rest.splitlines() if line.strip()]
    assert tail == ["interrupted (Ctrl-C)"], rest
    assert lines[0].startswith("converting model.gguf to int4 (once; cached in "), lines
    left = [os.path.relpath(os.path.join(r, n), cache) for r, ds, ns in os.walk(cache) for n in ns + ds]
    assert [f for f in left if not f.startswith("sources")] == [], left


def test_top_p_is_checked_when_sampling():
    with pytest.raises(ValueError, match="--top-p"):
        validate_args(parse_args(["--temperature", "0.7", "--top-p", "0"]))


def test_an_empty_prompts_file_is_named(capsys, tmp_path, no_weights):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    code, _, err = run_cli(capsys, "--prompts-file", str(path), "--cache-dir", str(tmp_path))
    assert code == 2 and str(path) in err and "has no prompts" in err and "no prompt given" not in err


def test_a_non_utf8_prompts_file_names_file_and_line(capsys, tmp_path, no_weights):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first prompt\ncaf\xe9 au lait\n")  # Latin-1
    code, _, err = run_cli(capsys, "--prompts-file", str(path), "--cache-dir", str(tmp_path))
    assert code == 2 and f"{path}:2" in err and "UTF-8" in err and "Traceback" not in err


def test_malformed_json_and_text_starting_with_a_brace_are_told_apart(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": "unclosed\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: .*not valid JSON"):
        read_prompts(parse_args(["--prompts-file", str(bad)]))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: .*no 'prompt' string field"):
        read_prompts(parse_args(["--prompts-file", str(nofield)]))
    # A .txt file is plain text: a line starting with '{' is a prompt like any other.
    text = tmp_path / "prompts.txt"
    text.write_text("{x: 1} is a set in Python?\r\nsecond\n")
    assert read_prompts(parse_args(["--prompts-file", str(text)])) == ["{x: 1} is a set in Python?", "second"]


def test_no_pytorch_notice_from_transformers():
    # Run without torch (a test-only dependency): transformers' import notice must not reach the user.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from qspec_jax.tokenizer import load_tokenizer\n"
            "assert load_tokenizer('smollm2-135m').encode('hi')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr


def help_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


def test_help_shows_defaults(capsys):
    text = " ".join(help_text(capsys).split())
    assert re.search(r"--max-new-tokens \S+ .*\(default: 128\)", text)
    assert re.search(r"--group-size \S+ [^-]*\b64\b", text)
    assert f"at most {generate.MAX_GAMMA}" in text
    assert "'prompt'" in text  # --json names its keys


def test_readme_options_table_matches_help(capsys):
    in_help = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(capsys))) - {"--help", "--no-chat"}
    table = readme().split("## The command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    in_readme = set(re.findall(r"--[a-z][a-z0-9-]*", "\n".join(rows))) - {"--no-chat"}
    assert in_help == in_readme
    assert "`prompt`" in table  # the --json keys, `prompt` among them
    assert f"1 to {generate.MAX_GAMMA}" in table


def test_readme_links_and_paths_exist():
    text = readme()
    assert "../shared" not in text and "docs/ARCHITECTURE.md" in text
    for doc in ("README.md", "benchmarks/README.md", "docs/ARCHITECTURE.md"):
        body = readme(doc)
        links = re.findall(r"\]\(([^)#]+)\)", body)
        paths = re.findall(r"`((?:scripts|benchmarks|docs|qspec_jax|pallas_kernels|tests|kernels|throughput|"
                           r"quality|acceptance)/[\w./-]*)`", body)
        base = os.path.dirname(os.path.join(ROOT, doc))
        for p in links:
            if not p.startswith("http"):
                assert os.path.exists(os.path.join(base, p)), f"{doc} links to a missing {p}"
        for p in paths:  # from the repository root, or from the page's folder (benchmarks/README.md)
            assert any(os.path.exists(os.path.join(d, p)) for d in (ROOT, base)), f"{doc} names a missing {p}"


def test_scripts_hold_what_users_run_and_run_records_sit_with_results():
    device = os.path.join(ROOT, "scripts", "device")
    assert not os.path.isdir(device) or not os.listdir(device)
    for kind in ("kernels", "throughput"):
        assert os.listdir(os.path.join(ROOT, "benchmarks", kind, "runs"))


def test_readme_claims_match_the_result_files():
    text = " ".join(readme().split())
    # w4a8 acceptance: the range in acceptance.json, not a rounder one.
    with open(os.path.join(ROOT, "benchmarks", "acceptance", "acceptance.json")) as f:
        runs = json.load(f)["runs"]
    rates = [d["acceptance_rate"] for r in runs if r["draft"] == "w4a8" for d in r["by_dataset"].values()]
    assert f"w4a8: {min(rates):.3f}-{max(rates):.3f}" in text
    # No QSpec perplexity: it was W4A16's number, not a measurement.
    assert not re.search(r"qspec (is )?\d+\.\d+", text, re.IGNORECASE)
    # The float reference is the dequantized Q4_1 GGUF.
    assert "dequantized Q4_1" in text


def test_throughput_verify_time_is_labelled_a_residual(tmp_path):
    with open(os.path.join(ROOT, "scripts", "bench_throughput.py")) as f:
        src = f.read()
    assert '"verify_ms_residual"' in src and '"verify_ms"' not in src
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import plot_throughput
    finally:
        sys.path.pop(0)
    mode = {"step_ms": 1.0, "step_floor_ms": 0.5, "tokens_per_s": 1.0, "prefill_seconds": 0.1}
    for key in ("verify_ms_residual", "verify_ms"):  # new files, and the committed ones
        q = {"draft": "w4a4", "gamma": 3, "acceptance_rate": 0.8, "tokens_per_cycle": 3.0, "tokens_per_s": 1.0,
             "speedup_vs_w4a16": 0.9, "decode_speedup_vs_w4a16": 0.9, "cycle_ms": 4.0, key: 1.0, "draft_share": 0.7}
        res = {"meta": {k: "-" for k in ("device", "jax", "commit", "weights", "acceptance", "timing")},
               "cells": [{"preset": "tiny", "batch": 1, "prompt_len": 8, "qspec": [q],
                          "modes": {"w4a16": mode, "w4a4": mode}}]}
        table = plot_throughput.tables(res)
        assert "verify ms (residual)" in table and "| 1.00 |" in table


