"""The identity of a GPU for tuned entries: a config tuned on an H100 SXM is not assumed
to be best on an H100 PCIe or an H200, so entries are filed per SKU."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Sku:
    """Device name, SM count, memory size (GiB) and compute capability."""

    name: str
    sm_count: int
    memory_gib: int
    capability: str

    @property
    def slug(self) -> str:
        """File-name form naming every field, e.g. nvidia-h100-80gb-hbm3-132sm-80gib-cc90."""
        text = f"{self.name}-{self.sm_count}sm-{self.memory_gib}gib-cc{self.capability.replace('.', '')}"
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    def to_json(self) -> dict:
        return asdict(self)


def current_sku(device: torch.device | None = None) -> Sku | None:
    """The SKU of `device` (default: the current CUDA device); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return Sku(
        name=props.name,
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30),
        capability=f"{props.major}.{props.minor}",
    )
