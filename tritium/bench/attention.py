"""Attention suite: dense prefill, the Gemma 2 shape, and KV-cache decode.

Every backend takes tritium's layout (batch, seqlen, heads, head_dim) and returns it; SDPA
and FlexAttention get transpose views, which cost nothing. A backend runs only the cases
it computes exactly (same mask, same softcap); the others are skipped with a note.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tritium
from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register

SUITE = "attention"
DTYPE = "bfloat16"
CPU_DTYPE = "float16"  # numpy has no bfloat16 (the interpreter emulates it, slowly)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
TOKENS = 16384  # batch * seqlen of every prefill case, so all do the same number of rows
CACHE_HEADROOM = 128  # decode caches have room for more tokens, as in generation
BWD_FLOPS = 2.5  # the backward's five GEMMs against the forward's two
SDPA = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


# ----------------------------------------------------------------------------- cases


def _dense(head_dim, seqlen, causal, *, heads, batch, window=0, dtype=DTYPE):
    """window > 0: a causal sliding window of that many keys (window_size (window - 1, 0))."""
    kind = ("causal" if causal else "full") + (f"-w{window}" if window else "")
    group = f"hdim {head_dim}, {'causal' if causal else 'non-causal'}" + (f", window {window}" if window else "")
    params = {
        "batch": batch, "seqlen": seqlen, "heads_q": heads, "heads_kv": heads, "head_dim": head_dim,
        "causal": causal, "window": [window - 1, 0] if window else [-1, -1], "softcap": 0.0, "dtype": dtype,
    }
    return Case(f"d{head_dim}-{kind}-s{seqlen}-b{batch}-h{heads}", seqlen, group, params)


def _dense_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_dense(32, 64, False, heads=2, batch=1, dtype=CPU_DTYPE),
                _dense(64, 128, True, heads=2, batch=1, window=32, dtype=CPU_DTYPE)]
    if quick:
        grid = [(128, s, True) for s in (1024, 4096, 16384)] + [(128, 4096, False)]
        return [_dense(d, s, c, heads=16, batch=TOKENS // s) for d, s, c in grid]
    cases = [
        _dense(d, s, c, heads=16 if d <= 128 else 8, batch=TOKENS // s)
        for d in (64, 128, 256) for c in (False, True) for s in SEQLENS
    ]
    # A sliding window (Mistral style): SDPA can only express it with an explicit mask.
    return cases + [_dense(128, s, True, heads=16, batch=TOKENS // s, window=2048) for s in SEQLENS[3:]]


def _gemma2(seqlen, *, batch, head_dim=256, heads=(8, 4), window=4096, dtype=DTYPE):
    params = {
        "batch": batch, "seqlen": seqlen, "heads_q": heads[0], "heads_kv": heads[1], "head_dim": head_dim,
        "causal": True, "window": [window - 1, 0], "softcap": 50.0, "dtype": dtype,
    }
    group = f"hdim {head_dim}, softcap 50, window {window}, causal, GQA {heads[0]}/{heads[1]}"
    return Case(f"gemma2-d{head_dim}-s{seqlen}-b{batch}-h{heads[0]}", seqlen, group, params)


def _gemma2_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_gemma2(128, batch=1, head_dim=64, heads=(2, 1), window=32, dtype=CPU_DTYPE)]
    return [_gemma2(s, batch=TOKENS // s) for s in ((2048, 8192) if quick else SEQLENS[1:])]


def _decode(batch, context, *, heads=(32, 8), head_dim=128, dtype=DTYPE):
    params = {
        "batch": batch, "context": context, "heads_q": heads[0], "heads_kv": heads[1], "head_dim": head_dim,
        "dtype": dtype,
    }
    return Case(f"decode-b{batch}-ctx{context}", context, f"batch {batch}", params)


def _decode_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_decode(2, 128, heads=(4, 2), head_dim=32, dtype=CPU_DTYPE)]
    grid = [(1, 8192), (1, 32768), (16, 8192)] if quick else [(b, c) for b in (1, 4, 16, 64) for c in CONTEXTS]
    return [_decode(b, c) for b, c in grid]


# ----------------------------------------------------------------------------- inputs and work


def _prefill_inputs(case: Case, device: str) -> dict:
    p = case.params

    def randn(heads):
        shape = (p["batch"], p["seqlen"], heads, p["head_dim"])
        return torch.randn(shape, dtype=getattr(torch, p["dtype"]), device=device)

    return {"q": randn(p["heads_q"]), "k": randn(p["heads_kv"]), "v": randn(p["heads_kv"])}


def _decode_inputs(case: Case, device: str) -> dict:
    p = case.params
    dtype = getattr(torch, p["dtype"])
    cache = (p["batch"], p["context"] + CACHE_HEADROOM, p["heads_kv"], p["head_dim"])
    return {
        "q": torch.randn(p["batch"], 1, p["heads_q"], p["head_dim"], dtype=dtype, device=device),
        "k_cache": torch.randn(cache, dtype=dtype, device=device),
        "v_cache": torch.randn(cache, dtype=dtype, device=device),
        "cache_seqlens": torch.full((p["batch"],), p["context"], dtype=torch.int32, device=device),
    }


def _visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window) -> int:
    """(query, key) pairs the mask lets through, aligned bottom-right (ARCHITECTURE.md,
    "Semantics"): the work an exact kernel must do."""
    left, right = window
    right = 0 if causal else right
    pos = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    lo = (pos - left).clamp(min=0) if left >= 0 else torch.zeros_like(pos)
    hi = (pos + right).clamp(max=seqlen_k - 1) if right >= 0 else torch.full_like(pos, seqlen_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _prefill_flops(case: Case, mode: str) -> float:
    p = case.params
    pairs = _visible_pairs(p["seqlen"], p["seqlen"], p["causal"], p["window"])
    fwd = 4 * p["batch"] * p["heads_q"] * pairs * p["head_dim"]
    return fwd * (1 + BWD_FLOPS) if mode == "fwd+bwd" else fwd


def _prefill_bytes(case: Case, mode: str) -> float:
    """Least HBM traffic: the forward reads q, k, v and writes out; the backward reads q,
    k, v, out, dout and writes dq, dk, dv."""
    p = case.params
    tokens = p["batch"] * p["seqlen"] * p["head_dim"] * getattr(torch, p["dtype"]).itemsize
    per_head = tokens * (p["heads_q"] + p["heads_kv"])
    return per_head * (6 if mode == "fwd+bwd" else 2)


def _decode_flops(case: Case, mode: str) -> float:
    p = case.params
    return 4 * p["batch"] * p["heads_q"] * p["context"] * p["head_dim"]


def _decode_bytes(case: Case, mode: str) -> float:
    """The K and V cache bytes read, which dominate decode."""
    p = case.params
    return 2 * p["batch"] * p["context"] * p["heads_kv"] * p["head_dim"] * getattr(torch, p["dtype"]).itemsize


# ----------------------------------------------------------------------------- accuracy


def _prefill_error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    """Error on batch 0, kv head 0 and its q heads: heads are independent, and the slice
    keeps the float64 reference's scores within memory at 16k."""
    p = case.params
    group = p["heads_q"] // p["heads_kv"]
    sub = {"q": inputs["q"][:1, :, :group], "k": inputs["k"][:1, :, :1], "v": inputs["v"][:1, :, :1]}
    widths = (group, group, 1, 1)[: len(outputs)]  # out, then dq, dk, dv in fwd+bwd
    got = [x[:1, :, :w] for x, w in zip(outputs, widths, strict=True)]
    ref = partial(reference.attention, causal=p["causal"], window_size=tuple(p["window"]), softcap=p["softcap"])
    return max_abs_error(ref, sub, got, None if grad_out is None else grad_out[:1, :, :group], ("q", "k", "v"))


