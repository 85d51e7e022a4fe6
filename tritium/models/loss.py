"""The compact models' LM loss, by attention backend: on "tritium" through
tritium.linear_cross_entropy (the LM head, its bias or final softcap and the cross-entropy
in one op that never builds the (tokens, vocab) logits), on "sdpa"/"eager" through its
plain-PyTorch reference, which does build them."""

from __future__ import annotations

import torch

from tritium import reference
from tritium.kernels.loss import linear_cross_entropy


def lm_loss(backend: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
            bias: torch.Tensor | None = None, softcap: float = 0.0, shift: bool = False) -> torch.Tensor:
    """The mean cross-entropy of softcap(hidden @ weight.T + bias) against labels (-100
    ignored); hidden (batch, seqlen, hidden), labels (batch, seqlen); shift: position t
    predicts labels[:, t + 1] (causal LMs)."""
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must be the inputs' {tuple(hidden.shape[:2])}")
    loss_fn = linear_cross_entropy if backend == "tritium" else reference.linear_cross_entropy
    return loss_fn(hidden, weight, labels, bias=None if bias is None else bias.to(weight.dtype), softcap=softcap,
                   shift=shift)
