"""Score and softmax conventions shared by every attention kernel (dense, decode,
block-sparse): the one mask predicate, the one score function, the one online-softmax
update, and the host-side constants they expect.

Scores are kept in log2 units (the softmax scale folded into log2(e)) so the inner loops
use exp2; lse is returned in natural units.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritium.kernels.activations import tanh
from tritium.runtime import next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def _span(first, last, reach_lo, reach_hi, length, BLOCK: tl.constexpr):
    """Blocks of an axis of `length` seen by a tile covering coordinates [first, last].

    Coordinate x sees indices [x - reach_lo, x + reach_hi]. Returns (lo, full_lo, full_hi,
    hi): blocks starting in [full_lo, full_hi) are seen whole by every coordinate of the
    tile and need no mask; [lo, full_lo) and [full_hi, hi) are partly seen. lo, full_lo
    and full_hi are multiples of BLOCK. Operands of // are kept >= 0 because Triton
    truncates where Python floors.
    """
    lo = tl.maximum(first - reach_lo, 0) // BLOCK * BLOCK
    hi = tl.maximum(tl.minimum(last + reach_hi + 1, length), lo)
    full_lo = (tl.maximum(last - reach_lo, 0) + BLOCK - 1) // BLOCK * BLOCK
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(first + reach_hi + 1, length), 0) // BLOCK * BLOCK
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(pos, key, left, right, seqlen_k):
    """The mask predicate: query at position `pos` sees key index `key` (broadcastable)."""
    return (key >= pos - left) & (key <= pos + right) & (key < seqlen_k)


@triton.jit
def _logits(a, b, qk_scale, cap_log2, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a @ b in log2 units, and the tanh of the softcap (for its derivative).

    Without softcap qk_scale = scale * log2(e); with it, qk_scale = scale / softcap and
    cap_log2 = softcap * log2(e), so s = softcap * tanh(qk * scale / softcap) * log2(e).
    """
    qk = tl.dot(a, b, input_precision=PRECISION)
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return t * cap_log2, t
    else:
        return qk * qk_scale, qk


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One online-softmax update with a (M, N) tile of log2 scores s (-inf where hidden)
    and its (N, D) values v. A row that has seen no visible key keeps m = -inf, l = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_rows(base, rows, stride_row, offs_d, stride_d, ok):
    """A (rows, head_dim) tile of a strided (seqlen, head_dim) slice; 0 where not ok."""
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, mask=ok, other=0.0)


@triton.jit
def _lse_log2(Lse, rows, ok):
    """Load natural-log lse as log2 units for recomputing P = exp2(s - lse). Rows that saw
    no key have lse = -inf; +inf makes every p of theirs exp2(-inf) = 0."""
    lse = tl.load(Lse + rows, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get true float32 products; the low-precision dtypes ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_log2) for `_logits`."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


def window_reach(window: int, unbounded: int) -> int:
    """A window side for the kernels: -1 (unbounded) becomes a reach past every key."""
    return unbounded if window < 0 else window


def head_block(head_dim: int) -> int:
    """BLOCK_D: head_dim padded to a power of two (tl.dot needs >= 16)."""
    return max(next_power_of_2(head_dim), 16)
