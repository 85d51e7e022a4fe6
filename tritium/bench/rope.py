"""RoPE suite: q and k rotated together at the shapes of Gemma 2 2B (full rotary, halves)
and GLM-4 9B (half the head rotated, interleaved pairs), from one token (decode) to 16k.

Every backend takes tritium's layout (batch, seqlen, heads, head_dim) with float32 cos/sin
tables of shape (seqlen, rotary_dim / 2), as `tritium.models.rotary.RotaryEmbedding` hands
them over, and returns (q_rotated, k_rotated). A bandwidth-bound op: GB/s leads.
"""

from __future__ import annotations

from functools import partial

import torch

from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register
from tritium.kernels.rope import apply_rotary

SUITE = "rope"
DTYPE = "bfloat16"
CPU_DTYPE = "float16"  # numpy has no bfloat16 (the interpreter emulates it, slowly)
TOKENS = (1, 16, 256, 1024, 4096, 16384)
QUICK_TOKENS = (1, 1024, 16384)
# (heads_q, heads_kv, head_dim, rotary_dim, interleaved) of each model's attention.
MODELS = {
    "gemma2-2b": (8, 4, 256, 256, False),
    "glm4-9b": (32, 2, 128, 64, True),
}
CPU_MODELS = {
    "gemma2-tiny": (2, 1, 64, 64, False),
    "glm4-tiny": (4, 1, 64, 32, True),
}


def _case(model: str, tokens: int, dtype: str) -> Case:
    heads_q, heads_kv, head_dim, rotary_dim, interleaved = {**MODELS, **CPU_MODELS}[model]
    params = {
        "tokens": tokens, "heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim,
        "rotary_dim": rotary_dim, "interleaved": interleaved, "dtype": dtype,
    }
    group = f"{model}: {heads_q}/{heads_kv} heads, hdim {head_dim}, rotary {rotary_dim}" + (
        " interleaved" if interleaved else " halves")
    return Case(f"{model}-t{tokens}", tokens, group, params)


def _cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case(model, 9, CPU_DTYPE) for model in CPU_MODELS]
    return [_case(model, t, DTYPE) for model in MODELS for t in (QUICK_TOKENS if quick else TOKENS)]


def _inputs(case: Case, device: str) -> dict:
    """One sequence of `tokens` tokens; the tables hold angles of positions 0..tokens-1."""
    p = case.params
    dtype = getattr(torch, p["dtype"])
    angles = torch.arange(p["tokens"], device=device, dtype=torch.float32)[:, None] * torch.rand(
        p["rotary_dim"] // 2, device=device)
    return {
        "q": torch.randn(1, p["tokens"], p["heads_q"], p["head_dim"], dtype=dtype, device=device),
        "k": torch.randn(1, p["tokens"], p["heads_kv"], p["head_dim"], dtype=dtype, device=device),
        "cos": angles.cos(),
        "sin": angles.sin(),
    }


def _bytes(case: Case, mode: str) -> float:
    """Least traffic: read q, k, cos, sin and write q, k; the backward does the same with
    the gradients."""
    p = case.params
    qk = p["tokens"] * (p["heads_q"] + p["heads_kv"]) * p["head_dim"] * getattr(torch, p["dtype"]).itemsize
    tables = p["tokens"] * p["rotary_dim"] * 4  # cos and sin, rotary_dim / 2 float32 each
    fwd = 2 * qk + tables
    return 2 * fwd if mode == "fwd+bwd" else fwd


def _flops(case: Case, mode: str) -> float:
    p = case.params
    fwd = 3 * p["tokens"] * (p["heads_q"] + p["heads_kv"]) * p["rotary_dim"]  # 2 mul + 1 add per feature
    return 2 * fwd if mode == "fwd+bwd" else fwd


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    ref = partial(reference.apply_rotary, interleaved=case.params["interleaved"])
    return max_abs_error(ref, inputs, outputs, grad_out, ("q", "k"))


def _tritium(case: Case, t: dict):
    return lambda: apply_rotary(t["q"], t["k"], t["cos"], t["sin"], interleaved=case.params["interleaved"])


def _eager(case: Case, t: dict):
    return lambda: reference.apply_rotary(t["q"], t["k"], t["cos"], t["sin"], interleaved=case.params["interleaved"])


def _compiled(case: Case, t: dict):
    if t["q"].device.type != "cuda":
        raise Unsupported("torch.compile is benchmarked on CUDA only")
    # Each case compiles anew: past dynamo's recompile limit it would silently run eagerly.
    torch._dynamo.reset()
    compiled = torch.compile(partial(reference.apply_rotary, interleaved=case.params["interleaved"]), dynamic=False)
    return lambda: compiled(t["q"], t["k"], t["cos"], t["sin"])


register(Operator(
    name="rope", suite=SUITE, modes=("fwd", "fwd+bwd"), cases=_cases, inputs=_inputs,
    backends=(Backend("tritium", _tritium), Backend("torch-compile", _compiled), Backend("eager", _eager)),
    baseline={"cuda": "torch-compile", "cpu": "eager"}, flops=_flops, nbytes=_bytes, error=_error,
    grad_inputs=("q", "k"), headline="gbps", x_name="tokens",
))
