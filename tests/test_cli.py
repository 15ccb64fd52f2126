"""`python -m qspec_jax.generate`: a real run on the default model and clear errors on bad input."""

import json

import pytest

from qspec_jax.generate import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_with_the_default_model(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    code, out, err = run_cli(capsys, "--prompt", "Name a color.", "--prompts-file", str(prompts),
                             "--max-new-tokens", "6", "--json", "--cache-dir", str(tmp_path / "ckpt"),
                             "--calibration-tokens", "512")  # GPTQ on two rows: the path, kept quick
    assert code == 0, err
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
    (["--prompt", "hi", "--max-new-tokens", "9000"], "exceeds the model's context"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "prompts file not found"),
    (["--prompt", "hi", "--calibration-tokens", "100"], "must be a multiple of 256"),
])
def test_bad_input_gives_a_clear_error(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, "--cache-dir", str(tmp_path / "ckpt"))
    assert code == 2
    assert message in err and "Traceback" not in err


def test_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    code, _, err = run_cli(capsys, "--prompt", "hi", "--model", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and err.startswith("error: ")
