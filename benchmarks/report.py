"""README.md of a results folder: run metadata, a summary of tritium's speedups per suite
and of the rows that failed accuracy, one table per (kernel, mode) with its geometric-mean
speedups, accuracy marks, skipped backends and plots, and the autotuner's chosen configs.
Readable without results.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks import accuracy, plots
from benchmarks.results import write_atomic
from benchmarks.summary import (
    SUBJECT,
    geomean,
    number,
    ordered,
    speedup_ratios,
    speedups_over,
    tables,
)

LEGEND = (
    "Each cell: median time · throughput (% of the measured peak above) · speedup over the "
    "table's baseline · on CUDA, the peak memory allocated during one call (everything the case "
    "holds: inputs, weights, caches); **accuracy FAIL** marks a row whose error against the "
    "float64 reference exceeds its tolerance (see Summary). p20/p80 times, both throughputs, "
    "errors, tolerances and a `reproduce` command for every row are in results.csv and "
    "results.json."
)


def write(out_dir: Path, metadata: dict, rows: list[dict]) -> None:
    """Write README.md and the PNG plots for `rows` into out_dir. `metadata` is one run's,
    or results.merge's (with "sources", every merged run's metadata)."""
    sections = [_header(metadata), _summary(rows, metadata)]
    for (kernel, mode), table in tables(rows).items():
        images = plots.write_figures(out_dir, kernel, mode, table, metadata)
        sections.append(_section(kernel, mode, table, images))
    sections.append(_autotune_section(_runs(metadata)))
    write_atomic(Path(out_dir) / "README.md", "\n\n".join(sections) + "\n")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _runs(metadata: dict) -> list[dict]:
    return metadata.get("sources") or [metadata]


# ----------------------------------------------------------------------------- metadata


def _sku(m: dict) -> str:
    sku = m.get("device_sku")
    if not sku or sku.get("sm_count") is None:
        return "n/a"
    return f"{sku['name']} · {sku['sm_count']} SMs · {sku['memory_gib']} GiB · compute capability {sku['compute_capability']}"


def _autotune_summary(m: dict) -> str:
    state = m.get("autotune", "unknown")
    if not isinstance(state, dict):
        return str(state)
    used = sum(len(k["configs"]) for k in state.values())
    return f"{len(state)} kernels registered, {used} configs used (see Autotune state)"


# The metadata table: a label, then how to render one run's value. Older results files
# lack driver, SKU and autotune: those read n/a.
_METADATA = (
    ("device", lambda m: m["device"]),
    ("device SKU", _sku),
    ("GPU driver", lambda m: m.get("driver", "n/a")),
    ("Triton interpreter", lambda m: "yes" if m["interpreted"] else "no"),
    ("torch / triton / tritium", lambda m: f"{m['torch']} / {m['triton']} / {m['tritium']}"),
    ("CUDA / Python", lambda m: f"{m['cuda'] or 'n/a'} / {m['python']}"),
    ("git commit", lambda m: m["git_commit"] + (" (uncommitted changes)" if m.get("git_dirty") else "")),
    ("date (UTC)", lambda m: m["date"]),
    ("command", lambda m: f"`{m['command']}`"),
    ("operators", lambda m: ", ".join(m["operators"]) if "operators" in m else "n/a"),
    ("wall time", lambda m: f"{m['wall_s']:.0f} s"),
    ("peak bf16 GEMM (8192³ matmul, measured)", lambda m: f"{number(m['peak_bf16_tflops'])} TFLOP/s"),
    ("peak copy bandwidth (device-to-device, measured)", lambda m: f"{number(m['peak_copy_gbps'])} GB/s"),
    ("autotune", _autotune_summary),
)


def _header(m: dict) -> str:
    runs = _runs(m)
    banner = f"\n\n> **{plots.INTERPRETER_LABEL}**" if m["interpreted"] else ""
    # A run stopped midway (or still going) wrote the operators it had measured; merged with
    # a run of the rest, the report may be whole, so each partial source says what it lacks.
    partial = "Partial run" if len(runs) == 1 else "A merged run is partial"
    banner += "".join(f"\n\n> **{partial}**: {run['partial']}." for run in runs if run.get("partial"))
    lines = ["| | |", "| --- | --- |"] + [f"| merged runs | {len(runs)} |"] * (len(runs) > 1)
    # Merged runs may differ (commit, date, peaks): each distinct value is shown once.
    lines += [f"| {label} | {'<br>'.join(ordered(map(render, runs)))} |" for label, render in _METADATA]
    return f"# Benchmarks: {m['device']}{banner}\n\n" + "\n".join(lines) + f"\n\n{LEGEND}"


# ----------------------------------------------------------------------------- summary


def _summary(rows: list[dict], metadata: dict) -> str:
    """Per suite and peer: geometric mean, count and range of tritium's speedups."""
    table = [
        f"| {suite} | {peer} | {_ratio(geomean(ratios))} | {len(ratios)} | {_ratio(min(ratios))} to {_ratio(max(ratios))} |"
        for suite in ordered(r["suite"] for r in rows)
        for peer, ratios in speedup_ratios([r for r in rows if r["suite"] == suite]).items()
        if ratios
    ]
    parts = [
        "## Summary",
        (f"Speedup of {SUBJECT} over each peer (the peer's median time / {SUBJECT}'s) over every "
         f"(kernel, mode, case) both measured; above 1x {SUBJECT} is faster."),
        f"| suite | peer | geomean speedup of {SUBJECT} | cases | range |\n| --- | --- | --- | --- | --- |\n"
        + "\n".join(table) if table else f"No case was measured with both {SUBJECT} and a peer.",
    ]
    if not any(r[f"{r['headline']}_pct_peak"] is not None for r in rows):
        where = "on CPU-interpreter" if metadata["interpreted"] else "in this run"
        parts.append(f"Roofline plots (% of the measured peak): n/a {where}, where no peak is measured.")
    return "\n\n".join([*parts, _accuracy_summary(rows)])


