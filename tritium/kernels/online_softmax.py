"""Score and softmax conventions shared by every attention kernel (dense, decode,
block-sparse) and the fused loss: the one mask predicate, the one score function, the one
online-softmax update (`lse_step`; `softmax_step` with values), the softmax-gradient row
term of both backward passes, and the host-side constants they expect.

Scores are kept in log2 units (the softmax scale folded into log2(e)) so the inner loops
use exp2; lse is returned in natural units.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tritium.kernels.activations import tanh_for
from tritium.kernels.tiles import dot, load_rows, rounded
from tritium.runtime import next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def block_span(first, last, reach_lo, reach_hi, length, BLOCK: tl.constexpr):
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
def heaviest_first(pid, count, REVERSE: tl.constexpr):
    """The tile (of `count` along an axis) that program `pid` takes, so that the tiles with
    the most work launch first and the light ones form the tail: the last tile first when
    REVERSE (`heavier_later`), else in order. A permutation of [0, count) either way.
    A constexpr, not a runtime select on the window: with the select, ptxas gave the
    head_dim 128 softcap dQ kernel (its default config, sm_90, Triton 3.9) 16 bytes of
    spills; with the constexpr, none."""
    if REVERSE:
        pid = count - 1 - pid
    return pid


@triton.jit
def visible(pos, key, left, right, seqlen_k):
    """The mask predicate: query at position `pos` sees key index `key` (broadcastable)."""
    return (key >= pos - left) & (key <= pos + right) & (key < seqlen_k)


@triton.jit
def logits(a, b, qk_scale, cap_log2, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a @ b in log2 units, and the tanh of the softcap (for its derivative).

    Without softcap qk_scale = scale * log2(e); with it, qk_scale = scale / softcap and
    cap_log2 = softcap * log2(e), so s = softcap * tanh(qk * scale / softcap) * log2(e);
    16-bit inputs take the hardware tanh (`tanh_for`).
    """
    qk = dot(a, b, None, PRECISION)
    if SOFTCAP:
        t = tanh_for(qk * qk_scale, a.dtype)
        return t * cap_log2, t
    else:
        return qk * qk_scale, qk


@triton.jit
def lse_step(m_i, l_i, s):
    """One online log-sum-exp update with a (M, N) tile of log2 scores s (-inf where
    hidden): (m_new, l_new, p, alpha), p = exp2(s - m_new) and alpha the rescaling of the
    old sums. A row that has seen no visible score keeps m = -inf, l = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One online-softmax update with a (M, N) tile of log2 scores s (-inf where hidden)
    and its (N, D) values v (`lse_step`, then the values weighed by p)."""
    m_new, l_i, p, alpha = lse_step(m_i, l_i, s)
    acc = dot(rounded(p, v.dtype), v, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


@triton.jit
def merge_step(acc, m, total, part, lse_part):
    """Fold one split's normalised partial output `part` (R, D) and its log-sum-exp
    `lse_part` (R,), log2 units, -inf for a split that saw no key, into a running merge:
    acc (R, D) and total (R,) weighted relative to the running maximum m (R,). Start from
    acc 0, m -inf, total 0; finish with `merge_result`. Split-KV decode and the split global
    rows of block-sparse attention merge their splits with it, in split order."""
    m_new = tl.maximum(m, lse_part)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    w = tl.exp2(lse_part - m_safe)
    return acc * alpha[:, None] + w[:, None] * part, m_new, total * alpha + w


@triton.jit
def merge_result(acc, m, total):
    """(output (R, D), natural-log lse (R,)) of a `merge_step` merge: 0 and -inf for rows
    that no split saw a key for."""
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), (tl.where(m == float("-inf"), 0.0, m) + tl.log2(tl.where(empty, 1.0, total))))
    return out, lse * 0.6931471805599453


@triton.jit
def lse_log2(Lse, rows, ok):
    """Load natural-log lse as log2 units for recomputing P = exp2(s - lse). Rows that saw
    no key have lse = -inf; +inf makes every p of theirs exp2(-inf) = 0."""
    lse = tl.load(Lse + rows, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def bwd_delta_kernel(
    Out, DOut, Delta, seqlen_q, heads_q,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_db, stride_dm, stride_dh, stride_dd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta[b, h, i] = sum_d Out * dOut (float32), the softmax-gradient row term, for the
    dense and the block-sparse backward passes."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = load_rows(Out + b * stride_ob + h * stride_oh, rows, stride_om, offs_d, stride_od, ok)
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, stride_dm, offs_d, stride_dd, ok)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


def score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_log2) for `logits`."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


def heavier_later(reach_lo: int, reach_hi: int) -> bool:
    """Whether the later tiles along an axis carry more work, for `heaviest_first`. The
    reaches are those of `block_span` for the tiles of the axis (window sides, -1 =
    unbounded): with reach_lo > reach_hi the span [x - reach_lo, x + reach_hi] of a tile
    is cut more at the start of the other axis than at its end, so it grows with the tile
    index (causal query tiles: keys [0, x]); otherwise (no mask, or the mirror of causal:
    the key tiles of the causal backward) the first tiles weigh at least as much. FA3
    launches causal query tiles last first too."""
    unbounded = float("inf")
    return (unbounded if reach_lo < 0 else reach_lo) > (unbounded if reach_hi < 0 else reach_hi)


def window_reach(window: int, unbounded: int) -> int:
    """A window side for the kernels: -1 (unbounded) becomes a reach past every key."""
    return unbounded if window < 0 else window


def head_block(head_dim: int) -> int:
    """BLOCK_D: head_dim padded to a power of two (tl.dot needs >= 16)."""
    return max(next_power_of_2(head_dim), 16)
