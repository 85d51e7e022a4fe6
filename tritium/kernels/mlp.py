"""Linear layers with a fused epilogue, and the gated MLP (GeGLU, SwiGLU).

`linear`: act(x @ W^T + b) as one tiled GEMM (programs in grouped order for L2 reuse, as
in Triton's matmul tutorial) whose epilogue adds the bias and applies the activation: in
inference the pre-activation never makes a round trip through memory. At few tokens
the output tiles alone are too few programs to stream the weight at full bandwidth; the
tuner may then split K (split_k.py), the epilogue moving to the deterministic reduction.

`gated_mlp`: down(act(x W_gate^T) * (x W_up^T)). One kernel multiplies each x tile by a
gate and an up weight tile (two tensors, or the halves of a stacked [2 * I, H] weight)
into two accumulators and writes only h = act(gate) * up; the down projection is the
same GEMM as `linear`.

Backward: the elementwise part (activation derivatives) runs in Triton with
`activations.activation_grad`; the GEMMs run in cuBLAS through torch.matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels import mlp_tuning as tuning
from tritium.kernels.activations import activation, activation_grad, check_activation
from tritium.kernels.split_k import SOURCES as SPLIT_K_SOURCES
from tritium.kernels.split_k import epilogue_flags, finish, k_span, launch_split_sum, partials, split_len
from tritium.kernels.tiles import dot, dot_precision, grouped_tile, rounded, store_tile
from tritium.kernels.validation import as_rows, check_dim, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, needs_grad, next_power_of_2, run_function

ELEMENTWISE_TILE = 4096  # values per program of the backward's elementwise kernels


@triton.jit
def _load_k(ptrs, offs_k, k_left, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    """One K step of a tile whose K axis is K_AXIS; past k_left it reads 0 (only the last
    step, and only when BLOCK_K does not divide K)."""
    if EVEN_K:
        return tl.load(ptrs)
    elif K_AXIS == 0:
        return tl.load(ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    else:
        return tl.load(ptrs, mask=offs_k[None, :] < k_left, other=0.0)


@triton.jit
def _linear_kernel(
    X, W, Bias, Out, Pre, Partial,
    M, N, K, split_len,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_om, stride_on, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of Out = act(X @ W^T + bias): X (M, K), W (N, K) as
    nn.Linear, Out (M, N), float32 accumulation. STORE_PRE also writes X @ W^T + bias to
    Pre, the input of act' in the backward. Program axis 1 is the K split: with SPLIT_K > 1
    the tile's partial sums over [split * split_len, +split_len) go to Partial (SPLIT_K,
    M, N) and `split_k._split_sum_kernel` applies the epilogue."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    start, stop = k_span(split, split_len, K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around: their loads need no mask, the store drops them.
    x_ptrs = X + (rows % M)[:, None].to(tl.int64) * stride_xm + (start + offs_k)[None, :] * stride_xk
    w_ptrs = W + (cols % N)[None, :].to(tl.int64) * stride_wn + (start + offs_k)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(start, stop, BLOCK_K):
        x = _load_k(x_ptrs, offs_k, K - k, 1, EVEN_K)
        w = _load_k(w_ptrs, offs_k, K - k, 0, EVEN_K)
        acc = dot(x, w, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    finish(acc, rows, cols, M, N, Bias, Out, Pre, Partial, split, stride_b, stride_om, stride_on, stride_pm,
            stride_pn, ACTIVATION, HAS_BIAS, STORE_PRE, SPLIT_K)


@triton.jit
def _gate_up_kernel(
    X, Wg, Wu, H, GateUp,
    M, N, K,
    stride_xm, stride_xk, stride_gn, stride_gk, stride_un, stride_uk, stride_hm, stride_hn, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of H = act(X @ Wg^T) * (X @ Wu^T), N the intermediate
    size: Wg and Wu (N, K) each, any strides (two tensors, or the row halves of GLM-4's
    stacked gate_up_proj), H (M, N). Each X tile feeds both accumulators. STORE_PRE also
    writes gate and up side by side to GateUp (M, 2N)."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rows % M)[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    g_ptrs = Wg + (cols % N)[None, :].to(tl.int64) * stride_gn + offs_k[:, None] * stride_gk
    u_ptrs = Wu + (cols % N)[None, :].to(tl.int64) * stride_un + offs_k[:, None] * stride_uk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = _load_k(x_ptrs, offs_k, K - k * BLOCK_K, 1, EVEN_K)
        acc_g = dot(x, _load_k(g_ptrs, offs_k, K - k * BLOCK_K, 0, EVEN_K), acc_g, PRECISION)
        acc_u = dot(x, _load_k(u_ptrs, offs_k, K - k * BLOCK_K, 0, EVEN_K), acc_u, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk
    if STORE_PRE:
        store_tile(GateUp, acc_g, rows, cols, M, N, stride_pm, stride_pn)
        store_tile(GateUp, acc_u, rows, cols + N, M, 2 * N, stride_pm, stride_pn)
    store_tile(H, activation(acc_g, ACTIVATION) * acc_u, rows, cols, M, N, stride_hm, stride_hn)


@triton.jit
def _activation_bwd_kernel(
    DY, Pre, DPre, M, N, stride_dym, stride_dyn, stride_pm, stride_dpm,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DPre = DY * act'(Pre) on one (BLOCK_M, BLOCK_N) tile; DY any strides (a broadcast
    gradient has stride 0), Pre and DPre rows contiguous."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < M) & (cols < N)
    rows = rows.to(tl.int64)
    dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=ok, other=0.0).to(tl.float32)
    pre = tl.load(Pre + rows * stride_pm + cols, mask=ok, other=0.0).to(tl.float32)
    dpre = dy * activation_grad(pre, ACTIVATION)
    tl.store(DPre + rows * stride_dpm + cols, rounded(dpre, DPre.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd_kernel(
    DH, GateUp, DGateUp, H, M, N, stride_dhm, stride_dhn, stride_gm, stride_dgm, stride_hm,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """On one (BLOCK_M, BLOCK_N) tile, from dh (M, N) and the saved (gate, up) of GateUp (M, 2N):
    dgate = dh * up * act'(gate) and dup = dh * act(gate) into DGateUp (GateUp's layout),
    and h = act(gate) * up into H for the down weight's gradient."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < M) & (cols < N)
    rows = rows.to(tl.int64)
    dh = tl.load(DH + rows * stride_dhm + cols * stride_dhn, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(GateUp + rows * stride_gm + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + rows * stride_gm + N + cols, mask=ok, other=0.0).to(tl.float32)
    act = activation(gate, ACTIVATION)
    dtype = DGateUp.dtype.element_ty
    tl.store(DGateUp + rows * stride_dgm + cols, rounded(dh * up * activation_grad(gate, ACTIVATION), dtype), mask=ok)
    tl.store(DGateUp + rows * stride_dgm + N + cols, rounded(dh * act, dtype), mask=ok)
    tl.store(H + rows * stride_hm + cols, rounded(act * up, H.dtype.element_ty), mask=ok)


_ACTIVATION_SOURCES = (activation, activation_grad)
LINEAR = autotune.Kernel(
    "mlp_linear", space=tuning.LINEAR_SPACE, key=tuning.gemm_bucket, default=tuning.linear_default,
    interpreter=tuning.LINEAR_INTERPRETER, prune=tuning.linear_fits,
    sources=(_linear_kernel, grouped_tile, _load_k, dot, *SPLIT_K_SOURCES),
)
GATE_UP = autotune.Kernel(
    "mlp_gate_up", space=tuning.SPACE, key=tuning.gemm_bucket, default=tuning.gate_up_default,
    interpreter=tuning.INTERPRETER, prune=tuning.gate_up_fits,
    sources=(_gate_up_kernel, grouped_tile, _load_k, dot, store_tile, rounded, *_ACTIVATION_SOURCES),
)


def _gemm_grid(m: int, n: int, config: autotune.Config) -> tuple[int]:
    return (cdiv(m, config.meta["BLOCK_M"]) * cdiv(n, config.meta["BLOCK_N"]),)


def launch_linear(x, weight, bias, out, pre, activation_name: str | None) -> None:
    """out = act(x @ weight^T + bias) with `_linear_kernel`; x (M, K), weight (N, K), bias
    (N,) or None, out (M, N), any strides. pre: None, or (M, N) to receive the
    pre-activation. With SPLIT_K > 1 the splits' float32 partial sums (SPLIT_K, M, N) are
    added by `split_k.launch_split_sum`, which applies the epilogue."""
    m, k = x.shape
    n = weight.shape[0]
    if is_empty(m, n):
        return

    def launch(config):
        split, block_k = config.meta["SPLIT_K"], config.meta["BLOCK_K"]
        partial = partials(out, split)
        _linear_kernel[(*_gemm_grid(m, n, config), split)](
            x, weight, x if bias is None else bias, out, out if pre is None else pre, partial,
            m, n, k, split_len(k, block_k, split),
            *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *out.stride(),
            *((0, 0) if pre is None else pre.stride()), **epilogue_flags(bias, pre, activation_name),
            EVEN_K=k % block_k == 0, PRECISION=dot_precision(x.dtype), **config.launch_kwargs(),
        )
        if split > 1:
            launch_split_sum(partial, bias, out, pre, activation_name)

    launch(LINEAR.lookup(launch, m=m, n=n, k=k, dtype=x.dtype, activation=activation_name))


def launch_gate_up(x, gate_weight, up_weight, h, gate_up, activation_name: str) -> None:
    """h = act(x @ gate_weight^T) * (x @ up_weight^T) with `_gate_up_kernel`; x (M, K),
    gate_weight and up_weight (I, K), h (M, I), any strides. gate_up: None, or (M, 2I) to
    receive gate and up."""
    m, k = x.shape
    inter = gate_weight.shape[0]
    if is_empty(m, inter):
        return

    def launch(config):
        _gate_up_kernel[_gemm_grid(m, inter, config)](
            x, gate_weight, up_weight, h, h if gate_up is None else gate_up, m, inter, k,
            *x.stride(), *gate_weight.stride(), *up_weight.stride(), *h.stride(),
            *((0, 0) if gate_up is None else gate_up.stride()),
            ACTIVATION=activation_name, STORE_PRE=gate_up is not None, EVEN_K=k % config.meta["BLOCK_K"] == 0,
            PRECISION=dot_precision(x.dtype), **config.launch_kwargs(),
        )

    launch(GATE_UP.lookup(launch, m=m, n=inter, k=k, dtype=x.dtype, activation=activation_name))


def _elementwise_launch(m: int, n: int) -> tuple[tuple[int, int], dict]:
    """Grid and tile of the backward's elementwise kernels: ELEMENTWISE_TILE values per
    program, rows as wide as the tensor up to 1024 columns."""
    block_n = min(1024, max(16, next_power_of_2(n)))
    block_m = ELEMENTWISE_TILE // block_n
    return (cdiv(m, block_m), cdiv(n, block_n)), {"BLOCK_M": block_m, "BLOCK_N": block_n}


# ----------------------------------------------------------------------------- custom ops


def _linear_outputs(x, weight, store_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, x.new_empty(out.shape if store_pre else (0,))


@custom_op("tritium::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation_name: Optional[str],
    store_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre) for 2-d x; pre is empty unless store_pre."""
    out, pre = _linear_outputs(x, weight, store_pre)
    launch_linear(x, weight, bias, out, pre if store_pre else None, activation_name)
    return out, pre


@_linear_op.register_fake
def _(x, weight, bias, activation_name, store_pre):
    return _linear_outputs(x, weight, store_pre)


def _gate_up_outputs(x, gate_weight, store_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.new_empty((x.shape[0], gate_weight.shape[0]))
    return h, x.new_empty((x.shape[0], 2 * gate_weight.shape[0]) if store_pre else (0,))


@custom_op("tritium::gated_mlp_gate_up", mutates_args=())
def _gate_up_op(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, activation_name: str, store_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, gate_up) for 2-d x; gate_up (M, 2I) is empty unless store_pre."""
    h, gate_up = _gate_up_outputs(x, gate_weight, store_pre)
    launch_gate_up(x, gate_weight, up_weight, h, gate_up if store_pre else None, activation_name)
    return h, gate_up


@_gate_up_op.register_fake
def _(x, gate_weight, up_weight, activation_name, store_pre):
    return _gate_up_outputs(x, gate_weight, store_pre)


@custom_op("tritium::activation_backward", mutates_args=())
def _activation_backward_op(dy: torch.Tensor, pre: torch.Tensor, activation_name: str) -> torch.Tensor:
    """dy * act'(pre) for 2-d dy and contiguous pre of its shape."""
    dpre = torch.empty_like(pre)
    m, n = pre.shape
    if m and n:
        grid, tile = _elementwise_launch(m, n)
        _activation_bwd_kernel[grid](
            dy, pre, dpre, m, n, *dy.stride(), pre.stride(0), dpre.stride(0), ACTIVATION=activation_name, **tile
        )
    return dpre


@_activation_backward_op.register_fake
def _(dy, pre, activation_name):
    return torch.empty_like(pre)


@custom_op("tritium::gated_mlp_backward", mutates_args=())
def _gated_backward_op(
    dh: torch.Tensor, gate_up: torch.Tensor, activation_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate_up, h) from dh (M, I) and the contiguous saved gate_up (M, 2I)."""
    dgate_up = torch.empty_like(gate_up)
    h = dh.new_empty(dh.shape)
    m, inter = dh.shape
    if m and inter:
        grid, tile = _elementwise_launch(m, inter)
        _gated_bwd_kernel[grid](
            dh, gate_up, dgate_up, h, m, inter, *dh.stride(), gate_up.stride(0), dgate_up.stride(0), h.stride(0),
            ACTIVATION=activation_name, **tile,
        )
    return dgate_up, h


@_gated_backward_op.register_fake
def _(dh, gate_up, activation_name):
    return torch.empty_like(gate_up), dh.new_empty(dh.shape)


# ----------------------------------------------------------------------------- autograd


class LinearFunction(torch.autograd.Function):
    """act(x @ weight^T + bias) for 2-d x. The forward keeps the pre-activation when an
    activation's derivative will need it; the backward GEMMs run in cuBLAS."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation_name, needs_grad):
        store_pre = needs_grad and activation_name is not None
        out, pre = _linear_op(x, weight, bias, activation_name, store_pre)
        ctx.save_for_backward(x, weight, pre)
        ctx.activation_name = activation_name
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, pre = ctx.saved_tensors
        dpre = dout if ctx.activation_name is None else _activation_backward_op(dout, pre, ctx.activation_name)
        dx = dpre @ weight if ctx.needs_input_grad[0] else None
        dweight = dpre.t() @ x if ctx.needs_input_grad[1] else None
        dbias = dpre.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class GatedMLPFunction(torch.autograd.Function):
    """down(act(gate) * up) for 2-d x, the gate and up weights (I, hidden) as two tensors
    (a stacked weight's row halves are views: autograd routes their gradients to it).

    For the backward the forward keeps gate and up (M, 2I) rather than recomputing them:
    recomputing would add a GEMM as large as the forward's first one, while keeping them
    costs what eager keeps anyway. h is not kept: the backward's elementwise kernel
    recomputes it from gate and up, so 2I values per token stay alive instead of eager's
    4I (gate_up, act(gate), h)."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight, activation_name, needs_grad):
        h, gate_up = _gate_up_op(x, gate_weight, up_weight, activation_name, needs_grad)
        out, _ = _linear_op(h, down_weight, None, None, False)
        ctx.save_for_backward(x, gate_weight, up_weight, down_weight, gate_up)
        ctx.activation_name = activation_name
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gate_weight, up_weight, down_weight, gate_up = ctx.saved_tensors
        dgate_up, h = _gated_backward_op(dout @ down_weight, gate_up, ctx.activation_name)
        dgate, dup = dgate_up.chunk(2, dim=1)
        dx = (dgate @ gate_weight).addmm_(dup, up_weight) if ctx.needs_input_grad[0] else None
        dgate_weight = dgate.t() @ x if ctx.needs_input_grad[1] else None
        dup_weight = dup.t() @ x if ctx.needs_input_grad[2] else None
        ddown_weight = dout.t() @ h if ctx.needs_input_grad[3] else None
        return dx, dgate_weight, dup_weight, ddown_weight, None, None


# ----------------------------------------------------------------------------- public API


def _check_input(x, shape: str) -> None:
    """x: a float tensor of rank >= 1 whose last dim is the features."""
    rank = x.dim() if isinstance(x, torch.Tensor) else 1
    check_tensor("x", x, shape=shape, ndim=max(rank, 1))


def check_linear_args(x, weight, bias, activation_name) -> None:
    """Validate `linear`'s arguments (before any launch)."""
    _check_input(x, "(..., in_features)")
    check_tensor("weight", weight, shape="(out_features, in_features)", ndim=2)
    check_like("weight", weight, "x", x)
    check_dim("weight", weight, 1, x.shape[-1], "in_features (x's last dim)")
    if bias is not None:
        check_tensor("bias", bias, shape="(out_features,)", ndim=1)
        check_like("bias", bias, "x", x)
        check_dim("bias", bias, 0, weight.shape[0], "out_features (weight's dim 0)")
    check_activation(activation_name)


def _is_pair(gate_up_weight) -> bool:
    return isinstance(gate_up_weight, (tuple, list))


def _check_gate_up(x, gate_up_weight) -> int:
    """Validate gated_mlp's gate_up_weight, stacked or a (gate_weight, up_weight) pair;
    returns the intermediate size."""
    if not _is_pair(gate_up_weight):
        if not isinstance(gate_up_weight, torch.Tensor):
            raise TypeError(
                "gate_up_weight: expected a torch.Tensor (2 * intermediate, hidden) or a pair "
                f"(gate_weight, up_weight) of (intermediate, hidden) tensors, got {type(gate_up_weight).__name__}"
            )
        check_tensor("gate_up_weight", gate_up_weight, shape="(2 * intermediate, hidden)", ndim=2)
        check_like("gate_up_weight", gate_up_weight, "x", x)
        check_dim("gate_up_weight", gate_up_weight, 1, x.shape[-1], "hidden (x's last dim)")
        if gate_up_weight.shape[0] % 2:
            raise ValueError(
                "gate_up_weight: dim 0 must be even (the gate rows, then as many up rows), "
                f"got shape {tuple(gate_up_weight.shape)}"
            )
        return gate_up_weight.shape[0] // 2
    if len(gate_up_weight) != 2:
        raise ValueError(
            "gate_up_weight: expected a pair (gate_weight, up_weight), "
            f"got a {type(gate_up_weight).__name__} of length {len(gate_up_weight)}"
        )
    gate_weight, up_weight = gate_up_weight
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight)):
        check_tensor(name, w, shape="(intermediate, hidden)", ndim=2)
        check_like(name, w, "x", x)
        check_dim(name, w, 1, x.shape[-1], "hidden (x's last dim)")
    check_dim("up_weight", up_weight, 0, gate_weight.shape[0], "intermediate (gate_weight's dim 0)")
    return gate_weight.shape[0]


