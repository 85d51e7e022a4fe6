"""What is measured: operators, their cases and their backends.

An operator is an input generator over a list of cases plus named backends, one of them
the baseline on each device. The suites (tritium/bench/<suite>.py) register theirs here;
`tritium profile` runs one case of one backend, and the repository's benchmarks/ harness
times every backend of every case side by side and writes the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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


_OPERATORS: dict[str, Operator] = {}

# What to install for a module that a suite or a backend imports only when it runs (the
# base install has neither): module -> (what to install, the command). A submodule matches
# its package's entry.
INSTALL_HINTS = {
    "transformers": ("transformers", 'pip install "tritium[hf]"'),
    "bitsandbytes": ("bitsandbytes", "pip install bitsandbytes"),
    "torch.nn.attention.flex_attention": ("a torch with FlexAttention", 'pip install "torch>=2.5"'),
    "liger_kernel": ("Liger-Kernel", "pip install liger-kernel"),
    "cut_cross_entropy": ("Cut Cross-Entropy", "pip install cut-cross-entropy"),
}


def install_hint(exc: BaseException) -> str | None:
    """'install X (pip install ...)' when `exc` says a module of INSTALL_HINTS is missing;
    None for any other error (a missing module we know no package for, a failing import)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    for module, (what, command) in INSTALL_HINTS.items():
        if exc.name == module or exc.name.startswith(f"{module}."):
            return f"install {what} ({command})"
    return None


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


def mode_step(forward, mode: str, leaves: list[torch.Tensor]):
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

