"""Launch configurations for tritium's kernels.

Each kernel registers, as data, a heuristic default: a function from a problem key (plain
keyword values such as head_dim or dtype) to a `Config`. `lookup` memoises per process.
Under the interpreter every kernel gets its interpreter default: small tiles, no tuning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tritium.runtime import interpreted


@dataclass(frozen=True)
class Config:
    """Meta-parameters of one launch: tl.constexpr block sizes plus warps and stages."""

    meta: dict = field(default_factory=dict, hash=False)
    num_warps: int = 4
    num_stages: int = 2

    def launch_kwargs(self) -> dict:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


_DEFAULTS: dict[str, Callable[..., Config]] = {}
_MEMO: dict[tuple, Config] = {}
_OVERRIDES: dict[str, Config] = {}


def register(kernel: str, default: Callable[..., Config]) -> None:
    """Declare `kernel`'s heuristic default: default(interpreted=bool, **key) -> Config."""
    _DEFAULTS[kernel] = default


def lookup(kernel: str, **key) -> Config:
    """The configuration to launch `kernel` with for a problem described by `key`."""
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    memo_key = (kernel, tuple(sorted(key.items())))
    config = _MEMO.get(memo_key)
    if config is None:
        config = _MEMO[memo_key] = _DEFAULTS[kernel](interpreted=interpreted(), **key)
    return config


@contextlib.contextmanager
def override(kernel: str, config: Config) -> Iterator[None]:
    """Force `config` for every launch of `kernel` inside the block (tests, experiments)."""
    previous = _OVERRIDES.get(kernel)
    _OVERRIDES[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _OVERRIDES[kernel]
        else:
            _OVERRIDES[kernel] = previous
