"""Rotary embedding module: the cos/sin table transformers computes for Gemma 2 and GLM-4,
applied with tritium's kernel."""

from __future__ import annotations

import torch
from torch import nn

from tritium.kernels.rope import apply_rotary


class RotaryEmbedding(nn.Module):
    """cos/sin of position * inv_freq, inv_freq = 1 / base^(arange(0, rotary_dim, 2) /
    rotary_dim), computed in float32 as transformers' default RoPE does, for positions
    [0, max_position_embeddings).

    rotary_dim: features rotated per head: Gemma 2's head_dim, GLM-4's head_dim *
    partial_rotary_factor (with interleaved=True: GLM-4 rotates the pairs (2i, 2i + 1)).
    The tables are non-persistent buffers (nothing to load), shape (max_position_embeddings,
    rotary_dim / 2), as `apply_rotary` takes them. scaling: transformers' "linear" rope
    factor (positions divided by it).
    """

    def __init__(self, rotary_dim: int, base: float = 10000.0, max_position_embeddings: int = 8192,
                 interleaved: bool = False, device: torch.device | str | None = None, *, scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.rotary_dim, self.interleaved, self.base, self.scaling = rotary_dim, interleaved, base, scaling
        self.reset_buffers(device, dtype, max_position_embeddings)

    def reset_buffers(self, device=None, dtype: torch.dtype | None = None, positions: int | None = None) -> None:
        """(Re)compute the tables on `device` in `dtype` (a model built on the meta device
        gets its real tables here). dtype float32, or the model's dtype, in which
        transformers' rotary rounds cos and sin before use."""
        dtype = dtype or self.cos.dtype
        positions = positions or self.cos.shape[0]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device=device)
                                        / self.rotary_dim))
        inv_freq = inv_freq / self.scaling  # "linear" rope scaling, as transformers divides inv_freq
        freqs = torch.arange(positions, dtype=torch.float, device=device)[:, None] * inv_freq
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, position_ids: torch.Tensor | None = None, *,
                seqlen_offsets: int | torch.Tensor = 0, inplace: bool = False):
        """Rotate q (batch, seqlen, heads_q, head_dim) and k (batch, seqlen, heads_kv,
        head_dim) at position_ids ((batch, seqlen) or (seqlen,) ints), or else at positions
        seqlen_offsets + t (an int, or int32 (batch,) for decode with a KV cache).
        Returns (q_rotated, k_rotated); see `apply_rotary` for inplace."""
        cos, sin = self.cos, self.sin
        if position_ids is not None:
            if isinstance(seqlen_offsets, torch.Tensor) or seqlen_offsets:
                raise ValueError("position_ids and seqlen_offsets: give one or the other")
            cos, sin = cos[position_ids], sin[position_ids]
        return apply_rotary(q, k, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offsets,
                            inplace=inplace)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, positions={self.cos.shape[0]}, interleaved={self.interleaved}"
