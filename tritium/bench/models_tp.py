"""The models suite's tensor-parallel decode (`python -m benchmarks tp`, one torchrun job per
tensor-parallel degree): what each rank builds and times.

- `random_model`: a compact decoder of a real model's shapes (models.SHAPES) with seeded
  random weights, this rank's part of it. Each checkpoint tensor is drawn whole on the
  device from a generator seeded by its name, then sliced, so every degree holds the same
  model (TP=1 included) and no rank holds more than one whole tensor at a time. Weights
  normal(0, STD), RMSNorm scales 1 + normal(0, STD) as each family stores them.
- `transformers_model`: transformers' model of the same weights under its own tensor
  parallelism (from_pretrained(tp_plan="auto")); every rank first draws the whole state
  dict on the CPU, so this baseline needs host memory for one copy per rank.
- `collective_ms`: the time a profiled step spends in collectives (NCCL kernels on CUDA,
  gloo calls on the CPU), the part of a decode step tensor parallelism adds.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from tritium.bench.hf import no_progress_bar
from tritium.bench.models import HF_CLASSES, SEED, SHAPES, STD
from tritium.models import MODEL_TYPES, sharding
from tritium.models.checkpoint import load_weights, tied_groups
from tritium.models.norms import RMSNorm
from tritium.models.parallel import TensorParallel

COLLECTIVES = ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "gloo")


class RandomWeights:
    """The checkpoint reader's interface (shapes, device, tensors) over seeded random tensors:
    `full(key)` is the same tensor on every rank and at every degree."""

    def __init__(self, dense: nn.Module, device: torch.device):
        self.device, self.unused = device, []
        self.shapes = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
        self.means = {f"{n}.weight": 1.0 - m.offset for n, m in dense.named_modules() if isinstance(m, RMSNorm)}

    def full(self, key: str) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(SEED + zlib.crc32(key.encode()))
        t = torch.empty(self.shapes[key], device=self.device)
        return t.normal_(self.means.get(key, 0.0), STD, generator=generator)

    def tensors(self, keys, slices=None):
        for key in sorted(keys):
            part = (slices or {}).get(key)
            yield key, self.full(key) if part is None else part.take(self.full(key))


def _classes(model: str):
    raw = SHAPES[model]
    config_from_hf, model_class = MODEL_TYPES[raw["model_type"]]
    return raw, config_from_hf(raw), model_class


def random_model(model: str, dtype: torch.dtype, device: torch.device, group) -> nn.Module:
    """This rank's part of `model` (a name of models.SHAPES) with the seeded random weights;
    the whole model when the group has one rank."""
    _, config, model_class = _classes(model)
    built, dense = (model_class(config, dtype=dtype, device="meta") for _ in range(2))
    slices = None
    if dist.get_world_size(group) > 1:
        slices = sharding.shard(built, TensorParallel.of(group, config.vocab_size))
    load_weights(built, dense, RandomWeights(dense, device), name=model, dtype=dtype, quantize=False, slices=slices)
    return built.eval()


def transformers_model(model: str, dtype: torch.dtype, device: torch.device, *, split: bool) -> nn.Module:
    """transformers' model of `model` holding the same random weights: with split, split by
    its tp_plan="auto" over the default group (on this rank's device), else whole on
    `device`."""
    import transformers

    raw, config, model_class = _classes(model)
    dense = model_class(config, dtype=dtype, device="meta")
    weights = RandomWeights(dense, torch.device("cpu"))
    # A tied tensor once, under its first name (as random_model reads it): transformers ties the others.
    tied = {name for group in tied_groups(dense) for name in group[1:]}
    state = {key: t.to(dtype) for key, t in weights.tensors(weights.shapes.keys() - tied)}
    config = transformers.AutoConfig.for_model(**raw)
    hf_class = getattr(transformers, HF_CLASSES[raw["model_type"]])
    placement = dict(tp_plan="auto") if split else dict(device_map=device)
    with no_progress_bar():
        hf = hf_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, **placement)
    return hf.eval()


def collective_ms(profile, steps: int) -> float:
    """Milliseconds per step in collectives: the device time of NCCL kernels on CUDA, the
    host time of the collective calls on the CPU, from a torch.profiler run of `steps`."""
    total = 0.0
    for event in profile.key_averages():
        if not any(word in event.key.lower() for word in COLLECTIVES):
            continue
        device_us = getattr(event, "device_time_total", 0.0) or 0.0
        total += device_us if device_us else event.cpu_time_total
    return total / 1e3 / steps
