"""Dense flash attention: forward and backward for prefill and training.

Layout (batch, seqlen, heads, head_dim), any strides. Every variant — causal (bottom-right
aligned), sliding window, softcap, GQA, key padding, split-KV decode — runs through the
`@triton.jit` helpers below: `_span` says which key blocks a tile sees and which of them
need a mask, `_visible` is the one mask predicate, `_logits` the one score function and
`_softmax_step` the one online-softmax update. `attention_kvcache.py` and the block-sparse
kernel reuse them.

Scores are kept in log2 units (the softmax scale folded into log2(e)) so the inner loop uses
exp2; lse is returned in natural units.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels.validation import check_dim, check_like, check_tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _tanh(x):
    # tl has no tanh on every Triton we support. Near 0, 1 - 2 / (e^2x + 1) cancels, so a
    # minimax odd polynomial (Cephes tanhf) covers |x| < 0.625: float32 to ~1 ulp everywhere.
    z = x * x
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    # Clamping keeps exp2 finite; tanh(15) is 1 to float32 precision.
    e = tl.exp2(tl.minimum(tl.maximum(x, -15.0), 15.0) * 2.8853900817779268)
    return tl.where(tl.abs(x) < 0.625, poly, 1.0 - 2.0 / (e + 1.0))


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
        t = _tanh(qk * qk_scale)
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
def _fwd_blocks(
    acc, m_i, l_i, q, k_base, v_base, km_base, start, end,
    pos, seqlen_k, left, right, qk_scale, cap_log2,
    stride_kn, stride_vn, stride_mn, offs_n, koffs_d, voffs_d, d_ok,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate key blocks [start, end) into (acc, m_i, l_i); MASKED applies the
    window/causal/length predicate (only the blocks at the edges of the span need it).
    koffs_d, voffs_d: head_dim offsets already multiplied by their strides."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kT_ptrs = k_base + koffs_d[:, None] + cols[None, :] * stride_kn
        v_ptrs = v_base + voffs_d[None, :] + cols[:, None] * stride_vn
        if MASKED:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :] & (cols[:, None] < seqlen_k), other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s, _ = _logits(q, kT, qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(_visible(pos[:, None], cols[None, :], left, right, seqlen_k), s, float("-inf"))
        if HAS_KEY_MASK:
            keep = tl.load(km_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KeyMask, SeqlensK,
    qk_scale, cap_log2, seqlen_q, seqlen_k, window_left, window_right, split_len, heads_q, group,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M rows of one batch element, over the key range of one split.

    A row is (query t, head g of a pack of PACK q heads sharing one kv head): PACK = 1 for
    prefill (one head per program), PACK = the GQA group for decode, where a few queries
    per head would leave the tile empty. Each split covers keys [split * split_len,
    (split + 1) * split_len); Out/Lse get a split stride (0 when there is one split).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    slots = heads_q // PACK
    b = pid_bh // slots
    head0 = (pid_bh % slots) * PACK
    kv_head = head0 // group

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // PACK
    head = head0 + rows % PACK
    row_ok = rows < seqlen_q * PACK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    if HAS_SEQLENS:
        seqlen_k = tl.load(SeqlensK + b).to(tl.int32)
    shift = seqlen_k - seqlen_q
    pos = t + shift
    first = pid_m * BLOCK_M // PACK + shift
    last = (tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q * PACK) - 1) // PACK + shift
    lo, full_lo, full_hi, hi = _span(first, last, window_left, window_right, seqlen_k, BLOCK_N)
    split_lo = split * split_len
    split_hi = split_lo + split_len
    lo = tl.maximum(lo, split_lo)
    hi = tl.minimum(hi, split_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + t[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + kv_head * stride_kh
    v_base = V + b64 * stride_vb + kv_head * stride_vh
    km_base = KeyMask + b64 * stride_mb
    koffs_d = offs_d * stride_kd
    voffs_d = offs_d * stride_vd

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # The edges of the span need the mask; the middle, usually most of it, does not.
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_base, v_base, km_base, lo, full_lo, pos, seqlen_k, window_left,
        window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn, offs_n, koffs_d, voffs_d, d_ok,
        True, SOFTCAP, HAS_KEY_MASK, HEAD_DIM == BLOCK_D, PRECISION, BLOCK_N)
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_base, v_base, km_base, full_lo, full_hi, pos, seqlen_k, window_left,
        window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn, offs_n, koffs_d, voffs_d, d_ok,
        False, SOFTCAP, HAS_KEY_MASK, HEAD_DIM == BLOCK_D, PRECISION, BLOCK_N)
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q, k_base, v_base, km_base, full_hi, hi, pos, seqlen_k, window_left,
        window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn, offs_n, koffs_d, voffs_d, d_ok,
        True, SOFTCAP, HAS_KEY_MASK, HEAD_DIM == BLOCK_D, PRECISION, BLOCK_N)

    # A row that saw no key (fully masked, or an empty split) writes 0 and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (Out + split * stride_os + b64 * stride_ob + t[:, None] * stride_om
              + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + split * stride_ls + b64 * stride_lb + head * stride_lh + t * stride_lm
    tl.store(l_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    Out, DOut, Delta, seqlen_q, heads_q,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_db, stride_dm, stride_dh, stride_dd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta[b, h, i] = sum_d Out * dOut (float32), the softmax-gradient row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _lse_log2(Lse, rows, ok):
    # Rows that saw no key have lse = -inf; +inf makes every p of theirs exp2(-inf) = 0.
    lse = tl.load(Lse + rows, mask=ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _bwd_dq_blocks(
    dq, q, do, lse2, delta, k_base, v_base, km_base, start, end,
    pos, seqlen_k, left, right, qk_scale, cap_log2,
    stride_kn, stride_vn, stride_mn, offs_n, koffs_d, voffs_d, d_ok,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq += dS @ K over key blocks [start, end), recomputing P from lse."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(k_base + koffs_d[None, :] + cols[:, None] * stride_kn, mask=kv_ok, other=0.0)
        v = tl.load(v_base + voffs_d[None, :] + cols[:, None] * stride_vn, mask=kv_ok, other=0.0)
        s, t = _logits(q, tl.trans(k), qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(_visible(pos[:, None], cols[None, :], left, right, seqlen_k), s, float("-inf"))
        if HAS_KEY_MASK:
            keep = tl.load(km_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KeyMask,
    sm_scale, qk_scale, cap_log2, seqlen_q, seqlen_k, window_left, window_right, heads_q, group,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one head: the forward's loop with the gradient inside.
    DQ is contiguous (batch, seqlen_q, heads_q, head_dim)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    kv_head = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < seqlen_q
    ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=ok, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    lse2 = _lse_log2(Lse + pid_bh.to(tl.int64) * seqlen_q, rows, row_ok)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)

    shift = seqlen_k - seqlen_q
    pos = rows + shift
    last = tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q) - 1 + shift
    lo, full_lo, full_hi, hi = _span(pid_m * BLOCK_M + shift, last, window_left, window_right, seqlen_k, BLOCK_N)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    km_base = KeyMask + b * stride_mb
    koffs_d = offs_d * stride_kd
    voffs_d = offs_d * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, lo, full_lo, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn,
                        offs_n, koffs_d, voffs_d, d_ok, True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, full_lo, full_hi, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn,
                        offs_n, koffs_d, voffs_d, d_ok, False, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, full_hi, hi, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_vn, stride_mn,
                        offs_n, koffs_d, voffs_d, d_ok, True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq_ptrs = DQ + ((b * seqlen_q + rows[:, None]) * heads_q + h) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dkdv_blocks(
    dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, start, end,
    cols, shift, seqlen_q, seqlen_k, left, right, qk_scale, cap_log2,
    stride_qm, stride_dm, offs_m, qoffs_d, dooffs_d, d_ok,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV (transposed view: keys are rows) over query blocks [start, end) of one head."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + qoffs_d[None, :] + rows[:, None] * stride_qm, mask=ok, other=0.0)
        do = tl.load(do_base + dooffs_d[None, :] + rows[:, None] * stride_dm, mask=ok, other=0.0)
        lse2 = _lse_log2(lse_base, rows, row_ok)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sT, tT = _logits(k, tl.trans(q), qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            seen = _visible(rows[None, :] + shift, cols[:, None], left, right, seqlen_k) & row_ok[None, :]
            sT = tl.where(seen, sT, float("-inf"))
        if HAS_KEY_MASK:
            sT = tl.where(keep[:, None], sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KeyMask,
    sm_scale, qk_scale, cap_log2, seqlen_q, seqlen_k, window_left, window_right, heads_kv, group,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one kv head, summed over the q heads of its GQA group
    inside the program: deterministic, no atomics. DK/DV are contiguous like K."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_kv).to(tl.int64)
    kv_head = pid_bh % heads_kv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < seqlen_k
    ok = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=ok, other=0.0)
    v = tl.load(V + b * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=ok, other=0.0)
    keep = col_ok
    if HAS_KEY_MASK:
        keep = tl.load(KeyMask + b * stride_mb + cols * stride_mn, mask=col_ok, other=0) != 0

    # Query rows that see these keys: position p sees key j iff j - right <= p <= j + left.
    shift = seqlen_k - seqlen_q
    last = tl.minimum((pid_n + 1) * BLOCK_N, seqlen_k) - 1 - shift
    lo, full_lo, full_hi, hi = _span(pid_n * BLOCK_N - shift, last, window_right, window_left, seqlen_q, BLOCK_M)
    qoffs_d = offs_d * stride_qd
    dooffs_d = offs_d * stride_dd

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group):
        head = kv_head * group + g
        q_base = Q + b * stride_qb + head * stride_qh
        do_base = DOut + b * stride_db + head * stride_dh
        row_base = (b * heads_kv * group + head) * seqlen_q
        dk, dv = _bwd_dkdv_blocks(
            dk, dv, k, v, keep, q_base, do_base, Lse + row_base, Delta + row_base, lo, full_lo,
            cols, shift, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_log2,
            stride_qm, stride_dm, offs_m, qoffs_d, dooffs_d, d_ok,
            True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_blocks(
            dk, dv, k, v, keep, q_base, do_base, Lse + row_base, Delta + row_base, full_lo, full_hi,
            cols, shift, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_log2,
            stride_qm, stride_dm, offs_m, qoffs_d, dooffs_d, d_ok,
            False, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_blocks(
            dk, dv, k, v, keep, q_base, do_base, Lse + row_base, Delta + row_base, full_hi, hi,
            cols, shift, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_log2,
            stride_qm, stride_dm, offs_m, qoffs_d, dooffs_d, d_ok,
            True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
    out_off = ((b * seqlen_k + cols[:, None]) * heads_kv + kv_head) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch settings


def _fwd_default(*, interpreted: bool, head_dim: int, dtype: str, pack: int) -> autotune.Config:
    if interpreted:
        return autotune.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    if pack > 1:  # decode: few rows per kv head, the key loop is all that matters
        return autotune.Config({"BLOCK_M": 16 if pack <= 16 else 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    wide = dtype == "float32"
    if head_dim <= 64:
        return autotune.Config({"BLOCK_M": 128, "BLOCK_N": 32 if wide else 64}, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return autotune.Config({"BLOCK_M": 64 if wide else 128, "BLOCK_N": 32 if wide else 64}, num_warps=8, num_stages=3)
    return autotune.Config({"BLOCK_M": 64, "BLOCK_N": 16 if wide else 32}, num_warps=8, num_stages=2)


def _bwd_default(*, interpreted: bool, head_dim: int, dtype: str) -> autotune.Config:
    if interpreted:
        return autotune.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    wide = dtype == "float32"
    if head_dim <= 64:
        return autotune.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return autotune.Config({"BLOCK_M": 32 if wide else 64, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    return autotune.Config({"BLOCK_M": 16 if wide else 32, "BLOCK_N": 32}, num_warps=8, num_stages=1)


autotune.register("attention_fwd", _fwd_default)
autotune.register("attention_bwd", _bwd_default)


# ----------------------------------------------------------------------------- validation


def check_attention_args(
    q, k, v, *, causal, window_size, softcap, softmax_scale, k_name="k", v_name="v"
) -> tuple[int, int, float]:
    """Validate the common attention arguments; returns (window_left, window_right, scale)
    with causal folded into the window (right = 0) and -1 kept for unbounded."""
    check_tensor("q", q, shape="(batch, seqlen_q, heads_q, head_dim)", ndim=4)
    check_tensor(k_name, k, shape="(batch, seqlen_k, heads_kv, head_dim)", ndim=4)
    check_tensor(v_name, v, shape="(batch, seqlen_k, heads_kv, head_dim)", ndim=4)
    check_like(k_name, k, "q", q)
    check_like(v_name, v, "q", q)
    batch, _, heads_q, head_dim = q.shape
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    check_dim(k_name, k, 0, batch, "batch (as q)")
    check_dim(k_name, k, 3, head_dim, "head_dim (as q)")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{v_name}: shape {tuple(v.shape)} must equal {k_name}'s {tuple(k.shape)}")
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"{k_name}: heads_kv = {heads_kv} must divide q's heads_q = {heads_q} (GQA/MQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected bool, got {type(causal).__name__}")
    left, right = _check_window(window_size)
    if causal:
        if right > 0:
            raise ValueError(f"window_size: causal=True needs a right window of 0 or -1, got {window_size}")
        right = 0
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    elif not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: expected a finite float > 0 or None, got {softmax_scale!r}")
    return left, right, float(softmax_scale)


def _check_window(window_size) -> tuple[int, int]:
    ok = (
        isinstance(window_size, (tuple, list))
        and len(window_size) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    )
    if not ok:
        raise ValueError(f"window_size: expected (left, right) ints >= -1 (-1 = unbounded), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def check_key_padding_mask(mask, batch: int, seqlen_k: int, ref: torch.Tensor) -> None:
    """key_padding_mask: None or bool (batch, seqlen_k) on ref's device, True = attend."""
    if mask is None:
        return
    check_tensor("key_padding_mask", mask, shape="(batch, seqlen_k)", ndim=2, dtypes=(torch.bool,))
    if tuple(mask.shape) != (batch, seqlen_k):
        raise ValueError(f"key_padding_mask: expected shape (batch, seqlen_k) = {(batch, seqlen_k)}, got {tuple(mask.shape)}")
    if mask.device != ref.device:
        raise ValueError(f"key_padding_mask: device {mask.device} differs from q's {ref.device}")


