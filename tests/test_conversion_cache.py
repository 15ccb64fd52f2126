"""The conversion cache: keyed by the source's content and settings, verified on read, atomic,
shared safely by concurrent runs; a damaged entry costs one warning line and a reconversion.

Each case here reproduces a failure of the cache as it was (one folder per model file *name*,
no checksums, no lock) on a tiny GGUF model quantized to int4 through the CLI's own loader.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_HF_CONFIG, random_hf_weights
from qspec_jax import checkpoint, conversion_cache, quantize
from qspec_jax.loading import load_params
from test_checkpoint import tree_equal, write_tiny_gguf

CONFIG = dataclasses.replace(TINY_HF_CONFIG, rope_scaling=None)


def make_gguf(path, seed: int, negate_output_norm: bool = False) -> str:
    tensors = random_hf_weights(CONFIG, seed=seed)
    if negate_output_norm:
        tensors["model.norm.weight"] = -tensors["model.norm.weight"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_tiny_gguf(path, CONFIG, tensors)
    return str(path)


def int4(path, cache) -> dict:
    return load_params(str(path), quantized=True, cache_dir=str(cache), calibration_tokens=0,
                       dtype=jnp.float32)[1]


def fresh_int4(path, tmp_path) -> dict:
    """The conversion of `path` made in a cache of its own (the truth to compare against)."""
    return int4(path, tmp_path / f"fresh-{np.random.default_rng().integers(1 << 30)}")


@pytest.fixture
def conversions(monkeypatch):
    """Counts int4 conversions (calls of quantize.quantize_params)."""
    calls = []
    real = quantize.quantize_params

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(quantize, "quantize_params", counting)
    return calls


def entries(cache) -> list:
    """Entry folders of the int4 conversions under `cache`, and everything else found beside them."""
    out = []
    for name in sorted(os.listdir(cache)):
        if "-int4-" in name:
            out += [os.path.join(cache, name, e) for e in sorted(os.listdir(os.path.join(cache, name)))]
    return out


def only_entry(cache) -> str:
    found = [e for e in entries(cache) if not e.endswith(".lock")]
    assert len(found) == 1, found
    return found[0]


def data_files(entry) -> list:
    """The orbax data files of an entry, largest first."""
    files = []
    for root, _, names in os.walk(os.path.join(entry, "state")):
        files += [os.path.join(root, n) for n in names]
    return sorted(files, key=os.path.getsize, reverse=True)


def stderr_lines(capfd, progress: bool = False) -> list:
    """Non-blank stderr lines; without `progress`, less the conversion's progress report (its
    "converting ..." line and indented stages) and "waiting: ..." lines."""
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    if progress:
        return lines
    return [line for line in lines if not line.startswith(("converting ", "  ", "waiting: "))]


def test_same_file_name_in_two_folders(tmp_path, conversions):
    a = make_gguf(tmp_path / "a" / "model.gguf", seed=1)
    b = make_gguf(tmp_path / "b" / "model.gguf", seed=1, negate_output_norm=True)
    cache = tmp_path / "cache"
    qa, qb = int4(a, cache), int4(b, cache)
    assert len(conversions) == 2, "the second file must be converted, not served the first one's weights"
    assert not tree_equal(qa, qb)
    assert tree_equal(qb, fresh_int4(b, tmp_path))
    # Both stay cached, each under its own key.
    assert tree_equal(int4(a, cache), qa) and tree_equal(int4(b, cache), qb) and len(conversions) == 3


def test_identical_content_is_shared(tmp_path, conversions):
    a = make_gguf(tmp_path / "a" / "model.gguf", seed=2)
    b = tmp_path / "b" / "model.gguf"
    os.makedirs(b.parent)
    b.write_bytes(open(a, "rb").read())
    cache = tmp_path / "cache"
    qa, qb = int4(a, cache), int4(b, cache)
    assert len(conversions) == 1 and tree_equal(qa, qb)


def test_source_modified_in_place(tmp_path, conversions):
    path = tmp_path / "m" / "model.gguf"
    make_gguf(path, seed=3)
    cache = tmp_path / "cache"
    before = int4(path, cache)
    make_gguf(path, seed=4)  # same path, same size, new weights
    after = int4(path, cache)
    assert len(conversions) == 2 and not tree_equal(before, after)
    assert tree_equal(after, fresh_int4(path, tmp_path))


def test_settings_change_the_key(tmp_path):
    path = make_gguf(tmp_path / "model.gguf", seed=5)
    base = conversion_cache.int4_fields(path, str(tmp_path), group_size=None, rotate=True)
    keys = {conversion_cache.entry_key(f) for f in (
        base,
        conversion_cache.int4_fields(path, str(tmp_path), group_size=32, rotate=True),
        conversion_cache.int4_fields(path, str(tmp_path), group_size=None, rotate=False),
        conversion_cache.int4_fields(path, str(tmp_path), group_size=None, rotate=True,
                                     calibration={"tokens": 512, "row": 256}),
        conversion_cache.int4_fields(path, str(tmp_path), group_size=None, rotate=True,
                                     calibration={"tokens": 1024, "row": 256}),
        dict(base, code="another version of the converter"),
    )}
    assert len(keys) == 6
    assert conversion_cache.entry_key(base) == conversion_cache.entry_key(
        conversion_cache.int4_fields(path, str(tmp_path), group_size=None, rotate=True))


def test_calibration_count_is_in_the_key(tmp_path, monkeypatch):
    """load_params (the API path) keys its cache entry on the number of calibration tokens: two
    non-zero counts give two keys, each recording its count."""
    path = make_gguf(tmp_path / "model.gguf", seed=5)
    seen = []

    def capture(root, name, fields, convert, on_convert=None):
        seen.append((name, fields))
        raise LookupError("stop before converting")
    monkeypatch.setattr(conversion_cache, "load_or_convert", capture)
    for n in (256, 512):
        with pytest.raises(LookupError):
            load_params(path, quantized=True, cache_dir=str(tmp_path / "c"), calibration_tokens=n)
    (name_a, a), (name_b, b) = seen
    assert [a["calibration"]["tokens"], b["calibration"]["tokens"]] == [256, 512]
    assert conversion_cache.entry_key(a) != conversion_cache.entry_key(b) and name_a != name_b
    assert conversion_cache.entry_key(dict(b, calibration=a["calibration"])) == conversion_cache.entry_key(a)


def cache_files(cache) -> list:
    return sorted(os.path.relpath(os.path.join(r, n), cache) for r, ds, ns in os.walk(cache) for n in ns + ds)


@pytest.mark.parametrize("bad", ["group size 7", "group size 0", "truncated"])
def test_bad_conversion_is_refused_before_it_is_announced(tmp_path, capfd, bad):
    """Settings a conversion cannot take are refused before "converting ..." and write nothing."""
    path = make_gguf(tmp_path / "model.gguf", seed=13)
    group = {"group size 7": 7, "group size 0": 0}.get(bad)
    if bad == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    cache = tmp_path / "cache"
    match = {"group size 7": "group_size=7 does not divide K=64", "group size 0": "group_size must be positive",
             "truncated": "model.gguf: not a readable GGUF file.*truncated"}[bad]
    with pytest.raises(ValueError, match=match):
        load_params(path, quantized=True, cache_dir=str(cache), calibration_tokens=0, group_size=group)
    assert stderr_lines(capfd, progress=True) == []
    assert not os.path.exists(cache)


def test_failed_conversion_leaves_nothing_behind(tmp_path, capfd, monkeypatch):
    path = make_gguf(tmp_path / "model.gguf", seed=14)
    cache = tmp_path / "cache"

    def fail(*a, **k):
        raise RuntimeError("conversion failed")
    monkeypatch.setattr(quantize, "quantize_params", fail)
    with pytest.raises(RuntimeError, match="conversion failed"):
        int4(path, cache)
    lines = stderr_lines(capfd, progress=True)
    assert lines[0].startswith("converting model.gguf to int4 (once; cached in ") and len(lines) == 4, lines
    assert cache_files(cache) == [f for f in cache_files(cache) if f.startswith("sources")]  # no lock, no folder
    monkeypatch.undo()
    assert tree_equal(int4(path, cache), fresh_int4(path, tmp_path))  # the next run converts and caches


def test_waiting_for_another_process_is_announced(tmp_path, capfd):
    """A run that must wait for another's lock says so, then goes on once the lock is free."""
    import fcntl
    import time

    path = make_gguf(tmp_path / "model.gguf", seed=15)
    cache = tmp_path / "cache"
    expected = int4(path, cache)
    lock = only_entry(cache) + ".lock"
    capfd.readouterr()
    result = []
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: result.append(int4(path, cache)))
        worker.start()
        err, deadline = "", time.monotonic() + 60
        while "waiting: " not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
        assert f"waiting: another process holds {lock}" in err and not result
    worker.join(60)
    assert result and tree_equal(result[0], expected)


