"""Self-attention of the compact decoders, with transformers' parameter names (q_proj,
k_proj, v_proj, o_proj and Gemma 3's q_norm, k_norm) and three backends:

- "tritium": flash_attention for a forward without cache and for the prefill, then
  flash_attention_with_kvcache for every later step;
- "sdpa": torch's scaled_dot_product_attention (refuses a softcap: it cannot apply one);
- "eager": tritium.reference.attention, plain PyTorch with the scores materialised.

All three see the same keys: causal, bottom-right aligned, the layer's window, the padding
mask; a query that sees no key gives 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tritium import reference
from tritium.kernels.attention import flash_attention
from tritium.kernels.attention_kvcache import flash_attention_with_kvcache
from tritium.models.cache import StaticCache

BACKENDS = ("tritium", "sdpa", "eager")


def check_backend(name: str, softcap: float) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation: expected one of {BACKENDS}, got {name!r}")
    if name == "sdpa" and softcap:
        raise ValueError(f"attn_implementation='sdpa': this model caps attention logits (softcap {softcap:g}) and "
                         "SDPA cannot, so its results would change; use 'tritium' or 'eager'")
    return name


@dataclass
class Step:
    """What one forward call shares across layers.

    position_ids: (batch, seqlen) int64, each token's rotary position.
    key_padding_mask: bool, True = attend, over the keys the call attends to: (batch,
        seqlen) without a cache, (batch, cache.max_seqlen) with one; None = no padding.
    cache: the static cache the call reads and extends, or None.
    """

    position_ids: torch.Tensor
    key_padding_mask: torch.Tensor | None = None
    cache: StaticCache | None = None


def sdpa(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=None, key_padding_mask=None):
    """tritium's attention semantics on torch's SDPA (same arguments as
    tritium.reference.attention, no softcap)."""
    if softcap:
        raise ValueError("sdpa cannot apply a softcap")
    visible = reference.attention_visibility(q.shape[1], k.shape[1], causal=causal, window_size=window_size,
                                             device=q.device)[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible, scale=softmax_scale).transpose(1, 2)
    # SDPA gives NaN where a query sees no key; the other backends give 0.
    return out.masked_fill(~visible.any(-1).transpose(1, 2)[..., None], 0.0)


ATTEND = {"tritium": flash_attention, "sdpa": sdpa, "eager": reference.attention}


def attend(backend: str, q, k, v, *, cache: StaticCache | None = None, layer: int = 0, key_padding_mask=None,
           **options) -> torch.Tensor:
    """Attention of q (batch, seqlen_q, heads, head_dim) over k, v with `backend`; options
    as tritium.flash_attention's (causal, window_size, softcap, softmax_scale).

    With a cache, k and v (this call's new keys) are first written into its layer `layer`
    at its start, and q attends to every filled row; key_padding_mask then spans the cache
    (batch, max_seqlen). tritium runs the flash kernel when the cache is empty (a prefill)
    and the cache kernel otherwise (a captured step's start is a tensor)."""
    if cache is None:
        return ATTEND[backend](q, k, v, key_padding_mask=key_padding_mask, **options)
    k_cache, v_cache, start = cache.keys[layer], cache.values[layer], cache.start
    if backend == "tritium" and not (isinstance(start, int) and start == 0):
        return flash_attention_with_kvcache(q, k_cache, v_cache, start, k=k, v=v, key_padding_mask=key_padding_mask,
                                            **options)
    end = start + q.shape[1]
    k_cache[:, start:end], v_cache[:, start:end] = k, v
    mask = None if key_padding_mask is None else key_padding_mask[:, :end]
    return ATTEND[backend](q, k_cache[:, :end], v_cache[:, :end], key_padding_mask=mask, **options)


def attend_fixed(backend: str, q, k, v, *, key_padding_mask=None, softmax_scale: float) -> torch.Tensor:
    """Non-causal attention over keys computed once (cross-attention over an encoder's
    output): tritium's split-KV cache kernel when nothing needs a gradient (a decode step's
    few queries against many keys), else the backend's attention."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if backend == "tritium" and not needs_grad:
        return flash_attention_with_kvcache(q, k, v, k.shape[1], causal=False, key_padding_mask=key_padding_mask,
                                            softmax_scale=softmax_scale)
    return ATTEND[backend](q, k, v, causal=False, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale)


class SelfAttention(nn.Module):
    """Causal GQA self-attention of one decoder layer.

    hidden -> q (heads x head_dim), k and v (kv_heads x head_dim); optional per-head q/k
    RMSNorm (Gemma 3), rotary from the `rotary` module the model passes in, attention with
    `softmax_scale`, `softcap` (0 = none) and `window` ((left, right), -1 unbounded), then
    o_proj. `linear(in, out, bias)` builds each projection (nn.Linear-like: dense or NF4).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, linear, bias: bool,
                 softmax_scale: float, softcap: float = 0.0, window: tuple[int, int] = (-1, -1), qk_norm=None,
                 backend: str = "tritium"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.softmax_scale, self.softcap, self.window = softmax_scale, softcap, window
        self.q_proj = linear(hidden, heads * head_dim, bias)
        self.k_proj = linear(hidden, kv_heads * head_dim, bias)
        self.v_proj = linear(hidden, kv_heads * head_dim, bias)
        self.o_proj = linear(heads * head_dim, hidden, False)
        if qk_norm is not None:
            self.q_norm, self.k_norm = qk_norm(head_dim), qk_norm(head_dim)
        self.backend = check_backend(backend, softcap)

    def forward(self, x: torch.Tensor, rotary, step: Step, layer: int) -> torch.Tensor:
        """x: (batch, seqlen, hidden) -> (batch, seqlen, hidden)."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, step.position_ids)
        options = dict(causal=True, window_size=self.window, softcap=self.softcap, softmax_scale=self.softmax_scale)
        out = attend(self.backend, q, k, v, cache=step.cache, layer=layer, key_padding_mask=step.key_padding_mask,
                     **options)
        return self.o_proj(out.reshape(batch, seqlen, self.heads * self.head_dim))
