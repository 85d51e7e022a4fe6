"""Plain-PyTorch versions of tritium's ops.

Three jobs, one implementation: the eager path, the float64 test oracle and the benchmark
baseline. Layouts and semantics are those of the kernels (ARCHITECTURE.md, "Semantics");
nothing here imports the rest of tritium.
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


ACTIVATIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


def activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The MLP activations by tritium's names ("gelu" exact; "gelu_tanh" is transformers'
    gelu_new / gelu_pytorch_tanh); None is the identity."""
    return x if name is None else ACTIVATIONS[name](x)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    multiply_in_float32: bool | None = None,
):
    """RMSNorm over the last dim, cast exactly where transformers casts.

    residual: when given, x + residual (in x's dtype) is normalised and also returned.
    multiply_in_float32: Gemma 2 computes (x * rsqrt(mean(x^2) + eps)) * (offset + w) in
    float32 and casts the product; Llama/GLM-4 cast the normalised x to x's dtype first and
    multiply by (offset + w) in that dtype. None picks Gemma's when offset != 0.
    Returns out (x's dtype), or (out, new_residual) with residual.
    """
    if residual is not None:
        x = x + residual
    if multiply_in_float32 is None:
        multiply_in_float32 = offset != 0
    wide = x.float() if x.dtype != torch.float64 else x
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    if multiply_in_float32:
        out = (normed * (offset + weight.to(wide.dtype))).to(x.dtype)
    else:
        out = (offset + weight.to(x.dtype)) * normed.to(x.dtype)
    return (out, x) if residual is not None else out


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dim (torch's: float32 statistics, output in x's dtype).
    residual: when given, x + residual (in x's dtype) is normalised and also returned."""
    if residual is not None:
        x = x + residual
    out = torch.nn.functional.layer_norm(x, x.shape[-1:], weight.to(x.dtype), None if bias is None else bias.to(x.dtype), eps)
    return (out, x) if residual is not None else out


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first rotary_dim = 2 * cos.shape[-1] features of x (batch, seqlen, heads,
    head_dim) by the angles whose cos/sin are (seqlen, rotary_dim / 2) or (batch, seqlen,
    rotary_dim / 2); the rest passes through. interleaved: pairs (2i, 2i + 1) (GLM-4);
    otherwise the halves (i, i + rotary_dim / 2) (Gemma 2, Llama). Computed in x's dtype."""
    rotary_dim = 2 * cos.shape[-1]
    cos = cos.to(x.dtype).unsqueeze(-2)  # broadcast over heads
    sin = sin.to(x.dtype).unsqueeze(-2)
    if cos.dim() == 3:  # (seqlen, 1, r/2): broadcast over batch too
        cos, sin = cos[None], sin[None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def apply_rotary(q, k, cos, sin, *, interleaved: bool = False):
    """`rotary` applied to q and to k: returns (q_rotated, k_rotated)."""
    return rotary(q, cos, sin, interleaved=interleaved), rotary(k, cos, sin, interleaved=interleaved)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation_name: str | None = None):
    """act(x @ weight.T + bias): weight (out_features, in_features), as nn.Linear."""
    return activation(torch.nn.functional.linear(x, weight, bias), activation_name)


def gated_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor, activation_name: str):
    """down(act(x W_gate^T) * (x W_up^T)) with gate_up_weight (2 * intermediate, hidden),
    the gate rows first (GLM-4's gate_up_proj), and down_weight (hidden, intermediate)."""
    gate, up = torch.nn.functional.linear(x, gate_up_weight).chunk(2, dim=-1)
    return torch.nn.functional.linear(activation(gate, activation_name) * up, down_weight)


def bigbird_block_counts(num_blocks: int, rand_attn: torch.Tensor) -> torch.Tensor:
    """(heads, num_blocks, num_blocks) int: how many times query block i lists key block j
    in BigBird's ITC layout. Blocks 0 and last see every block once; block 1 sees
    [0, 1, 2, last], block last-1 [0, last-2, last-1, last], middle block i [0, i-1, i, i+1,
    last]; each of those adds its row of rand_attn (heads, num_blocks - 2, r), row i - 1,
    duplicates counted."""
    heads, last = rand_attn.shape[0], num_blocks - 1
    counts = torch.zeros(heads, num_blocks, num_blocks, dtype=torch.long, device=rand_attn.device)
    counts[:, 0] = 1
    counts[:, last] = 1
    for i in range(1, last):
        window = {1: [0, 1, 2, last], last - 1: [0, last - 2, last - 1, last]}.get(i, [0, i - 1, i, i + 1, last])
        counts[:, i, window] += 1
        counts[:, i].scatter_add_(1, rand_attn[:, i - 1].long(), torch.ones_like(rand_attn[:, i - 1], dtype=torch.long))
    return counts


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    rand_attn: torch.Tensor | None = None,
    num_random_blocks: int = 3,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """BigBird block-sparse (ITC) attention, dense and plain: the scores of every key that a
    query block lists, each counted as many times as it is listed, one softmax per row.

    q, k, v: (batch, seqlen, heads, head_dim); rand_attn (heads, seqlen / block_size - 2, r),
    None = all zeros (transformers' eval layout, with r = num_random_blocks).
    key_padding_mask (batch, seqlen) bool, True = attend: masked keys get -10000 added to
    their scaled score (not -inf); masked query rows output 0.
    """
    batch, seqlen, heads, head_dim = q.shape
    num_blocks = seqlen // block_size
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    if rand_attn is None:
        rand_attn = torch.zeros(heads, num_blocks - 2, num_random_blocks, dtype=torch.long, device=q.device)
    counts = bigbird_block_counts(num_blocks, rand_attn)
    counts = counts.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[None]
    group = heads // k.shape[2]
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.transpose(1, 2), kh.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores - 10000.0 * (~key_padding_mask.bool())[:, None, None, :].to(scores.dtype)
    scores = scores.masked_fill(counts == 0, -math.inf)
    # Listing a key m times multiplies its weight by m: log(m) joins its score.
    scores = scores + torch.log(counts.clamp(min=1).to(scores.dtype))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(vh.dtype), vh).transpose(1, 2)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, :, None, None].to(out.dtype)
    return (out, lse) if return_lse else out


def linear_cross_entropy(hidden, weight, labels, *, bias=None, softcap: float = 0.0, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         shift: bool = False) -> torch.Tensor:
    """tritium.linear_cross_entropy as eager training computes it: the logits materialised
    in hidden's dtype (softcapped there, as transformers' Gemma 2 does), then
    F.cross_entropy in float32 (float64 for float64 inputs), plus z_loss * lse^2 per row
    not ignored."""
    if shift:
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], 1)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    flat = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    if z_loss > 0:
        lse = torch.logsumexp(logits, -1)
        loss = loss + torch.where(flat != ignore_index, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / (flat != ignore_index).sum()
