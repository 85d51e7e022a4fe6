"""Register-tile helpers shared by the kernels: loading and storing strided tiles, the
grouped order of GEMM output tiles, and the tile arithmetic that must differ under the
Triton interpreter: `dot` (every tl.dot of tritium goes through it), `rounded` (every
rounding of a float32 tile to a narrower dtype) and `add` (a sum in its operands' dtype).

The interpreter (TRITON_INTERPRET=1) keeps bfloat16 tiles as uint16 bit patterns: its
tl.dot and arithmetic compute on those integers (results off by ~1e9), and it truncates
float32 to bfloat16 where the GPU rounds to nearest even (a bias that the sums of a
backward pass carry past the accuracy bound). Its bfloat16 -> float32 casts are right.
So, interpreted, these helpers upcast bfloat16 operands to float32 (products and sums of
bfloat16 values are exact there, as in the GPU's float32 accumulation) and round the
float32 bits to nearest even before narrowing. Compiled, INTERPRETED is False, the
branches are dropped at compile time, and the kernel's PTX is instruction for
instruction what it is with plain tl.dot, .to() and +.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritium.runtime import interpreted

INTERPRETED = tl.constexpr(interpreted())


@triton.jit
def load_rows(base, rows, stride_row, cols, stride_col, ok):
    """The (rows, cols) tile of a strided 2-d array at base; 0 where not ok."""
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=ok, other=0.0)


@triton.jit
def store_tile(Out, value, rows, cols, M, N, stride_m, stride_n):
    """Store a float32 tile in Out's dtype, dropping rows >= M and columns >= N."""
    ptrs = Out + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_n
    tl.store(ptrs, rounded(value, Out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's (BLOCK_M, BLOCK_N) tile of an (M, N) output in
    grouped order: GROUP_M row blocks sweep the column blocks together, so the weight
    tiles they share are still in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // per_group * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in float32 (acc None: a zero accumulator); a (M, K), b (K, N) of one
    dtype, products at PRECISION ("ieee" or "tf32", from `dot_precision`)."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """x.to(dtype): to nearest, ties to even, interpreted too (NaN stays NaN)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                # Round the 16 bits the interpreter's truncation drops; it is then exact.
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
                x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)


@triton.jit
def add(a, b):
    """a + b rounded to a's dtype (b of the same dtype), as PyTorch adds two tensors."""
    dtype = a.dtype
    if INTERPRETED:
        if dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return rounded(a + b, dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """`dot`'s PRECISION: float32 inputs get true float32 products; the low-precision dtypes
    ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
