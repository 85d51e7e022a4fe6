"""Where and how tritium's kernels run: compiled on a CUDA device or under the Triton
interpreter, and the host-side path to a launch.

Triton decides between compiled and interpreted when a kernel is decorated, so the choice
is read once, at import, from TRITON_INTERPRET (the test setup and the benchmark runner
set it before importing triton when no GPU is present).

The host path is kept short because decode steps are launch-bound: `CustomOp` skips
torch's dispatcher on plain eager calls, `run_function` skips autograd when nothing needs
a gradient, and `cdiv`/`next_power_of_2` replace Triton's slower host-side versions.
"""

import contextlib
import functools
import inspect
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton `triton_version`'s interpreter cannot run tritium's kernels beside numpy
    `numpy_version`, or None. Before Triton 3.7 the interpreter turns a loop bound (a
    one-element array) into an int with int(), which numpy 2.4 refuses: every kernel whose
    loop bounds are computed at run time would fail with a TypeError from inside it."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1: the interpreter of Triton {triton_version} cannot run tritium's kernels with "
                f"numpy {numpy_version} (it converts loop bounds with int(), which numpy 2.4 refuses; Triton 3.7 "
                "fixed it): install 'numpy<2.4' or 'triton>=3.7'")
    return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_interpreter() -> None:
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    try:
        triton_version = version("triton")
    except PackageNotFoundError:  # another distribution of it (pytorch-triton): not judged
        return
    problem = interpreter_problem(triton_version, numpy.__version__)
    if problem:
        raise ImportError(problem)


if INTERPRETED:
    _check_interpreter()  # one clear error here, not a TypeError from inside every kernel


def interpreted() -> bool:
    """True when kernels run under the Triton interpreter (CPU tensors, slow, for testing)."""
    return INTERPRETED


def capturing() -> bool:
    """True inside CUDA-graph capture or torch.compile tracing, where a host sync (reading a
    tensor's values) or a tuning run (dozens of launches) must not happen."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def values_readable(x: torch.Tensor) -> bool:
    """True when the host may read x's values (a sync) or keep x for later calls: not inside
    capture or tracing (`capturing`), no dispatch mode active (FakeTensorMode, ...), and x a
    plain tensor (not fake, meta, functional or another subclass). Where it is False, host
    checks on values are skipped and the kernels' own guards stand."""
    return (not capturing() and type(x) in _TENSORS and not x.is_meta
            and not torch._C._len_torch_dispatch_stack())


_PRETEND: dict = {}  # inside compile_only.compile_for: {"sm_count": n}


@contextlib.contextmanager
def pretend_device(sm_count: int):
    """Launch paths see a GPU of `sm_count` SMs and accept meta tensors, whose launches
    `compile_only.compile_for` compiles instead of running."""
    previous = dict(_PRETEND)
    _PRETEND.update(sm_count=sm_count)
    try:
        yield
    finally:
        _PRETEND.clear()
        _PRETEND.update(previous)


def kernel_device(device: torch.device) -> bool:
    """True when kernels may launch on `device`: CUDA, the CPU under the interpreter, meta
    tensors while compiling for a target (`pretend_device`)."""
    kind = device.type
    return kind == "cuda" or (kind == "cpu" and INTERPRETED) or (kind == "meta" and bool(_PRETEND))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU that runs `device`'s launches (4 on the CPU
    interpreter: small enough that CPU tests take the multi-program paths)."""
    if _PRETEND:
        return _PRETEND["sm_count"]
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype, list, tuple, torch.Size})


def _needs_dispatcher(values) -> bool:
    """True when a call must go through torch's dispatcher: under torch.compile/export
    tracing, with a dispatch mode or the profiler active (fake tensors, FLOP counters,
    traces that name the op), or for tensor subclasses, meta tensors (except while compiling
    for a target: `pretend_device`), fx proxies and any other argument type an op's schema
    does not plainly take."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch.autograd.profiler._is_profiler_enabled:
        return True
    for value in values:
        kind = type(value)
        if kind in _TENSORS:
            if value.is_meta and not _PRETEND:
                return True
        elif kind not in _PLAIN:
            return True
    return False


class CustomOp:
    """A torch.library custom op whose plain eager calls run its Python body directly.

    torch.compile, export, fake tensors and the profiler see the registered op (`.op`).
    A plain eager call skips the dispatcher's Python layers, which cost about 60 us a call
    (measured on the CPU for the KV-cache op, whose body takes 24 us): more than a decode
    step's kernels run on the GPU. The version counters of the mutated arguments are bumped
    as the dispatcher would, so autograd still notices in-place writes."""

    def __init__(self, fn, name: str, mutates_args: tuple[str, ...]):
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self.register_fake = self.op.register_fake
        names = list(inspect.signature(fn).parameters)
        self._mutated = tuple((names.index(arg), arg) for arg in mutates_args)

    def __call__(self, *args, **kwargs):
        if _needs_dispatcher((*args, *kwargs.values())):
            return self.op(*args, **kwargs)
        out = self.fn(*args, **kwargs)
        for index, name in self._mutated:
            tensor = args[index] if index < len(args) else kwargs.get(name)
            if tensor is not None:
                torch.autograd.graph.increment_version(tensor)
        return out


def custom_op(name: str, *, mutates_args: tuple[str, ...]):
    """Decorator: `CustomOp(fn, name, mutates_args)`, used as torch.library.custom_op."""
    return lambda fn: CustomOp(fn, name, mutates_args)


# Host-side integer helpers for grids and block sizes. Triton 3.9's triton.cdiv and
# triton.next_power_of_2 are ConstexprFunctions costing about 1.7 us a call, several per
# launch, on paths (decode) where the host's time is the step's time.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def pow2(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi]: the buckets and block sizes of the tuners."""
    return min(max(next_power_of_2(n), lo), hi)


class _Inference:
    """The ctx an autograd.Function's forward gets when no gradient will be taken: it
    keeps nothing."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def needs_grad(*values) -> bool:
    """True when autograd would record an op on these values: grad mode is on and one of
    them is a tensor that requires grad (others, None included, are ignored)."""
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def run_function(function: type[torch.autograd.Function], *args, record: bool | None = None):
    """function.apply(*args) where autograd must record the call (`record`, by default
    `needs_grad(*args)`, or torch.compile traces it), else function's forward alone:
    Function.apply costs about 10 us a call (measured on the CPU for the norm), which
    inference pays for nothing."""
    record = needs_grad(*args) if record is None else record
    if record or torch.compiler.is_compiling():
        return function.apply(*args)
    return function.forward(_Inference(), *args)
