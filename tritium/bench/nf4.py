"""NF4 suite: y = x @ W^T with W in NF4 (blocksize 64, double quantization, as QLoRA) at
the linear shapes of Gemma 2 (2B, 9B, 27B) and GLM-4 9B, from one token to 4096.

Backends: tritium's fused dequant-matmul; dequantize-then-matmul (tritium.nf4.dequantize
+ torch.matmul, whose error sets the accuracy tolerance); bitsandbytes' matmul_4bit
(skipped where it is not installed); and the baseline, torch.matmul with the unquantized
weight in the activation dtype (bf16 cuBLAS on the GPU; a different function, so no
accuracy). Few tokens are bound by the weight read: `nf4_decode` leads with GB/s of the
4.5-bit weight (the least traffic of the quantized op, whichever backend reads it) as %
of peak; many tokens are bound by the GEMM: `nf4_prefill` leads with TFLOP/s. `nf4_train`
times forward + the x-gradient (frozen weight, QLoRA) at one shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tritium.bench.operators import Backend, Case, Operator, max_abs_error, register
from tritium.kernels import nf4

SUITE = "nf4"
DTYPE = "bfloat16"
CPU_DTYPE = "float16"  # numpy has no bfloat16 (the interpreter emulates it, slowly)
BLOCKSIZE, DOUBLE_QUANT = 64, True
# name -> (in_features, out_features) of nn.Linear.
SHAPES = {
    "gemma2-2b-q": (2304, 2048), "gemma2-2b-up": (2304, 9216), "gemma2-2b-down": (9216, 2304),
    "gemma2-9b-up": (3584, 14336), "gemma2-9b-down": (14336, 3584),
    "gemma2-27b-up": (4608, 36864), "gemma2-27b-down": (36864, 4608),
    "glm4-9b-gate_up": (4096, 27392), "glm4-9b-down": (13696, 4096),
}
QUICK_SHAPES = ("gemma2-2b-up", "gemma2-9b-down", "glm4-9b-down")
DECODE_TOKENS, PREFILL_TOKENS = (1, 2, 4, 8, 16, 32, 64), (256, 4096)
TRAIN_SHAPE, TRAIN_TOKENS = "gemma2-2b-up", (256, 4096)
ERROR_ROWS, ERROR_COLS = 8, 512  # outputs are independent: the error is checked on a corner


def _case(shape: str, tokens: int, dtype: str, sizes=None) -> Case:
    in_features, out_features = sizes or SHAPES[shape]
    params = {"tokens": tokens, "in_features": in_features, "out_features": out_features, "dtype": dtype,
              "blocksize": BLOCKSIZE, "double_quant": DOUBLE_QUANT}
    return Case(f"{shape}-m{tokens}", tokens, f"{shape}: {in_features} -> {out_features}", params)


def _cases(tokens: tuple, cpu: list) -> Callable[[str, bool], list[Case]]:
    """The case list of an operator: every shape at `tokens` (GPU), or the tiny `cpu`
    (name, tokens, (in, out)) cases under the interpreter."""

    def cases(device: str, quick: bool) -> list[Case]:
        if device == "cpu":
            return [_case(name, m, CPU_DTYPE, sizes) for name, m, sizes in cpu]
        shapes = QUICK_SHAPES if quick else tuple(SHAPES)
        grid = (tokens[0], tokens[-1]) if quick else tokens
        return [_case(shape, m, DTYPE) for shape in shapes for m in grid]

    return cases


def _train_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("tiny", 24, CPU_DTYPE, (128, 64))]
    return [_case(TRAIN_SHAPE, m, DTYPE) for m in (TRAIN_TOKENS[-1:] if quick else TRAIN_TOKENS)]


def _inputs(case: Case, device: str) -> dict:
    """x (tokens, in_features) and the dense weight (nn.Linear-scaled) the backends
    quantize in their setup (untimed)."""
    p = case.params
    dtype = getattr(torch, p["dtype"])
    weight = torch.randn(p["out_features"], p["in_features"], device=device) * p["in_features"] ** -0.5
    return {"x": torch.randn(p["tokens"], p["in_features"], device=device, dtype=dtype), "weight": weight.to(dtype)}


def _flops(case: Case, mode: str) -> float:
    """2 M N K for y, as much again for dx in fwd+bwd (no weight gradient)."""
    p = case.params
    fwd = 2 * p["tokens"] * p["in_features"] * p["out_features"]
    return 2 * fwd if mode == "fwd+bwd" else fwd


def _bytes(case: Case, mode: str) -> float:
    """The 4-bit codes, one absmax byte per 64 weights (double quantization) and x and y
    once; fwd+bwd reads the weight again and dy, writes dx."""
    p = case.params
    weight = p["in_features"] * p["out_features"] * (0.5 + 1 / BLOCKSIZE)
    itemsize = getattr(torch, p["dtype"]).itemsize
    activations = p["tokens"] * (p["in_features"] + p["out_features"]) * itemsize
    return 2 * (weight + activations) if mode == "fwd+bwd" else weight + activations


def _quantized(t: dict) -> nf4.NF4Weight:
    return nf4.quantize(t["weight"], BLOCKSIZE, DOUBLE_QUANT)


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    """Against x @ W^T in float64, W the dequantized NF4 weight (bit-identical to
    bitsandbytes'), on the first rows; the forward on the first columns too."""
    rows = slice(0, ERROR_ROWS)
    weight = nf4.dequantize(_quantized(inputs), torch.float32)
    if grad_out is None:
        sub = {"x": inputs["x"][rows], "weight": weight[:ERROR_COLS]}
        return max_abs_error(_linear, sub, [outputs[0][rows, :ERROR_COLS]])
    sub = {"x": inputs["x"][rows], "weight": weight}
    return max_abs_error(_linear, sub, [o[rows] for o in outputs], grad_out[rows], ("x",))


def _linear(x, weight):
    return x @ weight.T


def _tritium(case: Case, t: dict):
    w = _quantized(t)
    return lambda: nf4.matmul(t["x"], w, None)


def _dequantize_matmul(case: Case, t: dict):
    w = _quantized(t)
    return lambda: t["x"] @ nf4.dequantize(w, t["x"].dtype).T


def _bitsandbytes(case: Case, t: dict):
    import bitsandbytes as bnb  # not installed on every machine: ImportError skips

    packed, state = bnb.functional.quantize_4bit(t["weight"], blocksize=BLOCKSIZE, quant_type="nf4",
                                                 compress_statistics=DOUBLE_QUANT)
    return lambda: bnb.matmul_4bit(t["x"], packed.t(), quant_state=state)


def _dense(case: Case, t: dict):
    return lambda: t["x"] @ t["weight"].T


BACKENDS = (
    Backend("tritium", _tritium), Backend("dequantize+matmul", _dequantize_matmul),
    Backend("bitsandbytes", _bitsandbytes), Backend("dense", _dense, exact=False),
)
_COMMON = {"suite": SUITE, "inputs": _inputs, "backends": BACKENDS, "baseline": {"cuda": "dense", "cpu": "dense"},
           "flops": _flops, "nbytes": _bytes, "error": _error, "accuracy_reference": "dequantize+matmul",
           "x_name": "tokens"}

register(Operator(name="nf4_decode", modes=("fwd",), headline="gbps",
                  cases=_cases(DECODE_TOKENS, [("tiny", 1, (128, 96)), ("tiny", 4, (256, 64))]), **_COMMON))
register(Operator(name="nf4_prefill", modes=("fwd",), headline="tflops",
                  cases=_cases(PREFILL_TOKENS, [("tiny", 40, (128, 96))]), **_COMMON))
register(Operator(name="nf4_train", modes=("fwd+bwd",), headline="tflops", cases=_train_cases, grad_inputs=("x",),
                  **_COMMON))
