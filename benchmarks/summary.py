"""Summaries of result rows, shared by the Markdown report and the plots."""

from __future__ import annotations

import math

SUBJECT = "tritium"


def ordered(values) -> list:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


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


def speedups_over(rows: list[dict]) -> dict[str, tuple[float | None, int]]:
    """For each backend other than tritium: (geometric mean over the cases both measured
    of its median time / tritium's, number of such cases)."""
    ours = {r["case"]: r["ms_p50"] for r in rows if r["backend"] == SUBJECT and r["ms_p50"]}
    result = {}
    for rival in ordered(r["backend"] for r in rows if r["backend"] != SUBJECT):
        ratios = [r["ms_p50"] / ours[r["case"]] for r in rows
                  if r["backend"] == rival and r["ms_p50"] and r["case"] in ours]
        result[rival] = (geomean(ratios), len(ratios))
    return result
