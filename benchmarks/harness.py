"""Operators, backends and the measurement loop.

An operator is an input generator over a list of cases plus named backends, one of them
the baseline on each device. Every (case, mode, backend) becomes one row of the long-format
results table: time quantiles, TFLOP/s and GB/s with % of the measured peak, speedup over
the baseline, and max abs error against a float64 reference with the tolerance it is judged
by (benchmarks/accuracy.py). A backend that cannot run a case is a row with a note, never an
error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from benchmarks import accuracy, timing

# What a backend raises when it cannot run here: a missing import, a case it cannot express
# exactly, or a library refusing it ("No available kernel", out of memory).
SKIPPED = (ImportError, NotImplementedError, RuntimeError)


class Unsupported(NotImplementedError):
    """Raised by a backend's setup for a case it cannot compute exactly."""


@dataclass(frozen=True)
class Case:
    """One problem: `name` unique within its operator (what --filter matches), `x` the
    plot abscissa, `group` the plot panel it belongs to, `params` its sizes and options
    (JSON-able; stored as the row's config)."""

    name: str
    x: int
    group: str
    params: dict


@dataclass(frozen=True)
class Backend:
    """A named implementation. setup(case, inputs) returns a zero-argument callable that
    computes the operator's output from `inputs` (a tensor, or a tuple of tensors for an
    op with several outputs, such as RoPE's q and k); it raises Unsupported or ImportError
    when it cannot run the case. exact=False marks a backend timed for comparison that
    computes a different function (dense attention beside a sparse one): no accuracy."""

    name: str
    setup: Callable[[Case, dict], Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]]
    exact: bool = True


@dataclass(frozen=True)
class Operator:
    """A benchmarked op. cases(device, quick) lists its cases; inputs(case, device) builds
    a dict of tensors; flops(case, mode) and nbytes(case, mode) count the work and the
    least memory traffic; error(case, inputs, outputs, grad_out) is the max abs error of
    outputs (the output, then in fwd+bwd the gradients of grad_inputs) against a float64
    reference. `baseline` names the baseline backend per device; `accuracy_reference` the
    backend computing the op with PyTorch in the case's dtype, whose error scales every
    row's tolerance; `headline` ("tflops" or "gbps") is the throughput the report leads
    with; `x_name` says what case.x is."""

    name: str
    suite: str
    modes: tuple[str, ...]
    cases: Callable[[str, bool], list[Case]]
    inputs: Callable[[Case, str], dict]
    backends: tuple[Backend, ...]
    baseline: dict[str, str]
    flops: Callable[[Case, str], float]
    nbytes: Callable[[Case, str], float]
    error: Callable[[Case, dict, tuple, torch.Tensor | None], float]
    grad_inputs: tuple[str, ...] = ()
    accuracy_reference: str = "eager"
    headline: str = "tflops"
    x_name: str = "seqlen"


@dataclass(frozen=True)
class RunOptions:
    """What one `python -m benchmarks run` asked for, plus the measured peaks."""

    device: str
    quick: bool
    filter: str | None
    mode: str | None
    peaks: dict


_OPERATORS: dict[str, Operator] = {}


def register(op: Operator) -> Operator:
    """Add `op` to the registry (suites call this at import)."""
    if op.accuracy_reference not in {b.name for b in op.backends}:
        # Else every row would silently fall back to the looser per-dtype bound.
        raise ValueError(f"{op.name}: accuracy_reference {op.accuracy_reference!r} is not one of its backends")
    _OPERATORS[op.name] = op
    return op


