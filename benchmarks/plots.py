"""PNG figures of one (kernel, mode) table: throughput against x per backend with p20-p80
bands, one panel per case group; tritium's speedup over each other backend; and each
backend's achieved % of the measured peak per case (roofline %), when a peak was measured.

Figures are built without pyplot, so no GUI backend is ever chosen: PNGs render with Agg.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from benchmarks.results import write_atomic
from benchmarks.summary import SUBJECT, ordered, speedups_over

INTERPRETER_LABEL = "CPU-interpreter (correctness and plumbing, not performance)"
UNITS = {"tflops": ("TFLOP/s", 1e12, "peak_bf16_tflops"), "gbps": ("GB/s", 1e9, "peak_copy_gbps")}
# (folder, file stem) -> (what its figures were drawn from, the files written): `run`
# rewrites the report after every operator, and redrawing every earlier table each time
# would cost more than measuring on the CPU interpreter.
_DRAWN: dict[tuple[Path, str], tuple[str, list[str]]] = {}


def figure_label(metadata: dict) -> str:
    """The line every figure carries: the device, or the interpreter warning."""
    return INTERPRETER_LABEL if metadata["interpreted"] else metadata["device"]


def write_figures(out_dir: Path, kernel: str, mode: str, rows: list[dict], metadata: dict) -> list[str]:
    """Write {kernel}-{mode}-throughput.png, -speedup.png and -roofline.png for the rows of
    one table; returns the file names written (no speedup figure without tritium and a
    rival, no roofline figure without a measured peak)."""
    stem = f"{kernel}-{mode.replace('+', '-')}"
    slot = (Path(out_dir).resolve(), stem)
    # What the figures depend on: the rows, the label and the peaks.
    drawn_from = json.dumps([rows, figure_label(metadata), [metadata.get(u[2]) for u in UNITS.values()]], default=str)
    if _already_drawn(slot, drawn_from):
        return _DRAWN[slot][1]
    figures = {
        "throughput": _throughput_figure(rows, metadata),
        "speedup": _speedup_figure(rows),
        "roofline": _roofline_figure(rows),
    }
    names = []
    for kind, figure in figures.items():
        if figure is None:
            continue
        figure.suptitle(f"{kernel} · {mode} — {figure_label(metadata)}", fontsize=11)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        write_atomic(Path(out_dir) / f"{stem}-{kind}.png", buffer.getvalue())
        names.append(f"{stem}-{kind}.png")
    _DRAWN[slot] = drawn_from, names
    return names


def _already_drawn(slot: tuple[Path, str], drawn_from: str) -> bool:
    """Whether this process drew the figures of `slot` from the same data, and they are still there."""
    previous, names = _DRAWN.get(slot, (None, []))
    return previous == drawn_from and all((slot[0] / name).exists() for name in names)


def _colors(rows: list[dict]) -> dict:
    # Backends keep one colour across a table's figures; tritium comes first in every suite.
    return {name: f"C{i % 10}" for i, name in enumerate(ordered(r["backend"] for r in rows))}


def _throughput(row: dict, ms: float) -> float:
    scale = UNITS[row["headline"]][1]
    work = row["flops"] if row["headline"] == "tflops" else row["bytes"]
    return work / (ms * 1e-3) / scale


def _grid(count: int):
    cols = min(3, count)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(5.2 * cols, 3.8 * rows + 0.6))
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, list(axes.flat)


def _throughput_figure(rows: list[dict], metadata: dict):
    measured = [r for r in rows if r["ms_p50"] is not None]
    if not measured:
        return None
    unit, _, peak_key = UNITS[measured[0]["headline"]]
    peak = metadata.get(peak_key)
    colors = _colors(rows)
    groups = ordered(r["group"] for r in measured)
    figure, axes = _grid(len(groups))
    for ax, group in zip(axes, groups):
        for backend, color in colors.items():
            line = [r for r in measured if r["group"] == group and r["backend"] == backend]
            line.sort(key=lambda r: r["x"])
            if not line:
                continue
            xs = [r["x"] for r in line]
            ax.plot(xs, [_throughput(r, r["ms_p50"]) for r in line], "o-", color=color, label=backend, ms=3)
            ax.fill_between(xs, [_throughput(r, r["ms_p80"]) for r in line],
                            [_throughput(r, r["ms_p20"]) for r in line], color=color, alpha=0.2, lw=0)
        _style_axis(ax, group, measured[0]["x_name"], unit, peak)
    _shared_legend(figure, axes)
    return figure


def _shared_legend(figure, axes) -> None:
    # One legend for all panels: a backend skipped in the first panel may be drawn in others.
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False,
                  bbox_to_anchor=(0.5, -0.02))
    figure.tight_layout(rect=(0, 0.05, 1, 0.95))


def _x_label(x: int) -> str:
    return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)


def _bar_positions(slot: int, slots: int, count: int) -> tuple[list[float], float]:
    """Centres of bar `slot` of `slots` side by side at 0..count-1, and the bar width."""
    width = 0.8 / slots
    return [j + (slot - (slots - 1) / 2) * width for j in range(count)], width


def _style_axis(ax, group: str, x_name: str, unit: str, peak: float | None) -> None:
    ax.set_title(group, fontsize=9)
    ax.set_xscale("log", base=2)
    xs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(xs, [_x_label(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{unit} (median, p20-p80 band)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if peak:
        ax.secondary_yaxis("right", functions=(lambda y: 100 * y / peak, lambda p: p * peak / 100)).set_ylabel(
            "% of measured peak", fontsize=8)


def _speedup_figure(rows: list[dict]):
    """Bars: per group, geometric mean over x of (rival median / tritium median)."""
    groups = ordered(r["group"] for r in rows)
    per_group = {g: speedups_over([r for r in rows if r["group"] == g]) for g in groups}
    rivals = ordered(b for ratios in per_group.values() for b, (value, _) in ratios.items() if value)
    if not rivals:
        return None
    colors = _colors(rows)
    figure = Figure(figsize=(max(7.0, 0.3 * len(groups) * len(rivals) + 2.5), 4.6))
    ax = figure.subplots()
    for i, rival in enumerate(rivals):
        heights = [per_group[g].get(rival, (None, 0))[0] or math.nan for g in groups]
        positions, width = _bar_positions(i, len(rivals), len(groups))
        bars = ax.bar(positions, heights, width, color=colors[rival], label=f"vs {rival}")
        ax.bar_label(bars, ["" if math.isnan(h) else f"{h:.3g}x" for h in heights], fontsize=7, rotation=90, padding=2)
    ax.axhline(1.0, color="black", lw=0.8)
    # Log scale: 1.2x over a fused kernel and 30x over eager belong on one chart; the
    # headroom above the tallest bar leaves room for its label.
    values = [v for ratios in per_group.values() for v, _ in ratios.values() if v]
    ax.set_yscale("log")
    ax.set_ylim(min(0.5, min(values) / 1.5), max(2.0, max(values)) * 3)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{SUBJECT} speedup (geomean over x)")
    ax.legend(fontsize=8, ncol=len(rivals), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return figure


def _roofline_figure(rows: list[dict]):
    """Bars per group: each backend's headline throughput as % of the measured peak, per x."""
    measured = [r for r in rows if r[f"{r['headline']}_pct_peak"] is not None]
    if not measured:
        return None
    unit = UNITS[measured[0]["headline"]][0]
    colors = _colors(rows)
    groups = ordered(r["group"] for r in measured)
    figure, axes = _grid(len(groups))
    for ax, group in zip(axes, groups):
        in_group = [r for r in measured if r["group"] == group]
        xs = sorted({r["x"] for r in in_group})
        backends = ordered(r["backend"] for r in in_group)
        for i, backend in enumerate(backends):
            pct = {r["x"]: r[f"{r['headline']}_pct_peak"] for r in in_group if r["backend"] == backend}
            positions, width = _bar_positions(i, len(backends), len(xs))
            ax.bar(positions, [pct.get(x, math.nan) for x in xs], width, color=colors[backend], label=backend)
        ax.axhline(100, color="black", lw=0.8)
        ax.set_title(group, fontsize=9)
        ax.set_xticks(range(len(xs)), [_x_label(x) for x in xs])
        ax.set_xlabel(measured[0]["x_name"])
        ax.set_ylabel(f"% of measured peak {unit} (median)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _shared_legend(figure, axes)
    return figure
