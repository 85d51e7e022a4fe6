"""Profile a callable: a Chrome/Perfetto trace, a per-kernel table, and on CUDA a region
that nsys and ncu capture by itself.

torch.profiler and emit_nvtx cannot be enabled together on one thread ("Profiler is
already enabled on this thread"), and nsys/ncu want CUPTI to themselves. So on CUDA the
measured steps run twice after the warm-up: first under torch.profiler (the table and the
trace), then under emit_nvtx between cudaProfilerStart and cudaProfilerStop, which
`nsys profile --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` capture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

CPU_LABEL = "CPU-interpreter (correctness and plumbing, not performance)"
TOP = 15
NAME_WIDTH = 58
STEP_LABEL = "step "
ROW_KIND = {"cuda": "CUDA kernel", "cpu": "op"}
CLOCKS = {
    "cuda": "device time of CUDA kernels, memcpy and memset",
    "cpu": "CPU self time of ops (the Triton interpreter runs inside tritium's ops)",
}


@dataclass(frozen=True)
class OpTime:
    """One kernel (CUDA) or op (CPU) over all measured steps."""

    name: str
    calls: int
    total_us: float


@dataclass(frozen=True)
class ProfileResult:
    """What profile() measured. `ops` slowest first; `step_us` the time of one step (on
    CUDA the span from the first kernel's start to the last one's end, over the steps; on
    CPU the wall time of the step labels); flops and nbytes count one step's work."""

    ops: tuple[OpTime, ...]
    steps: int
    step_us: float
    device: str
    flops: float
    nbytes: float
    trace_path: Path

    def table(self, top: int = TOP) -> str:
        """The per-kernel table, `top` rows and an "other" line, under 100 columns."""
        total = self.steps * self.step_us
        lines = [f"{ROW_KIND[self.device]:<{NAME_WIDTH}} {'calls':>7} {'total ms':>10} {'% step':>7} {'avg us':>10}"]
        rest = self.ops[top:]
        rows = list(self.ops[:top])
        if rest:
            rows.append(OpTime(f"other ({len(rest)} more)", sum(o.calls for o in rest), sum(o.total_us for o in rest)))
        for op in rows:
            name = op.name if len(op.name) <= NAME_WIDTH else op.name[: NAME_WIDTH - 3] + "..."
            lines.append(f"{name:<{NAME_WIDTH}} {op.calls:>7} {op.total_us / 1e3:>10.3f}"
                         f" {100 * op.total_us / total:>7.1f} {op.total_us / op.calls:>10.1f}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One step's time and the throughput it achieves, and what the times are."""
        if not self.ops:
            return "no CUDA kernel was recorded: under nsys or ncu, which hold CUPTI, read their report"
        seconds = self.step_us * 1e-6
        return (f"step time {self.step_us / 1e3:.3f} ms (mean of {self.steps}): "
                f"{self.flops / seconds / 1e12:.3g} TFLOP/s, {self.nbytes / seconds / 1e9:.3g} GB/s\n"
                f"times: {CLOCKS[self.device]}" + f"\n{CPU_LABEL}" * (self.device == "cpu"))


def profile(fn: Callable[[], object], *, steps: int, warmup: int, trace_path: str | Path,
            flops: float, nbytes: float, device: str) -> ProfileResult:
    """Run fn() `warmup` times unrecorded, then `steps` times under torch.profiler (CPU
    activity, plus CUDA on "cuda"), each labelled "step N"; write the Chrome/Perfetto
    trace to `trace_path` atomically. On "cuda", run the steps once more under emit_nvtx
    between cudaProfilerStart/Stop. `flops` and `nbytes` count the work of one fn()."""
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device == "cuda")
    with torch.profiler.profile(activities=activities) as prof:
        _run_steps(fn, steps, device)
    trace_path = Path(trace_path)
    _export(prof, trace_path)
    ops, step_us = (_cuda_times if device == "cuda" else _cpu_times)(prof.events(), steps)
    if device == "cuda":
        # Last, with the trace written: nsys's default --capture-range-end=stop-shutdown
        # ends the process at cudaProfilerStop.
        with torch.cuda.profiler.profile(), torch.autograd.profiler.emit_nvtx():
            _run_steps(fn, steps, device)
    return ProfileResult(ops, steps, step_us, device, flops, nbytes, trace_path)


def _run_steps(fn, steps: int, device: str) -> None:
    for i in range(steps):
        with record_function(f"{STEP_LABEL}{i}"):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()  # the last kernels must finish inside the recorded region


def _export(prof, path: Path) -> None:
    """Write the trace beside `path`, then rename: a reader never sees half a file. The
    temporary name keeps the suffix, which tells torch whether to gzip (.gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        prof.export_chrome_trace(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _cuda_times(events, steps: int) -> tuple[tuple[OpTime, ...], float]:
    # Kernels, memcpy and memset; user annotations ("step N" on the GPU timeline) span them.
    device_events = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    if not device_events:
        return (), float("nan")  # summary() says why; the NVTX pass must still run
    span = max(e.time_range.end for e in device_events) - min(e.time_range.start for e in device_events)
    return _by_name((e.name, e.time_range.elapsed_us()) for e in device_events), span / steps


def _cpu_times(events, steps: int) -> tuple[tuple[OpTime, ...], float]:
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    labels = [e for e in cpu if e.name.startswith(STEP_LABEL)]
    ops = _by_name((e.name, e.self_cpu_time_total) for e in cpu if not e.name.startswith(STEP_LABEL))
    return ops, sum(e.cpu_time_total for e in labels) / steps


def _by_name(times) -> tuple[OpTime, ...]:
    calls: dict[str, int] = {}
    totals: dict[str, float] = {}
    for name, us in times:
        calls[name] = calls.get(name, 0) + 1
        totals[name] = totals.get(name, 0.0) + us
    return tuple(sorted((OpTime(n, calls[n], totals[n]) for n in calls), key=lambda o: -o.total_us))
