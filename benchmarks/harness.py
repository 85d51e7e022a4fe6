"""The measurement loop over the operators of tritium.bench (tritium/bench/operators.py).

Every (case, mode, backend) becomes one row of the long-format
results table: time quantiles, TFLOP/s and GB/s with % of the measured peak, speedup over
the baseline, peak memory allocated (CUDA), and max abs error against a float64 reference
with the tolerance it is judged by (benchmarks/accuracy.py). A backend that cannot run a
case is a row with a note, never an error; so is every backend of a case whose inputs
cannot be built (the hf suite's model without transformers). A missing optional library's
note says what to install.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from benchmarks import accuracy, timing
from tritium.bench.operators import Case, Operator, install_hint, mode_step

# What a backend, or the building of a case's inputs, raises when it cannot run here: a
# missing import, a case it cannot express exactly, or a library refusing it ("No available
# kernel", out of memory).
SKIPPED = (ImportError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class RunOptions:
    """What one `python -m benchmarks run` asked for, plus the measured peaks."""

    device: str
    quick: bool
    filter: str | None
    mode: str | None
    peaks: dict


def run_operator(op: Operator, opts: RunOptions) -> list[dict]:
    """Measure every selected case and mode of `op` with every backend; one row each."""
    cases = [c for c in op.cases(opts.device, opts.quick) if not opts.filter or opts.filter in c.name]
    modes = [m for m in op.modes if opts.mode in (None, m)]
    rows = []
    for case in tqdm(cases, desc=op.name, unit="case"):
        for mode in modes:
            rows += _run_case(op, case, mode, opts)
    return rows


def _run_case(op: Operator, case: Case, mode: str, opts: RunOptions) -> list[dict]:
    torch.manual_seed(0)
    try:
        inputs = op.inputs(case, opts.device)
    except SKIPPED as exc:
        return [_skipped(new_row(op, backend, case, mode, opts), exc, opts) for backend in op.backends]
    if mode == "fwd+bwd":
        for name in op.grad_inputs:
            inputs[name].requires_grad_()
    rows = [_measure(op, backend, case, mode, inputs, opts) for backend in op.backends]
    baseline = next((r for r in rows if r["is_baseline"] and r["ms_p50"] is not None), None)
    for row in rows:
        if baseline is not None and row["ms_p50"] is not None:
            row["speedup"] = baseline["ms_p50"] / row["ms_p50"]
    accuracy.judge(rows, op.accuracy_reference)
    return rows


def _measure(op, backend, case, mode, inputs, opts) -> dict:
    row = new_row(op, backend, case, mode, opts)
    try:
        forward = backend.setup(case, inputs)
        step, grad_out = mode_step(forward, mode, [inputs[n] for n in op.grad_inputs])
        row["ms_p20"], row["ms_p50"], row["ms_p80"] = timing.time_quantiles(step, opts.device)
        add_throughput(row, opts.peaks)
        # One more call, untimed: the outputs whose error is checked, and on CUDA the peak memory.
        if opts.device == "cuda":
            outputs = _peak_memory(step, row)
        elif backend.exact:
            outputs = step()
        # Checked after timing: the float64 reference is what most likely runs out of
        # memory, and that must not cost the row its times.
        if backend.exact:
            row["dtype"] = str(outputs[0].dtype).removeprefix("torch.")
            row["max_abs_err"] = op.error(case, inputs, outputs, grad_out)
        else:
            row["note"] = "computes a different function (a reference point): accuracy not compared"
    except SKIPPED as exc:
        _skipped(row, exc, opts)
    return row


def _peak_memory(step, row: dict):
    """step() once more, untimed, setting row["peak_memory_gib"]: the most CUDA memory
    allocated while it ran, what the case holds included (inputs, the backend's weights and
    caches). Not over the timed runs: do_bench's L2-flush buffer would count too. Returns
    the outputs (a CUDA graph's replay allocates nothing: its buffers are not counted)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    outputs = step()
    torch.cuda.synchronize()
    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return outputs


def _skipped(row: dict, exc: Exception, opts: RunOptions) -> dict:
    """`row` with a note saying why it has no time (or, timed, no error)."""
    row["note"] = ("skipped: " if row["ms_p50"] is None else "accuracy not checked: ") + _reason(exc)
    if opts.device == "cuda":
        torch.cuda.empty_cache()  # what a failed backend held must not starve the next one
    return row


def _reason(exc: Exception) -> str:
    hint = install_hint(exc)
    if hint:
        return hint
    # The first line says why; a whole Triton or Inductor traceback would drown the report.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def new_row(op, backend, case, mode, opts) -> dict:
    """A results row of (op, backend, case, mode), every field present, nothing measured
    yet (benchmarks/tp.py fills its own the same way)."""
    reproduce = f"python -m benchmarks run --suite {op.suite} --filter {case.name} --mode {mode}"
    reproduce += " --device cpu" * (opts.device == "cpu") + " --quick" * opts.quick
    return {
        "suite": op.suite, "kernel": op.name, "backend": backend.name,
        "is_baseline": backend.name == op.baseline[opts.device], "mode": mode,
        "case": case.name, "group": case.group, "x_name": op.x_name, "x": case.x,
        "ms_p20": None, "ms_p50": None, "ms_p80": None,
        "flops": op.flops(case, mode), "bytes": op.nbytes(case, mode), "headline": op.headline,
        "tflops": None, "tflops_pct_peak": None, "gbps": None, "gbps_pct_peak": None, "peak_memory_gib": None,
        "speedup": None, "max_abs_err": None, "dtype": None, "tolerance": None, "accuracy_failed": None,
        "config": case.params, "note": "",
        "reproduce": reproduce,
    }


def add_throughput(row: dict, peaks: dict) -> None:
    """TFLOP/s and GB/s of a timed row, and their % of the measured peaks."""
    seconds = row["ms_p50"] * 1e-3
    row["tflops"] = row["flops"] / seconds / 1e12
    row["gbps"] = row["bytes"] / seconds / 1e9
    for metric in ("tflops", "gbps"):
        if peaks.get(metric):
            row[f"{metric}_pct_peak"] = 100 * row[metric] / peaks[metric]


