"""Dense flash attention: the forward kernel, its autograd op and `flash_attention`.

Layout (batch, seqlen, heads, head_dim), any strides. Every variant — causal (bottom-right
aligned), sliding window, softcap, GQA, key padding, split-KV decode — runs through one
forward kernel built on the helpers of `online_softmax.py`: `block_span` says which key
blocks a tile sees and which of them need a mask, so only the edges of the span pay for
masking.
The backward pass lives in `attention_backward.py`, the KV-cache op in
`attention_kvcache.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels import attention_tuning as tuning
from tritium.kernels.activations import tanh
from tritium.kernels.attention_backward import launch_backward
from tritium.kernels.online_softmax import (
    block_span,
    head_block,
    heavier_later,
    heaviest_first,
    logits,
    score_scales,
    softmax_step,
    visible,
    window_reach,
)
from tritium.kernels.tiles import dot, dot_precision, rounded
from tritium.kernels.validation import check_dim, check_float, check_head_dim, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, run_function

# The kernels get the scale and softcap as float32 factors of the scores (in log2 units):
# softmax_scale * log2(e) without softcap; softmax_scale / softcap and softcap * log2(e)
# with it. With both in [1e-18, 1e18] each factor is a finite float32 (an inf factor turns
# a zero product into NaN, and +inf scores make the softmax NaN), softmax_scale / softcap is
# at most 1e36 (float32 ends at 3.4e38), and scores stay finite for |q . k| up to 2e20:
# float16 inputs (|q . k| <= 256 * 65504**2, 1.1e12) can never overflow them. A softcap
# outside the range has no use: below, every score is within 1e-18 of 0; above, every
# score below 1e14 is left as it is (to float32 precision).
MAX_SOFTMAX_SCALE = 1e18
MIN_SOFTCAP, MAX_SOFTCAP = 1e-18, 1e18


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
        s, _ = logits(q, kT, qk_scale, cap_log2, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(visible(pos[:, None], cols[None, :], left, right, seqlen_k), s, float("-inf"))
        if HAS_KEY_MASK:
            keep = tl.load(km_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def split_span(lo, hi, split, num_splits, BLOCK_N: tl.constexpr):
    """Part `split` of `num_splits` of the key range [lo, hi) (lo a multiple of BLOCK_N):
    whole blocks, spread evenly (the parts' block counts differ by at most one, so every
    split has work when the range has num_splits blocks or more), in order, possibly
    empty (lo = hi). The block arithmetic is int64: blocks * split passes 2**31 on a cache
    of 2**27 blocks."""
    blocks = (hi.to(tl.int64) - lo + BLOCK_N - 1) // BLOCK_N
    start = lo + (split * blocks // num_splits) * BLOCK_N
    end = lo + ((split + 1) * blocks // num_splits) * BLOCK_N
    return start.to(tl.int32), tl.minimum(end, hi).to(tl.int32)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KeyMask, SeqlensK,
    qk_scale, cap_log2, seqlen_q, seqlen_k, seqlen_new, window_left, window_right, num_splits, heads_q, group,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn, stride_sb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, PRECISION: tl.constexpr, REVERSE: tl.constexpr,
):
    """One program: BLOCK_M rows of one batch element, over the key range of one split.

    A row is (query t, head g of a pack of PACK q heads sharing one kv head): PACK = 1 for
    prefill (one head per program), PACK = the GQA group for decode, where a few queries
    per head would leave the tile empty. The tile's key span (its window and causal limits
    within its sequence's length) is cut into num_splits parts of whole key blocks
    (`split_span`), one per split; Out/Lse get a split stride (0 when there is one split).
    HAS_SEQLENS: batch element b sees its first min(clamp(SeqlensK[b], 0, seqlen_k) +
    seqlen_new, seqlen_k) keys (the KV cache's rows, cached then appended), so the splits
    follow the filled length, not the cache's capacity.
    Query tiles launch heaviest first (`heaviest_first`; REVERSE: the last first, under causal).
    """
    pid_m = heaviest_first(tl.program_id(0), tl.num_programs(0), REVERSE)
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
        # Device values, unchecked under capture: clamped in their own dtype (an int64
        # length past 2**31 stays exact) before any index is formed from them, so no key
        # past k's seqlen_k rows is ever read.
        cached = tl.load(SeqlensK + b.to(tl.int64) * stride_sb)
        cached = tl.minimum(tl.maximum(cached, 0), seqlen_k)
        seqlen_k = tl.minimum(cached + seqlen_new, seqlen_k).to(tl.int32)
    shift = seqlen_k - seqlen_q
    pos = t + shift
    first = pid_m * BLOCK_M // PACK + shift
    last = (tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q * PACK) - 1) // PACK + shift
    lo, full_lo, full_hi, hi = block_span(first, last, window_left, window_right, seqlen_k, BLOCK_N)
    if num_splits != 1:  # 1 (prefill) is a specialised constant: no split arithmetic at all
        lo, hi = split_span(lo, hi, split, num_splits, BLOCK_N)
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
    tl.store(o_ptrs, rounded(out, Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + split * stride_ls + b64 * stride_lb + head * stride_lh + t * stride_lm
    tl.store(l_ptrs, lse, mask=row_ok)


ATTENTION_FWD = autotune.Kernel(
    "attention_fwd", space=tuning.FWD_SPACE, key=tuning.attention_bucket, default=tuning.fwd_default,
    interpreter=tuning.INTERPRETER, prune=tuning.fwd_fits,
    sources=(_attn_fwd_kernel, _fwd_blocks, block_span, heaviest_first, split_span, visible, logits, softmax_step, dot,
             rounded, tanh),
)


def forward_config(q, k, *, window_left, window_right, softcap, pack=1, launch=None) -> autotune.Config:
    """The forward kernel's config for this problem; launch(config) enables tuning on a miss."""
    _, seqlen_q, heads_q, head_dim = q.shape
    _, seqlen_k, heads_kv, _ = k.shape
    return ATTENTION_FWD.lookup(
        launch, head_dim=head_dim, dtype=q.dtype, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        window_left=window_left, window_right=window_right, softcap=softcap, group=heads_q // heads_kv,
        pack=pack,
    )


def run_forward(q, k, out, lse, launch, *, pack=1, **options) -> None:
    """Fill out and lse for q against k: nothing to do without queries (batch, seqlen_q or
    heads_q 0), 0 and lse -inf without keys (no query sees one), else launch(config) with
    this problem's forward config. options: window_left, window_right, softcap."""
    if is_empty(*q.shape[:3]):
        return
    if is_empty(k.shape[1]):
        out.zero_()
        lse.fill_(float("-inf"))
        return
    launch(forward_config(q, k, pack=pack, launch=launch, **options))


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
    check_head_dim("q", q)
    batch, _, heads_q, head_dim = q.shape
    check_dim(k_name, k, 0, batch, "batch (as q)")
    check_dim(k_name, k, 3, head_dim, "head_dim (as q)")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{v_name}: shape {tuple(v.shape)} must equal {k_name}'s {tuple(k.shape)}")
    heads_kv = k.shape[2]
    if heads_kv == 0:  # even with heads_q = 0: the GQA group heads_q / heads_kv is undefined
        raise ValueError(f"{k_name}: heads_kv must be >= 1, got shape {tuple(k.shape)}")
    if heads_q % heads_kv:
        raise ValueError(f"{k_name}: heads_kv = {heads_kv} must divide q's heads_q = {heads_q} (GQA/MQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected bool, got {type(causal).__name__}")
    left, right = _check_window(window_size)
    if causal:
        if right > 0:
            raise ValueError(f"window_size: causal=True needs a right window of 0 or -1, got {window_size}")
        right = 0
    check_float("softcap", softcap, minimum=0.0, maximum=MAX_SOFTCAP, note=" (0 = off)")
    if 0 < softcap < MIN_SOFTCAP:
        raise ValueError(f"softcap: expected 0 (off) or a float in [{MIN_SOFTCAP:g}, {MAX_SOFTCAP:g}], got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    else:
        check_float("softmax_scale", softmax_scale, minimum=0.0, maximum=MAX_SOFTMAX_SCALE, strict=True, note=" or None")
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


def launch_forward(
    q, k, v, out, lse, config, *, key_padding_mask, seqlens_k, window_left, window_right, softcap, scale,
    max_seqlen_k, pack=1, num_splits=1, seqlen_new=0,
):
    """Run `_attn_fwd_kernel` with `config`. out/lse are (batch, seqlen_q, heads_q, head_dim)
    and (batch, heads_q, seqlen_q), or carry a leading split dim when num_splits > 1: each
    tile's key span is then cut into num_splits parts (on the device, from the lengths).
    seqlens_k: None (all rows see k.shape[1] keys) or an int32/int64 (batch,) tensor, any
    stride, of per-batch lengths; batch element b then sees min(clamp(seqlens_k[b], 0,
    k.shape[1]) + seqlen_new, k.shape[1]) keys."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    if is_empty(batch, seqlen_q, heads_q):
        return
    block_m = config.meta["BLOCK_M"]
    unbounded = max_seqlen_k + seqlen_q + 1
    qk_scale, cap_log2 = score_scales(scale, softcap)
    o_strides = out.stride() if num_splits > 1 else (0, *out.stride())
    l_strides = lse.stride() if num_splits > 1 else (0, *lse.stride())
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    grid = (cdiv(seqlen_q * pack, block_m), batch * heads_q // pack, num_splits)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, seqlens_k if seqlens_k is not None else q,
        qk_scale, cap_log2, seqlen_q, k.shape[1], seqlen_new, window_reach(window_left, unbounded),
        window_reach(window_right, unbounded), num_splits, heads_q, heads_q // k.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *l_strides, *mask_strides,
        seqlens_k.stride(0) if seqlens_k is not None else 0,
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), PACK=pack,
        SOFTCAP=softcap > 0, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_SEQLENS=seqlens_k is not None, PRECISION=dot_precision(q.dtype),
        REVERSE=heavier_later(window_left, window_right), **config.launch_kwargs(),
    )


@custom_op("tritium::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    window_left: int, window_right: int, softcap: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads_q, head_dim = q.shape
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    options = dict(window_left=window_left, window_right=window_right, softcap=softcap)

    def launch(config):
        launch_forward(q, k, v, out, lse, config, key_padding_mask=key_padding_mask, seqlens_k=None,
                       scale=softmax_scale, max_seqlen_k=k.shape[1], **options)

    run_forward(q, k, out, lse, launch, **options)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, key_padding_mask, window_left, window_right, softcap, softmax_scale):
    batch, seqlen_q, heads_q, head_dim = q.shape
    return q.new_empty((batch, seqlen_q, heads_q, head_dim)), q.new_empty(
        (batch, heads_q, seqlen_q), dtype=torch.float32
    )


@custom_op("tritium::flash_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    window_left: int, window_right: int, softcap: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(dout, q, k, v, out, lse, key_padding_mask, window_left, window_right, softcap, softmax_scale)


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
    any strides, heads_q a multiple of heads_kv (GQA/MQA), head_dim in [1, 256];
    float16, bfloat16 or float32, accumulated in float32.

    causal: mask aligned bottom-right (query i sits at position i + seqlen_k - seqlen_q).
    window_size: (left, right); key j is visible to the query at position p iff
        p - left <= j <= p + right, -1 = unbounded. Hugging Face's sliding_window=W is (W-1, 0).
    softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap) (Gemma 2: 50);
        0 or in [1e-18, 1e18].
    softmax_scale: defaults to head_dim ** -0.5; in (0, 1e18]. Scaled scores must stay in
        float32's range (|softmax_scale * q . k| < 2.3e38; float16 inputs always do).
    key_padding_mask: (batch, seqlen_k) bool, True = attend.
    A query that sees no key outputs 0 (lse -inf), seqlen_k = 0 included; batch, seqlen_q
    or heads_q 0 give empty results (heads_kv must be >= 1). Neither launches a kernel.

    Returns out (batch, seqlen_q, heads_q, head_dim) in q's dtype, and with return_lse also
    lse (batch, heads_q, seqlen_q) float32, the natural-log normaliser of each row.
    """
    left, right, scale = check_attention_args(
        q, k, v, causal=causal, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale
    )
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q)
    out, lse = run_function(FlashAttentionFunction, q, k, v, key_padding_mask, left, right, float(softcap), scale)
    return (out, lse) if return_lse else out
