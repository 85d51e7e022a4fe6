"""Benchmark cases by name, for `tritium profile`: list them, resolve a name to one, and
build the callable that one step of it runs.

A case is named "KERNEL/CASE_NAME" (e.g. attention/d128-causal-s4096-b4-h16); any unique
substring of that name resolves too. Imports the suites, and so triton: import this only
once TRITON_INTERPRET is settled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from tritium import bench
from tritium.bench import operators
from tritium.bench.operators import Case, Operator, install_hint, mode_step

DEVICES = ("cuda", "cpu")
CLOSE_MATCHES = 5


@dataclass(frozen=True)
class SuiteCase:
    """One case of a benchmarked operator, run by one of its backends in one of its modes."""

    op: Operator
    case: Case

    @property
    def name(self) -> str:
        return f"{self.op.name}/{self.case.name}"

    @property
    def modes(self) -> tuple[str, ...]:
        return self.op.modes

    def flops(self, mode: str) -> float:
        """Floating-point operations of one step in `mode`."""
        return self.op.flops(self.case, mode)

    def nbytes(self, mode: str) -> float:
        """Least memory traffic of one step in `mode`, in bytes."""
        return self.op.nbytes(self.case, mode)

    def step(self, backend: str, mode: str, device: str) -> Callable[[], tuple]:
        """The callable one step runs: `backend` computing this case in `mode` on `device`,
        on inputs built once and seeded as `python -m benchmarks run` seeds them. Raises
        ValueError for a backend or mode the case does not have, or cannot run here."""
        backends = {b.name: b for b in self.op.backends}
        if backend not in backends:
            raise ValueError(f"{self.name} has no backend {backend!r}; it has: {', '.join(backends)}")
        if mode not in self.modes:
            raise ValueError(f"{self.name} has no mode {mode!r}; it has: {', '.join(self.modes)}")
        torch.manual_seed(0)
        try:
            inputs = self.op.inputs(self.case, device)
            if mode == "fwd+bwd":
                for name in self.op.grad_inputs:
                    inputs[name].requires_grad_()
            forward = backends[backend].setup(self.case, inputs)
        except (ImportError, NotImplementedError) as exc:
            raise ValueError(f"backend {backend!r} cannot run {self.name} on {device}: "
                             f"{install_hint(exc) or exc}") from exc
        return mode_step(forward, mode, [inputs[n] for n in self.op.grad_inputs])[0]


def _suite_cases(device: str, suite: str) -> list[SuiteCase]:
    """Every case of `suite` ("all" or one of bench.NAMES) on `device`: the full lists, of
    which --quick runs a subset."""
    if suite not in ("all", *bench.NAMES):
        raise ValueError(f"unknown suite {suite!r}; suites: all, {', '.join(bench.NAMES)}")
    bench.load(suite)
    return [SuiteCase(op, case) for op in operators.operators(suite) for case in op.cases(device, False)]


# Where profilable names come from, by kind. A lister returns the targets on a device of
# a suite; a target has .name, .modes, .flops(mode), .nbytes(mode) and .step(backend, mode,
# device), as SuiteCase does. Models join as a second kind.
_KINDS: dict[str, Callable[[str, str], list]] = {"benchmark case": _suite_cases}


def available(device: str, suite: str = "all") -> list:
    """Everything `tritium profile` can run on `device` ("cuda" or "cpu"), of every kind."""
    return [target for lister in _KINDS.values() for target in lister(device, suite)]


def resolve(query: str, device: str, suite: str = "all"):
    """The target named `query` on `device`: an exact name, an exact CASE_NAME, or a
    unique substring of one name. Raises ValueError naming the close matches otherwise."""
    targets = {t.name: t for t in available(device, suite)}
    exact = [n for n in targets if n == query or n.endswith("/" + query)]
    found = exact or [n for n in targets if query in n]
    if len(found) == 1:
        return targets[found[0]]
    kinds = " or ".join(_KINDS)
    if found:
        raise ValueError(f"{query!r} matches {len(found)} {kinds}s on {device}: {_some(found)}; give more of the name")
    message = f"no {kinds} on {device} is named {query!r}"
    elsewhere = [d for d in DEVICES if d != device and any(query in t.name for t in available(d, suite))]
    if elsewhere:
        message += f" (it names a case of the {elsewhere[0]} list; `tritium profile --list` shows both)"
    close = _close_matches(query, list(targets))
    raise ValueError(message + (f"; close matches: {', '.join(close)}" if close else "; see `tritium profile --list`"))


def _some(names: list[str], limit: int = 2 * CLOSE_MATCHES) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _close_matches(query: str, names: list[str]) -> list[str]:
    """Names most like `query`, compared whole and by their CASE_NAME part (difflib ratio)."""

    def score(name: str) -> float:
        return max(SequenceMatcher(None, query, part).ratio() for part in (name, name.split("/", 1)[-1]))

    return [n for n in sorted(names, key=score, reverse=True)[:CLOSE_MATCHES] if score(n) >= 0.6]
