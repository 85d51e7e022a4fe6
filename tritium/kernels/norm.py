"""RMSNorm and LayerNorm over the last dim, with an optional fused residual add.

One forward and one backward kernel serve both norms through constexpr switches: RMS (no
mean), HAS_RESIDUAL (normalise x + residual and write that sum out too), HAS_BIAS, and two
casting switches that put the roundings to x's dtype exactly where transformers has them.
With n the float32 normalised row and cast() a rounding to x's dtype:

    Gemma 2 RMSNorm          cast(n * (offset + float(w)))          CAST_WEIGHT=0, CAST_NORMED=0
    Llama / GLM-4 RMSNorm    cast(cast(offset + cast(w)) * cast(n))  CAST_WEIGHT=1, CAST_NORMED=1
    LayerNorm (torch)        cast(n * cast(w) + cast(b))             CAST_WEIGHT=1, CAST_NORMED=0

A program normalises BLOCK_M rows. A row is N_CHUNKS tiles of BLOCK_N columns, BLOCK_N a
power of two (`row_chunks`): one tile, the next power of two >= hidden, when that leaves at
most 1/8 of its lanes idle, so the row is read once; else chunks that split the row with at
most 1/8 idle (2304: 5 chunks of 512 with 256 idle lanes, not one 4096 with 1792), read
twice: statistics, then the normalised output (LayerNorm merges the chunks' means and
centred sums of squares, Chan et al.: no variance as a difference of squares). Rows wider
than MAX_CHUNK are chunked too, so that no tile spills. The backward kernel loops
over a contiguous run of rows per program and writes that program's partial dweight/dbias
sums to its own row of a float32 buffer, which is summed afterwards: deterministic, no
atomics (with chunks, the program adds each row tile's sums into its row in memory).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels.tiles import add, load_rows, rounded
from tritium.kernels.validation import as_rows, check_device, check_dim, check_float, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, next_power_of_2, run_function, sm_count

MAX_HIDDEN = 65536
# A (BLOCK_M, BLOCK_N) tile lives in registers: rows wider than MAX_CHUNK are read in chunks
# (one tile of 16384 spills in the backward). Chunks narrower than MIN_CHUNK are not worth a
# second pass over the row: such rows are padded. Module constants, so that tests can split
# small rows (the interpreter is slow on wide ones).
MAX_CHUNK = 8192
MIN_CHUNK = 256
IDLE = 1 / 8  # the most of a row's lanes left idle by padding it to whole tiles


def row_chunks(hidden: int, narrowest: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, N_CHUNKS) for rows of `hidden` values: N_CHUNKS = cdiv(hidden, BLOCK_N)
    tiles of BLOCK_N columns, a power of two. The widest of the next power of two (at most
    MAX_CHUNK) and its halves down to `narrowest` (default MIN_CHUNK) that leaves at most
    IDLE of the lanes idle; the widest if none does (narrow rows: one padded tile). Gemma
    2's 2304 is 5 x 512 (10% idle), 4608 5 x 1024, 3584 one tile of 4096 (1/8 idle, one
    read), 65536 8 x 8192."""
    narrowest = MIN_CHUNK if narrowest is None else narrowest
    widest = width = min(next_power_of_2(hidden), MAX_CHUNK)
    while 1 - hidden / (width * cdiv(hidden, width)) > IDLE:
        if width // 2 < narrowest:
            return widest, cdiv(hidden, widest)
        width //= 2
    return width, cdiv(hidden, width)


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
def _row_input(X, Res, S, row, cols, ok, hidden, stride_xm, stride_xn, stride_rm, stride_rn,
               HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """The float32 input tile (0 where not ok): X's, or with a residual X + Res rounded to
    X's dtype as transformers adds, that sum stored to S (contiguous) when STORE_SUM."""
    x = load_rows(X, row, stride_xm, cols, stride_xn, ok)
    if HAS_RESIDUAL:
        x = add(x, load_rows(Res, row, stride_rm, cols, stride_rn, ok))
        if STORE_SUM:
            tl.store(S + row[:, None] * hidden + cols[None, :], x, mask=ok)
    return x.to(tl.float32)


@triton.jit
def _row_output(Y, W, B, n, row, cols, col_ok, ok, hidden, offset, dtype,
                HAS_BIAS: tl.constexpr, CAST_WEIGHT: tl.constexpr, CAST_NORMED: tl.constexpr):
    """Y's tile (contiguous) from the normalised float32 tile n, with its roundings."""
    if CAST_NORMED:
        n = rounded(n, dtype).to(tl.float32)
    y = n * _scale(W, cols, col_ok, offset, dtype, CAST_WEIGHT)[None, :]
    if HAS_BIAS:
        y += rounded(tl.load(B + cols, mask=col_ok, other=0.0), dtype).to(tl.float32)[None, :]
    tl.store(Y + row[:, None] * hidden + cols[None, :], rounded(y, dtype), mask=ok)


@triton.jit
def _norm_fwd_kernel(
    X, Res, W, B, Y, S, Mean, Rstd,
    rows, hidden, eps, offset,
    stride_xm, stride_xn, stride_rm, stride_rn,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_WEIGHT: tl.constexpr, CAST_NORMED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_CHUNKS: tl.constexpr,
):
    """Rows [pid * BLOCK_M, +BLOCK_M) of X (rows, hidden), any strides, hidden in
    (N_CHUNKS - 1) * BLOCK_N + [1, BLOCK_N]. Writes Y and, with a residual, S = X + Res
    (both contiguous (rows, hidden)); Rstd and, for LayerNorm, Mean (rows,) float32 for the
    backward pass. One tile: one read of the row. Chunks: statistics, then the output."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    row = row.to(tl.int64)
    dtype = X.dtype.element_ty
    if N_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        ok = row_ok[:, None] & col_ok[None, :]
        x = _row_input(X, Res, S, row, cols, ok, hidden, stride_xm, stride_xn, stride_rm, stride_rn,
                       HAS_RESIDUAL, True)
        mean, rstd, n = _normalise(x, ok, hidden, eps, RMS)
        _row_output(Y, W, B, n, row, cols, col_ok, ok, hidden, offset, dtype, HAS_BIAS, CAST_WEIGHT, CAST_NORMED)
    else:
        # Per row: the mean of the chunks so far and their sum of squares about it (RMS: about 0).
        # Unrolled: each pass issues its chunks' loads together (one memory latency a pass).
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in tl.static_range(N_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < hidden)[None, :]
            x = _row_input(X, Res, S, row, cols, ok, hidden, stride_xm, stride_xn, stride_rm, stride_rn,
                           HAS_RESIDUAL, True)
            if RMS:
                squares += tl.sum(x * x, 1)
            else:
                # Chan et al.'s merge of (count, mean, centred sum of squares): no cancellation.
                count = tl.minimum(hidden - c * BLOCK_N, BLOCK_N).to(tl.float32)
                chunk_mean = tl.sum(x, 1) / count
                centred = tl.where(ok, x - chunk_mean[:, None], 0.0)
                delta = chunk_mean - mean
                share = count / (c * BLOCK_N + count)
                mean += delta * share
                squares += tl.sum(centred * centred, 1) + delta * delta * (c * BLOCK_N) * share
        rstd = tl.rsqrt(squares / hidden + eps)
        for c in tl.static_range(N_CHUNKS):
            cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < hidden
            ok = row_ok[:, None] & col_ok[None, :]
            x = _row_input(X, Res, S, row, cols, ok, hidden, stride_xm, stride_xn, stride_rm, stride_rn,
                           HAS_RESIDUAL, False)
            if RMS:
                n = x * rstd[:, None]
            else:
                n = tl.where(ok, x - mean[:, None], 0.0) * rstd[:, None]
            _row_output(Y, W, B, n, row, cols, col_ok, ok, hidden, offset, dtype, HAS_BIAS, CAST_WEIGHT,
                        CAST_NORMED)
    tl.store(Rstd + row, rstd, mask=row_ok)
    if not RMS:
        tl.store(Mean + row, mean, mask=row_ok)


@triton.jit
def _bwd_input(X, DY, Mean, Rstd, row, row_ok, cols, ok, stride_xm, stride_xn, stride_dym, stride_dyn,
               RMS: tl.constexpr):
    """(n, dy, rstd) of a row tile: the float32 normalised input (0 where not ok), its
    gradient and the rows' rstd (BLOCK_M, 1)."""
    x = load_rows(X, row, stride_xm, cols, stride_xn, ok).to(tl.float32)
    dy = load_rows(DY, row, stride_dym, cols, stride_dyn, ok).to(tl.float32)
    rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)[:, None]
    if RMS:
        n = x * rstd
    else:
        n = tl.where(ok, x - tl.load(Mean + row, mask=row_ok, other=0.0)[:, None], 0.0) * rstd
    return n, dy, rstd


