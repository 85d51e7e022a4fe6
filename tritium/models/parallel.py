"""Tensor parallelism's runtime pieces, on torch.distributed process groups (NCCL on GPUs,
gloo on CPUs, processes started by torchrun): which rank holds what, and the collectives a
sharded model calls.

Megatron's layout: a column-parallel projection (q/k/v, gate/up, fc1) holds its rank's
output rows and needs nothing in the forward; a row-parallel one (o_proj, down_proj, fc2)
holds the matching input columns, and its partial outputs are summed by one all-reduce
(`reduce_sum`). In training, the replicated input of a column-parallel block gets the
ranks' partial gradients summed (`copy_in`). The vocabulary is split by rows, padded to
equal slices: the embedding looks up its own rows and all-reduces
(`VocabParallelEmbedding`), the LM head's logits are gathered (`gather_vocab`), and the
loss merges the slices' statistics (tritium.linear_cross_entropy's process_group).

`sharding.py` turns a model into one rank's part; this file is what that part runs.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tritium.runtime import cdiv

# torch >= 2.12 renames all_gather_into_tensor (and warns under the old name).
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallel:
    """One rank of a tensor-parallel group, and its slice of a vocabulary of vocab_size:
    rows [vocab_start, vocab_start + vocab_valid), padded with zero rows to vocab_rows (the
    same on every rank, so logits gather into one tensor)."""

    group: object
    rank: int
    world: int
    vocab_size: int

    @classmethod
    def of(cls, group, vocab_size: int) -> TensorParallel:
        world = dist.get_world_size(group)
        if vocab_size < world:
            raise ValueError(f"tensor parallelism: a vocabulary of {vocab_size} cannot be split over {world} ranks")
        return cls(group, dist.get_rank(group), world, vocab_size)

    @property
    def vocab_rows(self) -> int:
        return cdiv(self.vocab_size, self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def vocab_valid(self) -> int:
        return max(0, min(self.vocab_rows, self.vocab_size - self.vocab_start))


def split(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's [start, stop) of `total` items dealt as evenly as possible (sizes differ by at
    most one: 14 intermediate features over 4 ranks are 3, 4, 3, 4)."""
    return rank * total // world, (rank + 1) * total // world


def head_split(heads: int, kv_heads: int, world: int, rank: int) -> tuple[int, int, list[int]]:
    """Rank's query heads [start, stop) and the kv heads they read, in order.

    A rank's query heads must read its kv heads as GQA does (local query head i reads
    local kv head i // (local heads / local kv heads)). When its query heads cover whole
    groups, or lie inside one group (fewer kv heads than ranks: the kv head is replicated),
    each kv head is listed once; otherwise (6 heads, 3 kv heads, 2 ranks: heads 0-2 read kv
    0, 0, 1) the kv heads are listed per query head, so each local query head has its own
    copy. Raises where a rank would get no query head."""
    if world > heads:
        raise ValueError(f"tensor parallelism: {heads} attention heads cannot be split over {world} ranks "
                         "(each rank needs at least one head)")
    start, stop = split(heads, world, rank)
    group = heads // kv_heads
    per_head = [h // group for h in range(start, stop)]
    distinct = sorted(set(per_head))
    if len(per_head) % len(distinct) == 0:
        repeat = len(per_head) // len(distinct)
        if per_head == [kv for kv in distinct for _ in range(repeat)]:
            return start, stop, distinct
    return start, stop, per_head


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK (torchrun sets it) when there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def process_group(tp: bool, device_mesh=None):
    """The group a model is sharded over: device_mesh's (1-D), else with tp the default
    group, initialized from torchrun's environment if it is not yet; None without either."""
    if device_mesh is not None:
        if device_mesh.ndim != 1:
            raise ValueError(f"device_mesh: expected the 1-D tensor-parallel mesh, got {device_mesh.ndim} dimensions "
                             "(pass mesh['tp'])")
        return device_mesh.get_group()
    if not tp:
        return None
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("tp=True: torch.distributed is not initialized and this process was not started by "
                             "torchrun; run `torchrun --nproc-per-node N your_script.py`, or call "
                             "torch.distributed.init_process_group first")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_destroy_default_group)  # torch asks for it before exit (NCCL warns otherwise)
    return dist.group.WORLD


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> None:
    """End this process of a torchrun job that is done: wait until every rank is (no
    collective still in flight), destroy the default group, flush the output, and leave
    without interpreter teardown. At teardown, c10d's and gloo's threads can still abort a
    finished process ("terminate called without an active exception", SIGABRT; seen in CI
    even with the group destroyed), and torchrun then reports the whole job failed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _CopyIn(torch.autograd.Function):
    """Identity forward; the backward sums the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceSum(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (every rank holds the summed output)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _recording(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def copy_in(group, x: torch.Tensor) -> torch.Tensor:
    """x, the replicated input of a column-parallel block of the ranks of `group` (None: no
    tensor parallelism): its gradient summed over them."""
    return _CopyIn.apply(x, group) if group is not None and _recording(x) else x


def reduce_sum(group, x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of `group` (None: x itself) of x, a row-parallel projection's
    partial output; in place when no gradient is recorded (capturable in a CUDA graph:
    NCCL's all-reduce is)."""
    if group is None:
        return x
    if _recording(x):
        return _ReduceSum.apply(x, group)
    dist.all_reduce(x, group=group)
    return x


def _gather(local: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    local = local.contiguous()
    parts = local.new_empty(tp.world * local.shape[0], *local.shape[1:])  # the ranks' slices stacked on dim 0
    ALL_GATHER(parts, local, group=tp.group)
    return parts.view(tp.world, *local.shape).movedim(0, -2).reshape(*local.shape[:-1], -1)[..., : tp.vocab_size]


class _GatherVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, tp):
        ctx.tp = tp
        return _gather(local, tp)

    @staticmethod
    def backward(ctx, grad):
        tp = ctx.tp
        mine = grad[..., tp.vocab_start: tp.vocab_start + tp.vocab_valid]
        return F.pad(mine, (0, tp.vocab_rows - tp.vocab_valid)), None


def gather_vocab(tp: TensorParallel | None, logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab_rows) logits of this rank's vocabulary slice -> (..., vocab_size), every
    rank's slice in order (one all-gather)."""
    if tp is None:
        return logits
    return _GatherVocab.apply(logits, tp) if _recording(logits) else _gather(logits, tp)


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding rows [vocab_start, vocab_start + vocab_rows) of the table
    (parameter `weight`, as the checkpoint names it); a lookup takes the ids in its rows,
    zeros for the others, and sums over ranks. padding_idx: the whole table's."""

    def __init__(self, tp: TensorParallel, embedding_dim: int, padding_idx: int | None, *, dtype: torch.dtype,
                 device=None):
        local = None if padding_idx is None else padding_idx - tp.vocab_start
        super().__init__(tp.vocab_rows, embedding_dim, local if local is not None and 0 <= local < tp.vocab_valid
                         else None, device=device, dtype=dtype)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.tp.vocab_start
        inside = (local >= 0) & (local < self.tp.vocab_valid)
        out = F.embedding(torch.where(inside, local, 0), self.weight, self.padding_idx)
        return reduce_sum(self.tp.group, out * inside[..., None].to(out.dtype))
