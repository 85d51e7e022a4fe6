"""The compact models' LM loss, by attention backend: on "tritium" through
tritium.linear_cross_entropy (the LM head, its bias or final softcap and the cross-entropy
in one op that never builds the (tokens, vocab) logits), on "sdpa"/"eager" through its
plain-PyTorch reference, which does build them. Under tensor parallelism the head is this
rank's vocabulary slice and the fused loss merges the slices."""

from __future__ import annotations

import torch

from tritium import reference
from tritium.kernels.loss import linear_cross_entropy
from tritium.models.parallel import TensorParallel


def lm_loss(backend: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
            bias: torch.Tensor | None = None, softcap: float = 0.0, shift: bool = False,
            tp: TensorParallel | None = None) -> torch.Tensor:
    """The mean cross-entropy of softcap(hidden @ weight.T + bias) against labels (-100
    ignored); hidden (batch, seqlen, hidden), labels (batch, seqlen); shift: position t
    predicts labels[:, t + 1] (causal LMs). tp: weight and bias are this rank's vocabulary
    slice (tp.vocab_rows rows, the padding past vocab_valid left out)."""
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must be the inputs' {tuple(hidden.shape[:2])}")
    bias = None if bias is None else bias.to(weight.dtype)
    if tp is not None:
        if backend != "tritium":
            raise ValueError(f"labels on the {backend!r} backend under tensor parallelism: the loss over vocabulary "
                             "slices is tritium's fused loss; set_attn_implementation('tritium')")
        rows = tp.vocab_valid
        return linear_cross_entropy(hidden, weight[:rows], labels, bias=None if bias is None else bias[:rows],
                                    softcap=softcap, shift=shift, process_group=tp.group, vocab_start=tp.vocab_start,
                                    vocab_size=tp.vocab_size)
    loss_fn = linear_cross_entropy if backend == "tritium" else reference.linear_cross_entropy
    return loss_fn(hidden, weight, labels, bias=bias, softcap=softcap, shift=shift)
