"""Compile the kernels of real launches for a GPU that is not here.

Inside `compile_for(arch)`, a tritium call on meta tensors goes through its whole launch
path (validation, config lookup, grid, every kernel of the call, the backward too), and
each launch is compiled for sm_<arch> instead of run. Triton itself derives what it
compiles from the launch's arguments, as on a GPU: the specialisation of pointers and
integers (16-byte alignment, divisibility by 16, value 1), the constexprs and the options.
A meta tensor's data pointer is 0 plus its offset, so a view keeps the alignment a CUDA
allocation (256-byte aligned) would give it.

This is what `python -m benchmarks.compile_check` reports on: registers, spills, shared
memory and the instructions of exactly what a launch would run, on a machine with no GPU.
Nothing runs, so outputs hold no values; calls whose host path reads values (`.item()`)
skip those reads (`runtime.values_readable` is False for meta tensors).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Iterator

from tritium import runtime


@dataclass(frozen=True)
class Compiled:
    """One launch, compiled. name: the kernel's function name; constants: its constexprs by
    name; kernel: Triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata)."""

    name: str
    constants: dict
    num_warps: int
    num_stages: int
    kernel: object


class _TargetDriver:
    """The part of a Triton driver a launch asks before it compiles: the target, a device
    and a stream (never used: no launch happens)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Each target gets its own per-kernel compile cache in Triton (keyed by device).
        return f"compile-only sm_{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_for(arch: int, sm_count: int = 132) -> Iterator[list[Compiled]]:
    """Within the context, launches compile for sm_<arch> (90: Hopper, 80: Ampere) and do
    not run; tritium ops accept meta tensors and see a GPU of `sm_count` SMs (132: H100
    SXM). Yields the list the launches are appended to, in launch order."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    if runtime.interpreted():
        raise RuntimeError("compile_for needs compiled kernels: unset TRITON_INTERPRET before importing tritium")
    compiled: list[Compiled] = []
    memo: dict = {}  # Triton's launch key -> Compiled
    replaying = []

    def hook(*, key, fn, compile, **_):
        if replaying:  # our own replay below: let Triton compile it
            return False
        if key not in memo:
            jit_function, data = fn.jit_function, compile["specialization_data"]
            replaying.append(True)
            try:
                kernel = jit_function.preload(data)
            finally:
                replaying.pop()
            # preload filed the kernel in Triton's per-device cache, where the next
            # identical launch would find it and try to run it: take it out again.
            jit_function.device_caches[compile["device"]][0].pop(key, None)
            memo[key] = _describe(jit_function, data, kernel)
        compiled.append(memo[key])
        return True  # compiled: skip Triton's own compile and the launch

    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    knobs.runtime.jit_cache_hook = hook
    try:
        with runtime.pretend_device(sm_count):
            yield compiled
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        # Back to the real driver; on a machine without one (no GPU), back to none, since
        # reset_active() would try to create it and raise.
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)


def _describe(jit_function, specialization_data: str, kernel) -> Compiled:
    data = json.loads(specialization_data)
    params = [p.name for p in jit_function.params]
    constants = {params[key[0]]: _plain(value) for key, value in zip(data["constant_keys"], data["constant_vals"])
                 if len(key) == 1}
    options = data["options"]
    return Compiled(jit_function.fn.__name__, constants, options["num_warps"], options["num_stages"], kernel)


def _plain(value):
    return value["constexpr"] if isinstance(value, dict) and "constexpr" in value else value
