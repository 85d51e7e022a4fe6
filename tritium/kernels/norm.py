"""RMSNorm and LayerNorm over the last dim, with an optional fused residual add.

One forward and one backward kernel serve both norms through constexpr switches: RMS (no
mean), HAS_RESIDUAL (normalise x + residual and write that sum out too), HAS_BIAS, and two
casting switches that put the roundings to x's dtype exactly where transformers has them.
With n the float32 normalised row and cast() a rounding to x's dtype:

    Gemma 2 RMSNorm          cast(n * (offset + float(w)))          CAST_WEIGHT=0, CAST_NORMED=0
    Llama / GLM-4 RMSNorm    cast(cast(offset + cast(w)) * cast(n))  CAST_WEIGHT=1, CAST_NORMED=1
    LayerNorm (torch)        cast(n * cast(w) + cast(b))             CAST_WEIGHT=1, CAST_NORMED=0

A program normalises BLOCK_M rows with one (BLOCK_M, BLOCK_N) tile, BLOCK_N the next power
of two >= hidden. The backward kernel loops over a contiguous run of rows per program and
writes that program's partial dweight/dbias sums to its own row of a float32 buffer, which
is summed afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels.tiles import add, load_rows, rounded
from tritium.kernels.validation import as_rows, check_device, check_dim, check_float, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, next_power_of_2, run_function

MAX_HIDDEN = 65536  # one row lives in registers: BLOCK_N floats spread over the warps


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _normalise(x, ok, hidden, eps, RMS: tl.constexpr):
    """Per-row (mean, rstd) and the normalised tile of a float32 (BLOCK_M, BLOCK_N) tile
    whose lanes outside `ok` are 0 (they stay 0). RMS: mean is 0 and not subtracted."""
    if RMS:
        mean = 0.0
        centred = x
    else:
        mean = tl.sum(x, 1) / hidden
        centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, 1) / hidden + eps)
    return mean, rstd, centred * rstd[:, None]


@triton.jit
def _scale(W, cols, ok, offset, dtype, CAST_WEIGHT: tl.constexpr):
    """offset + weight as float32 (BLOCK_N,): summed in float32 (Gemma 2), or the weight
    and the sum each rounded to `dtype` first, as transformers' x.dtype arithmetic does."""
    w = tl.load(W + cols, mask=ok, other=0.0)
    if CAST_WEIGHT:
        # float32 spelled out: the compiled kernel promotes to it anyway (offset is a float32
        # argument), the interpreter passes offset as a Python float and would add in dtype.
        scale = rounded(rounded(w, dtype).to(tl.float32) + offset, dtype).to(tl.float32)
    else:
        scale = w.to(tl.float32) + offset
    return scale


@triton.jit
def _norm_fwd_kernel(
    X, Res, W, B, Y, S, Mean, Rstd,
    rows, hidden, eps, offset,
    stride_xm, stride_xn, stride_rm, stride_rn,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_WEIGHT: tl.constexpr, CAST_NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid * BLOCK_M, +BLOCK_M) of X (rows, hidden), any strides. Writes Y and, with a
    residual, S = X + Res (both contiguous (rows, hidden)); Rstd and, for LayerNorm, Mean
    (rows,) float32 for the backward pass."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    col_ok = cols < hidden
    ok = row_ok[:, None] & col_ok[None, :]
    row = row.to(tl.int64)
    dtype = X.dtype.element_ty
    x = load_rows(X, row, stride_xm, cols, stride_xn, ok)
    out_offsets = row[:, None] * hidden + cols[None, :]
    if HAS_RESIDUAL:
        # transformers adds in x's dtype: the rounded sum is both the input and the new residual.
        x = add(x, load_rows(Res, row, stride_rm, cols, stride_rn, ok))
        tl.store(S + out_offsets, x, mask=ok)
    mean, rstd, n = _normalise(x.to(tl.float32), ok, hidden, eps, RMS)
    if CAST_NORMED:
        n = rounded(n, dtype).to(tl.float32)
    y = n * _scale(W, cols, col_ok, offset, dtype, CAST_WEIGHT)[None, :]
    if HAS_BIAS:
        y += rounded(tl.load(B + cols, mask=col_ok, other=0.0), dtype).to(tl.float32)[None, :]
    tl.store(Y + out_offsets, rounded(y, dtype), mask=ok)
    tl.store(Rstd + row, rstd, mask=row_ok)
    if not RMS:
        tl.store(Mean + row, mean, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    DY, DS, X, W, Mean, Rstd, DX, DW, DB,
    rows, hidden, offset, rows_per_program,
    stride_dym, stride_dyn, stride_dsm, stride_dsn, stride_xm, stride_xn,
    RMS: tl.constexpr, HAS_DS: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid * rows_per_program, +rows_per_program) (a multiple of BLOCK_M): DX (rows,
    hidden) contiguous, plus DS (the new residual's gradient) when given; this program's
    sums of dy * n and dy into row pid of DW and DB (programs, hidden) float32.

    dx = rstd * (dn - mean(dn) - n * mean(dn * n)) with dn = dy * (offset + w); RMSNorm
    drops the mean(dn) term. The gradient of the rounding in CAST_NORMED is taken as 1.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    scale = _scale(W, cols, col_ok, offset, X.dtype.element_ty, CAST_WEIGHT)[None, :]
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(first, last, BLOCK_M):
        row = start + tl.arange(0, BLOCK_M)
        row_ok = row < last
        ok = row_ok[:, None] & col_ok[None, :]
        row = row.to(tl.int64)
        x = load_rows(X, row, stride_xm, cols, stride_xn, ok).to(tl.float32)
        dy = load_rows(DY, row, stride_dym, cols, stride_dyn, ok).to(tl.float32)
        rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)[:, None]
        if RMS:
            n = x * rstd
        else:
            n = tl.where(ok, x - tl.load(Mean + row, mask=row_ok, other=0.0)[:, None], 0.0) * rstd
        dw += tl.sum(dy * n, 0)
        dn = dy * scale
        dx = dn - n * (tl.sum(dn * n, 1) / hidden)[:, None]
        if not RMS:
            dx -= (tl.sum(dn, 1) / hidden)[:, None]
        dx *= rstd
        if HAS_DS:
            dx += load_rows(DS, row, stride_dsm, cols, stride_dsn, ok).to(tl.float32)
        tl.store(DX + row[:, None] * hidden + cols[None, :], rounded(dx, DX.dtype.element_ty), mask=ok)
        if HAS_BIAS:
            db += tl.sum(dy, 0)
    tl.store(DW + pid * hidden + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + pid * hidden + cols, db, mask=col_ok)


