"""Plain-PyTorch versions of tritium's ops.

Three jobs, one implementation: the eager path, the float64 test oracle and the benchmark
baseline. Layouts and semantics are those of the kernels (see DESIGN.md); nothing here
imports the rest of tritium.
"""

from __future__ import annotations

import math

import torch


def attention_visibility(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): True where key j is visible to query i.

    Query i sits at position i + seqlen_k - seqlen_q (bottom-right alignment). Key j is
    visible iff pos - left <= j <= pos + right, where -1 means unbounded and causal
    forces right = 0.
    """
    left, right = window_size
    if causal:
        right = 0
    pos = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    return visible


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Softmax attention computed in the dtype of its inputs, materialising the scores.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim)
    with heads_q a multiple of heads_kv (GQA). key_padding_mask: (batch, seqlen_k) bool,
    True = attend. softcap > 0 applies softcap * tanh(s / softcap) after the scale.
    Rows with no visible key give 0 (and lse -inf).
    Returns out (batch, seqlen_q, heads_q, head_dim), and lse (batch, heads_q, seqlen_q)
    in float32 when return_lse.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    group = heads_q // heads_kv
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    visible = attention_visibility(
        seqlen_q, seqlen_k, causal=causal, window_size=window_size, device=q.device
    )[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    out = torch.matmul(probs.to(vh.dtype), vh).transpose(1, 2)
    return (out, lse) if return_lse else out
