"""KV-cache attention for decode: append new keys/values to a preallocated cache and attend
to it with split-KV, so that one sequence at 32k context still fills the GPU.

The attention itself is `attention._attn_fwd_kernel` with the q heads of a GQA group packed
into the rows of one tile (each cached key is read once per group) and the key range cut
into splits whose partial results `_combine_kernel` merges by their log-sum-exp. The host
picks the number of splits from shapes; each program cuts the keys its own sequence sees
(its filled length, window and causal limits, read on the device) into that many parts,
so a short sequence in a long cache, or a window's worth of keys, still spreads over every
split. Free of host syncs under CUDA-graph capture and torch.compile; an eager call with a
tensor cache_seqlens reads it once, for its range check.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium.kernels.attention import check_attention_args, check_key_padding_mask, launch_forward, run_forward
from tritium.kernels.online_softmax import head_block, merge_result, merge_step
from tritium.kernels.tiles import rounded
from tritium.kernels.validation import check_dim, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, interpreted, needs_grad, sm_count, values_readable

MAX_SPLITS = 64


@triton.jit
def _append_kernel(
    KCache, VCache, K, V, CacheSeqlens, seqlen_new, max_seqlen, heads_kv, stride_sb,
    stride_cb, stride_cn, stride_ch, stride_cd,
    stride_vcb, stride_vcn, stride_vch, stride_vcd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Copy k/v (batch, seqlen_new, heads_kv, d) into the caches at rows start + t, start =
    cache_seqlens[b] clamped to [0, max_seqlen]; rows at or past max_seqlen are dropped. The
    host rejects such lengths before launch when it may sync; under capture it cannot, and
    this clamp is what keeps every store inside the caches."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_kv).to(tl.int64)
    h = pid_bh % heads_kv
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    start = tl.load(CacheSeqlens + b * stride_sb)  # int32 or int64: clamped before any widening
    dst = tl.minimum(tl.maximum(start, 0), max_seqlen).to(tl.int64) + t
    ok = ((t < seqlen_new) & (dst < max_seqlen))[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + t[:, None] * stride_kn + d[None, :] * stride_kd, mask=ok)
    v = tl.load(V + b * stride_vb + h * stride_vh + t[:, None] * stride_vn + d[None, :] * stride_vd, mask=ok)
    tl.store(KCache + b * stride_cb + h * stride_ch + dst[:, None] * stride_cn + d[None, :] * stride_cd, k, mask=ok)
    tl.store(VCache + b * stride_vcb + h * stride_vch + dst[:, None] * stride_vcn + d[None, :] * stride_vcd, v, mask=ok)


@triton.jit
def _combine_kernel(
    OutPart, LsePart, Out, Lse, num_splits, seqlen_q, heads_q,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_ls, stride_lb, stride_lh,
    stride_ob, stride_om, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of one (batch, query, head) row, in split order (`merge_step`)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid // heads_q
    h = pid % heads_q
    d = tl.arange(0, BLOCK_D)[None, :]  # the row as a (1, BLOCK_D) tile
    row = tl.zeros([1], dtype=tl.int64) + t
    acc = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    for s in range(num_splits):
        lse_s = tl.load(LsePart + s * stride_ls + b * stride_lb + h * stride_lh + row)
        part = tl.load(OutPart + s * stride_ps + b * stride_pb + t * stride_pm + h * stride_ph + d,
                       mask=d < HEAD_DIM, other=0.0)
        acc, m, total = merge_step(acc, m, total, part, lse_s * 1.4426950408889634)  # to log2 units
    out, lse = merge_result(acc, m, total)
    tl.store(Out + b * stride_ob + t * stride_om + h * stride_oh + d, rounded(out, Out.dtype.element_ty),
             mask=d < HEAD_DIM)
    tl.store(Lse + (b * heads_q + h) * seqlen_q + row, lse)


def _split_count(q: torch.Tensor, heads_kv: int, max_seqlen: int, pack: int, block_n: int, requested: int,
                 window_left: int, window_right: int) -> int:
    """How many parts each tile's key span is cut into: `requested`, or (0) enough that
    batch x kv heads x splits programs cover the SMs twice, and one split when the batch
    already does; never more than the key blocks a tile can see (the cache's, or a bounded
    window's). The kernel cuts each sequence's own span (`attention.split_span`), from its
    length on the device: the count depends on shapes only, so no value of cache_seqlens
    is read (no sync, safe in CUDA-graph capture)."""
    span = max_seqlen
    if window_left >= 0 and window_right >= 0:  # keys [first - left, last + right]: block-aligned, one more block
        span = min(span, q.shape[1] + window_left + window_right + block_n)
    n_blocks = max(cdiv(span, block_n), 1)
    splits = requested
    if not splits and interpreted():  # exercise the split path on small CPU shapes too
        splits = 4
    elif not splits:
        programs = q.shape[0] * heads_kv * cdiv(q.shape[1] * pack, 16)
        sms = sm_count(q.device)  # the pretended GPU's inside compile_only.compile_for
        splits = 1 if programs >= sms else min(cdiv(2 * sms, programs), MAX_SPLITS)
    return max(min(splits, n_blocks), 1)


def _append(k_cache, v_cache, k, v, cache_seqlens):
    batch, seqlen_new, heads_kv, head_dim = k.shape
    if is_empty(batch, seqlen_new, heads_kv):
        return
    block_t = 16
    _append_kernel[(cdiv(seqlen_new, block_t), batch * heads_kv)](
        k_cache, v_cache, k, v, cache_seqlens, seqlen_new, k_cache.shape[1], heads_kv, cache_seqlens.stride(0),
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK_T=block_t,
    )


@custom_op("tritium::flash_attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k: Optional[torch.Tensor], v: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    window_left: int, window_right: int, softcap: float, softmax_scale: float, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads_q, head_dim = q.shape
    max_seqlen, heads_kv = k_cache.shape[1], k_cache.shape[2]
    # cache_seqlens goes to the kernels as given (int32 or int64, any stride): they clamp
    # it, add the new tokens and read it with its stride, with no host op in between.
    seqlen_new = 0
    if k is not None:
        _append(k_cache, v_cache, k, v, cache_seqlens)
        seqlen_new = k.shape[1]
    # Pack the GQA group into the tile rows while the rows stay few (decode); a long chunk
    # of new queries fills tiles on its own.
    group = heads_q // heads_kv
    pack = group if seqlen_q * group <= 64 else 1
    out = torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    window = dict(window_left=window_left, window_right=window_right, softcap=softcap)

    def launch(config):
        splits = _split_count(q, heads_kv, max_seqlen, pack, config.meta["BLOCK_N"], num_splits, window_left,
                              window_right)
        options = dict(key_padding_mask=key_padding_mask, seqlens_k=cache_seqlens, seqlen_new=seqlen_new,
                       scale=softmax_scale, max_seqlen_k=max_seqlen, pack=pack, **window)
        if splits == 1:
            launch_forward(q, k_cache, v_cache, out, lse, config, **options)
            return
        out_part = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
        launch_forward(q, k_cache, v_cache, out_part, lse_part, config, num_splits=splits, **options)
        _combine_kernel[(seqlen_q * heads_q, batch)](
            out_part, lse_part, out, lse, splits, seqlen_q, heads_q,
            *out_part.stride()[:4], *lse_part.stride()[:3], *out.stride()[:3],
            HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
        )

    run_forward(q, k_cache, out, lse, launch, pack=pack, **window)
    return out, lse


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, window_left, window_right, softcap, softmax_scale,
      num_splits):
    batch, seqlen_q, heads_q, head_dim = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


def _check_cache_args(q, k_cache, cache_seqlens, k, v) -> torch.Tensor:
    """Validate the cache-specific arguments; returns cache_seqlens as an int32/int64 tensor."""
    batch, max_seqlen = q.shape[0], k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k, v: give both new keys and new values, or neither")
    seqlen_new = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, shape="(batch, seqlen_new, heads_kv, head_dim)", ndim=4)
            check_like(name, x, "q", q)
            if (x.shape[0], x.shape[2], x.shape[3]) != (batch, *k_cache.shape[2:]):
                raise ValueError(
                    f"{name}: expected shape (batch, seqlen_new, heads_kv, head_dim) = "
                    f"({batch}, *, {k_cache.shape[2]}, {k_cache.shape[3]}), got {tuple(x.shape)}"
                )
        check_dim("v", v, 1, k.shape[1], "seqlen_new (as k)")
        seqlen_new = k.shape[1]
        if seqlen_new > max_seqlen:
            raise ValueError(f"k: {seqlen_new} new tokens do not fit a cache of max_seqlen {max_seqlen}")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= max_seqlen - seqlen_new:
            raise ValueError(
                f"cache_seqlens: {cache_seqlens} cached + {seqlen_new} new tokens do not fit "
                f"max_seqlen {max_seqlen} (expected 0 <= cache_seqlens <= {max_seqlen - seqlen_new})"
            )
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    check_tensor("cache_seqlens", cache_seqlens, shape="(batch,)", ndim=1, dtypes=(torch.int32, torch.int64))
    check_dim("cache_seqlens", cache_seqlens, 0, batch, "batch")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: device {cache_seqlens.device} differs from q's {q.device}")
    if values_readable(cache_seqlens) and not is_empty(batch):
        # A data-dependent check needs the values on the host: done whenever a sync is
        # allowed (and there are values), with one read of both ends. Under capture the
        # kernels clamp instead.
        lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()
        if lo < 0 or hi + seqlen_new > max_seqlen:
            raise ValueError(
                f"cache_seqlens: values in [{lo}, {hi}] with {seqlen_new} new tokens do not fit "
                f"max_seqlen {max_seqlen} (expected 0 <= cache_seqlens <= {max_seqlen - seqlen_new})"
            )
    return cache_seqlens


def flash_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
):
    """Attention of new queries against a preallocated KV cache (inference; no backward).

    q: (batch, seqlen_q, heads_q, head_dim); k_cache, v_cache: (batch, max_seqlen, heads_kv,
    head_dim), updated in place; cache_seqlens: int32/int64 (batch,) (any stride) or int, the
    number of tokens already cached per sequence (not updated: the caller advances it).
    k, v: optional new (batch, seqlen_new, heads_kv, head_dim), written into the cache at
    rows cache_seqlens[b] .. + seqlen_new before attending; sequence b then attends to its
    first cache_seqlens[b] + seqlen_new keys.
    key_padding_mask: optional bool (batch, max_seqlen) over the cache rows, True = attend
    (a left-padded batch: its pad rows stay hidden while the rows past each sequence's
    length are hidden anyway). causal/window/softcap/softmax_scale as in
    `flash_attention`, with query i at position i + seqlen_k[b] - seqlen_q.
    num_splits: how many parts each sequence's visible key range (after its length and
    window) is cut into, in whole key blocks (None = enough to fill the GPU).
    A tensor cache_seqlens is range-checked on the host (one sync per call: ValueError unless
    0 <= cache_seqlens[b] <= max_seqlen - seqlen_new) except under CUDA-graph capture or
    torch.compile, where the kernels clamp instead and never read or write outside the
    caches: a negative length counts as 0, one past max_seqlen as max_seqlen, new rows that
    would land at or past max_seqlen are not written and not attended, and sequence b
    attends to its first min(clamped length + seqlen_new, max_seqlen) rows. For sync-free
    eager decode pass an int, or capture the decode step in a CUDA graph.
    Empty sizes launch nothing needless: batch 0 or 0 new tokens write no cache row,
    seqlen_q 0 or heads_q 0 still append k/v but attend to nothing, and a max_seqlen 0
    cache gives out 0 and lse -inf.

    Returns out (batch, seqlen_q, heads_q, head_dim), and lse (batch, heads_q, seqlen_q)
    float32 with return_lse.
    """
    left, right, scale = check_attention_args(
        q, k_cache, v_cache, causal=causal, window_size=window_size, softcap=softcap,
        softmax_scale=softmax_scale, k_name="k_cache", v_name="v_cache",
    )
    if needs_grad(q, k_cache, v_cache, k, v):
        raise ValueError("flash_attention_with_kvcache is for inference and has no backward: an input requires grad "
                         "(use flash_attention to train, or call it under torch.no_grad())")
    seqlens = _check_cache_args(q, k_cache, cache_seqlens, k, v)
    check_key_padding_mask(key_padding_mask, q.shape[0], k_cache.shape[1], q)
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits: expected None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    out, lse = _kvcache_op(q, k_cache, v_cache, seqlens, k, v, key_padding_mask, left, right, float(softcap), scale, num_splits or 0)
    return (out, lse) if return_lse else out
