"""The FlashAttention error criterion: a kernel may be at most twice as far from the float64
truth as PyTorch itself is in the same dtype, plus a small absolute floor."""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double(), truth.double()
    both_inf = torch.isinf(x) & torch.isinf(truth) & (torch.sign(x) == torch.sign(truth))
    return (x - truth).abs().masked_fill(both_inf, 0.0).max().item() if x.numel() else 0.0


def assert_close(name, kernel, same_dtype, truth, dtype: torch.dtype, factor: float = 2.0):
    """kernel, same_dtype: the op computed by the kernel and by PyTorch from inputs of
    `dtype`; truth: the float64 result."""
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(kernel).any(), f"{name}: NaN in the kernel's result"
    err, ref_err = max_err(kernel, truth), max_err(same_dtype, truth)
    bound = factor * ref_err + FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3g} > {factor} x PyTorch's {ref_err:.3g} + floor"
