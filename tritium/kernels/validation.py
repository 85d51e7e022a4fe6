"""Input checks shared by every op: run before any launch, raise errors that name the
argument, what it got and what it expects. A Triton compile error is never the answer a
user sees for bad input."""

from __future__ import annotations

import math

import torch

from tritium.runtime import kernel_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# FlashAttention's limit. Any smaller head_dim works: the kernels pad it to a power of two
# >= 16 (tl.dot's minimum) with masked loads and stores.
MAX_HEAD_DIM = 256


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, shape: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    """x must be a tensor of rank `ndim` (described by `shape`) with a dtype in `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {shape}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {x.dtype}")
    check_device(name, x)


def check_device(name: str, x: torch.Tensor) -> None:
    """x must live where kernels run: CUDA, or the CPU under the Triton interpreter."""
    if kernel_device(x.device):
        return
    hint = (
        "set TRITON_INTERPRET=1 before importing tritium to run kernels on the CPU"
        if x.device.type == "cpu"
        else "move it to a CUDA device"
    )
    raise ValueError(f"{name}: tensor is on {x.device}; tritium kernels need a CUDA device ({hint})")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """x must share ref's dtype and device."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from {ref_name}'s {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name}: device {x.device} differs from {ref_name}'s {ref.device}; they must match")


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """x.shape[dim] must equal `expected` (described by `what`)."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {what} = {expected} at dim {dim}, got shape {tuple(x.shape)}"
        )


def check_head_dim(name: str, x: torch.Tensor) -> None:
    """The attention head_dim, x's last dim, must be in [1, MAX_HEAD_DIM]."""
    if not 1 <= x.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in [1, {MAX_HEAD_DIM}], got {x.shape[-1]}")


def is_empty(*sizes: int) -> bool:
    """True when a problem has a zero size (batch, rows, tokens, heads, ...): its result is
    empty, or a constant the host fills, so the op returns it with no kernel launch and no
    config lookup (which could tune on an empty problem)."""
    return 0 in sizes


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., features) as (rows, features), rows the product of the leading dims: a view
    when they flatten to one stride, a copy otherwise. Unlike reshape(-1, features), it
    takes features = 0 (where -1 is ambiguous)."""
    rows = 1
    for size in x.shape[:-1]:
        rows *= size
    return x.reshape(rows, x.shape[-1])


def check_float(
    name: str, value, *, minimum: float = -math.inf, maximum: float = math.inf, strict: bool = False, note: str = ""
) -> None:
    """value must be a finite real number >= minimum (> minimum when strict) and <= maximum."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not real or value < minimum or (strict and value == minimum) or value > maximum:
        bounds = [f"{'>' if strict else '>='} {minimum:g}"] if minimum > -math.inf else []
        bounds += [f"<= {maximum:g}"] if maximum < math.inf else []
        bound = " " + " and ".join(bounds) if bounds else ""
        raise ValueError(f"{name}: expected a finite float{bound}{note}, got {value!r}")