# ----------------------------------------------------------------------------- tuning, as data


def norm_bucket(*, hidden: int, dtype: torch.dtype, rows: int) -> dict:
    """Problems in one bucket share a config: the row tile width (hidden rounded up to a
    power of two), the dtype, and the row count by powers of two (decode to prefill)."""
    return {"block_n": next_power_of_2(hidden), "dtype": str(dtype).replace("torch.", ""),
            "rows": min(next_power_of_2(max(rows, 1)), 1 << 14)}


def _fits(config: autotune.Config, bucket: dict) -> bool:
    """No more row tiles than rows, at most 64 float32 tile values per thread (registers),
    and no warp without a value."""
    tile = config.meta["BLOCK_M"] * bucket["block_n"]
    threads = 32 * config.num_warps
    return config.meta["BLOCK_M"] <= bucket["rows"] and threads <= tile <= 64 * threads


FWD_SPACE = {"BLOCK_M": (1, 2, 4, 8, 16, 32), "num_warps": (1, 2, 4, 8, 16, 32), "num_stages": (1,)}
BWD_SPACE = {"BLOCK_M": (1, 2, 4, 8, 16), "PER_SM": (1, 2, 4), "num_warps": (1, 2, 4, 8, 16, 32), "num_stages": (1, 2)}