# ----------------------------------------------------------------------------- launchers


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products; the low-precision dtypes ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _score_scales(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_log2) for `_logits`."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _reach(window: int, unbounded: int) -> int:
    return unbounded if window < 0 else window


def launch_forward(
    q, k, v, out, lse, *, key_padding_mask, seqlens_k, window_left, window_right, softcap, scale,
    max_seqlen_k, pack=1, num_splits=1, split_len=None,
):
    """Run `_attn_fwd_kernel`. out/lse are (batch, seqlen_q, heads_q, head_dim) and
    (batch, heads_q, seqlen_q), or carry a leading split dim when num_splits > 1.
    seqlens_k: None (all rows see k.shape[1] keys) or int32 (batch,) per-batch lengths."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    if batch * seqlen_q * heads_q == 0:
        return
    config = autotune.lookup("attention_fwd", head_dim=head_dim, dtype=_dtype_name(q.dtype), pack=pack)
    block_m = config.meta["BLOCK_M"]
    unbounded = max_seqlen_k + seqlen_q + 1
    qk_scale, cap_log2 = _score_scales(scale, softcap)
    o_strides = out.stride() if num_splits > 1 else (0, *out.stride())
    l_strides = lse.stride() if num_splits > 1 else (0, *lse.stride())
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    grid = (triton.cdiv(seqlen_q * pack, block_m), batch * heads_q // pack, num_splits)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, seqlens_k if seqlens_k is not None else q,
        qk_scale, cap_log2, seqlen_q, k.shape[1], _reach(window_left, unbounded),
        _reach(window_right, unbounded), split_len or unbounded, heads_q, heads_q // k.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *l_strides, *mask_strides,
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), PACK=pack,
        SOFTCAP=softcap > 0, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_SEQLENS=seqlens_k is not None, PRECISION=_precision(q.dtype), **config.launch_kwargs(),
    )


def _launch_backward(dout, q, k, v, out, lse, key_padding_mask, window_left, window_right, softcap, scale):
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch * heads_q * seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    config = autotune.lookup("attention_bwd", head_dim=head_dim, dtype=_dtype_name(q.dtype))
    meta = config.launch_kwargs()
    block_d = max(triton.next_power_of_2(head_dim), 16)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads_q)](
        out, dout, delta, seqlen_q, heads_q, *out.stride(), *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=meta["BLOCK_M"],
    )
    unbounded = seqlen_q + seqlen_k + 1
    qk_scale, cap_log2 = _score_scales(scale, softcap)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    common = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, SOFTCAP=softcap > 0,
        HAS_KEY_MASK=key_padding_mask is not None, PRECISION=_precision(q.dtype), **meta,
    )
    scalars = (scale, qk_scale, cap_log2, seqlen_q, seqlen_k,
               _reach(window_left, unbounded), _reach(window_right, unbounded))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mask_strides)
    _attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads_q)](
        q, k, v, dout, lse, delta, dq, mask, *scalars, heads_q, heads_q // heads_kv, *strides, **common
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, mask, *scalars, heads_kv, heads_q // heads_kv, *strides, **common
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op("tritium::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
    window_left: int, window_right: int, softcap: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads_q, head_dim = q.shape
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    launch_forward(
        q, k, v, out, lse, key_padding_mask=key_padding_mask, seqlens_k=None,
        window_left=window_left, window_right=window_right, softcap=softcap, scale=softmax_scale,
        max_seqlen_k=k.shape[1],
    )
    return out, lse


@_forward_op.register_fake
def _(q, k, v, key_padding_mask, window_left, window_right, softcap, softmax_scale):
    batch, seqlen_q, heads_q, head_dim = q.shape
    return q.new_empty((batch, seqlen_q, heads_q, head_dim)), q.new_empty(
        (batch, heads_q, seqlen_q), dtype=torch.float32
    )


@torch.library.custom_op("tritium::flash_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
    window_left: int, window_right: int, softcap: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dout, q, k, v, out, lse, key_padding_mask, window_left, window_right, softcap, softmax_scale)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, window_left, window_right, softcap, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper over the forward/backward custom ops (which torch.compile sees)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, window_left, window_right, softcap, softmax_scale):
        out, lse = _forward_op(q, k, v, key_padding_mask, window_left, window_right, softcap, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (window_left, window_right, softcap, softmax_scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _backward_op(dout, q, k, v, out, lse, key_padding_mask, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Exact softmax attention without materialising the scores; differentiable.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim),
    any strides, heads_q a multiple of heads_kv (GQA/MQA), head_dim in [16, 256];
    float16, bfloat16 or float32, accumulated in float32.

    causal: mask aligned bottom-right (query i sits at position i + seqlen_k - seqlen_q).
    window_size: (left, right); key j is visible to the query at position p iff
        p - left <= j <= p + right, -1 = unbounded. Hugging Face's sliding_window=W is (W-1, 0).
    softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap) (Gemma 2: 50).
    softmax_scale: defaults to head_dim ** -0.5.
    key_padding_mask: (batch, seqlen_k) bool, True = attend.
    A query that sees no key outputs 0 (lse -inf).

    Returns out (batch, seqlen_q, heads_q, head_dim) in q's dtype, and with return_lse also
    lse (batch, heads_q, seqlen_q) float32, the natural-log normaliser of each row.
    """
    left, right, scale = check_attention_args(
        q, k, v, causal=causal, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale
    )
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q)
    out, lse = FlashAttentionFunction.apply(q, k, v, key_padding_mask, left, right, float(softcap), scale)
    return (out, lse) if return_lse else out
