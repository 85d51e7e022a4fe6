"""Gemma 2 / GLM-4 rotary embeddings on tritium's kernel, at transformers' own seam.

Their attention forwards rotate q and k by calling the module-level
`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` of their modeling file. `apply`
swaps that name for `rotary_pos_emb` (one swap per modeling file, however many models
share it, undone when the last is reverted) and wraps each patched attention module's
forward in `rotary_scope`: inside a patched module the rotation runs on
`tritium.apply_rotary`, anywhere else it is transformers' own function. The forward itself
stays transformers', so its cache handling and arguments follow whatever version is
installed; `tritium.hf.compat` checks at apply time that the forward still calls the
function and that the function still takes (q, k, cos, sin, unsqueeze_dim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tritium.kernels.rope import apply_rotary

ROTARY_FUNCTION = "apply_rotary_pos_emb"
ROTARY_PARAMETERS = [("q", "k", "cos", "sin", "unsqueeze_dim")]

# One entry per patched attention forward now running. A plain global list (not a
# thread-local) so torch.compile traces it; another thread's unpatched module that sees
# an entry still gets a correct rotation, only from the other implementation.
_SCOPE: list[bool] = []


def rotary_scope(forward: Callable, *args, **kwargs):
    """Run an attention module's forward with its rotation on tritium's kernel."""
    _SCOPE.append(True)
    try:
        return forward(*args, **kwargs)
    finally:
        _SCOPE.pop()


def rotary_pos_emb(original: Callable, interleaved: bool, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb: q (batch, heads_q, seq, head_dim), k (batch,
    heads_kv, seq, head_dim), cos/sin (batch or 1, seq, rotary_dim) holding [freqs, freqs]
    (GLM-4's reads only the first half too, interleaved over the first rotary_dim features,
    the rest passing through). Returns new rotated (q, k), as transformers' does.

    q and k are transpose(1, 2) views of the projections' (batch, seq, heads, dim) output,
    the layout apply_rotary takes, so both rotate in one launch without a copy."""
    if not _SCOPE or unsqueeze_dim != 1 or q.dim() != 4:
        return original(q, k, cos, sin, unsqueeze_dim)
    cos, sin = (t[..., : t.shape[-1] // 2] for t in (cos, sin))
    q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, interleaved=interleaved)
    return q.transpose(1, 2), k.transpose(1, 2)