def operators(suite: str) -> list[Operator]:
    """Registered operators of `suite` ("all": every one), in registration order."""
    return [op for op in _OPERATORS.values() if suite in ("all", op.suite)]


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
    inputs = op.inputs(case, opts.device)
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
    row = _new_row(op, backend, case, mode, opts)
    try:
        forward = backend.setup(case, inputs)
        step, grad_out = _mode_step(forward, mode, [inputs[n] for n in op.grad_inputs])
        row["ms_p20"], row["ms_p50"], row["ms_p80"] = timing.time_quantiles(step, opts.device)
        _add_throughput(row, opts.peaks)
        # Checked after timing: the float64 reference is what most likely runs out of
        # memory, and that must not cost the row its times.
        if backend.exact:
            outputs = step()
            row["dtype"] = str(outputs[0].dtype).removeprefix("torch.")
            row["max_abs_err"] = op.error(case, inputs, outputs, grad_out)
        else:
            row["note"] = "computes a different function (a reference point): accuracy not compared"
    except SKIPPED as exc:
        row["note"] = ("skipped: " if row["ms_p50"] is None else "accuracy not checked: ") + _reason(exc)
        if opts.device == "cuda":
            torch.cuda.empty_cache()  # what a failed backend held must not starve the next one
    return row


def _reason(exc: Exception) -> str:
    # The first line says why; a whole Triton or Inductor traceback would drown the report.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def _mode_step(forward, mode: str, leaves: list[torch.Tensor]):
    """The callable timed for `mode`, returning a tuple of outputs, and the grad_out used.

    fwd+bwd differentiates w.r.t. the inputs with torch.autograd.grad, so nothing
    accumulates in .grad between runs; grad_out is random (zeros would let a backend skip
    work) and identical for every backend of a case: a tensor, or a tuple of them when
    forward returns several outputs.
    """
    if mode != "fwd+bwd":
        return (lambda: _outputs(forward())), None
    outs = _outputs(forward())
    generator = torch.Generator(device=outs[0].device).manual_seed(1)
    grads = tuple(torch.randn(o.shape, generator=generator, dtype=o.dtype, device=o.device) for o in outs)

    def step():
        outs = _outputs(forward())
        return (*outs, *torch.autograd.grad(outs, leaves, grads))

    return step, grads if len(grads) > 1 else grads[0]


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _new_row(op, backend, case, mode, opts) -> dict:
    reproduce = f"python -m benchmarks run --suite {op.suite} --filter {case.name} --mode {mode}"
    reproduce += " --device cpu" * (opts.device == "cpu") + " --quick" * opts.quick
    return {
        "suite": op.suite, "kernel": op.name, "backend": backend.name,
        "is_baseline": backend.name == op.baseline[opts.device], "mode": mode,
        "case": case.name, "group": case.group, "x_name": op.x_name, "x": case.x,
        "ms_p20": None, "ms_p50": None, "ms_p80": None,
        "flops": op.flops(case, mode), "bytes": op.nbytes(case, mode), "headline": op.headline,
        "tflops": None, "tflops_pct_peak": None, "gbps": None, "gbps_pct_peak": None,
        "speedup": None, "max_abs_err": None, "dtype": None, "tolerance": None, "accuracy_failed": None,
        "config": case.params, "note": "",
        "reproduce": reproduce,
    }


def _add_throughput(row: dict, peaks: dict) -> None:
    seconds = row["ms_p50"] * 1e-3
    row["tflops"] = row["flops"] / seconds / 1e12
    row["gbps"] = row["bytes"] / seconds / 1e9
    for metric in ("tflops", "gbps"):
        if peaks.get(metric):
            row[f"{metric}_pct_peak"] = 100 * row[metric] / peaks[metric]


def max_abs_error(reference, inputs: dict, outputs, grad_out=None, grad_names=()) -> float:
    """Largest |output - expected| over `outputs`: reference(**inputs) run in float64 (one
    output or a tuple), then (with grad_out, a tensor or a tuple) its gradients w.r.t.
    `grad_names`, in that order. Non-float inputs pass through unchanged."""
    wide = {
        name: x.detach().double().requires_grad_(grad_out is not None and name in grad_names)
        if x.is_floating_point() else x
        for name, x in inputs.items()
    }
    outs = _outputs(reference(**wide))
    expected = list(outs)
    if grad_out is not None:
        grads = [g.double() for g in _outputs(grad_out)]
        expected += torch.autograd.grad(outs, [wide[n] for n in grad_names], grads)
    return max(
        (got.detach().double() - want).abs().max().item() if got.numel() else 0.0
        for got, want in zip(outputs, expected, strict=True)
    )