def _decode_error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    p = case.params
    group, ctx = p["heads_q"] // p["heads_kv"], p["context"]
    sub = {"q": inputs["q"][:1, :, :group], "k": inputs["k_cache"][:1, :ctx, :1], "v": inputs["v_cache"][:1, :ctx, :1]}
    return max_abs_error(partial(reference.attention, causal=True), sub, [outputs[0][:1, :, :group]])


# ----------------------------------------------------------------------------- backends


def _tritium(case: Case, t: dict):
    p = case.params
    return lambda: tritium.flash_attention(
        t["q"], t["k"], t["v"], causal=p["causal"], window_size=tuple(p["window"]), softcap=p["softcap"]
    )


def _eager(case: Case, t: dict):
    p = case.params
    return lambda: reference.attention(
        t["q"], t["k"], t["v"], causal=p["causal"], window_size=tuple(p["window"]), softcap=p["softcap"]
    )


def _sdpa_call(kernel: SDPBackend, q, k, v, *, mask=None, causal=False):
    """SDPA pinned to `kernel` on tritium-layout tensors. Its is_causal is aligned top-left,
    so it is exact only when seqlen_q == seqlen_k."""
    gqa = q.shape[2] != k.shape[2]

    def run():
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=causal, enable_gqa=gqa,
            )
        return out.transpose(1, 2)

    return run


