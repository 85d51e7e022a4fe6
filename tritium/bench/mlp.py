"""MLP suite: linear + bias + GELU (BART-large's fc1) and the gated MLPs of Gemma 2 2B
(GeGLU) and GLM-4 9B (SwiGLU), over the token count.

Backends: tritium; eager (the reference: the GEMMs, then the activation as separate ops);
compile (torch.compile of the reference, CUDA only); cublas, the bare GEMMs without the
activation: the time the fused kernels aim to match (>= 0.95x of it) and the baseline on
CUDA. Its max_abs_err is against the activated reference, so large by design.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register

SUITE = "mlp"
DTYPE = "bfloat16"
CPU_DTYPE = "float16"
TOKENS = (1, 16, 128, 512, 2048, 8192, 16384)
QUICK_TOKENS = (1, 2048, 16384)
BWD_FLOPS = 2.0  # each forward GEMM has two backward GEMMs of its size (input and weight)


def _case(gated: bool, label: str, tokens: int, hidden: int, inter: int, activation: str, dtype: str) -> Case:
    params = {
        "tokens": tokens, "hidden": hidden, "intermediate": inter, "activation": activation, "gated": gated,
        "dtype": dtype,
    }
    group = f"{label}: {hidden} -> {inter}, {activation}"
    return Case(f"{'gated' if gated else 'linear'}-h{hidden}-i{inter}-t{tokens}", tokens, group, params)


def _cases(gated: bool, label: str, hidden: int, inter: int, activation: str, cpu_shape: tuple[int, int]):
    def cases(device: str, quick: bool) -> list[Case]:
        if device == "cpu":
            return [_case(gated, label, 7, *cpu_shape, activation, CPU_DTYPE)]
        return [_case(gated, label, t, hidden, inter, activation, DTYPE) for t in (QUICK_TOKENS if quick else TOKENS)]

    return cases


def _linear_inputs(case: Case, device: str) -> dict:
    p = case.params
    dtype = getattr(torch, p["dtype"])
    hidden, inter = p["hidden"], p["intermediate"]
    return {
        "x": torch.randn(p["tokens"], hidden, dtype=dtype, device=device),
        "weight": (torch.randn(inter, hidden, device=device) * hidden**-0.5).to(dtype),
        "bias": (torch.randn(inter, device=device) * 0.1).to(dtype),
    }


def _gated_inputs(case: Case, device: str) -> dict:
    p = case.params
    dtype = getattr(torch, p["dtype"])
    hidden, inter = p["hidden"], p["intermediate"]
    return {
        "x": torch.randn(p["tokens"], hidden, dtype=dtype, device=device),
        "gate_up_weight": (torch.randn(2 * inter, hidden, device=device) * hidden**-0.5).to(dtype),
        "down_weight": (torch.randn(hidden, inter, device=device) * inter**-0.5).to(dtype),
    }


def _weights_per_token(case: Case) -> int:
    """Weight elements per token of the GEMMs: hidden x intermediate once for linear,
    three times for the gated MLP (gate, up, down)."""
    p = case.params
    return p["hidden"] * p["intermediate"] * (3 if p["gated"] else 1)


def _flops(case: Case, mode: str) -> float:
    fwd = 2 * case.params["tokens"] * _weights_per_token(case)
    return fwd * (1 + BWD_FLOPS) if mode == "fwd+bwd" else fwd


def _nbytes(case: Case, mode: str) -> float:
    """Least traffic: the weights, the input and the output once each (the weights
    dominate at decode); fwd+bwd also reads dout and writes dx and the weight gradients."""
    p = case.params
    weights = _weights_per_token(case)
    rows = p["tokens"] * (p["hidden"] + (p["hidden"] if p["gated"] else p["intermediate"]))
    elements = 2 * (weights + rows) if mode == "fwd+bwd" else weights + rows
    return elements * getattr(torch, p["dtype"]).itemsize


def _error(reference_op):
    def error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
        ref = partial(reference_op, activation_name=case.params["activation"])
        return max_abs_error(ref, inputs, outputs, grad_out, tuple(inputs))

    return error


# ----------------------------------------------------------------------------- backends


def _tritium_linear(case: Case, t: dict):
    return lambda: tritium.linear(t["x"], t["weight"], t["bias"], case.params["activation"])


def _tritium_gated(case: Case, t: dict):
    return lambda: tritium.gated_mlp(t["x"], t["gate_up_weight"], t["down_weight"], case.params["activation"])


def _eager(reference_op):
    def setup(case: Case, t: dict):
        return lambda: reference_op(**t, activation_name=case.params["activation"])

    return setup


def _compiled(reference_op):
    def setup(case: Case, t: dict):
        if t["x"].device.type != "cuda":
            raise Unsupported("torch.compile is benchmarked on CUDA only")
        # Each case compiles anew; without a reset dynamo would hit its recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(partial(reference_op, activation_name=case.params["activation"]), dynamic=False)
        return lambda: compiled(**t)

    return setup


def _cublas_linear(case: Case, t: dict):
    return lambda: F.linear(t["x"], t["weight"], t["bias"])


def _cublas_gated(case: Case, t: dict):
    inter = case.params["intermediate"]
    # The second GEMM reads the first's left half in place (a row stride of 2I, no copy).
    return lambda: F.linear(F.linear(t["x"], t["gate_up_weight"])[:, :inter], t["down_weight"])


# ----------------------------------------------------------------------------- operators

_COMMON = {
    "suite": SUITE, "modes": ("fwd", "fwd+bwd"), "baseline": {"cuda": "cublas", "cpu": "eager"},
    "flops": _flops, "nbytes": _nbytes, "x_name": "tokens",
}

register(Operator(
    name="linear_gelu", cases=_cases(False, "BART-large fc1", 1024, 4096, "gelu", (64, 160)),
    inputs=_linear_inputs, error=_error(reference.linear), grad_inputs=("x", "weight", "bias"),
    backends=(Backend("tritium", _tritium_linear), Backend("eager", _eager(reference.linear)),
              Backend("compile", _compiled(reference.linear)), Backend("cublas", _cublas_linear, exact=False)),
    **_COMMON,
))
for _name, _label, _hidden, _inter, _activation, _cpu_shape in (
    ("gated_mlp_gemma2", "Gemma 2 2B GeGLU", 2304, 9216, "gelu_tanh", (64, 96)),
    ("gated_mlp_glm4", "GLM-4 9B SwiGLU", 4096, 13696, "silu", (96, 136)),
):
    register(Operator(
        name=_name, cases=_cases(True, _label, _hidden, _inter, _activation, _cpu_shape),
        inputs=_gated_inputs, error=_error(reference.gated_mlp), grad_inputs=("x", "gate_up_weight", "down_weight"),
        backends=(Backend("tritium", _tritium_gated), Backend("eager", _eager(reference.gated_mlp)),
                  Backend("compile", _compiled(reference.gated_mlp)), Backend("cublas", _cublas_gated, exact=False)),
        **_COMMON,
    ))