def test_a_lock_removed_by_its_holder_is_taken_afresh(tmp_path):
    """A holder that failed removes the lock file while holding it; a waiter on the removed file
    then locks the new file at that path, so a third run cannot hold another copy at once."""
    import fcntl

    lock = str(tmp_path / "k.lock")
    got, waited = [], threading.Event()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def waiter():
        with conversion_cache._locked(lock, on_wait=waited.set) as ok:
            got.append((ok, os.path.exists(lock)))  # without the re-check: a lock on the removed file
    t = threading.Thread(target=waiter)
    t.start()
    assert waited.wait(30)
    os.unlink(lock)
    os.close(fd)  # releases the removed file's lock
    t.join(30)
    assert got == [(True, True)]


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete", "manifest"])
def test_damaged_entry_is_rebuilt_with_one_warning(tmp_path, conversions, capfd, damage):
    path = make_gguf(tmp_path / "model.gguf", seed=6)
    cache = tmp_path / "cache"
    good = int4(path, cache)
    entry = only_entry(cache)
    assert stderr_lines(capfd) == []
    target = data_files(entry)[0]
    size = os.path.getsize(target)
    if damage == "overwrite":  # 4 KiB of other bytes in the middle, the size unchanged
        with open(target, "r+b") as f:
            f.seek(max(0, size // 2 - 2048))
            f.write(np.random.default_rng().integers(0, 256, min(4096, size), np.uint8).tobytes())
        assert os.path.getsize(target) == size
    elif damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "delete":
        os.remove(target)
    else:
        os.remove(os.path.join(entry, conversion_cache.MANIFEST))
    again = int4(path, cache)
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "damaged" in lines[0], lines
    assert len(conversions) == 2 and tree_equal(again, good)
    assert only_entry(cache) == entry and conversion_cache.verify_entry(entry, os.path.basename(entry)) is None
    assert tree_equal(int4(path, cache), good) and len(conversions) == 2
    assert stderr_lines(capfd) == []


def entry_bytes(entry) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(entry) for n in ns)


def test_concurrent_conversions_share_one_entry(tmp_path, conversions, capfd):
    path = make_gguf(tmp_path / "model.gguf", seed=7)
    cache = tmp_path / "cache"
    results, errors = [None] * 3, []

    def run(i):
        try:
            results[i] = int4(path, cache)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(conversions) == 1, "the others wait for the first conversion and read it"
    assert all(tree_equal(r, results[0]) for r in results)
    entry = only_entry(cache)
    assert not [e for e in entries(cache) if ".tmp-" in e]
    assert conversion_cache.verify_entry(entry, os.path.basename(entry)) is None
    int4(path, tmp_path / "single")
    single = entry_bytes(only_entry(tmp_path / "single"))  # orbax's ocdbt layout varies by a few KiB
    assert abs(entry_bytes(entry) - single) < 0.1 * single, "one entry's worth, not two writes in one folder"
    assert stderr_lines(capfd) == []


_CHILD = """
import sys
sys.path.insert(0, {root!r})
import jax.numpy as jnp
from qspec_jax.loading import load_params
load_params({path!r}, quantized=True, cache_dir={cache!r}, calibration_tokens=0, dtype=jnp.float32)
print("ok")
"""


def test_concurrent_processes(tmp_path):
    """Two CLI processes converting into one cache at once: both succeed, one entry, no tmp folder."""
    import subprocess
    import sys

    path = make_gguf(tmp_path / "model.gguf", seed=8)
    cache = str(tmp_path / "cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _CHILD.format(root=root, path=path, cache=cache)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
        assert "Traceback" not in err and "warning" not in err, err
    entry = only_entry(cache)
    assert not [e for e in entries(cache) if ".tmp-" in e]
    assert conversion_cache.verify_entry(entry, os.path.basename(entry)) is None


def test_stale_tmp_folder_is_removed(tmp_path):
    path = make_gguf(tmp_path / "model.gguf", seed=9)
    cache = tmp_path / "cache"
    fields = conversion_cache.int4_fields(path, str(cache), group_size=None, rotate=True)
    entry = conversion_cache.entry_dir(str(cache), "model.gguf-int4-gauto-rot", fields)
    os.makedirs(entry + ".tmp-99999-1")  # a crashed writer's leftover
    int4(path, cache)
    assert [os.path.basename(e) for e in entries(cache)] == [os.path.basename(entry),
                                                             os.path.basename(entry) + ".lock"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QSPEC_JAX_CACHE", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert conversion_cache.default_cache_dir() == str(tmp_path / "q")
    monkeypatch.delenv("QSPEC_JAX_CACHE")
    assert conversion_cache.default_cache_dir() == str(tmp_path / "xdg" / "qspec_jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert conversion_cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "qspec_jax")
    # Relative values and the working directory: a run elsewhere finds the same cache.
    monkeypatch.chdir(tmp_path)
    assert conversion_cache.resolve_cache_dir("c") == str(tmp_path / "c")
    assert conversion_cache.resolve_cache_dir(None) == str(tmp_path / "home" / ".cache" / "qspec_jax")


def test_default_cache_dir_is_used(monkeypatch, tmp_path, conversions):
    monkeypatch.setenv("QSPEC_JAX_CACHE", str(tmp_path / "q"))
    path = make_gguf(tmp_path / "model.gguf", seed=10)
    monkeypatch.chdir(tmp_path)
    load_params(path, quantized=True, calibration_tokens=0)
    monkeypatch.chdir(tmp_path / "q")  # another working directory
    load_params(path, quantized=True, calibration_tokens=0)
    assert len(conversions) == 1
    only_entry(tmp_path / "q")


def test_source_hash_is_remembered(tmp_path, monkeypatch):
    path = make_gguf(tmp_path / "model.gguf", seed=11)
    first = conversion_cache.file_sha256(path, str(tmp_path / "c"))
    hashed = []
    real = conversion_cache._sha256_file
    monkeypatch.setattr(conversion_cache, "_sha256_file", lambda p: hashed.append(p) or real(p))
    assert conversion_cache.file_sha256(path, str(tmp_path / "c")) == first and hashed == []
    with open(path, "r+b") as f:  # same size, new content: the stamp changes, the file is hashed again
        f.seek(100)
        f.write(b"x")
    assert conversion_cache.file_sha256(path, str(tmp_path / "c")) != first and len(hashed) == 1


def test_unwritable_cache_still_converts(tmp_path, capfd):
    """One warning for an unusable cache, however many loads use it, and no line claiming a cache."""
    path = make_gguf(tmp_path / "model.gguf", seed=12)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    q = int4(path, blocker / "cache")
    assert tree_equal(int4(path, blocker / "cache"), q)
    lines = stderr_lines(capfd, progress=True)
    assert len([line for line in lines if "not writable" in line]) == 1 and lines[0].startswith("warning: "), lines
    assert [line for line in lines if line.startswith("converting ")] == ["converting model.gguf to int4 (not cached):"] * 2
    assert not [line for line in lines if "cached in" in line]
    assert tree_equal(q, fresh_int4(path, tmp_path))
