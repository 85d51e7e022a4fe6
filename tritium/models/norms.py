"""Norm modules on tritium's kernels, with transformers' parameter names (`weight`, `bias`)
so checkpoints load unchanged. forward(x, residual=None) fuses the residual add when given
and then returns (normed, x + residual)."""

from __future__ import annotations

import torch
from torch import nn

from tritium.kernels.norm import layer_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (offset + weight).

    offset 1.0 is Gemma 2's convention (the checkpoint stores w - 1, float32 product);
    0.0 is Llama's and GLM-4's (the normalised x is cast to x's dtype before the product).
    multiply_in_float32 overrides that choice (see tritium.rms_norm). The weight starts at
    1 - offset, so a fresh module scales by 1 under either convention, as transformers'
    Gemma2RMSNorm (zeros) and Glm4RMSNorm (ones) do.
    """

    def __init__(self, hidden: int, eps: float = 1e-6, offset: float = 0.0, multiply_in_float32: bool | None = None,
                 *, device=None, dtype=None):
        super().__init__()
        self.eps, self.offset, self.multiply_in_float32 = eps, offset, multiply_in_float32
        self.weight = nn.Parameter(torch.full((hidden,), 1.0 - offset, device=device, dtype=dtype))

    @classmethod
    def gemma2(cls, hidden: int, eps: float = 1e-6, **factory) -> "RMSNorm":
        """Gemma2RMSNorm: scale 1 + weight, multiplied in float32."""
        return cls(hidden, eps, offset=1.0, **factory)

    @classmethod
    def llama(cls, hidden: int, eps: float = 1e-6, **factory) -> "RMSNorm":
        """Glm4RMSNorm / LlamaRMSNorm: scale weight, multiplied in x's dtype."""
        return cls(hidden, eps, **factory)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, offset=self.offset, residual=residual,
                        multiply_in_float32=self.multiply_in_float32)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dim on tritium's kernel (BART, MVP, Pegasus, BERT); an
    nn.LayerNorm for every isinstance check, with the same parameters and init."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1 or not elementwise_affine:
            raise ValueError(f"LayerNorm: tritium normalises the last dim with a weight; got normalized_shape="
                             f"{self.normalized_shape}, elementwise_affine={elementwise_affine}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
