"""A launch configuration: tl.constexpr meta-parameters plus warps and stages."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    """Meta-parameters of one launch (block sizes and the like) plus num_warps/num_stages."""

    meta: dict = field(default_factory=dict, hash=False)
    num_warps: int = 4
    num_stages: int = 2

    def launch_kwargs(self) -> dict:
        """Keyword arguments for `kernel[grid](..., **launch_kwargs())`."""
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_json(self) -> dict:
        return self.launch_kwargs()

    @classmethod
    def from_json(cls, data: dict) -> "Config":
        """Inverse of to_json; raises KeyError/TypeError/ValueError on a malformed entry."""
        meta = {k: int(v) for k, v in data.items() if k not in ("num_warps", "num_stages")}
        return cls(meta, num_warps=int(data["num_warps"]), num_stages=int(data["num_stages"]))

    def __str__(self) -> str:
        meta = " ".join(f"{k}={v}" for k, v in self.meta.items())
        return f"{meta} warps={self.num_warps} stages={self.num_stages}"