def _sdpa(kernel: SDPBackend):
    def setup(case: Case, t: dict):
        p = case.params
        if p["softcap"]:
            raise Unsupported("SDPA has no softcap")
        if t["q"].device.type != "cuda" and kernel != SDPBackend.MATH:
            raise Unsupported("on CPU only the math backend is benchmarked")
        if tuple(p["window"]) == (-1, -1):
            return _sdpa_call(kernel, t["q"], t["k"], t["v"], causal=p["causal"])
        if kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            raise Unsupported("a window needs an explicit mask, which this backend does not take")
        mask = reference.attention_visibility(
            p["seqlen"], p["seqlen"], causal=p["causal"], window_size=tuple(p["window"]), device=t["q"].device
        )
        return _sdpa_call(kernel, t["q"], t["k"], t["v"], mask=mask)

    return setup


def _window_mask_mod(left: int, right: int):
    """FlexAttention mask_mod: key j visible to query i iff i - left <= j <= i + right
    (-1 = unbounded), for seqlen_q == seqlen_k."""

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx + right if right >= 0 else kv_idx >= 0
        return visible & (kv_idx >= q_idx - left) if left >= 0 else visible

    return mask_mod


def _flex(case: Case, t: dict):
    if t["q"].device.type != "cuda":
        raise Unsupported("FlexAttention is benchmarked compiled, on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    left, right = p["window"]
    right = 0 if p["causal"] else right
    block_mask = None
    if (left, right) != (-1, -1):
        block_mask = create_block_mask(
            _window_mask_mod(left, right), None, None, p["seqlen"], p["seqlen"], device=t["q"].device
        )
    cap = p["softcap"]
    score_mod = (lambda s, b, h, q_idx, kv_idx: cap * torch.tanh(s / cap)) if cap else None
    # Each case compiles anew; without a reset dynamo would reach its recompile limit and
    # silently run flex_attention eagerly.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = p["heads_q"] != p["heads_kv"]
    q, k, v = t["q"], t["k"], t["v"]
    return lambda: compiled(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
    ).transpose(1, 2)


def _tritium_decode(case: Case, t: dict):
    return lambda: tritium.flash_attention_with_kvcache(t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], causal=True)


def _sdpa_flash_decode(case: Case, t: dict):
    if t["q"].device.type != "cuda":
        raise Unsupported("SDPA's flash backend is benchmarked on CUDA only")
    ctx = case.params["context"]
    # Not causal: SDPA aligns is_causal top-left, and the one new query sees the whole context.
    return _sdpa_call(SDPBackend.FLASH_ATTENTION, t["q"], t["k_cache"][:, :ctx], t["v_cache"][:, :ctx])


def _eager_decode(case: Case, t: dict):
    ctx = case.params["context"]
    return lambda: reference.attention(t["q"], t["k_cache"][:, :ctx], t["v_cache"][:, :ctx], causal=True)


# ----------------------------------------------------------------------------- operators

_TRITIUM, _FLEX, _EAGER = Backend("tritium", _tritium), Backend("flex", _flex), Backend("eager", _eager)
_PREFILL = {
    "suite": SUITE, "modes": ("fwd", "fwd+bwd"), "inputs": _prefill_inputs, "flops": _prefill_flops,
    "nbytes": _prefill_bytes, "error": _prefill_error, "grad_inputs": ("q", "k", "v"),
}

register(Operator(
    name="attention", cases=_dense_cases, baseline={"cuda": "sdpa-flash", "cpu": "eager"},
    backends=(_TRITIUM, *(Backend(name, _sdpa(kernel)) for name, kernel in SDPA.items()), _FLEX, _EAGER),
    **_PREFILL,
))
register(Operator(
    name="attention_gemma2", cases=_gemma2_cases, baseline={"cuda": "flex", "cpu": "eager"},
    backends=(_TRITIUM, _FLEX, _EAGER), **_PREFILL,
))
register(Operator(
    name="attention_decode", suite=SUITE, modes=("decode",), cases=_decode_cases, inputs=_decode_inputs,
    backends=(
        Backend("tritium", _tritium_decode), Backend("sdpa-flash", _sdpa_flash_decode), Backend("eager", _eager_decode),
    ),
    baseline={"cuda": "sdpa-flash", "cpu": "eager"}, flops=_decode_flops, nbytes=_decode_bytes,
    error=_decode_error, headline="gbps", x_name="context",
))
