"""tritium's kernels inside a transformers model loaded with tensor parallelism
(`from_pretrained(..., tp_plan="auto")`): transformers holds each split parameter as a
DTensor over a 1-D device mesh (Shard(0): a column-parallel projection's output rows, or
the LM head's vocabulary rows; Shard(1): a row-parallel projection's input columns) and
wraps those Linear modules' forwards with its collectives.

The attention interface needs nothing: q, k and v come out of the column-parallel
projections with this rank's heads. What reads weights itself takes the local shards here:
- the fused gated MLP (Gemma 2: gate_proj and up_proj Shard(0), down_proj Shard(1)) runs
  on this rank's intermediate features, then sums the ranks' outputs, as down_proj's
  row-parallel forward would;
- the fused loss runs on the LM head's vocabulary rows (linear_cross_entropy's
  process_group).
A layout other than these is refused by name when `apply` runs, before anything is
patched.
"""

from __future__ import annotations

import torch
from torch import nn

from tritium.kernels.mlp import gated_mlp
from tritium.models.parallel import copy_in, reduce_sum
from tritium.runtime import cdiv


def _dtensor():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def is_sharded(weight) -> bool:
    """Whether a parameter is a DTensor (split by transformers' tensor parallelism)."""
    return isinstance(weight, _dtensor()[0])


def local(weight, dim: int, name: str) -> torch.Tensor:
    """This rank's shard of a DTensor parameter split along `dim` over a 1-D mesh (differentiable:
    its gradient reaches the DTensor); ValueError naming the parameter for another layout."""
    _, Shard = _dtensor()
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(dim),):
        raise ValueError(f"{name}: tritium's kernels take a weight split along dim {dim} over a 1-D mesh; this one is "
                         f"{tuple(weight.placements)} over a {weight.device_mesh.ndim}-D mesh")
    return weight.to_local()


def group_of(weight):
    """The process group a DTensor parameter is split over."""
    return weight.device_mesh.get_group()


def check_gated_mlp(module: nn.Module, names: tuple[str, ...]) -> None:
    """Refuse (at apply) a split MLP whose layout the local fused kernel cannot run."""
    for name in names:
        local(getattr(module, name).weight, 0, f"{type(module).__name__}.{name}.weight")
    local(module.down_proj.weight, 1, f"{type(module).__name__}.down_proj.weight")
    if module.down_proj.bias is not None:
        raise ValueError(f"{type(module).__name__}.down_proj: a bias under tensor parallelism is not supported")


def gated_mlp_shards(module: nn.Module, activation: str, x: torch.Tensor) -> torch.Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)) on this rank's intermediate features, summed
    over the ranks: one all-reduce, as transformers' row-parallel down_proj does."""
    group = group_of(module.down_proj.weight)
    gate, up = (local(getattr(module, n).weight, 0, n) for n in ("gate_proj", "up_proj"))
    out = gated_mlp(copy_in(group, x), (gate, up), local(module.down_proj.weight, 1, "down_proj"), activation)
    return reduce_sum(group, out)


def vocab_shard(weight, vocab_size: int) -> dict:
    """linear_cross_entropy's keywords for an LM head split by vocabulary rows: the local
    rows (torch.chunk's split, as DTensor's Shard(0)), their offset, the group."""
    rows, group = local(weight, 0, "lm_head.weight"), group_of(weight)
    per_rank = cdiv(vocab_size, torch.distributed.get_world_size(group))
    start = torch.distributed.get_rank(group) * per_rank
    if rows.shape[0] != max(0, min(vocab_size - start, per_rank)):
        raise ValueError(f"lm_head.weight: this rank holds {rows.shape[0]} vocabulary rows from {start}, not "
                         "torch.chunk's split of the vocabulary")
    return dict(weight=rows, process_group=group, vocab_start=start, vocab_size=vocab_size)
