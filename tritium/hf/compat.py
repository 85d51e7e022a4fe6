"""The transformers versions tritium.hf is written for, and the checks that refuse any other
shape of transformers' code before it could give a wrong answer.

tritium.hf touches transformers at a few seams: the AttentionInterface and
AttentionMaskInterface contracts, module-level functions it swaps (`apply_rotary_pos_emb`),
and forwards it must replace where transformers computes attention inline (MVP's, BigBird-
Pegasus' encoder). Each seam states the parameters it was written for; `check_parameters`
compares them with the installed transformers' at registration or `apply` time and raises
`UnsupportedTransformers` naming the version and the function on any difference. A version
outside the tested range whose seams all match is used, with one warning.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable

import transformers

# Tested at both ends by .ci/run (pyproject.toml declares the same range).
OLDEST, NEWEST = "5.17.0", "5.24.0"


class UnsupportedTransformers(RuntimeError):
    """The installed transformers' code differs from what a tritium.hf patch was written for."""


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; pre-release and local suffixes dropped."""
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def in_tested_range(version: str = transformers.__version__) -> bool:
    """Whether version lies in [OLDEST, NEWEST] (NEWEST's patch releases included)."""
    release = _release(version)
    return _release(OLDEST) <= release and release[:2] <= _release(NEWEST)[:2]


_warned = False


def warn_if_untested() -> None:
    """One warning per process when transformers is outside the tested range."""
    global _warned
    if not _warned and not in_tested_range():
        _warned = True
        warnings.warn(f"tritium.hf is tested with transformers {OLDEST} to {NEWEST}; found {transformers.__version__}. "
                      "Its seams match what tritium.hf was written for, so it is used; report any difference.",
                      stacklevel=3)


def _refuse(what: str, detail: str) -> UnsupportedTransformers:
    return UnsupportedTransformers(
        f"tritium.hf: transformers {transformers.__version__}'s {what} {detail}. tritium.hf is written for "
        f"transformers {OLDEST} to {NEWEST} and refuses to patch code whose shape it does not know (it could give "
        "wrong results silently); install a transformers in that range, or turn this patch off "
        "(see tritium.hf.apply's options)")


def parameters(fn: Callable) -> tuple[str, ...]:
    """fn's parameter names, through decorators (functools.wraps chains)."""
    return tuple(inspect.signature(inspect.unwrap(fn)).parameters)


def _name(owner) -> str:
    return f"{owner.__module__}.{owner.__qualname__}"


def _check(what: str, found: tuple[str, ...], expected: Iterable[tuple[str, ...]], prefix: bool) -> None:
    if not any(found[: len(e)] == e if prefix else found == e for e in expected):
        shown = " or ".join(f"({', '.join(e)}{', ...' if prefix else ''})" for e in expected)
        raise _refuse(what, f"takes ({', '.join(found)}), not {shown}")


def check_parameters(fn: Callable, expected: Iterable[tuple[str, ...]], *, prefix: bool = False,
                     name: str | None = None) -> None:
    """Raise UnsupportedTransformers unless fn's parameters are one of `expected` (or, with
    prefix=True, start with one of them: functions that may grow optional trailing ones).
    name: how to call fn in the error (default: its module and qualified name)."""
    _check(name or _name(fn), parameters(fn), expected, prefix)


def check_forward(module_type: type, expected: Iterable[tuple[str, ...]]) -> None:
    """check_parameters for module_type.forward, named by its class."""
    _check(f"{_name(module_type)}.forward", parameters(module_type.forward), expected, prefix=False)


def check_calls(module_type: type, name: str) -> None:
    """Raise UnsupportedTransformers unless module_type.forward looks `name` up as a global: a
    swap of that module-level function only reaches code that calls it by that name."""
    if name not in inspect.unwrap(module_type.forward).__code__.co_names:
        raise _refuse(f"{_name(module_type)}.forward", f"no longer calls the module-level {name}")
