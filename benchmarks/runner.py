"""One `python -m benchmarks run`: measure the selected suites, then write the results
and the report. Imports triton (through the suites): import it only once
TRITON_INTERPRET is settled."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import environment, harness, report, results, timing
from tritium import bench
from tritium.bench.operators import operators


def run(*, suite: str, device: str, quick: bool, filter: str | None, mode: str | None,
        out: str | None, command: list[str]) -> tuple[Path, list[dict]]:
    """Run `suite` ("all" or a name in tritium.bench.NAMES) on `device`; write results.json,
    results.csv, README.md and plots to `out` (default reports/<device-slug>/). Returns
    that folder and the rows. Exits with a message when --filter/--mode select nothing."""
    start = time.perf_counter()
    bench.load(suite)
    peaks = timing.measure_peaks(device)
    opts = harness.RunOptions(device=device, quick=quick, filter=filter, mode=mode, peaks=peaks)
    rows = [row for op in operators(suite) for row in harness.run_operator(op, opts)]
    if not rows:
        raise SystemExit(f"no case of suite {suite!r} matches --filter {filter!r} --mode {mode!r}")
    metadata = environment.run_metadata(device, peaks, command)
    metadata["wall_s"] = time.perf_counter() - start
    out_dir = Path(out) if out else environment.REPO / "reports" / metadata["device_slug"]
    results.save(out_dir, metadata, rows)
    report.write(out_dir, metadata, rows)
    return out_dir, rows
