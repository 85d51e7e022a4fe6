"""Flash attention backward: dQ, and dK/dV summed over each GQA group inside one program
(deterministic, no atomics). P is recomputed from the forward's lse with the same span,
mask and score helpers as the forward pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels import attention_tuning as tuning
from tritium.kernels.activations import tanh
from tritium.kernels.online_softmax import (
    block_span,
    bwd_delta_kernel,
    head_block,
    heavier_later,
    heaviest_first,
    logits,
    lse_log2,
    score_scales,
    visible,
    window_reach,
)
from tritium.kernels.tiles import dot, dot_precision, load_rows, rounded
from tritium.runtime import cdiv


@triton.jit
def _bwd_dq_blocks(
    dq, q, do, lse2, delta, k_base, v_base, km_base, start, end,
    pos, seqlen_k, left, right, qk_scale, cap_log2,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_n, offs_d, d_ok,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq += dS @ K over key blocks [start, end), recomputing P from lse."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok[None, :]
        k = load_rows(k_base, cols, stride_kn, offs_d, stride_kd, kv_ok)
        v = load_rows(v_base, cols, stride_vn, offs_d, stride_vd, kv_ok)
        s, t = logits(q, tl.trans(k), qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(visible(pos[:, None], cols[None, :], left, right, seqlen_k), s, float("-inf"))
        if HAS_KEY_MASK:
            keep = tl.load(km_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = dot(do, tl.trans(v), None, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot(rounded(ds, k.dtype), k, dq, PRECISION)
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
    SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr, REVERSE: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one head: the forward's loop with the gradient inside.
    DQ is contiguous (batch, seqlen_q, heads_q, head_dim). Query tiles launch heaviest
    first, as in the forward (the last first under causal)."""
    pid_m = heaviest_first(tl.program_id(0), tl.num_programs(0), REVERSE)
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

    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, ok)
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, stride_dm, offs_d, stride_dd, ok)
    lse2 = lse_log2(Lse + pid_bh.to(tl.int64) * seqlen_q, rows, row_ok)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)

    shift = seqlen_k - seqlen_q
    pos = rows + shift
    last = tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q) - 1 + shift
    lo, full_lo, full_hi, hi = block_span(pid_m * BLOCK_M + shift, last, window_left, window_right, seqlen_k, BLOCK_N)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    km_base = KeyMask + b * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, lo, full_lo, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                        stride_mn, offs_n, offs_d, d_ok, True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, full_lo, full_hi, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                        stride_mn, offs_n, offs_d, d_ok, False, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, k_base, v_base, km_base, full_hi, hi, pos, seqlen_k,
                        window_left, window_right, qk_scale, cap_log2, stride_kn, stride_kd, stride_vn, stride_vd,
                        stride_mn, offs_n, offs_d, d_ok, True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_N)
    dq_ptrs = DQ + ((b * seqlen_q + rows[:, None]) * heads_q + h) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, rounded(dq * sm_scale, DQ.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dkdv_blocks(
    dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, start, end,
    cols, shift, seqlen_q, seqlen_k, left, right, qk_scale, cap_log2,
    stride_qm, stride_qd, stride_dm, stride_dd, offs_m, offs_d, d_ok,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV (transposed view: keys are rows) over query blocks [start, end) of one head."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        ok = row_ok[:, None] & d_ok[None, :]
        q = load_rows(q_base, rows, stride_qm, offs_d, stride_qd, ok)
        do = load_rows(do_base, rows, stride_dm, offs_d, stride_dd, ok)
        lse2 = lse_log2(lse_base, rows, row_ok)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sT, tT = logits(k, tl.trans(q), qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            seen = visible(rows[None, :] + shift, cols[:, None], left, right, seqlen_k) & row_ok[None, :]
            sT = tl.where(seen, sT, float("-inf"))
        if HAS_KEY_MASK:
            sT = tl.where(keep[:, None], sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dv = dot(rounded(pT, do.dtype), do, dv, PRECISION)
        dpT = dot(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = dot(rounded(dsT, q.dtype), q, dk, PRECISION)
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
    SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr, REVERSE: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one kv head, summed over the q heads of its GQA group
    inside the program: deterministic, no atomics. DK/DV are contiguous like K. Key tiles
    launch heaviest first (REVERSE: `heavier_later` with the reaches swapped, as the queries
    that see key j are [j - right, j + left]; under causal the first key tiles are the
    heaviest and stay in order)."""
    pid_n = heaviest_first(tl.program_id(0), tl.num_programs(0), REVERSE)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_kv).to(tl.int64)
    kv_head = pid_bh % heads_kv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < seqlen_k
    ok = col_ok[:, None] & d_ok[None, :]

    k = load_rows(K + b * stride_kb + kv_head * stride_kh, cols, stride_kn, offs_d, stride_kd, ok)
    v = load_rows(V + b * stride_vb + kv_head * stride_vh, cols, stride_vn, offs_d, stride_vd, ok)
    keep = col_ok
    if HAS_KEY_MASK:
        keep = tl.load(KeyMask + b * stride_mb + cols * stride_mn, mask=col_ok, other=0) != 0

    # Query rows that see these keys: position p sees key j iff j - right <= p <= j + left.
    shift = seqlen_k - seqlen_q
    last = tl.minimum((pid_n + 1) * BLOCK_N, seqlen_k) - 1 - shift
    lo, full_lo, full_hi, hi = block_span(pid_n * BLOCK_N - shift, last, window_right, window_left, seqlen_q, BLOCK_M)

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
            stride_qm, stride_qd, stride_dm, stride_dd, offs_m, offs_d, d_ok,
            True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_blocks(
            dk, dv, k, v, keep, q_base, do_base, Lse + row_base, Delta + row_base, full_lo, full_hi,
            cols, shift, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_log2,
            stride_qm, stride_qd, stride_dm, stride_dd, offs_m, offs_d, d_ok,
            False, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_blocks(
            dk, dv, k, v, keep, q_base, do_base, Lse + row_base, Delta + row_base, full_hi, hi,
            cols, shift, seqlen_q, seqlen_k, window_left, window_right, qk_scale, cap_log2,
            stride_qm, stride_qd, stride_dm, stride_dd, offs_m, offs_d, d_ok,
            True, SOFTCAP, HAS_KEY_MASK, PRECISION, BLOCK_M)
    out_off = ((b * seqlen_k + cols[:, None]) * heads_kv + kv_head) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, rounded(dk * sm_scale, DK.dtype.element_ty), mask=ok)
    tl.store(DV + out_off, rounded(dv, DV.dtype.element_ty), mask=ok)


DELTA_BLOCK_M = 32
ATTENTION_BWD_DQ = autotune.Kernel(
    "attention_bwd_dq", space=tuning.BWD_SPACE, key=tuning.attention_bucket, default=tuning.dq_default,
    interpreter=tuning.INTERPRETER, prune=tuning.bwd_fits,
    sources=(_attn_bwd_dq_kernel, _bwd_dq_blocks, block_span, heaviest_first, visible, logits, lse_log2, load_rows, dot,
             rounded, tanh),
)
ATTENTION_BWD_DKDV = autotune.Kernel(
    "attention_bwd_dkdv", space=tuning.BWD_SPACE, key=tuning.attention_bucket, default=tuning.dkdv_default,
    interpreter=tuning.INTERPRETER, prune=tuning.bwd_fits,
    sources=(_attn_bwd_dkdv_kernel, _bwd_dkdv_blocks, block_span, heaviest_first, visible, logits, lse_log2, load_rows,
             dot, rounded, tanh),
)


def launch_backward(dout, q, k, v, out, lse, key_padding_mask, window_left, window_right, softcap, scale):
    """Gradients (dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch * heads_q * seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = head_block(head_dim)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    bwd_delta_kernel[(cdiv(seqlen_q, DELTA_BLOCK_M), batch * heads_q)](
        out, dout, delta, seqlen_q, heads_q, *out.stride(), *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M,
    )
    unbounded = seqlen_q + seqlen_k + 1
    qk_scale, cap_log2 = score_scales(scale, softcap)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, SOFTCAP=softcap > 0,
                     HAS_KEY_MASK=key_padding_mask is not None, PRECISION=dot_precision(q.dtype))
    scalars = (scale, qk_scale, cap_log2, seqlen_q, seqlen_k,
               window_reach(window_left, unbounded), window_reach(window_right, unbounded))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mask_strides)
    group = heads_q // heads_kv

    def launch_dq(config):
        _attn_bwd_dq_kernel[(cdiv(seqlen_q, config.meta["BLOCK_M"]), batch * heads_q)](
            q, k, v, dout, lse, delta, dq, mask, *scalars, heads_q, group, *strides,
            REVERSE=heavier_later(window_left, window_right), **constants, **config.launch_kwargs())

    def launch_dkdv(config):  # the queries that see key j are [j - right, j + left]: the reaches swap
        _attn_bwd_dkdv_kernel[(cdiv(seqlen_k, config.meta["BLOCK_N"]), batch * heads_kv)](
            q, k, v, dout, lse, delta, dk, dv, mask, *scalars, heads_kv, group, *strides,
            REVERSE=heavier_later(window_right, window_left), **constants, **config.launch_kwargs())

    problem = dict(head_dim=head_dim, dtype=q.dtype, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                   window_left=window_left, window_right=window_right, softcap=softcap, group=group)
    launch_dq(ATTENTION_BWD_DQ.lookup(launch_dq, **problem))
    launch_dkdv(ATTENTION_BWD_DKDV.lookup(launch_dkdv, **problem))
    return dq, dk, dv
