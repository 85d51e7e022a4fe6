"""BigBird block-sparse attention (ITC layout), exact to transformers' BigBirdPegasus.

Each query block walks its own list of key blocks — the two global blocks, the 3-block
window, its random blocks; every block for the global first and last query blocks — with
the online softmax of `online_softmax.py`. A key block listed twice is visited twice, which
counts it twice, as transformers' concatenation does. Masked keys get -10000 added to their
scaled score (not -inf); masked query rows output 0.

Load balance: a middle query block walks 5 + r key blocks, the global ones all of them. So
each global row is split over several programs of at most `split_blocks` key blocks (twice
a middle row's walk), launched first; each writes its partial output and log-sum-exp, and
`_bs_merge_kernel` combines them by their log-sum-exp, as split-KV decode does.

The backward pass is deterministic without atomics. dQ walks the forward's lists, its
global rows split the same way (their partial dQ summed by the merge kernel). dK/dV of a
key block walk its inverse list (`inverse_lists`: each query block that lists it, once,
with the number of times it does as a weight), built with the forward lists once per
layout; the global key blocks 0 and last, which every query block lists, are split too.

Memory safety: a random block index outside [0, num_blocks) is refused eagerly (a
ValueError, one host read of rand_attn per call); where values cannot be read (torch.compile
tracing, CUDA-graph capture, fake tensors) `block_lists` marks it -1 and `inverse_lists`
leaves it out, and the kernels also mask any listed block outside [0, num_blocks), any slot
past a list's width and any inverse entry past its tensor, so no index reaches a load or
store: such a block is ignored.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.kernels.attention import check_attention_args, check_key_padding_mask
from tritium.kernels.online_softmax import (
    bwd_delta_kernel,
    head_block,
    logits,
    lse_log2,
    merge_result,
    merge_step,
    softmax_step,
)
from tritium.kernels.tiles import dot, dot_precision, load_rows, rounded
from tritium.kernels.validation import check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, needs_grad, run_function, values_readable

MASK_PENALTY = -10000.0  # transformers' attn_mask_penalty, added to masked keys' scores
LOG2E = 1.4426950408889634
MERGE_VALUES = 2048  # elements of the (rows, BLOCK_D) tile one merge program combines


# ----------------------------------------------------------------------------- layout


def min_seqlen(block_size: int, num_random_blocks: int) -> int:
    """The shortest sequence the block-sparse layout is defined for: transformers uses full
    attention up to (5 + 2r) * block_size tokens."""
    return (5 + 2 * num_random_blocks) * block_size + block_size


def split_blocks(num_random_blocks: int) -> int:
    """Key blocks one program of a global query row (or, in dK/dV, of a global key block)
    walks: twice the 5 + r of a middle row, so no program has much more work than the
    others, and the partials to merge stay few: 2 * splits float32 blocks per head, about
    4 / split_blocks times the bytes of a bfloat16 output."""
    return 2 * (5 + num_random_blocks)


def _middle_rows(num_blocks: int, rand_attn: torch.Tensor) -> torch.Tensor:
    """(heads, num_blocks - 2, 5 + r) int64: the key blocks of query blocks 1 .. last-1 in
    the order they are visited — 0, i-1, i, i+1 (or blocks 1 and last-1's 4-block window),
    the r random blocks, and last (for blocks 1 and last-1, a repeat of block 0 past their
    count of 4 + r, never visited). A rand_attn index outside [0, num_blocks) becomes -1
    (int64 indices are tested before any narrowing could wrap them)."""
    heads = rand_attn.shape[0]
    last = num_blocks - 1
    device = rand_attn.device
    middle = torch.arange(1, last, device=device)
    window = torch.stack([torch.zeros_like(middle), middle - 1, middle, middle + 1,
                          torch.full_like(middle, last)], dim=1)
    window[0] = torch.tensor([0, 1, 2, last, 0], device=device)
    window[-1] = torch.tensor([0, last - 2, last - 1, last, 0], device=device)
    random = rand_attn.to(device=device, dtype=window.dtype)
    random = torch.where((random >= 0) & (random < num_blocks), random, -1)
    sparse = torch.cat([window.expand(heads, -1, -1), random], dim=2)
    return torch.cat([sparse[:, :, :4], sparse[:, :, 5:], sparse[:, :, 4:5]], dim=2)


def block_lists(num_blocks: int, rand_attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: (lists (heads, num_blocks, width) int32, counts (num_blocks,)
    int32). Row i holds the key blocks query block i visits, duplicates kept; rows 0 and
    last hold every block; a rand_attn index outside [0, num_blocks) becomes -1 (the
    kernels skip it). Built with tensor ops on rand_attn's device, read with its strides:
    no host sync."""
    heads, _, r = rand_attn.shape
    last = num_blocks - 1
    device = rand_attn.device
    sparse = _middle_rows(num_blocks, rand_attn)
    width = max(num_blocks, sparse.shape[2])
    lists = torch.zeros(heads, num_blocks, width, dtype=torch.int32, device=device)
    lists[:, 0, :num_blocks] = torch.arange(num_blocks, device=device, dtype=torch.int32)
    lists[:, last, :num_blocks] = lists[:, 0, :num_blocks]
    lists[:, 1:last, : sparse.shape[2]] = sparse.to(torch.int32)
    counts = torch.full((num_blocks,), 5 + r, dtype=torch.int32, device=device)
    counts[0] = counts[last] = num_blocks
    counts[1] = counts[last - 1] = 4 + r
    return lists, counts


def inverse_lists(num_blocks: int, rand_attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose of `block_lists`, for dK/dV: (offsets (heads, num_blocks + 1) int32,
    entries (heads, 2, capacity) int32). For head h, key block j's entries are
    [offsets[h, j], offsets[h, j + 1]): entries[h, 0, e] a query block that lists j (each
    once, ascending) and entries[h, 1, e] how many times it lists it (>= 1; a block listed
    twice counts twice). Every query block lists blocks 0 and last, so those two have
    num_blocks entries, the others a handful. capacity = 2 * num_blocks + (num_blocks - 2)
    * (5 + r) bounds the entries of every layout; past offsets[h, num_blocks] the entries
    are unused. rand_attn indices outside [0, num_blocks) are left out. Tensor ops on
    rand_attn's device with shapes known from the arguments (a sort, a scan, scatters and a
    search): no host sync, so it runs under torch.compile and CUDA-graph capture."""
    heads = rand_attn.shape[0]
    last = num_blocks - 1
    device = rand_attn.device
    sparse = _middle_rows(num_blocks, rand_attn)
    sparse[:, [0, -1], -1] = -1  # blocks 1 and last-1 stop one slot short
    blocks = torch.arange(num_blocks, device=device)
    query = torch.cat([torch.zeros_like(blocks), torch.full_like(blocks, last),
                      torch.arange(1, last, device=device).repeat_interleave(sparse.shape[2])])
    key = torch.cat([blocks.expand(heads, -1), blocks.expand(heads, -1), sparse.flatten(1)], dim=1)
    # One code per (key block, query block) pair, sorted: a pair listed m times is a run of
    # m equal codes; the missing (-1) sort last, under the sentinel.
    sentinel = num_blocks * num_blocks
    code = torch.where(key >= 0, key * num_blocks + query, sentinel).sort(dim=1).values
    starts = torch.ones_like(code, dtype=torch.bool)
    starts[:, 1:] = code[:, 1:] != code[:, :-1]
    run = starts.long().cumsum(1) - 1  # each pair's slot among the distinct pairs
    pairs = torch.full_like(code, sentinel).scatter_(1, run, code)  # a run's codes are equal
    times = torch.zeros_like(code).scatter_add_(1, run, (code < sentinel).long())
    bounds = torch.arange(num_blocks + 1, device=device).expand(heads, -1).contiguous()
    offsets = torch.searchsorted(pairs // num_blocks, bounds)  # first entry of each key block
    return offsets.to(torch.int32), torch.stack([pairs % num_blocks, times], dim=1).to(torch.int32)


def bigbird_random_layout(
    seqlen: int,
    block_size: int,
    num_random_blocks: int,
    heads: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A training-mode rand_attn (heads, seqlen / block_size - 2, r), int64: for query
    block i, r distinct random key blocks drawn from the candidates transformers'
    `_bigbird_block_rand_mask` allows (middle blocks away from i's window, with its
    special rows 1, 2, last-2, last-1). Drawn on `device` with torch's RNG (seed it through
    `generator`): no numpy, so it compiles and can be captured in a CUDA graph. seqlen and
    block_size as `block_sparse_attention` takes them; heads = 0 gives an empty layout."""
    _check_blocks("seqlen:", seqlen, block_size, num_random_blocks)
    num_blocks = seqlen // block_size
    allowed = _random_candidates(num_blocks, device)
    noise = torch.rand(heads, num_blocks - 2, num_blocks, generator=generator, device=device)
    noise = noise.masked_fill(~allowed, -1.0)
    return noise.topk(num_random_blocks, dim=-1).indices


def _random_candidates(num_blocks: int, device) -> torch.Tensor:
    """(num_blocks - 2, num_blocks) bool: key blocks query block i (row i - 1) may draw."""
    last = num_blocks - 1
    i = torch.arange(1, last, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    middle = (j >= 1) & (j < last)
    allowed = middle & ((j <= i - 2) | (j >= i + 2))
    allowed[0] = (middle & (j >= 3))[0]  # row 1
    allowed[1] = (middle & (j >= 4))[0]  # row 2
    allowed[-2:] = middle  # rows last-2 and last-1: transformers draws from every middle block
    return allowed


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _key_penalty(km_base, cols, stride_mn, HAS_KEY_MASK: tl.constexpr):
    """Additive log2-unit score penalty of keys `cols`: -10000 * log2(e) where padded."""
    if HAS_KEY_MASK:
        keep = tl.load(km_base + cols * stride_mn)
        return tl.where(keep != 0, 0.0, -14426.950408889634)
    else:
        return tl.zeros(cols.shape, dtype=tl.float32)


@triton.jit
def _query_keep(km_base, rows, stride_mn, HAS_KEY_MASK: tl.constexpr):
    if HAS_KEY_MASK:
        return tl.load(km_base + rows * stride_mn) != 0
    else:
        return rows >= 0


@triton.jit
def _program_block(pid, num_blocks, splits):
    """(block, global, g, split) of program `pid` of a grid of 2 * splits + num_blocks - 2:
    the first 2 * splits programs take the two global blocks (g = 0: block 0, g = 1: the
    last), `splits` programs each, so the heaviest programs launch first; the others take
    the middle blocks 1 .. last-1, one each."""
    is_global = pid < 2 * splits
    g = tl.where(is_global, pid // splits, 0)
    split = tl.where(is_global, pid % splits, 0)
    block = tl.where(is_global, g * (num_blocks - 1), pid - 2 * splits + 1)
    return block, is_global, g, split


@triton.jit
def _slot_range(start, end, is_global, split, chunk):
    """The entries [lo, hi) of [start, end) that a program walks: all of them, or for a
    program of a global block its split's `chunk` of them."""
    lo = tl.where(is_global, start + split * chunk, start)
    hi = tl.where(is_global, tl.minimum(lo + chunk, end), end)
    return lo, hi


@triton.jit
def _part_rows(pid_bh, g, split, splits, offs, BLOCK: tl.constexpr):
    """Rows of partial buffer (batch * heads, 2, splits, BLOCK, ...) holding split `split`
    of global block g of (batch, head) pid_bh."""
    return ((pid_bh.to(tl.int64) * 2 + g) * splits + split) * BLOCK + offs


@triton.jit
def _bs_fwd_kernel(
    Q, K, V, Out, Lse, OutPart, LsePart, Lists, Counts, KeyMask,
    qk_scale, heads, group, width, num_blocks, splits, chunk,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_lh, stride_lq, stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block of one head over the key blocks of its list, or (global blocks,
    splits > 1) over `chunk` slots of it, written as a partial (output normalised over
    those slots, float32, and their log2-sum-exp) for `_bs_merge_kernel`. A listed block
    outside the sequence is masked out (its scores -inf), not branched around, so the loop
    stays one straight-line body that the compiler can pipeline. Out is contiguous (batch,
    seqlen, heads, head_dim), Lse (batch, heads, seqlen)."""
    qb, is_global, g, split = _program_block(tl.program_id(0), num_blocks, splits)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    kv_head = h // group
    seqlen = num_blocks * BLOCK
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, d_ok[None, :])
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    km_base = KeyMask + b * stride_mb
    list_base = Lists + h * stride_lh + qb * stride_lq
    lo, hi = _slot_range(0, tl.minimum(tl.load(Counts + qb), width), is_global, split, chunk)

    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(lo, hi):
        key_block = tl.load(list_base + j)
        listed = (key_block >= 0) & (key_block < num_blocks)  # the guard: see the module docstring
        cols = tl.where(listed, key_block, 0) * BLOCK + offs
        kT = tl.trans(load_rows(k_base, cols, stride_kn, offs_d, stride_kd, d_ok[None, :]))
        v = load_rows(v_base, cols, stride_vn, offs_d, stride_vd, d_ok[None, :])
        s, _ = logits(q, kT, qk_scale, 1.0, False, PRECISION)
        s = s + _key_penalty(km_base, cols, stride_mn, HAS_KEY_MASK)[None, :]
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, tl.where(listed, s, float("-inf")), v, PRECISION)

    keep = _query_keep(km_base, rows, stride_mn, HAS_KEY_MASK)
    out = tl.where(keep[:, None], acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], 0.0)
    lse2 = m_i + tl.log2(l_i)  # -inf where nothing was seen
    if is_global & (splits > 1):
        part = _part_rows(pid_bh, g, split, splits, offs, BLOCK)
        tl.store(OutPart + part[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(LsePart + part, lse2)
    else:
        o_ptrs = Out + ((b * seqlen + rows[:, None]) * heads + h) * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, rounded(out, Out.dtype.element_ty), mask=d_ok[None, :])
        tl.store(Lse + pid_bh.to(tl.int64) * seqlen + rows, lse2 * 0.6931471805599453)


@triton.jit
def _bs_merge_kernel(
    Part, LsePart, Out, Out2, Lse, scale, heads, num_blocks, splits, stride_pt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """Combine the splits of ROWS rows of a global block (g = 0: block 0, 1: the last) of
    one (batch, head), in split order (deterministic). WEIGHTED (the forward): partial
    outputs weighted by exp2(lse_s - lse), lse = log2-sum-exp of the splits' lse_s, both
    stored (Lse in natural units). Otherwise (dQ, dK, dV): the sum of the partials, times
    `scale`; program_id(2) = 1 merges the second partial tensor (at Part + stride_pt) into
    Out2, unscaled (dV after dK). Out, Out2 contiguous (batch, seqlen, heads, head_dim)."""
    g = tl.program_id(0) // (BLOCK // ROWS)
    offs = tl.program_id(0) % (BLOCK // ROWS) * ROWS + tl.arange(0, ROWS)
    pid_bh = tl.program_id(1)
    second = tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    seqlen = num_blocks * BLOCK
    offs_d = tl.arange(0, BLOCK_D)
    part_base = Part + second * stride_pt
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    for split in range(splits):
        part = _part_rows(pid_bh, g, split, splits, offs, BLOCK)
        tile = tl.load(part_base + part[:, None] * BLOCK_D + offs_d[None, :])
        if WEIGHTED:
            acc, m, total = merge_step(acc, m, total, tile, tl.load(LsePart + part))
        else:
            acc += tile
    rows = g * (num_blocks - 1) * BLOCK + offs
    out_off = ((b * seqlen + rows[:, None]) * heads + h) * HEAD_DIM + offs_d[None, :]
    d_ok = (offs_d < HEAD_DIM)[None, :]
    if WEIGHTED:
        out, lse = merge_result(acc, m, total)
        tl.store(Out + out_off, rounded(out, Out.dtype.element_ty), mask=d_ok)
        tl.store(Lse + pid_bh.to(tl.int64) * seqlen + rows, lse)
    else:
        if second == 0:
            tl.store(Out + out_off, rounded(acc * scale, Out.dtype.element_ty), mask=d_ok)
        else:
            tl.store(Out2 + out_off, rounded(acc, Out2.dtype.element_ty), mask=d_ok)


@triton.jit
def _bs_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DQPart, Lists, Counts, KeyMask,
    sm_scale, qk_scale, heads, group, width, num_blocks, splits, chunk,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_lh, stride_lq, stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query block: the forward's walk (the same programs, the same blocks masked
    out) with P recomputed from lse; a global block's split writes its partial dQ (float32,
    unscaled) for `_bs_merge_kernel` to sum. Masked query rows get dO = 0 (their output is a
    constant 0). DQ is contiguous like Out."""
    qb, is_global, g, split = _program_block(tl.program_id(0), num_blocks, splits)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    kv_head = h // group
    seqlen = num_blocks * BLOCK
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    km_base = KeyMask + b * stride_mb
    keep = _query_keep(km_base, rows, stride_mn, HAS_KEY_MASK)
    q = load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, d_ok[None, :])
    do = load_rows(DOut + b * stride_db + h * stride_dh, rows, stride_dm, offs_d, stride_dd, keep[:, None] & d_ok[None, :])
    lse2 = lse_log2(Lse + pid_bh.to(tl.int64) * seqlen, rows, rows >= 0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seqlen + rows)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    list_base = Lists + h * stride_lh + qb * stride_lq
    lo, hi = _slot_range(0, tl.minimum(tl.load(Counts + qb), width), is_global, split, chunk)

    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for j in range(lo, hi):
        key_block = tl.load(list_base + j)
        listed = (key_block >= 0) & (key_block < num_blocks)
        cols = tl.where(listed, key_block, 0) * BLOCK + offs
        k = load_rows(k_base, cols, stride_kn, offs_d, stride_kd, d_ok[None, :])
        v = load_rows(v_base, cols, stride_vn, offs_d, stride_vd, d_ok[None, :])
        s, _ = logits(q, tl.trans(k), qk_scale, 1.0, False, PRECISION)
        s = s + _key_penalty(km_base, cols, stride_mn, HAS_KEY_MASK)[None, :]
        p = tl.where(listed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), None, PRECISION)
        dq = dot(rounded(p * (dp - delta[:, None]), k.dtype), k, dq, PRECISION)
    if is_global & (splits > 1):
        part = _part_rows(pid_bh, g, split, splits, offs, BLOCK)
        tl.store(DQPart + part[:, None] * BLOCK_D + offs_d[None, :], dq)
    else:
        dq_ptrs = DQ + ((b * seqlen + rows[:, None]) * heads + h) * HEAD_DIM + offs_d[None, :]
        tl.store(dq_ptrs, rounded(dq * sm_scale, DQ.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _bs_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KVPart, Offsets, Entries, KeyMask,
    sm_scale, qk_scale, heads_kv, group, capacity, num_blocks, splits, chunk,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_db, stride_dm, stride_dh, stride_dd,
    stride_oh, stride_eh, stride_ew, stride_mb, stride_mn, stride_pt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one kv head: for every q head of the group, the query
    blocks of its inverse list (`inverse_lists`), each weighted by how many times it lists
    the key block. The global key blocks 0 and last (listed by every query block) are split
    like the forward's global rows: a split walks `chunk` entries of each head's list and
    writes partial dK, dV (float32, dK unscaled; dV at KVPart + stride_pt) for
    `_bs_merge_kernel`. Entries are read only inside [0, capacity), and a query block
    outside [0, num_blocks) is masked out (weight 0)."""
    kb, is_global, g_kv, split = _program_block(tl.program_id(0), num_blocks, splits)
    pid_bh = tl.program_id(1)
    seqlen = num_blocks * BLOCK
    b = (pid_bh // heads_kv).to(tl.int64)
    kv_head = pid_bh % heads_kv
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = load_rows(K + b * stride_kb + kv_head * stride_kh, cols, stride_kn, offs_d, stride_kd, d_ok[None, :])
    v = load_rows(V + b * stride_vb + kv_head * stride_vh, cols, stride_vn, offs_d, stride_vd, d_ok[None, :])
    km_base = KeyMask + b * stride_mb
    penalty = _key_penalty(km_base, cols, stride_mn, HAS_KEY_MASK)

    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for g in range(group):
        h = kv_head * group + g
        row_base = (b * heads_kv * group + h) * seqlen
        start = tl.minimum(tl.maximum(tl.load(Offsets + h * stride_oh + kb), 0), capacity)
        end = tl.minimum(tl.maximum(tl.load(Offsets + h * stride_oh + kb + 1), start), capacity)
        lo, hi = _slot_range(start, end, is_global, split, chunk)
        entry_base = Entries + h * stride_eh
        for e in range(lo, hi):
            qb = tl.load(entry_base + e)
            times = tl.load(entry_base + stride_ew + e)
            listed = (qb >= 0) & (qb < num_blocks)
            rows = tl.where(listed, qb, 0) * BLOCK + offs
            keep = _query_keep(km_base, rows, stride_mn, HAS_KEY_MASK)
            q = load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, d_ok[None, :])
            do = load_rows(DOut + b * stride_db + h * stride_dh, rows, stride_dm, offs_d, stride_dd,
                           keep[:, None] & d_ok[None, :])
            lse2 = lse_log2(Lse + row_base, rows, rows >= 0)
            delta = tl.load(Delta + row_base + rows)
            sT, _ = logits(k, tl.trans(q), qk_scale, 1.0, False, PRECISION)
            pT = tl.where(listed, tl.exp2(sT + penalty[:, None] - lse2[None, :]) * times.to(tl.float32), 0.0)
            dv = dot(rounded(pT, do.dtype), do, dv, PRECISION)
            dpT = dot(v, tl.trans(do), None, PRECISION)
            dk = dot(rounded(pT * (dpT - delta[None, :]), q.dtype), q, dk, PRECISION)
    if is_global & (splits > 1):
        part = _part_rows(pid_bh, g_kv, split, splits, offs, BLOCK)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(KVPart + part, dk)
        tl.store(KVPart + stride_pt + part, dv)
    else:
        out_off = ((b * seqlen + cols[:, None]) * heads_kv + kv_head) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out_off, rounded(dk * sm_scale, DK.dtype.element_ty), mask=d_ok[None, :])
        tl.store(DV + out_off, rounded(dv, DV.dtype.element_ty), mask=d_ok[None, :])


def _bs_default(*, block_size: int, head_dim: int, dtype: str) -> autotune.Config:
    """4 warps, 2 stages (one warpgroup: wgmma on 64-row blocks); 8 warps where the
    tiles outgrow 4 warps' registers (sm_90, bf16: forward and dQ at head_dim 256, dK/dV's
    two accumulators from 128)."""
    return autotune.Config({}, num_warps=8 if block_size >= 64 and head_dim > 128 else 4, num_stages=2)


def _bs_dkdv_default(*, block_size: int, head_dim: int, dtype: str) -> autotune.Config:
    return autotune.Config({}, num_warps=8 if block_size >= 64 and head_dim > 64 else 4, num_stages=2)


def _bs_bucket(*, block_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    return {"block_size": block_size, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", "")}


_SPACE = {"num_warps": (2, 4, 8), "num_stages": (1, 2, 3)}
_INTERPRETER = autotune.Config({}, num_warps=4, num_stages=1)
_HELPERS = (_key_penalty, _query_keep, _program_block, _slot_range, _part_rows, load_rows, logits, dot, rounded)
BLOCK_SPARSE_FWD = autotune.Kernel("block_sparse_fwd", space=_SPACE, key=_bs_bucket, default=_bs_default,
                                   interpreter=_INTERPRETER, sources=(_bs_fwd_kernel, softmax_step, *_HELPERS))
BLOCK_SPARSE_BWD_DQ = autotune.Kernel("block_sparse_bwd_dq", space=_SPACE, key=_bs_bucket, default=_bs_default,
                                      interpreter=_INTERPRETER, sources=(_bs_bwd_dq_kernel, lse_log2, *_HELPERS))
BLOCK_SPARSE_BWD_DKDV = autotune.Kernel("block_sparse_bwd_dkdv", space=_SPACE, key=_bs_bucket, default=_bs_dkdv_default,
                                        interpreter=_INTERPRETER, sources=(_bs_bwd_dkdv_kernel, lse_log2, *_HELPERS))


# ----------------------------------------------------------------------------- host


def _check_blocks(label: str, seqlen, block_size, num_random_blocks) -> None:
    """block_size a power of two >= 16, num_random_blocks an int >= 0, and seqlen (named
    by `label`, e.g. "q: seqlen") a multiple of block_size of at least min_seqlen."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
    if seqlen % block_size:
        raise ValueError(f"{label} {seqlen} is not a multiple of block_size {block_size}: pad the sequence "
                         f"(transformers pads to a multiple of the block size)")
    if not isinstance(num_random_blocks, int) or num_random_blocks < 0:
        raise ValueError(f"num_random_blocks: expected an int >= 0, got {num_random_blocks!r}")
    shortest = min_seqlen(block_size, num_random_blocks)
    if seqlen < shortest:
        raise ValueError(
            f"{label} {seqlen} is too short for the block-sparse layout with block_size {block_size} and "
            f"{num_random_blocks} random blocks (minimum {shortest}); there full attention is the right choice, "
            f"as transformers makes it: tritium.flash_attention(q, k, v, key_padding_mask=...)")


def _check_layout_args(q, k, block_size, num_random_blocks, rand_attn, key_padding_mask) -> None:
    """Validate the block-sparse arguments before any launch."""
    batch, seqlen, heads, _ = q.shape
    if k.shape[1] != seqlen:
        raise ValueError(f"k: block-sparse attention is self-attention: seqlen {k.shape[1]} must equal q's {seqlen}")
    _check_blocks("q: seqlen", seqlen, block_size, num_random_blocks)
    num_blocks = seqlen // block_size
    if rand_attn is not None:
        _check_rand_attn(rand_attn, (heads, num_blocks - 2, num_random_blocks), q.device)
    check_key_padding_mask(key_padding_mask, batch, seqlen, q)


_EVAL_LISTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _layout(num_blocks: int, heads: int, num_random_blocks: int, rand_attn, q, inverse: bool) -> tuple:
    """(lists, counts, offsets, entries): `block_lists` and `inverse_lists` of rand_attn, or
    of the eval layout (all zeros). The inverse (offsets, entries) only with `inverse` (a
    backward will run), else None, None. The eval layout's are built once per shape and
    device, all four, and kept: every layer and step of a model reuses them. Only real
    tensors built eagerly are kept: under tracing, capture (whose kernels have not run yet)
    or a dispatch mode (FakeTensorMode), the layout is built for the call and not cached
    nor reused."""
    if rand_attn is None:
        key = (num_blocks, heads, num_random_blocks, str(q.device))
        if values_readable(q) and key in _EVAL_LISTS:
            return _EVAL_LISTS[key]
        rand_attn = torch.zeros(heads, num_blocks - 2, num_random_blocks, dtype=torch.int32, device=q.device)
        if values_readable(q):
            _EVAL_LISTS[key] = (*block_lists(num_blocks, rand_attn), *inverse_lists(num_blocks, rand_attn))
            return _EVAL_LISTS[key]
    lists = block_lists(num_blocks, rand_attn)
    return (*lists, *(inverse_lists(num_blocks, rand_attn) if inverse else (None, None)))


def _check_rand_attn(rand_attn, expected: tuple, device) -> None:
    check_tensor("rand_attn", rand_attn, shape="(heads, seqlen / block_size - 2, num_random_blocks)", ndim=3,
                 dtypes=(torch.int32, torch.int64))
    if tuple(rand_attn.shape) != expected:
        raise ValueError(f"rand_attn: expected shape (heads, seqlen / block_size - 2, num_random_blocks) = "
                         f"{expected}, got {tuple(rand_attn.shape)}")
    if rand_attn.device != device:
        raise ValueError(f"rand_attn: device {rand_attn.device} differs from q's {device}")
    _check_indices(rand_attn, expected[1] + 2)


def _check_indices(rand_attn: torch.Tensor, num_blocks: int) -> None:
    """Indices in [0, num_blocks), read on the host (one sync) at every call where that is
    allowed. Not cached by (data_ptr, version): a write the version counter misses (.data,
    numpy) or a reused address would go unseen. Where it cannot run, the kernels ignore
    such an index (module docstring)."""
    if not rand_attn.numel() or not values_readable(rand_attn):
        return
    lo, hi = torch.stack(torch.aminmax(rand_attn)).tolist()
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"rand_attn: block indices must lie in [0, {num_blocks - 1}], got values in [{lo}, {hi}]")


def _check_lists(lists, counts, q, block_size: int, chunk: int) -> None:
    """lists and counts as block_lists builds them for q (the custom ops can be called
    directly): the kernels read counts[qb] and lists[h, qb, :width] of every head h and
    query block qb; at least 3 blocks (two global ones and a middle one) and chunk >= 1.
    Metadata only."""
    heads, num_blocks = q.shape[2], q.shape[1] // block_size
    ok = (lists.dtype == counts.dtype == torch.int32 and lists.device == counts.device == q.device
          and lists.dim() == 3 and tuple(lists.shape[:2]) == (heads, num_blocks) and lists.stride(2) == 1
          and tuple(counts.shape) == (num_blocks,) and counts.is_contiguous())
    if not ok:
        raise ValueError(f"lists, counts: expected block_lists' int32 ({heads}, {num_blocks}, width) lists and "
                         f"({num_blocks},) counts on {q.device}, got {lists.dtype} {tuple(lists.shape)} and "
                         f"{counts.dtype} {tuple(counts.shape)}")
    if num_blocks < 3 or chunk < 1:
        raise ValueError(f"block-sparse layout: expected at least 3 blocks and chunk >= 1, got {num_blocks} "
                         f"blocks and chunk {chunk}")


def _check_inverse(offsets, entries, q, block_size: int) -> None:
    """offsets and entries as inverse_lists builds them for q: the dK/dV kernel reads
    offsets[h, :num_blocks + 1] and entries[h, :2, :capacity] of every head h. Metadata
    only: the kernel clamps what it reads from offsets to [0, capacity)."""
    heads, num_blocks = q.shape[2], q.shape[1] // block_size
    ok = (offsets is not None and entries is not None and offsets.dtype == entries.dtype == torch.int32
          and offsets.device == entries.device == q.device and tuple(offsets.shape) == (heads, num_blocks + 1)
          and offsets.stride(1) == 1 and entries.dim() == 3 and tuple(entries.shape[:2]) == (heads, 2)
          and entries.stride(2) == 1)
    if not ok:
        got = ["None" if t is None else f"{t.dtype} {tuple(t.shape)}" for t in (offsets, entries)]
        raise ValueError(f"offsets, entries: expected inverse_lists' int32 ({heads}, {num_blocks + 1}) offsets and "
                         f"({heads}, 2, capacity) entries on {q.device}, got {got[0]} and {got[1]}")


def _launch_args(q, k, key_padding_mask):
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    return mask, mask_strides


def _problem(q, block_size):
    return dict(block_size=block_size, head_dim=q.shape[3], dtype=q.dtype)


def _partials(splits: int, tensors: int, programs: int, block_size: int, head_dim: int, q) -> torch.Tensor:
    """float32 scratch for the partial results of global blocks split over `splits`
    programs: (tensors, programs, 2, splits, block_size, BLOCK_D); a 1-element stand-in when
    nothing is split (the kernels then write their results directly)."""
    if splits <= 1:
        return torch.empty(1, dtype=torch.float32, device=q.device)
    return torch.empty((tensors, programs, 2, splits, block_size, head_block(head_dim)), dtype=torch.float32,
                       device=q.device)


def _merge(part, lse_part, out, out2, lse, scale, heads: int, num_blocks: int, splits: int, block_size: int,
           weighted: bool) -> None:
    """Launch `_bs_merge_kernel` over the global blocks of every (batch, head) of out (and
    out2: part's second tensor)."""
    batch, _, _, head_dim = out.shape
    rows = min(MERGE_VALUES // head_block(head_dim), block_size)
    pair = out2 is not None
    _bs_merge_kernel[(2 * (block_size // rows), batch * heads, 2 if pair else 1)](
        part, lse_part, out, out2 if pair else out, lse, scale, heads, num_blocks, splits,
        part.stride(0) if pair else 0,
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK=block_size, ROWS=rows, WEIGHTED=weighted,
        num_warps=max(rows * head_block(head_dim) // 256, 1),  # 8 values a thread: 16 make ptxas spill
    )


@custom_op("tritium::block_sparse_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, counts: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], block_size: int, softmax_scale: float, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen, heads, head_dim = q.shape
    out = torch.empty((batch, seqlen, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
    if is_empty(batch, heads):
        return out, lse
    _check_lists(lists, counts, q, block_size, chunk)
    num_blocks, width = seqlen // block_size, lists.shape[2]
    splits = max(cdiv(width, chunk), 1)  # covers every slot of a global row
    out_part = _partials(splits, 1, batch * heads, block_size, head_dim, q)
    lse_part = torch.empty(out_part.shape[:-1], dtype=torch.float32, device=q.device) if splits > 1 else out_part
    mask, mask_strides = _launch_args(q, k, key_padding_mask)

    def launch(config):
        _bs_fwd_kernel[(num_blocks - 2 + 2 * splits, batch * heads)](
            q, k, v, out, lse, out_part, lse_part, lists, counts, mask, softmax_scale * LOG2E, heads,
            heads // k.shape[2], width, num_blocks, splits, chunk,
            *q.stride(), *k.stride(), *v.stride(), *lists.stride()[:2], *mask_strides,
            HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK=block_size,
            HAS_KEY_MASK=key_padding_mask is not None, PRECISION=dot_precision(q.dtype), **config.launch_kwargs(),
        )

    launch(BLOCK_SPARSE_FWD.lookup(launch, **_problem(q, block_size)))
    if splits > 1:
        _merge(out_part, lse_part, out, None, lse, 1.0, heads, num_blocks, splits, block_size, weighted=True)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, lists, counts, key_padding_mask, block_size, softmax_scale, chunk):
    batch, seqlen, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen), dtype=torch.float32)


@custom_op("tritium::block_sparse_attention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    lists: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, entries: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], block_size: int, softmax_scale: float, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seqlen, heads, head_dim = q.shape
    heads_kv = k.shape[2]
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    if is_empty(batch, heads):  # no query: dq is empty, and k, v (if any) had no effect
        return dq, dk.zero_(), dv.zero_()
    _check_lists(lists, counts, q, block_size, chunk)
    _check_inverse(offsets, entries, q, block_size)
    num_blocks, width = seqlen // block_size, lists.shape[2]
    delta = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=q.device)
    bwd_delta_kernel[(num_blocks, batch * heads)](
        out, dout, delta, seqlen, heads, *out.stride(), *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK_M=block_size,
    )
    mask, mask_strides = _launch_args(q, k, key_padding_mask)
    tensors = (q, k, v, dout, lse, delta)
    all_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK=block_size,
                     HAS_KEY_MASK=key_padding_mask is not None, PRECISION=dot_precision(q.dtype))
    scales = (softmax_scale, softmax_scale * LOG2E)
    q_splits = max(cdiv(width, chunk), 1)  # a global query row: its list's every slot
    k_splits = cdiv(num_blocks, chunk)  # a global key block: at most num_blocks entries per head
    dq_part = _partials(q_splits, 1, batch * heads, block_size, head_dim, q)
    kv_part = _partials(k_splits, 2, batch * heads_kv, block_size, head_dim, q)

    def launch_dq(config):
        _bs_bwd_dq_kernel[(num_blocks - 2 + 2 * q_splits, batch * heads)](
            *tensors, dq, dq_part, lists, counts, mask, *scales, heads, heads // heads_kv, width, num_blocks,
            q_splits, chunk, *all_strides, *lists.stride()[:2], *mask_strides,
            **constants, **config.launch_kwargs())

    def launch_dkdv(config):
        _bs_bwd_dkdv_kernel[(num_blocks - 2 + 2 * k_splits, batch * heads_kv)](
            *tensors, dk, dv, kv_part, offsets, entries, mask, *scales, heads_kv, heads // heads_kv,
            entries.shape[2], num_blocks, k_splits, chunk, *all_strides, offsets.stride(0),
            *entries.stride()[:2], *mask_strides, kv_part.stride(0) if k_splits > 1 else 0,
            **constants, **config.launch_kwargs())

    launch_dq(BLOCK_SPARSE_BWD_DQ.lookup(launch_dq, **_problem(q, block_size)))
    launch_dkdv(BLOCK_SPARSE_BWD_DKDV.lookup(launch_dkdv, **_problem(q, block_size)))
    if q_splits > 1:
        _merge(dq_part, dq_part, dq, None, lse, softmax_scale, heads, num_blocks, q_splits, block_size, weighted=False)
    if k_splits > 1:
        _merge(kv_part, kv_part, dk, dv, lse, softmax_scale, heads_kv, num_blocks, k_splits, block_size,
               weighted=False)
    return dq, dk, dv


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, lists, counts, offsets, entries, key_padding_mask, block_size, softmax_scale, chunk):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper over the forward/backward custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, lists, counts, offsets, entries, key_padding_mask, block_size, softmax_scale,
                chunk):
        out, lse = _forward_op(q, k, v, lists, counts, key_padding_mask, block_size, softmax_scale, chunk)
        ctx.save_for_backward(q, k, v, out, lse, lists, counts, offsets, entries, key_padding_mask)
        ctx.options = (block_size, softmax_scale, chunk)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, lists, counts, offsets, entries, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _backward_op(dout, q, k, v, out, lse, lists, counts, offsets, entries, key_padding_mask,
                                  *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    num_random_blocks: int = 3,
    rand_attn: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """BigBird block-sparse self-attention (ITC), exact to transformers' BigBirdPegasus.

    q, k, v: (batch, seqlen, heads, head_dim), any strides (k/v may have fewer heads: GQA);
    seqlen a multiple of block_size (a power of two >= 16) and longer than
    (5 + 2 * num_random_blocks) * block_size (shorter sequences want full attention).
    Query block 0 and the last attend to every key; block 1 to key blocks [0, 1, 2, last],
    the last but one to [0, last-2, last-1, last], a middle block i to [0, i-1, i, i+1,
    last]; each also to its num_random_blocks blocks of rand_attn (heads, seqlen /
    block_size - 2, r), row i - 1. One softmax per query row over all its keys, a key
    listed twice counting twice. rand_attn None is transformers' eval layout (all zeros:
    block 0 counts r more times); `bigbird_random_layout` draws a training one. rand_attn
    (int32/int64, any strides, stride 0 included) holds block indices in [0, seqlen /
    block_size): eagerly another value is a ValueError (rand_attn is read on the host, one
    sync per call); under torch.compile or CUDA-graph capture, where it cannot be read,
    such an index is ignored (that slot attends to nothing), never read past k or v.
    key_padding_mask: (batch, seqlen) bool, True = attend; masked keys get -10000 added to
    their scaled score, masked query rows output 0.
    Returns out like q (and lse (batch, heads, seqlen) float32 with return_lse).
    """
    check_attention_args(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=softmax_scale)
    _check_layout_args(q, k, block_size, num_random_blocks, rand_attn, key_padding_mask)
    scale = q.shape[3] ** -0.5 if softmax_scale is None else float(softmax_scale)
    record = needs_grad(q, k, v)
    layout = _layout(q.shape[1] // block_size, q.shape[2], num_random_blocks, rand_attn, q, inverse=record)
    out, lse = run_function(BlockSparseAttentionFunction, q, k, v, *layout, key_padding_mask, block_size, scale,
                            split_blocks(num_random_blocks), record=record)
    return (out, lse) if return_lse else out