@triton.jit
def _bwd_output(DX, DS, dn, n, rstd, dot, total, row, cols, ok, hidden, stride_dsm, stride_dsn,
                RMS: tl.constexpr, HAS_DS: tl.constexpr):
    """Stores DX's tile (contiguous) from dn, n and the rows' sums of dn * n and dn."""
    dx = dn - n * (dot / hidden)[:, None]
    if not RMS:
        dx -= (total / hidden)[:, None]
    dx *= rstd
    if HAS_DS:
        dx += load_rows(DS, row, stride_dsm, cols, stride_dsn, ok).to(tl.float32)
    tl.store(DX + row[:, None] * hidden + cols[None, :], rounded(dx, DX.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_chunk(X, DY, W, Mean, Rstd, row, row_ok, c, hidden, offset, dtype, stride_xm, stride_xn, stride_dym,
               stride_dyn, RMS: tl.constexpr, CAST_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk c of a row tile, for the two passes of the chunked backward: its columns, their
    mask, the tile's mask, `_bwd_input`'s (n, dy, rstd) and dn = dy * (offset + w)."""
    cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ok = row_ok[:, None] & col_ok[None, :]
    n, dy, rstd = _bwd_input(X, DY, Mean, Rstd, row, row_ok, cols, ok, stride_xm, stride_xn, stride_dym, stride_dyn,
                             RMS)
    return cols, col_ok, ok, n, dy, rstd, dy * _scale(W, cols, col_ok, offset, dtype, CAST_WEIGHT)[None, :]


@triton.jit
def _norm_bwd_kernel(
    DY, DS, X, W, Mean, Rstd, DX, DW, DB,
    rows, hidden, offset, rows_per_program,
    stride_dym, stride_dyn, stride_dsm, stride_dsn, stride_xm, stride_xn,
    RMS: tl.constexpr, HAS_DS: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """Rows [pid * rows_per_program, +rows_per_program) (a multiple of BLOCK_M): DX (rows,
    hidden) contiguous, plus DS (the new residual's gradient) when given; this program's
    sums of dy * n and dy into row pid of DW and DB (programs, hidden) float32. The
    program has at least one row.

    dx = rstd * (dn - mean(dn) - n * mean(dn * n)) with dn = dy * (offset + w); RMSNorm
    drops the mean(dn) term. The gradient of the rounding in CAST_NORMED is taken as 1.
    """
    pid = tl.program_id(0)
    dtype = X.dtype.element_ty
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    if N_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < hidden
        scale = _scale(W, cols, col_ok, offset, dtype, CAST_WEIGHT)[None, :]
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(first, last, BLOCK_M):
            row = start + tl.arange(0, BLOCK_M)
            row_ok = row < last
            ok = row_ok[:, None] & col_ok[None, :]
            row = row.to(tl.int64)
            n, dy, rstd = _bwd_input(X, DY, Mean, Rstd, row, row_ok, cols, ok, stride_xm, stride_xn,
                                     stride_dym, stride_dyn, RMS)
            dw += tl.sum(dy * n, 0)
            dn = dy * scale
            _bwd_output(DX, DS, dn, n, rstd, tl.sum(dn * n, 1), tl.sum(dn, 1), row, cols, ok, hidden,
                        stride_dsm, stride_dsn, RMS, HAS_DS)
            if HAS_BIAS:
                db += tl.sum(dy, 0)
        tl.store(DW + pid * hidden + cols, dw, mask=col_ok)
        if HAS_BIAS:
            tl.store(DB + pid * hidden + cols, db, mask=col_ok)
    else:
        # Chunk loops not unrolled: unrolled, the compiler keeps the whole row of x and dy in
        # registers from the first pass to the second, and spills (sm_90, 4608 = 5 x 1024).
        for start in range(first, last, BLOCK_M):
            row = start + tl.arange(0, BLOCK_M)
            row_ok = row < last
            row = row.to(tl.int64)
            dot = tl.zeros([BLOCK_M], dtype=tl.float32)
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(N_CHUNKS):
                cols, col_ok, ok, n, dy, rstd, dn = _bwd_chunk(
                    X, DY, W, Mean, Rstd, row, row_ok, c, hidden, offset, dtype, stride_xm, stride_xn,
                    stride_dym, stride_dyn, RMS, CAST_WEIGHT, BLOCK_N)
                dot += tl.sum(dn * n, 1)
                total += tl.sum(dn, 1)
            for c in range(N_CHUNKS):
                cols, col_ok, ok, n, dy, rstd, dn = _bwd_chunk(
                    X, DY, W, Mean, Rstd, row, row_ok, c, hidden, offset, dtype, stride_xm, stride_xn,
                    stride_dym, stride_dyn, RMS, CAST_WEIGHT, BLOCK_N)
                _bwd_output(DX, DS, dn, n, rstd, dot, total, row, cols, ok, hidden, stride_dsm, stride_dsn,
                            RMS, HAS_DS)
                # This program's partial sums so far, from its row of DW/DB: none before its first tile.
                earlier = cols < tl.where(start > first, hidden, 0)
                dw = tl.load(DW + pid * hidden + cols, mask=earlier, other=0.0) + tl.sum(dy * n, 0)
                tl.store(DW + pid * hidden + cols, dw, mask=col_ok)
                if HAS_BIAS:
                    db = tl.load(DB + pid * hidden + cols, mask=earlier, other=0.0) + tl.sum(dy, 0)
                    tl.store(DB + pid * hidden + cols, db, mask=col_ok)
            # The next row tile reads those sums back, maybe in other threads of the program.
            tl.debug_barrier()


# ----------------------------------------------------------------------------- tuning, as data


def norm_bucket(*, hidden: int, dtype: torch.dtype, rows: int) -> dict:
    """Problems in one bucket share a config: the row's split (`row_chunks`: the tile width
    and the number of chunks), the dtype, and the row count by powers of two (decode to
    prefill)."""
    block_n, chunks = row_chunks(hidden)
    return {"block_n": block_n, "chunks": chunks, "dtype": str(dtype).replace("torch.", ""),
            "rows": min(next_power_of_2(max(rows, 1)), 1 << 14)}


def _fits(config: autotune.Config, bucket: dict) -> bool:
    """No more row tiles than rows, at most 64 float32 values per thread in a (BLOCK_M,
    BLOCK_N) tile (registers), and no warp without a value."""
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
    sources=(_norm_fwd_kernel, _row_input, _row_output, _normalise, _scale, load_rows, add, rounded),
)
# PER_SM: backward programs per SM; more programs, more partial sums to add up afterwards.
NORM_BWD = autotune.Kernel(
    "norm_bwd", space=BWD_SPACE,
    key=norm_bucket, default=_bwd_default, prune=_fits,
    interpreter=autotune.Config({"BLOCK_M": 8, "PER_SM": 2}, num_warps=1, num_stages=1),
    sources=(_norm_bwd_kernel, _bwd_input, _bwd_output, _scale, load_rows, rounded),
)


# ----------------------------------------------------------------------------- launchers


def _launch_forward(x2, r2, weight, bias, y, s, mean, rstd, config, *, eps, offset, rms, cast_weight, cast_normed):
    rows, hidden = x2.shape
    block_m = config.meta["BLOCK_M"]
    block_n, chunks = row_chunks(hidden)
    _norm_fwd_kernel[(cdiv(rows, block_m),)](
        # Absent tensors are empty: a placeholder pointer stands in, never dereferenced.
        x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, y,
        s if r2 is not None else y, rstd if rms else mean, rstd,
        rows, hidden, eps, offset, *x2.stride(), *(r2.stride() if r2 is not None else (0, 0)),
        RMS=rms, HAS_RESIDUAL=r2 is not None, HAS_BIAS=bias is not None, CAST_WEIGHT=cast_weight,
        CAST_NORMED=cast_normed, BLOCK_M=block_m, BLOCK_N=block_n, N_CHUNKS=chunks,
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
    block_n, chunks = row_chunks(hidden)
    _norm_bwd_kernel[(dw.shape[0],)](
        dy2, ds2 if ds2 is not None else dy2, x2, weight, rstd if rms else mean, rstd, dx, dw,
        db if db.numel() else dw,
        rows, hidden, offset, per_program,
        *dy2.stride(), *(ds2.stride() if ds2 is not None else (0, 0)), *x2.stride(),
        RMS=rms, HAS_DS=ds2 is not None, HAS_BIAS=db.numel() > 0, CAST_WEIGHT=cast_weight,
        BLOCK_M=block_m, BLOCK_N=block_n, N_CHUNKS=chunks,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _programs(rows: int, config: autotune.Config, device: torch.device) -> int:
    """Backward programs: about PER_SM per SM, each with as many row tiles as the others
    (the last one may have fewer), none without a row."""
    tiles = max(1, cdiv(rows, config.meta["BLOCK_M"]))
    per_program = cdiv(tiles, min(tiles, config.meta["PER_SM"] * sm_count(device)))
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
