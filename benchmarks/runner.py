"""One `python -m benchmarks run`: measure the selected suites operator by operator,
rewriting the results and the report after each, so a run stopped midway (Ctrl-C, a crash
in a later suite) keeps what it measured. Imports triton (through the suites): import it
only once TRITON_INTERPRET is settled."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import environment, harness, report, results, timing
from tritium import bench
from tritium.bench.operators import operators


def run(*, suite: str, device: str, quick: bool, filter: str | None, mode: str | None,
        out: str | None, command: list[str]) -> tuple[Path, list[dict]]:
    """Run `suite` ("all" or a name in tritium.bench.NAMES) on `device`; write results.json,
    results.csv, README.md and plots to `out` (default reports/<device-slug>/) after each
    operator, the last write the complete one. Returns that folder and the rows. Exits with
    a message when --filter/--mode select nothing."""
    start = time.perf_counter()
    bench.load(suite)
    peaks = timing.measure_peaks(device)
    opts = harness.RunOptions(device=device, quick=quick, filter=filter, mode=mode, peaks=peaks)
    out_dir = Path(out) if out else environment.REPO / "reports" / environment.device_slug(device)
    ops = operators(suite)
    rows: list[dict] = []
    done: list[str] = []

    def write(stopped: str | None) -> None:
        """The files for the rows so far; `stopped` (None once complete) says why some
        operators are missing. Metadata are taken anew: the autotuner's state grows."""
        missing = ", ".join(op.name for op in ops if op.name not in done)
        partial = f"{stopped}: {len(done)} of {len(ops)} operators measured; not measured: {missing}"
        metadata = {**environment.run_metadata(device, peaks, command), "wall_s": time.perf_counter() - start,
                    "operators": list(done), "partial": partial if stopped else None}
        results.save(out_dir, metadata, rows)
        report.write(out_dir, metadata, rows)

    current = None
    try:
        for op in ops:
            current = op.name
            new = harness.run_operator(op, opts)
            rows += new
            done.append(op.name)
            current = None
            if new and len(done) < len(ops):
                write("in progress when written")
    except BaseException as exc:  # Ctrl-C too: keep what was measured and say where it stopped
        if rows:
            write(f"stopped by {type(exc).__name__} " + (f"while measuring {current}" if current else "while writing"))
            print(f"\n{type(exc).__name__}: the {len(done)} operator(s) measured so far are in {out_dir}",
                  file=sys.stderr)
        raise
    if not rows:
        raise SystemExit(f"no case of suite {suite!r} matches --filter {filter!r} --mode {mode!r}")
    write(None)
    return out_dir, rows
