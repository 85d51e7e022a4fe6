"""Split-K for GEMMs with too few output tiles to fill the GPU (decode: a handful of
tokens): the K range is cut into SPLIT_K slices, each run by its own programs, and the
float32 partial sums are added afterwards in split order (deterministic, unlike atomics).

Shared by `linear` (mlp.py) and the NF4 matmul (nf4.py). A GEMM kernel computes its tile
over `k_span` and hands the accumulator to `finish`: with one split it applies the
epilogue in registers (bias, the pre-activation for the backward, activation, cast); with
several it stores the partial sums, and `_split_sum_kernel` applies that same epilogue to
their total.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritium.kernels.activations import activation
from tritium.kernels.tiles import rounded, store_tile
from tritium.runtime import cdiv, next_power_of_2

NO_ACTIVATION = "none"  # the name `activations.activation` treats as the identity
IDENTITY = tl.constexpr(NO_ACTIVATION)  # the same name, for kernels with no activation (NF4)
SUM_BLOCK = 1024  # outputs per program of the split-K reduction
SUM_ROWS = 16  # at most this many rows per reduction tile: decode has few, columns are contiguous


@triton.jit
def k_span(split, split_len, K):
    """(start, stop): the part of [0, K) that split `split` covers; split_len is a
    multiple of the K step, so only the last split can be short (or empty)."""
    start = split * split_len
    return start, tl.minimum(start + split_len, K)


@triton.jit
def _epilogue(acc, rows, cols, M, N, Bias, Out, Pre, stride_b, stride_om, stride_on, stride_pm, stride_pn,
              ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr):
    """Out[rows, cols] = act(acc + bias) from the float32 (rows, cols) tile acc; STORE_PRE
    also writes acc + bias to Pre, the input of act' in the backward."""
    if HAS_BIAS:
        acc += tl.load(Bias + cols * stride_b, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        store_tile(Pre, acc, rows, cols, M, N, stride_pm, stride_pn)
    store_tile(Out, activation(acc, ACTIVATION), rows, cols, M, N, stride_om, stride_on)


@triton.jit
def finish(acc, rows, cols, M, N, Bias, Out, Pre, Partial, split,
            stride_b, stride_om, stride_on, stride_pm, stride_pn,
            ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the float32 tile acc of Out[rows, cols] (M, N). One split: `_epilogue`.
    Several: this split's partial sums into Partial (SPLIT_K, M, N), contiguous."""
    if SPLIT_K == 1:
        _epilogue(acc, rows, cols, M, N, Bias, Out, Pre, stride_b, stride_om, stride_on, stride_pm, stride_pn,
                  ACTIVATION, HAS_BIAS, STORE_PRE)
    else:
        store_tile(Partial + split.to(tl.int64) * M * N, acc, rows, cols, M, N, N, 1)


@triton.jit
def _split_sum_kernel(
    Partial, Bias, Out, Pre, M, N, stride_b, stride_om, stride_on, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of Out = act(sum over splits of Partial (SPLIT_K, M, N)
    + bias), the splits added in order, and Pre = the sum + bias with STORE_PRE."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    ptrs = Partial + rows[:, None].to(tl.int64) * N + cols[None, :]
    acc = tl.load(ptrs, mask=ok, other=0.0)
    for _ in tl.static_range(1, SPLIT_K):
        ptrs += M * N
        acc += tl.load(ptrs, mask=ok, other=0.0)
    _epilogue(acc, rows, cols, M, N, Bias, Out, Pre, stride_b, stride_om, stride_on, stride_pm, stride_pn,
              ACTIVATION, HAS_BIAS, STORE_PRE)


# What a kernel that ends in `finish` is built from, for its autotune source hash.
SOURCES = (k_span, store_tile, rounded, _epilogue, finish, _split_sum_kernel, activation)


def split_len(k: int, block_k: int, split: int) -> int:
    """K elements per split: whole K steps, as even as they go; the last split may be
    short or empty (split 3 of 4 steps: 2, 2, 0)."""
    return cdiv(cdiv(k, block_k), split) * block_k


def epilogue_flags(bias, pre, activation_name: str | None) -> dict:
    """The constexpr flags of `_epilogue` for a launch with these arguments."""
    return dict(ACTIVATION=activation_name or NO_ACTIVATION, HAS_BIAS=bias is not None, STORE_PRE=pre is not None)


def partials(out: torch.Tensor, split: int) -> torch.Tensor:
    """The float32 (split, M, N) buffer of the splits' partial sums for out (M, N); with
    one split nothing is stored there, and out stands in for the pointer."""
    if split == 1:
        return out
    return torch.empty((split, *out.shape), dtype=torch.float32, device=out.device)


def launch_split_sum(partial: torch.Tensor, bias, out: torch.Tensor, pre, activation_name: str | None) -> None:
    """out = act(partial.sum(0) + bias), the splits added in order; pre: None, or (M, N)
    to receive the sum + bias. partial (split, M, N) contiguous float32, bias (N,) or
    None, out and pre any strides."""
    split, m, n = partial.shape
    block_m = min(next_power_of_2(m), SUM_ROWS)
    block_n = SUM_BLOCK // block_m
    _split_sum_kernel[(cdiv(n, block_n), cdiv(m, block_m))](
        partial, out if bias is None else bias, out, out if pre is None else pre, m, n,
        0 if bias is None else bias.stride(0), *out.stride(), *((0, 0) if pre is None else pre.stride()),
        **epilogue_flags(bias, pre, activation_name), SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=block_n,
    )