def _dtypes(bounds: dict) -> str:
    return ", ".join(f"{str(dtype).removeprefix('torch.')} {value:g}" for dtype, value in bounds.items())


def _accuracy_summary(rows: list[dict]) -> str:
    """How many rows failed accuracy and which, under the rule that judged them."""
    judged = sum(r.get("accuracy_failed") is not None for r in rows)
    if not judged:
        return "Accuracy: not judged (these results record no tolerances; a new run judges them)."
    failed = accuracy.failures(rows)
    ours = len(accuracy.failures(rows, subject_only=True))
    rule = (f"A row fails accuracy when its max abs error against the float64 reference exceeds "
            f"{accuracy.FACTOR:g}x the error of PyTorch computing the same case in the same dtype "
            f"(the operator's accuracy reference, eager in most suites) plus a floor "
            f"({_dtypes(accuracy.FLOOR)}); where that reference has no error, a per-dtype bound "
            f"({_dtypes(accuracy.BOUND)}). A {SUBJECT} row that fails makes the run exit with status 1.")
    if not failed:
        return f"**Accuracy: all {judged} rows with an error are within their tolerance.** {rule}"
    table = ["| kernel | mode | case | backend | max abs error | tolerance |", "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['kernel']} | {r['mode']} | {r['case']} | {r['backend']} | {number(r['max_abs_err'])} | "
              f"{number(r['tolerance'])} |" for r in failed]
    return (f"**Accuracy: {len(failed)} of {judged} rows failed accuracy ({ours} of them {SUBJECT}'s).** "
            f"{rule}\n\n" + "\n".join(table))


# ----------------------------------------------------------------------------- tables


def _cell(row: dict) -> str:
    if row["ms_p50"] is None:
        return "skipped"
    metric = row["headline"]
    unit = plots.UNITS[metric][0]
    pct = row[f"{metric}_pct_peak"]
    pct_text = "n/a" if pct is None else f"{pct:.0f}%"
    text = f"{number(row['ms_p50'], ' ms')}<br>{number(row[metric])} {unit} ({pct_text})<br>{_ratio(row['speedup'])}"
    if row.get("collective_ms") is not None:  # tensor-parallel rows: the step's time in collectives
        text += f"<br>collectives {number(row['collective_ms'], ' ms')} ({100 * row['collective_ms'] / row['ms_p50']:.0f}%)"
    if row.get("peak_memory_gib") is not None:  # measured on CUDA only; older results lack it
        text += f"<br>{number(row['peak_memory_gib'], ' GiB')} peak"
    if row.get("accuracy_failed"):
        text += f"<br>**accuracy FAIL**: err {number(row['max_abs_err'])} > tol {number(row['tolerance'])}"
    return text


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
        x = next(r["x"] for r in rows if r["case"] == case)
        lines.append(f"| {case} | {x} | " + " | ".join(cells) + " |")
    worst = [max((r["max_abs_err"] for r in rows if r["backend"] == b and r["max_abs_err"] is not None), default=None)
             for b in backends]
    lines.append("| max abs error vs float64 (worst case) | | " + " | ".join(number(w) for w in worst) + " |")
    lines.append("| accuracy (error within tolerance) | | "
                 + " | ".join(_verdicts([r for r in rows if r["backend"] == b]) for b in backends) + " |")
    text = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    return text + _notes(rows) + "".join(f"\n\n![{name}]({name})" for name in images)


def _verdicts(rows: list[dict]) -> str:
    """One backend's accuracy over a table's N judged cases: "ok (N of N)", "**FAIL** in F of
    N" or "n/a"."""
    judged = [r["accuracy_failed"] for r in rows if r.get("accuracy_failed") is not None]
    if not judged:
        return "n/a"
    return f"**FAIL** in {sum(judged)} of {len(judged)}" if any(judged) else f"ok ({len(judged)} of {len(judged)})"


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


# ----------------------------------------------------------------------------- autotune


def _autotune_section(runs: list[dict]) -> str:
    """Per kernel: where its lookups found configs, and the configs it launched with."""
    states = [m.get("autotune", "unknown") for m in runs]
    title = "## Autotune state"
    if not all(isinstance(s, dict) for s in states):
        return f"{title}\n\nunknown: this results file does not record it."
    # Distinct rows over merged runs: runs that used the same configs show them once.
    rows = ordered(
        f"| {name} | {_counts(kernel['resolved'])} | {kernel['memo_hits']} | "
        f"{'<br>'.join(map(_config, kernel['configs'])) or 'none'} |"
        for state in states for name, kernel in state.items()
    )
    note = ("Under the Triton interpreter kernels run their fixed interpreter configs: nothing is "
            "looked up or tuned.\n\n" if runs[0]["interpreted"] else "")
    return (f"{title}\n\n{note}| kernel | configs resolved from | memo hits | configs used |\n"
            "| --- | --- | --- | --- |\n" + "\n".join(rows))


def _counts(counts: dict) -> str:
    return " · ".join(f"{source} {count}" for source, count in counts.items()) or "none"


def _config(config: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in config.items())
