"""The shared activations and their derivatives (`tritium.kernels.activations`), applied
elementwise by a tiny kernel, against torch autograd in float64 on [-10, 10]."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from tritium import reference
from tritium.kernels.activations import ACTIVATIONS, activation, activation_grad, check_activation

BLOCK = 1024
# The tanh branch switches from its polynomial at |x| = 0.625; gelu_tanh feeds it
# 0.798 * (x + 0.045 x^3), which crosses 0.625 near |x| = 0.76.
EDGES = [0.0, 1e-30, 1e-7, 1e-3, 0.5, 0.6249, 0.625, 0.6251, 0.76, 1.0, 3.0, 5.5, 7.5, 9.99]


@triton.jit
def _apply_kernel(X, Y, DY, N, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok)
    tl.store(Y + offs, activation(x, ACTIVATION), mask=ok)
    tl.store(DY + offs, activation_grad(x, ACTIVATION), mask=ok)


def apply(x: torch.Tensor, name: str):
    y, dy = torch.empty_like(x), torch.empty_like(x)
    _apply_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, dy, x.numel(), ACTIVATION=name, BLOCK=BLOCK)
    return y, dy


def inputs() -> torch.Tensor:
    edges = torch.tensor(EDGES)
    return torch.cat((torch.linspace(-10, 10, 2001), edges, -edges)).to(DEVICE)


@pytest.mark.parametrize("name", [*ACTIVATIONS, None])
def test_activation_and_derivative(name):
    """float32 kernels within a few ulp of float64 truth (None: the identity, derivative 1)."""
    x = inputs()
    y, dy = apply(x, name or "none")
    x64 = x.double().requires_grad_()
    truth = reference.activation(x64, name)
    (dtruth,) = torch.autograd.grad(truth.sum(), x64)
    torch.testing.assert_close(y.double(), truth.detach(), rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(dy.double(), dtruth, rtol=2e-6, atol=2e-7)


def test_check_activation():
    for name in ACTIVATIONS:
        check_activation(name)
    check_activation(None)
    with pytest.raises(ValueError, match="activation: expected one of 'gelu'.* or None, got 'gelu_new'"):
        check_activation("gelu_new")
    with pytest.raises(ValueError, match=r"act: expected one of .*'silu', got None"):
        check_activation(None, name="act", allow_none=False)
