"""Norm suite: RMSNorm (Gemma 2 style: offset 1, float32 product) and LayerNorm, plain and
with the fused residual add, at the hidden sizes of the families, 1 to 16k tokens.

Norms are memory-bound: the headline is GB/s against the measured copy peak. Every backend
returns the normalised output only; with a residual the new residual stream is still
computed and written, but the harness differentiates one output, so in fwd+bwd the new
residual gets no gradient of its own (tests/test_norm.py covers that path).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register
from tritium.kernels import norm

SUITE = "norm"
DTYPE = "bfloat16"
CPU_DTYPE = "float16"  # numpy has no bfloat16 (the interpreter emulates it, slowly)
RMS_HIDDEN = {2304: "Gemma 2 2B", 3584: "Gemma 2 9B", 4096: "GLM-4 9B", 4608: "Gemma 2 27B"}
LAYER_HIDDEN = {1024: "BART, MVP, Pegasus, BERT-large"}
TOKENS = (1, 16, 128, 1024, 4096, 16384)
EPS = {"rms": 1e-6, "layer": 1e-5}
# Rough arithmetic per element (square/centre, sum, scale, weight, bias); norms are bound
# by memory, so this only fills the TFLOP/s column.
FLOPS_PER_ELEMENT = {"rms": 4, "layer": 7}


# ----------------------------------------------------------------------------- cases


def _case(kind: str, residual: bool, hidden: int, tokens: int, family: str, dtype: str = DTYPE) -> Case:
    params = {"norm": kind, "residual": residual, "hidden": hidden, "tokens": tokens, "dtype": dtype}
    return Case(f"h{hidden}-t{tokens}", tokens, f"hidden {hidden} ({family})", params)


def _cases(kind: str, residual: bool, device: str, quick: bool) -> list[Case]:
    families = RMS_HIDDEN if kind == "rms" else LAYER_HIDDEN
    if device == "cpu":
        return [_case(kind, residual, 100, 7, "tiny", CPU_DTYPE), _case(kind, residual, 1024, 16, "tiny", CPU_DTYPE)]
    hiddens = list(families)[:2] if quick else list(families)
    tokens = (1, 1024, 16384) if quick else TOKENS
    return [_case(kind, residual, h, t, families[h]) for h in hiddens for t in tokens]


# ----------------------------------------------------------------------------- inputs and work


def _inputs(case: Case, device: str) -> dict:
    """x (tokens, hidden); weight near what it encodes (Gemma stores w - 1); bias for
    LayerNorm; residual for the fused form."""
    p = case.params
    dtype = getattr(torch, p["dtype"])
    tokens, hidden = p["tokens"], p["hidden"]
    scale = 0.1 * torch.randn(hidden, device=device)
    t = {"x": torch.randn(tokens, hidden, dtype=dtype, device=device),
         "weight": (scale if p["norm"] == "rms" else 1 + scale).to(dtype)}
    if p["norm"] == "layer":
        t["bias"] = 0.1 * torch.randn(hidden, dtype=dtype, device=device)
    if p["residual"]:
        t["residual"] = torch.randn(tokens, hidden, dtype=dtype, device=device)
    return t


def _nbytes(case: Case, mode: str) -> float:
    """Least HBM traffic (per-row statistics left out). Forward: read x (+ residual) and the
    parameters, write y (+ the new residual). Backward: read dy, the saved input and the
    parameters, write dx (shared with the residual) and the parameter gradients."""
    p = case.params
    item = getattr(torch, p["dtype"]).itemsize
    activation = p["tokens"] * p["hidden"] * item
    params = p["hidden"] * item * (2 if p["norm"] == "layer" else 1)
    fwd = activation * (4 if p["residual"] else 2) + params
    return fwd + (3 * activation + 2 * params if mode == "fwd+bwd" else 0)


def _flops(case: Case, mode: str) -> float:
    p = case.params
    fwd = p["tokens"] * p["hidden"] * (FLOPS_PER_ELEMENT[p["norm"]] + p["residual"])
    return fwd * (3 if mode == "fwd+bwd" else 1)


# ----------------------------------------------------------------------------- backends


def _call(impl, p: dict, x, weight, bias=None, residual=None):
    """The case's op through `impl` (tritium.kernels.norm or tritium.reference, which share
    signatures); the normalised output only."""
    if p["norm"] == "rms":
        out = impl.rms_norm(x, weight, EPS["rms"], offset=1.0, residual=residual)
    else:
        out = impl.layer_norm(x, weight, bias, EPS["layer"], residual=residual)
    return out[0] if residual is not None else out


def _tritium(case: Case, t: dict):
    return lambda: _call(norm, case.params, **t)


def _eager(case: Case, t: dict):
    return lambda: _call(reference, case.params, **t)


def _compiled(case: Case, t: dict):
    if t["x"].device.type != "cuda":
        raise Unsupported("torch.compile is benchmarked on CUDA only")
    # Each case compiles anew; without a reset dynamo would reach its recompile limit and
    # silently fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(partial(_call, reference, case.params), dynamic=False)
    return lambda: compiled(**t)


def _torch_layer_norm(case: Case, t: dict):
    """torch's fused layer_norm kernel, after an eager residual add."""
    hidden = (case.params["hidden"],)

    def run():
        x = t["x"] + t["residual"] if "residual" in t else t["x"]
        return F.layer_norm(x, hidden, t["weight"], t["bias"], EPS["layer"])

    return run


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    names = _grad_inputs(case.params["norm"], case.params["residual"])
    return max_abs_error(partial(_call, reference, case.params), inputs, outputs, grad_out, names)


# ----------------------------------------------------------------------------- operators


def _grad_inputs(kind: str, residual: bool) -> tuple[str, ...]:
    return ("x",) + ("residual",) * residual + ("weight",) + ("bias",) * (kind == "layer")


def _register(name: str, kind: str, residual: bool) -> None:
    backends = [Backend("tritium", _tritium), Backend("eager", _eager), Backend("compile", _compiled)]
    if kind == "layer":
        backends.append(Backend("torch", _torch_layer_norm))
    register(Operator(
        name=name, suite=SUITE, modes=("fwd", "fwd+bwd"), cases=partial(_cases, kind, residual), inputs=_inputs,
        backends=tuple(backends), baseline={"cuda": "torch" if kind == "layer" else "compile", "cpu": "eager"},
        flops=_flops, nbytes=_nbytes, error=_error, grad_inputs=_grad_inputs(kind, residual),
        headline="gbps", x_name="tokens",
    ))


_register("rms_norm", "rms", residual=False)
_register("rms_norm_residual", "rms", residual=True)
_register("layer_norm", "layer", residual=False)
_register("layer_norm_residual", "layer", residual=True)
