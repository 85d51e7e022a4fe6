"""Elementwise math shared by every kernel: tanh, and the MLP activations with their
derivatives. One definition each; kernels pick one with a tl.constexpr name."""

from __future__ import annotations

import triton
import triton.language as tl

from tritium.kernels.tiles import INTERPRETED

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def check_activation(activation, name: str = "activation", allow_none: bool = True) -> None:
    """activation must be one of ACTIVATIONS (or None when allowed)."""
    if activation is None and allow_none:
        return
    if activation not in ACTIVATIONS:
        allowed = ", ".join(map(repr, ACTIVATIONS)) + (" or None" if allow_none else "")
        raise ValueError(f"{name}: expected one of {allowed}, got {activation!r}")


@triton.jit
def tanh(x):
    """float32 tanh to ~1 ulp (tl has no tanh on every Triton we support). Near 0,
    1 - 2 / (e^2x + 1) cancels, so a minimax odd polynomial (Cephes tanhf) covers |x| < 0.625."""
    z = x * x
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    # Clamping keeps exp2 finite; tanh(15) is 1 to float32 precision.
    e = tl.exp2(tl.minimum(tl.maximum(x, -15.0), 15.0) * 2.8853900817779268)
    return tl.where(tl.abs(x) < 0.625, poly, 1.0 - 2.0 / (e + 1.0))


@triton.jit
def tanh_for(x, dtype: tl.constexpr):
    """tanh(x) in float32, at the precision that inputs of `dtype` call for. float32 inputs
    get `tanh` (~1 ulp). 16-bit inputs get the hardware's `tanh.approx.f32` (MUFU.TANH, one
    instruction instead of a dozen): its relative error, about 1.1e-5 (measured over all
    floats by N. Juffa, NVIDIA developer forums), is 1/350 of bfloat16's rounding step and
    1/40 of float16's. The interpreter has no PTX and takes `tanh`."""
    if dtype == tl.float32 or INTERPRETED:
        return tanh(x)
    else:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """act(x) in float32: "gelu" (erf), "gelu_tanh" (transformers' gelu_new and
    gelu_pytorch_tanh), "relu", "silu"; anything else is the identity."""
    if ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) = sigmoid(2u): no cancellation where tanh(u) nears -1.
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    else:
        return x


@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """d act / dx at x, in float32 (1 for the identity)."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == "gelu_tanh":
        # With s = sigmoid(2u): 0.5 * (1 + tanh(u)) = s and 1 - tanh(u)^2 = 4 s sigmoid(-2u),
        # both free of the cancellation the tanh form suffers for x below about -3.
        u2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(u2)
        return s + 1.5957691216057308 * x * s * tl.sigmoid(-u2) * (1.0 + 0.134145 * x * x)
    elif ACTIVATION == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.full(x.shape, 1.0, tl.float32)
