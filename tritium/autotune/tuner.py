"""The search: time every candidate config of a bucket and keep the fastest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tritium.autotune.config import Config


@dataclass(frozen=True)
class Result:
    """The winner of one search, its median time and the heuristic default's (ms)."""

    config: Config
    ms: float
    default_ms: float | None
    tried: int


def gpu_timer(fn: Callable[[], None]) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: warm-up excluded, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))


def search(
    candidates: list[Config],
    launch: Callable[[Config], None],
    default: Config,
    timer: Callable[[Callable[[], None]], float] = gpu_timer,
) -> Result:
    """Time `launch(config)` for every candidate (and the default); the fastest wins.

    A candidate that fails to compile or launch (out of shared memory or registers) is
    skipped. The default is always timed so the gain can be reported; it also wins when
    no candidate runs.
    """
    default_ms = _time(launch, default, timer)
    best, best_ms = default, default_ms if default_ms is not None else float("inf")
    for config in candidates:
        ms = _time(launch, config, timer)
        if ms is not None and ms < best_ms:
            best, best_ms = config, ms
    return Result(best, best_ms, default_ms, len(candidates))


def _time(launch, config: Config, timer) -> float | None:
    try:
        launch(config)  # compile outside the timed region
        return timer(lambda: launch(config))
    except _candidate_failures():
        return None


def _candidate_failures() -> tuple[type[BaseException], ...]:
    """What a config too big for the GPU raises; anything else is a bug and propagates."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return (OutOfResources, CompilationError, RuntimeError)  # RuntimeError: CUDA launch/OOM
