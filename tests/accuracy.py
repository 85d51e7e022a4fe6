"""The FlashAttention error criterion: a kernel may be at most twice as far from the float64
truth as PyTorch itself is in the same dtype, plus a small absolute floor. The rule lives in
benchmarks/accuracy.py, which judges the benchmark rows by it too."""

import torch

from benchmarks.accuracy import FACTOR, tolerance


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double(), truth.double()
    both_inf = torch.isinf(x) & torch.isinf(truth) & (torch.sign(x) == torch.sign(truth))
    return (x - truth).abs().masked_fill(both_inf, 0.0).max().item() if x.numel() else 0.0


def assert_close(name, kernel, same_dtype, truth, dtype: torch.dtype, factor: float = FACTOR):
    """kernel, same_dtype: the op computed by the kernel and by PyTorch from inputs of
    `dtype`; truth: the float64 result."""
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(kernel).any(), f"{name}: NaN in the kernel's result"
    err, ref_err = max_err(kernel, truth), max_err(same_dtype, truth)
    bound = tolerance(dtype, ref_err, factor)
    assert err <= bound, f"{name}: error {err:.3g} > {factor} x PyTorch's {ref_err:.3g} + floor"
