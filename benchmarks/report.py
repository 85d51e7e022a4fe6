"""README.md of a results folder: run metadata, one table per (kernel, mode) with tritium's
geometric-mean speedups, skipped backends, and the plots. Readable without results.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks import plots
from benchmarks.results import write_atomic
from benchmarks.summary import SUBJECT, ordered, speedups_over, tables


def write(out_dir: Path, metadata: dict, rows: list[dict]) -> None:
    """Write README.md and the PNG plots for `rows` into out_dir."""
    sections = [_header(metadata)]
    for (kernel, mode), table in tables(rows).items():
        images = plots.write_figures(out_dir, kernel, mode, table, metadata)
        sections.append(_section(kernel, mode, table, images))
    write_atomic(Path(out_dir) / "README.md", "\n\n".join(sections) + "\n")


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    # Three significant digits, without the exponent .3g would give 2900 or 560.
    return (f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}") + unit


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _header(m: dict) -> str:
    banner = f"\n\n> **{plots.INTERPRETER_LABEL}**" if m["interpreted"] else ""
    commit = m["git_commit"] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    table = "\n".join([
        "| | |\n| --- | --- |",
        f"| device | {m['device']} |",
        f"| Triton interpreter | {'yes' if m['interpreted'] else 'no'} |",
        f"| torch / triton / tritium | {m['torch']} / {m['triton']} / {m['tritium']} |",
        f"| CUDA / Python | {m['cuda'] or 'n/a'} / {m['python']} |",
        f"| git commit | {commit} |",
        f"| date (UTC) | {m['date']} |",
        f"| command | `{m['command']}` |",
        f"| wall time | {m['wall_s']:.0f} s |",
        f"| peak bf16 GEMM (8192³ matmul, measured) | {_num(m['peak_bf16_tflops'])} TFLOP/s |",
        f"| peak copy bandwidth (device-to-device, measured) | {_num(m['peak_copy_gbps'])} GB/s |",
    ])
    legend = (
        "Each cell: median time · throughput (% of the measured peak above) · speedup over the "
        "table's baseline. p20/p80 times, both throughputs, errors and a `reproduce` command "
        "for every row are in results.csv and results.json."
    )
    return f"# Benchmarks: {m['device']}{banner}\n\n{table}\n\n{legend}"


def _cell(row: dict) -> str:
    if row["ms_p50"] is None:
        return "skipped"
    metric = row["headline"]
    unit = plots.UNITS[metric][0]
    pct = row[f"{metric}_pct_peak"]
    pct_text = "n/a" if pct is None else f"{pct:.0f}%"
    return f"{_num(row['ms_p50'], ' ms')}<br>{_num(row[metric])} {unit} ({pct_text})<br>{_ratio(row['speedup'])}"


def _section(kernel: str, mode: str, rows: list[dict], images: list[str]) -> str:
    backends = ordered(r["backend"] for r in rows)
    baseline = next((r["backend"] for r in rows if r["is_baseline"]), "n/a")
    by_key = {(r["case"], r["backend"]): r for r in rows}
    header = [f"{b} (baseline)" if b == baseline else b for b in backends]
    lines = [
        f"## {kernel} · {mode}",
        f"Baseline: **{baseline}**. {_geomean_line(rows)}",
        f"| case | {rows[0]['x_name']} | " + " | ".join(header) + " |",
        "| --- | --- |" + " --- |" * len(backends),
    ]
    for case in ordered(r["case"] for r in rows):
        cells = [_cell(by_key[case, b]) if (case, b) in by_key else "" for b in backends]
        lines.append(f"| {case} | {by_key[case, backends[0]]['x']} | " + " | ".join(cells) + " |")
    worst = [max((r["max_abs_err"] for r in rows if r["backend"] == b and r["max_abs_err"] is not None), default=None)
             for b in backends]
    lines.append("| max abs error vs float64 (worst case) | | " + " | ".join(_num(w) for w in worst) + " |")
    text = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    return text + _notes(rows) + "".join(f"\n\n![{name}]({name})" for name in images)


def _geomean_line(rows: list[dict]) -> str:
    parts = [f"{_ratio(value)} over {rival} ({count} cases)"
             for rival, (value, count) in speedups_over(rows).items() if count]
    return f"Geometric-mean speedup of {SUBJECT}: " + ("; ".join(parts) or "n/a") + "."


def _notes(rows: list[dict]) -> str:
    notes = Counter((r["backend"], r["note"]) for r in rows if r["note"])
    if not notes:
        return ""
    items = [f"- {backend}, {count} case(s): {note}" for (backend, note), count in notes.items()]
    return "\n\nNotes:\n\n" + "\n".join(items)
