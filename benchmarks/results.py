"""results.json (metadata + long-format rows) and results.csv, written atomically; loading
and merging them back."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace,
    so a crash or a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); reports are meant to be read by others.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(out_dir: Path, metadata: dict, rows: list[dict]) -> None:
    """Write results.json ({"metadata": ..., "rows": [...]}) and results.csv (one row per
    dict, config as a JSON string, a field a row lacks empty) into out_dir."""
    write_atomic(Path(out_dir) / "results.json", json.dumps({"metadata": metadata, "rows": rows}, indent=1))
    buffer = io.StringIO()
    # Every row's fields: rows of older runs (merged) may lack newer ones, such as peak_memory_gib.
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "config": json.dumps(row["config"], sort_keys=True)})
    write_atomic(Path(out_dir) / "results.csv", buffer.getvalue())


def load(path: Path) -> tuple[dict, list[dict]]:
    """(metadata, rows) from a results.json written by `save`."""
    with open(path) as f:
        data = json.load(f)
    return data["metadata"], data["rows"]


def locate(path: Path) -> Path:
    """`path` itself, or the results.json inside it when it is a folder."""
    path = Path(path)
    return path / "results.json" if path.is_dir() else path


def row_key(row: dict) -> tuple[str, str, str, str]:
    """What identifies a row across runs: (kernel, backend, mode, case)."""
    return row["kernel"], row["backend"], row["mode"], row["case"]


def device_mismatch(named: dict[str, dict]) -> str | None:
    """A message naming each run's device when the metadata in `named` (label -> metadata)
    come from more than one device; None when they agree."""
    if len({m["device"] for m in named.values()}) <= 1:
        return None
    return "results from different devices: " + "; ".join(f"{label} on {m['device']!r}" for label, m in named.items())


def merge(runs: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One (metadata, rows) from several runs on one device (check device_mismatch first).

    Rows keep the order of first appearance; a later run's row replaces an earlier one with
    the same row_key, so re-running a few cases updates a full run. The metadata are the
    first run's plus "sources": every run's metadata, which the report lists.
    """
    if len(runs) == 1:
        return runs[0]
    merged: dict[tuple, dict] = {}
    for _, rows in runs:
        merged.update((row_key(r), r) for r in rows)
    return {**runs[0][0], "sources": [m for m, _ in runs]}, list(merged.values())
