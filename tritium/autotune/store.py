"""Tuned entries on disk: the user's cache and the tables shipped with tritium.

One human-readable JSON file per GPU SKU:

    {"schema": "tritium-autotune/1", "sku": {...},
     "entries": {kernel: {bucket: {"config": {...}, "source": hash, "triton": version,
                                   "ms": float, "default_ms": float}}}}

Writes merge under a file lock and land by rename, so concurrent processes lose nothing and
readers never see half a file. A corrupt, truncated, foreign or unreadable file earns one
warning and is ignored; an unwritable directory means tuned results stay in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

from tritium.autotune.device import Sku

SCHEMA = "tritium-autotune/1"
SHIPPED_DIR = Path(__file__).parent / "configs"
_warned: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    """$TRITIUM_CACHE_DIR/autotune (default ~/.cache/tritium/autotune)."""
    return Path(os.environ.get("TRITIUM_CACHE_DIR", "~/.cache/tritium")).expanduser() / "autotune"


def cache_path(sku: Sku) -> Path:
    return cache_dir() / f"{sku.slug}.json"


def shipped_path(sku: Sku) -> Path:
    return SHIPPED_DIR / f"{sku.slug}.json"


def _warn_once(path: Path, reason: str) -> None:
    if (str(path), reason) not in _warned:
        _warned.add((str(path), reason))
        warnings.warn(f"tritium autotune: ignoring {path}: {reason}", RuntimeWarning, stacklevel=3)


def read_table(path: Path, sku: Sku) -> dict[str, dict[str, dict]]:
    """{kernel: {bucket: entry}} from `path`; {} when the file is missing or unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _warn_once(path, f"unreadable ({exc.strerror})")
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        _warn_once(path, "not valid JSON (corrupt or truncated)")
        return {}
    problem = _schema_problem(data, sku)
    if problem:
        _warn_once(path, problem)
        return {}
    return data["entries"]


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
    warning) when it cannot be written, in which case nothing on disk changed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = read_table(path, sku)
            for kernel, buckets in new.items():
                entries.setdefault(kernel, {}).update(buckets)
            _write_atomic(path, {"schema": SCHEMA, "sku": sku.to_json(), "entries": entries})
        return True
    except OSError as exc:
        _warn_once(path, f"cannot write ({exc.strerror or exc}); tuned configs stay in memory")
        return False


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock for the read-merge-write of one update."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): rename still keeps files whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
