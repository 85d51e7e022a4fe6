"""results.json (metadata + long-format rows) and results.csv, written atomically."""

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
    dict, config as a JSON string) into out_dir."""
    write_atomic(Path(out_dir) / "results.json", json.dumps({"metadata": metadata, "rows": rows}, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "config": json.dumps(row["config"], sort_keys=True)})
    write_atomic(Path(out_dir) / "results.csv", buffer.getvalue())


def load(path: Path) -> tuple[dict, list[dict]]:
    """(metadata, rows) from a results.json written by `save`."""
    with open(path) as f:
        data = json.load(f)
    return data["metadata"], data["rows"]