def check_gated_mlp_args(x, gate_up_weight, down_weight, activation_name) -> None:
    """Validate `gated_mlp`'s arguments (before any launch)."""
    _check_input(x, "(..., hidden)")
    inter = _check_gate_up(x, gate_up_weight)
    check_tensor("down_weight", down_weight, shape="(hidden, intermediate)", ndim=2)
    check_like("down_weight", down_weight, "x", x)
    expected = (x.shape[-1], inter)
    if tuple(down_weight.shape) != expected:
        raise ValueError(f"down_weight: expected shape (hidden, intermediate) = {expected}, got {tuple(down_weight.shape)}")
    check_activation(activation_name, allow_none=False)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """act(x @ weight^T + bias) in one GEMM, the bias and activation in its epilogue;
    differentiable.

    x: (..., in_features), any leading dims and strides; weight: (out_features,
    in_features) as nn.Linear; bias: (out_features,) or None; all float16, bfloat16 or
    float32, accumulated in float32. activation: None, "gelu" (erf), "gelu_tanh"
    (transformers' gelu_new / gelu_pytorch_tanh), "relu" or "silu".
    Returns (..., out_features) in x's dtype.
    """
    check_linear_args(x, weight, bias, activation)
    x2 = as_rows(x)
    grad = needs_grad(x, weight, bias)
    out = run_function(LinearFunction, x2, weight, bias, activation, grad, record=grad)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def gated_mlp(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    down_weight: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """down(act(x W_gate^T) * (x W_up^T)) (GeGLU with "gelu"/"gelu_tanh", SwiGLU with
    "silu"); differentiable. The [tokens, 2 * intermediate] projection is never written in
    inference; with gradients it is kept for the backward.

    x: (..., hidden), any leading dims and strides. gate_up_weight: either one tensor
    (2 * intermediate, hidden), the gate rows first (GLM-4's gate_up_proj), or a pair
    (gate_weight, up_weight) of (intermediate, hidden) tensors (Gemma 2's gate_proj and
    up_proj, used in place: nothing is stacked); any strides. down_weight: (hidden,
    intermediate). All of x's dtype (float16, bfloat16 or float32) and device, accumulated
    in float32. Returns (..., hidden) in x's dtype.
    """
    check_gated_mlp_args(x, gate_up_weight, down_weight, activation)
    gate_weight, up_weight = gate_up_weight if _is_pair(gate_up_weight) else gate_up_weight.chunk(2)
    x2 = as_rows(x)
    grad = needs_grad(x, gate_weight, up_weight, down_weight)
    out = run_function(GatedMLPFunction, x2, gate_weight, up_weight, down_weight, activation, grad, record=grad)
    return out.reshape(x.shape)
