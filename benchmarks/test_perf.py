"""pytest-benchmark view of the registered suites: one test per (operator, case, mode),
timing tritium alone, for users who gate performance through pytest (see README.md here).

    pytest benchmarks/test_perf.py --benchmark-autosave
    pytest benchmarks/test_perf.py --benchmark-compare --benchmark-compare-fail=median:5%

The quick cases on a GPU, the small interpreter cases on CPU. Not collected by
`pytest tests`: timing belongs to `python -m benchmarks` and to these opt-in runs.
"""

import os
import warnings

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Before triton is first imported: Triton picks the interpreter when a kernel is decorated.
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter evaluates masked-off lanes in numpy too; their overflows are noise.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")

import pytest

from tritium import bench
from tritium.bench.operators import operators
from tritium.cli.cases import SuiteCase

BACKEND = "tritium"


def _params() -> list:
    bench.load("all")
    return [
        pytest.param(SuiteCase(op, case), mode, id=f"{op.name}-{mode}-{case.name}")
        for op in operators("all") if any(b.name == BACKEND for b in op.backends)
        for case in op.cases(DEVICE, True)
        for mode in op.modes
    ]


@pytest.mark.parametrize(("target", "mode"), _params())
def test_perf(benchmark, target: SuiteCase, mode: str) -> None:
    """Time one step of tritium on `target` in `mode` (skipped where it cannot run here)."""
    try:
        step = target.step(BACKEND, mode, DEVICE)
    except ValueError as exc:
        pytest.skip(str(exc))
    # pytest-benchmark reads the wall clock: on CUDA each round waits for its kernels.
    run = (lambda: (step(), torch.cuda.synchronize())) if DEVICE == "cuda" else step
    run()  # outside the timing: the first launch compiles (or, interpreted, warms caches)
    benchmark.group = f"{target.op.name} {mode}"
    benchmark.extra_info.update(flops=target.flops(mode), bytes=target.nbytes(mode), config=target.case.params)
    benchmark(run)
