"""Summaries of result rows, shared by the Markdown report, the plots and `compare`."""

from __future__ import annotations

import math
import re

SUBJECT = "tritium"


def ordered(values) -> list:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def is_subject(backend: str) -> bool:
    """Whether `backend` runs tritium's kernels: "tritium" or a variant ("tritium+apply")."""
    return re.split(r"[+-]", backend)[0] == SUBJECT


def number(value: float | None, unit: str = "") -> str:
    """`value` with three significant digits and `unit`, or "n/a" for None."""
    if value is None:
        return "n/a"
    # Three significant digits, without the exponent .3g would give 2900 or 560.
    return (f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}") + unit


def tables(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows split by (kernel, mode), in the order they were measured."""
    split: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        split.setdefault((row["kernel"], row["mode"]), []).append(row)
    return split


def geomean(values) -> float | None:
    """Geometric mean of positive values; None when there are none."""
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def speedup_ratios(rows: list[dict]) -> dict[str, list[float]]:
    """For each backend other than tritium: its median time / tritium's, one ratio per
    (kernel, mode, case) both measured. Rows may span several tables (a whole suite)."""
    ours = {_case_key(r): r["ms_p50"] for r in rows if r["backend"] == SUBJECT and r["ms_p50"]}
    return {
        rival: [r["ms_p50"] / ours[_case_key(r)] for r in rows
                if r["backend"] == rival and r["ms_p50"] and _case_key(r) in ours]
        for rival in ordered(r["backend"] for r in rows if r["backend"] != SUBJECT)
    }


def speedups_over(rows: list[dict]) -> dict[str, tuple[float | None, int]]:
    """For each backend other than tritium: (geometric mean of speedup_ratios, their count)."""
    return {rival: (geomean(ratios), len(ratios)) for rival, ratios in speedup_ratios(rows).items()}


def _case_key(row: dict) -> tuple[str, str, str]:
    return row["kernel"], row["mode"], row["case"]
