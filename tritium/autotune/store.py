"""Tuned entries on disk: the user's cache and the tables shipped with tritium.

One human-readable JSON file per GPU SKU:

    {"schema": "tritium-autotune/1", "sku": {...},
     "entries": {kernel: {bucket: {"config": {...}, "source": hash, "triton": version,
                                   "ms": float, "default_ms": float}}}}

Writes merge under a file lock and land by rename, so concurrent processes lose nothing and
readers never see half a file. A file we did not write is read defensively: one over
MAX_BYTES, not UTF-8, not JSON, nested deeper than MAX_DEPTH, holding NaN or an infinity,
of another schema or GPU, or unreadable earns one warning, is ignored and is never
overwritten (tuned results then stay in memory, as they do with an unwritable directory).
Configs inside a file are checked against their kernel by `kernel.py`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
import time
import warnings
from pathlib import Path

from tritium.autotune.device import Sku

SCHEMA = "tritium-autotune/1"
SHIPPED_DIR = Path(__file__).parent / "configs"
MAX_BYTES = 8 << 20  # thousands of entries; checked before reading, so a huge file costs nothing
MAX_DEPTH = 16  # a table nests 6 deep; bounds what merging and rewriting another entry recurses into
STALE_TEMP_SECONDS = 600  # a writer holds its temp file for milliseconds
_warned: set[str] = set()


def cache_dir() -> Path:
    """$TRITIUM_CACHE_DIR/autotune (default ~/.cache/tritium/autotune)."""
    return Path(os.environ.get("TRITIUM_CACHE_DIR", "~/.cache/tritium")).expanduser() / "autotune"


def cache_path(sku: Sku) -> Path:
    return cache_dir() / f"{sku.slug}.json"


def shipped_path(sku: Sku) -> Path:
    return SHIPPED_DIR / f"{sku.slug}.json"


def warn_once(message: str) -> None:
    """One RuntimeWarning per distinct message in this process (not one per launch)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"tritium autotune: {message}", RuntimeWarning, stacklevel=3)


def _warn_once(path: Path, reason: str) -> None:
    warn_once(f"ignoring {path}: {reason}")


def read_table(path: Path, sku: Sku) -> dict[str, dict[str, dict]]:
    """{kernel: {bucket: entry}} from `path`; {} when the file is missing or unusable."""
    entries, problem = _load(path, sku)
    if problem:
        _warn_once(path, problem)
    return entries


def _load(path: Path, sku: Sku) -> tuple[dict[str, dict[str, dict]], str]:
    """(entries, "") for a usable or missing file, ({}, why not) for any other."""
    try:
        text = _read(path).decode("utf-8")
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"unreadable ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return {}, "not valid UTF-8"
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        return {}, f"nested deeper than {MAX_DEPTH} levels"
    except _NonFinite:
        return {}, "holds a non-finite number (NaN, Infinity or 1e999)"
    except ValueError:  # also integers of thousands of digits
        return {}, "not valid JSON (corrupt or truncated)"
    if _depth(data) > MAX_DEPTH:
        return {}, f"nested deeper than {MAX_DEPTH} levels"
    problem = _schema_problem(data, sku)
    return ({}, problem) if problem else (data["entries"], "")


def _read(path: Path) -> bytes:
    """The bytes of `path`, refusing (OSError) anything but a regular file of at most
    MAX_BYTES; the size is checked on the open file, before reading. O_NONBLOCK: a FIFO
    there must not hang the caller."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > MAX_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_BYTES >> 20} MB")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:  # grew while we read
        raise OSError(errno.EFBIG, f"larger than {MAX_BYTES >> 20} MB")
    return data


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise _NonFinite(text)
    return value


def _depth(data) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _schema_problem(data, sku: Sku) -> str:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return f"not a {SCHEMA} file"
    if data.get("sku") != sku.to_json():
        return f"tuned for another GPU ({data.get('sku')}), this is {sku.to_json()}"
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        return "malformed 'entries'"
    return ""


def write_entries(path: Path, sku: Sku, new: dict[str, dict[str, dict]]) -> bool:
    """Merge `new` ({kernel: {bucket: entry}}) into the file at `path`; False (and one
    warning) when it cannot be written, in which case nothing on disk changed. A file
    there that we cannot read or that is not this SKU's table is never overwritten."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            _remove_stale_temps(path)
            entries, problem = _load(path, sku)
            if problem:
                _warn_once(path, problem)
                warn_once(f"not saving tuned configs to {path} ({problem}): not ours to overwrite; "
                          "they stay in memory (move the file away to save them)")
                return False
            for kernel, buckets in new.items():
                entries.setdefault(kernel, {}).update(buckets)
            _write_atomic(path, {"schema": SCHEMA, "sku": sku.to_json(), "entries": entries})
        return True
    except _SymlinkLock as exc:
        warn_once(f"not saving tuned configs to {path}: its lock {exc} is a symlink, not followed; "
                  "they stay in memory")
        return False
    except OSError as exc:
        _warn_once(path, f"cannot write ({exc.strerror or exc}); tuned configs stay in memory")
        return False


class _SymlinkLock(OSError):
    pass


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock for the read-merge-write of one update. The lock
    is opened without following a symlink (one planted there would have us create or
    open a file elsewhere), and must be a regular file."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): rename still keeps files whole
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or lock_path.is_symlink():
            raise _SymlinkLock(str(lock_path)) from exc
        raise
    with os.fdopen(fd, "w") as lock:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{lock_path} is not a regular file")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _temp_pattern(path: Path) -> re.Pattern:
    """The names `_write_atomic`'s mkstemp gives: .<file name>.<8 random chars>.tmp"""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Delete the temp files a crashed writer of `path` left (ours by name, regular files,
    older than STALE_TEMP_SECONDS); called under the lock, so no live writer owns one."""
    pattern, cutoff = _temp_pattern(path), time.time() - STALE_TEMP_SECONDS
    with contextlib.suppress(OSError), os.scandir(path.parent) as found:
        for item in found:
            with contextlib.suppress(OSError):
                info = item.stat(follow_symlinks=False)
                if pattern.fullmatch(item.name) and stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    os.unlink(item.path)


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
