"""`python -m benchmarks compare NEW BASELINE`: the case-by-case median ratio of two runs,
with a noise guard, as a CI gate.

A case regressed when its median slowed by more than the threshold AND its p20-p80 range
lies wholly above the baseline's; it improved when the baseline's median / its median
exceeds 1 + threshold AND its range lies wholly below. A move past the threshold inside
overlapping ranges is noise: reported, never failed on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from benchmarks.results import row_key
from benchmarks.summary import number


@dataclass
class Comparison:
    """Matched (new row, baseline row) pairs sorted into verdicts, plus the unmatched keys."""

    regressions: list[tuple[dict, dict]] = field(default_factory=list)
    improvements: list[tuple[dict, dict]] = field(default_factory=list)
    noise: list[tuple[dict, dict]] = field(default_factory=list)
    unchanged: int = 0
    missing: list[tuple[tuple, str]] = field(default_factory=list)

    @property
    def compared(self) -> int:
        """How many cases were measured on both sides."""
        return len(self.regressions) + len(self.improvements) + len(self.noise) + self.unchanged


def parse_threshold(text: str) -> float:
    """0.05 from "5%" or "0.05" (an argparse type: raises ArgumentTypeError on anything else)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = None
    # A bare number >= 1 ("5") is ambiguous between 5% and 500%: refuse rather than guess.
    if value is None or not 0 <= value < (10 if text.endswith("%") else 1):
        raise argparse.ArgumentTypeError(f"expected a fraction such as 5% or 0.05, got {text!r}")
    return value


def verdict(new: dict, base: dict, threshold: float) -> str:
    """The verdict on two measured rows: "regression", "improvement", "noise" or "unchanged"."""
    ratio = new["ms_p50"] / base["ms_p50"]
    if ratio > 1 + threshold:
        return "regression" if new["ms_p20"] > base["ms_p80"] else "noise"
    if 1 / ratio > 1 + threshold:
        return "improvement" if new["ms_p80"] < base["ms_p20"] else "noise"
    return "unchanged"


def compare(new_rows: list[dict], base_rows: list[dict], threshold: float, backends: set[str] | None) -> Comparison:
    """Match rows by (kernel, backend, mode, case), keeping `backends` (None: all), and
    sort them; a case skipped or absent on one side is listed as missing."""
    new = {row_key(r): r for r in new_rows if backends is None or r["backend"] in backends}
    base = {row_key(r): r for r in base_rows if backends is None or r["backend"] in backends}
    result = Comparison()
    buckets = {"regression": result.regressions, "improvement": result.improvements, "noise": result.noise}
    for key in [*base, *(k for k in new if k not in base)]:
        why = _missing_side(new.get(key), base.get(key))
        if why:
            result.missing.append((key, why))
        elif (kind := verdict(new[key], base[key], threshold)) == "unchanged":
            result.unchanged += 1
        else:
            buckets[kind].append((new[key], base[key]))
    return result


def _missing_side(new: dict | None, base: dict | None) -> str | None:
    for label, row, other in (("NEW", new, "BASELINE"), ("BASELINE", base, "NEW")):
        if row is None:
            return f"only in {other}"
        if row["ms_p50"] is None:
            return f"not measured in {label}: {row['note'] or 'no time'}"
    return None


def describe(path, metadata: dict) -> str:
    """One line naming a results file and the run behind it."""
    dirty = " (uncommitted changes)" if metadata.get("git_dirty") else ""
    return f"`{path}` · {metadata['device']} · commit {metadata['git_commit'][:12]}{dirty} · {metadata['date']}"


def markdown(result: Comparison, threshold: float, sides: dict[str, str], interpreted: bool) -> str:
    """The comparison as Markdown: verdict, the runs (sides: label -> describe()), counts,
    then tables of regressions, improvements, moves within noise and missing cases."""
    status = f"FAIL ({len(result.regressions)} regressed)" if result.regressions else "PASS"
    lines = [f"# Benchmark comparison: {status}"]
    if interpreted:
        lines.append("> CPU-interpreter timings: they check the plumbing, not performance.")
    table = ["| | |", "| --- | --- |", *(f"| {label} | {text} |" for label, text in sides.items())]
    limit = f"{1 + threshold:.4g}"
    table.append(f"| rule | regressed: new median > {limit} x baseline median and new p20 > baseline p80; "
                 f"improved: baseline median > {limit} x new median and new p80 < baseline p20 |")
    table.append(f"| compared | {result.compared} cases: {len(result.regressions)} regressed, "
                 f"{len(result.improvements)} improved, {result.unchanged + len(result.noise)} unchanged "
                 f"({len(result.noise)} of them moved past the threshold within noise) |")
    table.append(f"| missing | {len(result.missing)} cases (measured on one side only) |")
    lines.append("\n".join(table))
    for title, pairs in (("Regressions", result.regressions), ("Improvements", result.improvements),
                         ("Within noise", result.noise)):
        if pairs:
            lines += [f"## {title}", _pairs_table(pairs)]
    if result.missing:
        rows = [f"| {' | '.join(key)} | {why} |" for key, why in result.missing]
        lines += ["## Missing", "| kernel | backend | mode | case | why |\n| --- | --- | --- | --- | --- |\n"
                  + "\n".join(rows)]
    return "\n\n".join(lines) + "\n"


def _pairs_table(pairs: list[tuple[dict, dict]]) -> str:
    def times(row):
        return f"{number(row['ms_p50'])} ({number(row['ms_p20'])}-{number(row['ms_p80'])})"

    lines = ["| kernel | backend | mode | case | baseline ms p50 (p20-p80) | new ms p50 (p20-p80) | new / baseline |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row_key(new))} | {times(base)} | {times(new)} | {new['ms_p50'] / base['ms_p50']:.3f} |"
              for new, base in pairs]
    return "\n".join(lines)
