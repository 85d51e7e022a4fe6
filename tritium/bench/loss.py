"""Loss suite: the LM head + (softcapped) cross-entropy of a training step, at the Gemma 2
2B shape (hidden 2304, vocabulary 256000, final softcap 30) and the GLM-4 9B shape (4096,
151552, no softcap), 1k to 16k tokens, forward and forward+backward (the gradients of the
hidden states and the head's weight).

The figure that matters beside time is memory: on CUDA every row records its peak
(`peak_memory_gib`), where eager PyTorch holds the (tokens, vocab) logits in float32 and
their softcapped copy and gradient.

Backends:
- tritium: tritium.linear_cross_entropy (never builds the logits; exact gradients).
- eager (the baseline, and the accuracy reference): the logits materialised in bfloat16,
  softcapped there, F.cross_entropy in float32 (tritium.reference, as transformers trains).
- compile: torch.compile of the same (CUDA only).
- liger: Liger-Kernel's fused linear cross-entropy (chunked logits; CUDA only,
  `pip install liger-kernel`).
- cce and cce-exact: Apple's Cut Cross-Entropy (`pip install cut-cross-entropy`; CUDA
  only), with its default gradient filtering (approximate gradients: its error shows it)
  and with the filter off.
"""

from __future__ import annotations

from functools import partial

import torch

from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register
from tritium.kernels.loss import linear_cross_entropy

SUITE = "loss"
DTYPE, CPU_DTYPE = "bfloat16", "float16"  # numpy has no bfloat16 (the interpreter emulates it, slowly)
HEADS = {"gemma-2-2b": (2304, 256000, 30.0), "glm-4-9b": (4096, 151552, 0.0)}  # hidden, vocab, final softcap
TOKENS = (1024, 2048, 4096, 8192, 16384)
IGNORED_EVERY = 16  # one label in 16 is padding (-100)


# ----------------------------------------------------------------------------- cases


def _case(model: str, tokens: int, hidden: int, vocab: int, softcap: float, dtype: str = DTYPE) -> Case:
    params = {"model": model, "tokens": tokens, "hidden": hidden, "vocab": vocab, "softcap": softcap, "dtype": dtype}
    return Case(f"{model}-t{tokens}", tokens, f"{model} (hidden {hidden}, vocabulary {vocab}"
                f"{f', softcap {softcap:g}' if softcap else ''})", params)


def _cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("tiny", 32, 32, 300, 30.0, CPU_DTYPE)]
    tokens = (8192,) if quick else TOKENS
    return [_case(model, t, *head) for model, head in HEADS.items() for t in tokens]


def _inputs(case: Case, device: str) -> dict:
    """hidden ~ N(0, 1), the head's weight scaled so the logits have a standard deviation
    of about 2, labels uniform with one in IGNORED_EVERY ignored."""
    p = case.params
    dtype = getattr(torch, p["dtype"])
    labels = torch.randint(0, p["vocab"], (p["tokens"],), device=device)
    labels[::IGNORED_EVERY] = -100
    return {"hidden": torch.randn(p["tokens"], p["hidden"], device=device, dtype=dtype),
            "weight": (torch.randn(p["vocab"], p["hidden"], device=device) * 2 * p["hidden"] ** -0.5).to(dtype),
            "labels": labels}


def _flops(case: Case, mode: str) -> float:
    """The head's GEMM (2 N V H); the backward's two more (the recomputations tritium and
    CCE make are not counted: the useful work is the same)."""
    p = case.params
    gemm = 2 * p["tokens"] * p["vocab"] * p["hidden"]
    return gemm * (3 if mode == "fwd+bwd" else 1)


def _nbytes(case: Case, mode: str) -> float:
    """The weight and the hidden states read once (and their gradients written)."""
    p = case.params
    once = (p["vocab"] + p["tokens"]) * p["hidden"] * getattr(torch, p["dtype"]).itemsize
    return once * (2 if mode == "fwd+bwd" else 1)


# ----------------------------------------------------------------------------- backends


def _call(fn, softcap: float, hidden, weight, labels):
    return fn(hidden, weight, labels, softcap=softcap)


def _tritium(case: Case, t: dict):
    return partial(_call, linear_cross_entropy, case.params["softcap"], **t)


def _eager(case: Case, t: dict):
    return partial(_call, reference.linear_cross_entropy, case.params["softcap"], **t)


def _cuda_only(t: dict, what: str) -> None:
    if t["hidden"].device.type != "cuda":
        raise Unsupported(f"{what} is benchmarked on CUDA only")


def _compiled(case: Case, t: dict):
    _cuda_only(t, "torch.compile")
    torch._dynamo.reset()  # each case compiles anew (dynamo's recompile limit)
    compiled = torch.compile(partial(_call, reference.linear_cross_entropy, case.params["softcap"]), dynamic=False)
    return lambda: compiled(**t)


def _liger(case: Case, t: dict):
    _cuda_only(t, "Liger-Kernel")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    softcap = case.params["softcap"] or None
    return lambda: liger_fused_linear_cross_entropy(t["hidden"], t["weight"], t["labels"], softcap=softcap)


def _cce(filter_eps):
    def setup(case: Case, t: dict):
        _cuda_only(t, "Cut Cross-Entropy")
        from cut_cross_entropy import linear_cross_entropy as cce

        softcap = case.params["softcap"] or None
        return lambda: cce(t["hidden"], t["weight"], t["labels"], softcap=softcap, filter_eps=filter_eps)

    return setup


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    return max_abs_error(partial(_call, reference.linear_cross_entropy, case.params["softcap"]), inputs, outputs,
                         grad_out, ("hidden", "weight"))


register(Operator(
    name="linear_cross_entropy", suite=SUITE, modes=("fwd", "fwd+bwd"), cases=_cases, inputs=_inputs,
    backends=(Backend("tritium", _tritium), Backend("eager", _eager), Backend("compile", _compiled),
              Backend("liger", _liger), Backend("cce", _cce("high")), Backend("cce-exact", _cce(None))),
    baseline={"cuda": "eager", "cpu": "eager"}, flops=_flops, nbytes=_nbytes, error=_error,
    grad_inputs=("hidden", "weight"), accuracy_reference="eager", headline="tflops", x_name="tokens"))
