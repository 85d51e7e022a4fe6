"""Fused LM head + (softcapped) cross-entropy that never materialises the logits.

With z = softcap(hidden @ weight.T + bias) in float32 (softcap(x) = c * tanh(x / c)), per
row i of label y_i:

    lse_i  = log sum_j exp(z_ij)
    loss_i = (1 - eps) * (lse_i - z_iy) + eps * (lse_i - mean_j z_ij) + z_loss * lse_i^2

(eps: label smoothing, as torch's cross_entropy computes it; ignored rows add nothing).

Forward (`_lce_fwd_kernel`): a program takes BLOCK_N rows and a run of vocabulary blocks
(a split); per (BLOCK_N, BLOCK_V) tile it computes the logits with tl.dot over the hidden
dim, folds them into an online log-sum-exp (`lse_step`, the attention kernels' update), and
keeps the label's logit and, with smoothing, the row sum. The splits' partial sums (a few
floats per row) are merged in split order on the host: O(tokens) memory, deterministic.

Backward: dz_ij = a_i * p_ij - c_i * [j = y_i] - e_i, p = exp(z - lse), with per-row
a = g (1 + 2 z_loss lse), c = g (1 - eps), e = g eps / V (g the row's loss gradient, 0 when
ignored); times 1 - tanh^2 under a softcap. Two kernels recompute the logits tile by tile:
`_lce_dx_kernel` owns row blocks and walks the vocabulary (dhidden += dz @ weight), and
`_lce_dw_kernel` owns vocabulary blocks and walks the rows (dweight += dz^T @ hidden, dbias +=
the column sums). Each program adds into its own slab of a float32 scratch buffer: no
atomics, deterministic. The scratch is bounded (SCRATCH_BYTES): the rows, or the
vocabulary, go in chunks through one buffer, each chunk cast into the gradient; float32
gradients take the sums directly.

Labels are only compared with column indices, never used as addresses: an out-of-range
label cannot make a kernel read or write outside its tensors (the host check names it).

Vocabulary-parallel (`process_group`, tensor parallelism): each rank holds a slice of the
head's rows; it runs the same kernels on its slice with the labels shifted to it (a label
in another rank's slice is a class no local logit has), and the ranks merge their rows'
statistics with two all-reduces (the log-sum-exps as max, then the sum of exps; the label
logits and row sums added). The backward needs no more: each rank's dz is its columns of
the full dz, and dhidden, a sum over all columns, is all-reduced.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels.activations import tanh_for
from tritium.kernels.online_softmax import LOG2E, lse_step
from tritium.kernels.tiles import dot, dot_precision, load_rows, rounded
from tritium.kernels.validation import as_rows, check_dim, check_float, check_like, check_tensor
from tritium.runtime import cdiv, custom_op, next_power_of_2, run_function, sm_count, values_readable

# Largest float32 scratch for the gradient sums (bytes): chunks of rows or vocabulary go
# through one buffer of at most this size. A module constant, so tests can make it small.
SCRATCH_BYTES = 256 << 20
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # what a compiled kernel may read of a global


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _logits(X, W, B, rows, row_ok, first_col, vocab, hidden, stride_xm, stride_xk, stride_wv, stride_wk, cap,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The vocabulary tile from first_col: its columns, which of them exist, the
    (BLOCK_N, BLOCK_V) float32 logits z of rows x columns, and the tanh t of the softcap
    (for its derivative 1 - t^2; z itself without one)."""
    cols = (first_col + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = load_rows(X, rows, stride_xm, ks, stride_xk, row_ok[:, None] & k_ok[None, :])
        b = load_rows(W, ks, stride_wk, cols, stride_wv, k_ok[:, None] & col_ok[None, :])
        acc = dot(a, b, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        t = tanh_for(acc / cap, X.dtype.element_ty)
        return cols, col_ok, t * cap, t
    else:
        return cols, col_ok, acc, acc


@triton.jit
def _dz(z, t, lse2, a, c, e, labels, cols, col_ok, SOFTCAP: tl.constexpr):
    """dloss/dx of a logits tile (x before the softcap), float32; 0 outside the vocabulary."""
    p = tl.exp2(z * _LOG2E - lse2[:, None])
    dz = a[:, None] * p - tl.where(cols[None, :] == labels[:, None], c[:, None], 0.0) - e[:, None]
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(col_ok[None, :], dz, 0.0)


@triton.jit
def _split_span(split, blocks_per_split, vocab, BLOCK_V: tl.constexpr):
    """[first, stop) of the vocabulary columns split `split` walks."""
    first = split * blocks_per_split * BLOCK_V
    return first, tl.minimum(first + blocks_per_split * BLOCK_V, vocab)


@triton.jit
def _row_terms(Labels, Coef, rows, row_ok, rows_total, stride_label):
    """The backward's per-row inputs: labels, lse (log2 units), a, c, e."""
    labels = tl.load(Labels + rows * stride_label, mask=row_ok, other=-1)
    lse2 = tl.load(Coef + rows, mask=row_ok, other=0.0)
    a = tl.load(Coef + rows_total + rows, mask=row_ok, other=0.0)
    c = tl.load(Coef + 2 * rows_total + rows, mask=row_ok, other=0.0)
    e = tl.load(Coef + 3 * rows_total + rows, mask=row_ok, other=0.0)
    return labels, lse2, a, c, e


@triton.jit
def _add_product(Out, out_rows, out_ok, stride_out, g, Src, src_rows, src_ok, stride_src, stride_src_k, hidden,
                 BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """Out[out_rows, :hidden] += g @ Src[src_rows, :hidden] (float32 Out, contiguous rows),
    BLOCK_H columns at a time: a program adds into rows no other program touches."""
    for h in range(0, hidden, BLOCK_H):
        hs = h + tl.arange(0, BLOCK_H)
        h_ok = hs < hidden
        src = load_rows(Src, src_rows, stride_src, hs, stride_src_k, src_ok[:, None] & h_ok[None, :])
        ptrs = Out + out_rows[:, None] * stride_out + hs[None, :]
        ok = out_ok[:, None] & h_ok[None, :]
        tl.store(ptrs, dot(g, src, tl.load(ptrs, mask=ok, other=0.0), PRECISION), mask=ok)


@triton.jit
def _lce_fwd_kernel(
    X, W, B, Labels, Part, rows_total, vocab, hidden, blocks_per_split,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_label, cap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Part[split, 0..3, row] = (max, sum of exp2, label logit, logit sum) of the row over
    the split's vocabulary blocks, log2 units for the first two."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < rows_total
    labels = tl.load(Labels + rows * stride_label, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first, stop = _split_span(split, blocks_per_split, vocab, BLOCK_V)
    for v in range(first, stop, BLOCK_V):
        cols, col_ok, z, _ = _logits(X, W, B, rows, row_ok, v, vocab, hidden, stride_xm, stride_xk, stride_wv,
                                     stride_wk, cap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        m, total, _, _ = lse_step(m, total, tl.where(col_ok[None, :], z * _LOG2E, float("-inf")))
        picked += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        if SMOOTHING:
            row_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
    out = Part + split.to(tl.int64) * 4 * rows_total + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + rows_total, total, mask=row_ok)
    tl.store(out + 2 * rows_total, picked, mask=row_ok)
    tl.store(out + 3 * rows_total, row_sum, mask=row_ok)


@triton.jit
def _lce_dx_kernel(
    X, W, B, Labels, Coef, DX, rows_total, vocab, hidden, blocks_per_split,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_label, stride_dsplit, stride_dm, cap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DX[split, row] += dz @ W over the split's vocabulary blocks (float32 sums)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < rows_total
    labels, lse2, a, c, e = _row_terms(Labels, Coef, rows, row_ok, rows_total, stride_label)
    out = DX + split.to(tl.int64) * stride_dsplit
    first, stop = _split_span(split, blocks_per_split, vocab, BLOCK_V)
    for v in range(first, stop, BLOCK_V):
        cols, col_ok, z, t = _logits(X, W, B, rows, row_ok, v, vocab, hidden, stride_xm, stride_xk, stride_wv,
                                     stride_wk, cap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        g = rounded(_dz(z, t, lse2, a, c, e, labels, cols, col_ok, SOFTCAP), X.dtype.element_ty)
        _add_product(out, rows, row_ok, stride_dm, g, W, cols, col_ok, stride_wv, stride_wk, hidden, BLOCK_H,
                     PRECISION)


@triton.jit
def _lce_dw_kernel(
    X, W, B, Labels, Coef, DW, DB, rows_total, vocab, hidden, col_offset,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_label, stride_dv, cap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DW[col - col_offset] = dz^T @ X and DB[col - col_offset] = column sums of dz, over
    every row, for the vocabulary block of this program (float32 sums)."""
    first_col = col_offset + tl.program_id(0) * BLOCK_V
    local = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r in range(0, rows_total, BLOCK_N):
        rows = (r + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < rows_total
        labels, lse2, a, c, e = _row_terms(Labels, Coef, rows, row_ok, rows_total, stride_label)
        cols, col_ok, z, t = _logits(X, W, B, rows, row_ok, first_col, vocab, hidden, stride_xm, stride_xk,
                                     stride_wv, stride_wk, cap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K,
                                     PRECISION)
        dz = tl.where(row_ok[:, None], _dz(z, t, lse2, a, c, e, labels, cols, col_ok, SOFTCAP), 0.0)
        db += tl.sum(dz, 0)
        g = rounded(tl.trans(dz), X.dtype.element_ty)
        _add_product(DW, local, col_ok, stride_dv, g, X, rows, row_ok, stride_xm, stride_xk, hidden, BLOCK_H,
                     PRECISION)
    if HAS_BIAS:
        tl.store(DB + local, db, mask=first_col + tl.arange(0, BLOCK_V) < vocab)


# ----------------------------------------------------------------------------- tuning, as data


def loss_bucket(*, hidden: int, vocab: int, dtype: torch.dtype, rows: int) -> dict:
    """Problems in one bucket share a config: the dtype, the hidden size by powers of two,
    and the row count by powers of two (the vocabulary only sets the grid)."""
    return {"dtype": str(dtype).replace("torch.", ""), "hidden": next_power_of_2(hidden),
            "rows": min(next_power_of_2(max(rows, 1)), 1 << 16)}


FWD_SPACE = {"BLOCK_N": (64, 128), "BLOCK_V": (64, 128, 256), "BLOCK_K": (32, 64, 128),
             "num_warps": (4, 8), "num_stages": (2, 3, 4)}
BWD_SPACE = {"BLOCK_N": (64, 128), "BLOCK_V": (64, 128), "BLOCK_K": (32, 64), "BLOCK_H": (64, 128),
             "num_warps": (4, 8), "num_stages": (2, 3)}


def _fwd_default(**_) -> autotune.Config:
    return autotune.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)


def _bwd_default(**_) -> autotune.Config:
    return autotune.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 64, "BLOCK_H": 128}, num_warps=8, num_stages=2)


# The interpreter's tl.dot wants at least 16 on each side.
LOSS_FWD = autotune.Kernel(
    "loss_fwd", space=FWD_SPACE, key=loss_bucket, default=_fwd_default,
    interpreter=autotune.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1),
    sources=(_lce_fwd_kernel,))
LOSS_DX = autotune.Kernel(
    "loss_dx", space=BWD_SPACE, key=loss_bucket, default=_bwd_default,
    interpreter=autotune.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "BLOCK_H": 16}, num_warps=1,
                                num_stages=1),
    sources=(_lce_dx_kernel,))
LOSS_DW = autotune.Kernel(
    "loss_dw", space=BWD_SPACE, key=loss_bucket, default=_bwd_default,
    interpreter=autotune.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "BLOCK_H": 16}, num_warps=1,
                                num_stages=1),
    sources=(_lce_dw_kernel,))


def _splits(row_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits so that about two programs per SM run: none when the row blocks
    already fill the GPU (every split adds a few floats per row, or a scratch slab)."""
    return max(1, min(vocab_blocks, cdiv(2 * sm_count(device), row_blocks)))


# ----------------------------------------------------------------------------- launchers


def _common(x, weight, bias, labels, softcap, config):
    return dict(stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wv=weight.stride(0), stride_wk=weight.stride(1),
                stride_label=labels.stride(0), cap=softcap, HAS_BIAS=bias is not None, SOFTCAP=softcap > 0,
                PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
                **config.meta)


@custom_op("tritium::linear_cross_entropy_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                softcap: float, smoothing: bool) -> torch.Tensor:
    """(3, rows) float32: the lse, the label's logit (0 for a label outside the vocabulary)
    and the logit sum (0 without smoothing) of each row of x (rows, hidden)."""
    rows, hidden = x.shape
    vocab = weight.shape[0]
    if rows == 0:
        return x.new_zeros(3, 0, dtype=torch.float32)

    def launch(config):
        row_blocks, vocab_blocks = cdiv(rows, config.meta["BLOCK_N"]), cdiv(vocab, config.meta["BLOCK_V"])
        splits = _splits(row_blocks, vocab_blocks, x.device)
        per_split = cdiv(vocab_blocks, splits)
        splits = cdiv(vocab_blocks, per_split)
        part = torch.empty(splits, 4, rows, dtype=torch.float32, device=x.device)
        _lce_fwd_kernel[(row_blocks, splits)](x, weight, bias if bias is not None else weight, labels, part, rows,
                                              vocab, hidden, per_split, SMOOTHING=smoothing,
                                              **_common(x, weight, bias, labels, softcap, config))
        return part

    part = launch(LOSS_FWD.lookup(launch, hidden=hidden, vocab=vocab, dtype=x.dtype, rows=rows))
    m, total, picked, row_sum = part.unbind(1)  # every split saw a vocabulary block: m finite, total >= 1
    lse = torch.logsumexp((m + torch.log2(total)) * LN2, 0)
    return torch.stack([lse, picked.sum(0), row_sum.sum(0)])


@_forward_op.register_fake
def _(x, weight, bias, labels, softcap, smoothing):
    return x.new_empty(3, x.shape[0], dtype=torch.float32)


def _chunks(total: int, per_item: int) -> int:
    """Items per chunk so that a float32 scratch of per_item floats each fits SCRATCH_BYTES."""
    return max(1, min(total, SCRATCH_BYTES // (4 * per_item)))


def _grad_x(x, weight, bias, labels, coef, softcap) -> torch.Tensor:
    rows, hidden = x.shape
    vocab = weight.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def plan(config) -> tuple[int, int]:
        """(vocabulary splits, rows per chunk): the splits' float32 slabs of a chunk fit
        the scratch."""
        splits = _splits(cdiv(rows, config.meta["BLOCK_N"]), cdiv(vocab, config.meta["BLOCK_V"]), x.device)
        return splits, _chunks(rows, splits * hidden)

    def run(config, start, stop, splits):
        xs, ls, cs = x[start:stop], labels[start:stop], coef[:, start:stop].contiguous()
        vocab_blocks = cdiv(vocab, config.meta["BLOCK_V"])
        per_split = cdiv(vocab_blocks, splits)
        splits = cdiv(vocab_blocks, per_split)
        direct = splits == 1 and x.dtype == torch.float32
        if direct:
            out = dx[start:stop].zero_()
        else:
            out = torch.zeros(splits, stop - start, hidden, dtype=torch.float32, device=x.device)
        _lce_dx_kernel[(cdiv(stop - start, config.meta["BLOCK_N"]), splits)](
            xs, weight, bias if bias is not None else weight, ls, cs, out, stop - start, vocab, hidden, per_split,
            stride_dsplit=0 if direct else out.stride(0), stride_dm=out.stride(-2),
            **_common(xs, weight, bias, ls, softcap, config))
        if not direct:
            dx[start:stop] = out.sum(0)

    def launch(config):  # tuning: the first chunk
        splits, step = plan(config)
        run(config, 0, step, splits)

    config = LOSS_DX.lookup(launch, hidden=hidden, vocab=vocab, dtype=x.dtype, rows=rows)
    splits, step = plan(config)
    for start in range(0, rows, step):
        run(config, start, min(rows, start + step), splits)
    return dx


def _grad_weight(x, weight, bias, labels, coef, softcap) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, hidden = x.shape
    vocab = weight.shape[0]
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    db = torch.empty(vocab, dtype=weight.dtype, device=x.device) if bias is not None else None
    direct = weight.dtype == torch.float32

    def step(config) -> int:
        """Vocabulary rows per chunk: whole blocks whose float32 sums fit the scratch."""
        block = config.meta["BLOCK_V"]
        return cdiv(_chunks(vocab, hidden), block) * block

    def run(config, start, stop):
        out = dw[start:stop].zero_() if direct else torch.zeros(stop - start, hidden, dtype=torch.float32,
                                                                 device=x.device)
        dbias = torch.empty(stop - start, dtype=torch.float32, device=x.device) if bias is not None else out
        _lce_dw_kernel[(cdiv(stop - start, config.meta["BLOCK_V"]),)](
            x, weight, bias if bias is not None else weight, labels, coef, out, dbias, rows, stop, hidden, start,
            stride_dv=out.stride(0), **_common(x, weight, bias, labels, softcap, config))
        if not direct:
            dw[start:stop] = out
        if bias is not None:
            db[start:stop] = dbias

    def launch(config):  # tuning: the first chunk
        run(config, 0, min(vocab, step(config)))

    config = LOSS_DW.lookup(launch, hidden=hidden, vocab=vocab, dtype=x.dtype, rows=rows)
    for start in range(0, vocab, step(config)):
        run(config, start, min(vocab, start + step(config)))
    return dw, db


@custom_op("tritium::linear_cross_entropy_backward", mutates_args=())
def _backward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 coef: torch.Tensor, softcap: float, needs_x: bool, needs_weight: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) for the per-row coefficients coef (4, rows) float32: the lse in
    log2 units, a, c, e (see the module docstring). A gradient not needed comes back empty."""
    if x.shape[0] == 0:  # no row: nothing flowed through the head
        db = weight.new_zeros(bias.shape if bias is not None and needs_weight else 0)
        return x.new_empty(x.shape if needs_x else 0), weight.new_zeros(weight.shape if needs_weight else 0), db
    dx = _grad_x(x, weight, bias, labels, coef, softcap) if needs_x else x.new_empty(0)
    dw, db = _grad_weight(x, weight, bias, labels, coef, softcap) if needs_weight else (weight.new_empty(0), None)
    return dx, dw, db if db is not None else weight.new_empty(0)


@_backward_op.register_fake
def _(x, weight, bias, labels, coef, softcap, needs_x, needs_weight):
    return (x.new_empty(x.shape if needs_x else 0), weight.new_empty(weight.shape if needs_weight else 0),
            weight.new_empty(bias.shape if bias is not None and needs_weight else 0))


# ----------------------------------------------------------------------------- autograd


class VocabShard(NamedTuple):
    """This rank's slice of a vocabulary-parallel head: weight rows [start, start + rows)
    of a vocabulary of `size` classes, split over the ranks of `group`."""

    group: object
    start: int
    size: int


def _merge_shards(lse, picked, row_sum, group):
    """Each row's statistics over the whole vocabulary from every rank's slice: the
    log-sum-exps merged (their max, then the sum of exps relative to it), the label logit
    (one rank holds it, the others add 0) and the row sums added."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse - top), picked, row_sum])
    dist.all_reduce(sums, group=group)
    return top + torch.log(sums[0]), sums[1], sums[2]


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over the forward/backward custom ops; the per-row arithmetic (O(rows)) is
    plain PyTorch around them. Returns the per-row losses (rows,) float32, 0 where ignored.
    shard: a VocabShard when weight is one rank's slice of the head, else None."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, softcap, ignore_index, smoothing, z_loss, shard):
        valid = labels != ignore_index
        if shard is not None:  # another rank's classes fall outside this slice: no local logit matches them
            labels = labels - shard.start
        lse, picked, row_sum = _forward_op(x, weight, bias, labels, softcap, smoothing > 0)
        vocab = weight.shape[0]
        if shard is not None:
            lse, picked, row_sum = _merge_shards(lse, picked, row_sum, shard.group)
            vocab = shard.size
        loss = (1 - smoothing) * (lse - picked) + z_loss * lse * lse
        if smoothing > 0:
            loss = loss + smoothing * (lse - row_sum / vocab)
        loss = torch.where(valid, loss, 0.0)
        ctx.save_for_backward(x, weight, bias, labels, lse, valid)
        ctx.options = (softcap, smoothing, z_loss, vocab, shard)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, labels, lse, valid = ctx.saved_tensors
        softcap, smoothing, z_loss, vocab, shard = ctx.options
        g = torch.where(valid, grad.float(), 0.0)
        coef = torch.stack([lse * LOG2E, g * (1 + 2 * z_loss * lse), g * (1 - smoothing), g * (smoothing / vocab)])
        needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = _backward_op(x, weight, bias, labels, coef, softcap, needs_x, needs_weight)
        if shard is not None and needs_x:  # this slice's columns' part of dhidden
            dist.all_reduce(dx, group=shard.group)
        return (dx if needs_x else None, dw if needs_weight else None,
                db if bias is not None and needs_weight else None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- public op

REDUCTIONS = ("mean", "sum", "none")


def _check_args(hidden, weight, bias, labels, softcap, ignore_index, reduction, label_smoothing, z_loss, shift):
    """Shapes, dtypes, devices and options; raises before any launch."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden: expected a tensor (tokens, hidden) or (batch, seqlen, hidden), got {shape}")
    check_tensor("hidden", hidden, shape="(..., hidden)", ndim=hidden.dim())
    check_tensor("weight", weight, shape="(vocab, hidden)", ndim=2)
    check_like("weight", weight, "hidden", hidden)
    check_dim("weight", weight, 1, hidden.shape[-1], "hidden (hidden.shape[-1])")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"weight: vocab and hidden must be at least 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape="(vocab,)", ndim=1)
        check_like("bias", bias, "weight", weight)
        check_dim("bias", bias, 0, weight.shape[0], "vocab (weight.shape[0])")
    check_tensor("labels", labels, shape="hidden.shape[:-1]", ndim=labels.dim() if isinstance(labels, torch.Tensor)
                 else 1, dtypes=(torch.int64, torch.int32))
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must be hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels: device {labels.device} differs from hidden's {hidden.device}; they must match")
    if shift and hidden.dim() != 3:
        raise ValueError(f"shift=True: hidden must be (batch, seqlen, hidden), got shape {tuple(hidden.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_float("softcap", softcap, minimum=0.0)
    check_float("label_smoothing", label_smoothing, minimum=0.0)
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    check_float("z_loss", z_loss, minimum=0.0)


def _vocab_shard(group, start, size, rows: int) -> VocabShard | None:
    """The VocabShard of a vocabulary-parallel call, None for a whole head; raises for
    offsets that do not place the slice inside the vocabulary."""
    for name, value in (("vocab_start", start), ("vocab_size", size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if group is None:
        if start != 0 or size not in (None, rows):
            raise ValueError("vocab_start/vocab_size: only with process_group (a vocabulary-parallel head)")
        return None
    if size is None or not 0 <= start <= size - rows:
        raise ValueError(f"vocab_start {start}, vocab_size {size}: this rank's {rows} rows must lie inside the "
                         "vocabulary (give both with process_group)")
    return VocabShard(group, start, size)


def _check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """One host read: every label is ignore_index or a class. Skipped where values cannot be
    read (capture, compile): the kernels only compare labels, so a bad one reads nothing
    outside the tensors, it only counts as a class no logit has."""
    if not values_readable(labels) or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"labels: {value} is neither ignore_index ({ignore_index}) nor a class in [0, {vocab})")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: bool = False,
    process_group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the LM head's logits without materialising them.

    The loss is F.cross_entropy(softcap(hidden @ weight.T + bias), labels,
    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    computed in float32, plus z_loss * lse^2 per row not ignored (reduced the same way),
    softcap(x) = softcap * tanh(x / softcap) when softcap > 0.

    hidden: (tokens, hidden) or (batch, seqlen, hidden), float16, bfloat16 or float32, any
        strides; weight: (vocab, hidden) as lm_head.weight, hidden's dtype and device;
        bias: (vocab,) or None; labels: hidden.shape[:-1], int64 or int32, each a class or
        ignore_index.
    shift: the causal-LM shift (hidden (batch, seqlen, hidden)): position t predicts
        labels[:, t + 1], the last position none.
    reduction: "mean" (over the rows not ignored: NaN when all are, as torch), "sum" or
        "none" (hidden.shape[:-1], 0 where ignored). Returns float32.
    process_group: vocabulary-parallel (tensor parallelism): weight and bias are this
        rank's rows [vocab_start, vocab_start + weight.shape[0]) of a head of vocab_size
        classes whose other rows the group's other ranks hold; every rank passes the same
        hidden and labels and gets the loss over the whole vocabulary (two all-reduces of
        a few floats per row), and the gradient of hidden summed over the ranks.

    Differentiable w.r.t. hidden, weight and bias, deterministically. Memory beyond the
    inputs and gradients: a few floats per row and per vocabulary entry, plus a bounded
    float32 scratch for the gradient sums (SCRATCH_BYTES).
    """
    _check_args(hidden, weight, bias, labels, softcap, ignore_index, reduction, label_smoothing, z_loss, shift)
    shard = _vocab_shard(process_group, vocab_start, vocab_size, weight.shape[0])
    if shift:
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], 1)
    _check_label_values(labels, weight.shape[0] if shard is None else shard.size, ignore_index)
    x, flat = as_rows(hidden), labels.reshape(-1)
    if bias is not None:
        bias = bias.contiguous()
    per_row = run_function(LinearCrossEntropyFunction, x, weight, bias, flat, float(softcap), ignore_index,
                           float(label_smoothing), float(z_loss), shard)
    if reduction == "none":
        return per_row.reshape(labels.shape)
    total = per_row.sum()
    return total if reduction == "sum" else total / (flat != ignore_index).sum()