def _tile_default(block_n: int, rows: int, elements: int, most: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): about `elements` values per program, 16 per thread, at most
    `most` rows (the largest BLOCK_M of the kernel's space)."""
    block_m = max(1, min(rows, elements // block_n, most))
    return block_m, min(32, max(1, block_m * block_n // 512))


def _fwd_default(*, block_n: int, rows: int, **_) -> autotune.Config:
    block_m, warps = _tile_default(block_n, rows, 4096, max(FWD_SPACE["BLOCK_M"]))
    return autotune.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=1)


def _bwd_default(*, block_n: int, rows: int, **_) -> autotune.Config:
    block_m, warps = _tile_default(block_n, rows, 2048, max(BWD_SPACE["BLOCK_M"]))
    return autotune.Config({"BLOCK_M": block_m, "PER_SM": 2}, num_warps=warps, num_stages=1)


NORM_FWD = autotune.Kernel(
    "norm_fwd", space=FWD_SPACE,
    key=norm_bucket, default=_fwd_default, prune=_fits,
    interpreter=autotune.Config({"BLOCK_M": 16}, num_warps=1, num_stages=1),
    sources=(_norm_fwd_kernel, _normalise, _scale, load_rows, add, rounded),
)
# PER_SM: backward programs per SM; more programs, more partial sums to add up afterwards.
NORM_BWD = autotune.Kernel(
    "norm_bwd", space=BWD_SPACE,
    key=norm_bucket, default=_bwd_default, prune=_fits,
    interpreter=autotune.Config({"BLOCK_M": 8, "PER_SM": 2}, num_warps=1, num_stages=1),
    sources=(_norm_bwd_kernel, _scale, load_rows, rounded),
)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    # The interpreter has no SMs; 4 still splits the rows so the partial sums get exercised.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# ----------------------------------------------------------------------------- launchers


def _launch_forward(x2, r2, weight, bias, y, s, mean, rstd, config, *, eps, offset, rms, cast_weight, cast_normed):
    rows, hidden = x2.shape
    block_m = config.meta["BLOCK_M"]
    _norm_fwd_kernel[(cdiv(rows, block_m),)](
        # Absent tensors are empty: a placeholder pointer stands in, never dereferenced.
        x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, y,
        s if r2 is not None else y, rstd if rms else mean, rstd,
        rows, hidden, eps, offset, *x2.stride(), *(r2.stride() if r2 is not None else (0, 0)),
        RMS=rms, HAS_RESIDUAL=r2 is not None, HAS_BIAS=bias is not None, CAST_WEIGHT=cast_weight,
        CAST_NORMED=cast_normed, BLOCK_M=block_m, BLOCK_N=next_power_of_2(hidden),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


@custom_op("tritium::norm_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    eps: float, offset: float, rms: bool, cast_weight: bool, cast_normed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, new_residual, mean, rstd): y and new_residual contiguous in x's shape and dtype
    (new_residual empty without a residual), mean/rstd (rows,) float32 (mean empty for RMS)."""
    x2, r2 = as_rows(x), None if residual is None else as_rows(residual)
    rows, hidden = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape if residual is not None else 0, dtype=x.dtype, device=x.device)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if is_empty(rows):
        return y, s, mean, rstd
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()

    def launch(config):
        _launch_forward(x2, r2, weight, bias, y, s, mean, rstd, config, eps=eps, offset=offset, rms=rms,
                        cast_weight=cast_weight, cast_normed=cast_normed)

    launch(NORM_FWD.lookup(launch, hidden=hidden, dtype=x.dtype, rows=rows))
    return y, s, mean, rstd


@_forward_op.register_fake
def _(x, residual, weight, bias, eps, offset, rms, cast_weight, cast_normed):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else 0),
            x.new_empty(0 if rms else rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


def _launch_backward(dy2, ds2, x2, weight, mean, rstd, dx, dw, db, config, *, offset, rms, cast_weight):
    rows, hidden = x2.shape
    block_m = config.meta["BLOCK_M"]
    per_program = block_m * cdiv(cdiv(rows, block_m), dw.shape[0])
    _norm_bwd_kernel[(dw.shape[0],)](
        dy2, ds2 if ds2 is not None else dy2, x2, weight, rstd if rms else mean, rstd, dx, dw,
        db if db.numel() else dw,
        rows, hidden, offset, per_program,
        *dy2.stride(), *(ds2.stride() if ds2 is not None else (0, 0)), *x2.stride(),
        RMS=rms, HAS_DS=ds2 is not None, HAS_BIAS=db.numel() > 0, CAST_WEIGHT=cast_weight,
        BLOCK_M=block_m, BLOCK_N=next_power_of_2(hidden),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _programs(rows: int, config: autotune.Config, device: torch.device) -> int:
    """Backward programs: about PER_SM per SM, each with as many row tiles as the others
    (the last one may have fewer), none without a row."""
    tiles = max(1, cdiv(rows, config.meta["BLOCK_M"]))
    per_program = cdiv(tiles, min(tiles, config.meta["PER_SM"] * _sm_count(device)))
    return cdiv(tiles, per_program)


@custom_op("tritium::norm_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, offset: float, rms: bool, has_bias: bool, cast_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx contiguous in x's dtype (the gradient of the normalised input,
    plus ds, the gradient of the new residual, when given); dweight/dbias in weight's dtype
    (dbias empty without a bias)."""
    x2, dy2, ds2 = as_rows(x), as_rows(dy), None if ds is None else as_rows(ds)
    rows, hidden = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if is_empty(rows):  # no row: the weight and bias had no effect
        return dx, weight.new_zeros(hidden), weight.new_zeros(hidden if has_bias else 0)
    weight = weight.contiguous()

    def launch(config):
        # Every program writes its whole row of partial sums: no fill needed.
        dw = torch.empty(_programs(rows, config, x.device), hidden, dtype=torch.float32, device=x.device)
        db = torch.empty(dw.shape, dtype=torch.float32, device=x.device) if has_bias else dw[:0]
        _launch_backward(dy2, ds2, x2, weight, mean, rstd, dx, dw, db, config, offset=offset, rms=rms,
                         cast_weight=cast_weight)
        return dw, db

    dw, db = launch(NORM_BWD.lookup(launch, hidden=hidden, dtype=x.dtype, rows=rows))
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)


@_backward_op.register_fake
def _(dy, ds, x, weight, mean, rstd, offset, rms, has_bias, cast_weight):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty(weight.shape if has_bias else 0)


# ----------------------------------------------------------------------------- autograd


class NormFunction(torch.autograd.Function):
    """Autograd over the forward/backward custom ops (which torch.compile sees).

    Returns (y, new_residual); new_residual is empty without a residual. Outputs nobody
    differentiates arrive as None, so the kernel reads no zero gradient for them.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, offset, rms, cast_weight, cast_normed):
        y, s, mean, rstd = _forward_op(x, residual, weight, bias, eps, offset, rms, cast_weight, cast_normed)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
        ctx.options = (offset, rms, bias is not None, cast_weight)
        ctx.has_residual = residual is not None
        if residual is None:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        x, weight, mean, rstd = ctx.saved_tensors
        has_bias = ctx.options[2]
        if dy is None:  # only the new residual was used: it passes its gradient straight back
            return ds, ds, None, None, None, None, None, None, None
        dx, dw, db = _backward_op(dy, ds if ctx.has_residual else None, x, weight, mean, rstd, *ctx.options)
        dres = dx if ctx.has_residual else None
        return dx, dres, dw, db if has_bias else None, None, None, None, None, None


# ----------------------------------------------------------------------------- public ops


def _check_norm_args(x, weight, bias, residual, eps) -> None:
    """Shapes, dtypes and devices of a norm's arguments; raises before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (..., hidden), got {type(x).__name__}")
    check_tensor("x", x, shape="(..., hidden)", ndim=max(x.dim(), 1))
    hidden = x.shape[-1]
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"x: hidden = x.shape[-1] must be in [1, {MAX_HIDDEN}], got shape {tuple(x.shape)}")
    check_tensor("weight", weight, shape="(hidden,)", ndim=1)
    check_dim("weight", weight, 0, hidden, "hidden (x.shape[-1])")
    if weight.device != x.device:
        raise ValueError(f"weight: device {weight.device} differs from x's {x.device}; they must match")
    if bias is not None:
        check_tensor("bias", bias, shape="(hidden,)", ndim=1)
        check_like("bias", bias, "weight", weight)
        check_dim("bias", bias, 0, hidden, "hidden (x.shape[-1])")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual: expected a torch.Tensor shaped like x, got {type(residual).__name__}")
        check_device("residual", residual)
        check_like("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}")
    check_float("eps", eps, minimum=0.0)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    multiply_in_float32: bool | None = None,
):
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (offset + weight), in float32.

    x: (..., hidden), any strides, float16, bfloat16 or float32; weight: (hidden,) of any of
    those dtypes, on x's device. offset: 1.0 for Gemma 2, whose checkpoints store w - 1.
    multiply_in_float32: True multiplies by (offset + weight) in float32 and casts the product
    (Gemma 2); False casts the normalised x to x's dtype first and multiplies by (offset +
    weight) in x's dtype (Llama, GLM-4). None picks True exactly when offset != 0.
    residual: shaped like x, same dtype: x + residual (added in x's dtype) is normalised.

    Returns y (x's shape, contiguous, x's dtype), or with residual (y, x + residual).
    Differentiable w.r.t. x, residual and weight (gradients of both outputs).
    """
    _check_norm_args(x, weight, None, residual, eps)
    check_float("offset", offset)
    if multiply_in_float32 is None:
        multiply_in_float32 = offset != 0
    elif not isinstance(multiply_in_float32, bool):
        raise TypeError(f"multiply_in_float32: expected bool or None, got {type(multiply_in_float32).__name__}")
    narrow = not multiply_in_float32
    y, s = run_function(NormFunction, x, residual, weight, None, float(eps), float(offset), True, narrow, narrow)
    return (y, s) if residual is not None else y


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dim, as torch.nn.functional.layer_norm: float32 statistics,
    (x - mean) * rsqrt(var + eps) * weight + bias with weight and bias rounded to x's dtype,
    one rounding of the result.

    x: (..., hidden), any strides, float16, bfloat16 or float32; weight, bias: (hidden,),
    one float dtype between them, on x's device. residual: shaped like x, same dtype:
    x + residual (added in x's dtype) is normalised.

    Returns y (x's shape, contiguous, x's dtype), or with residual (y, x + residual).
    Differentiable w.r.t. x, residual, weight and bias (gradients of both outputs).
    """
    _check_norm_args(x, weight, bias, residual, eps)
    y, s = run_function(NormFunction, x, residual, weight, bias, float(eps), 0.0, False, True, False)
    return (y, s) if residual is not None else y
