"""Rotary position embeddings: one kernel rotates q and k, forward and backward.

Layout (batch, seqlen, heads, head_dim), any strides. The first rotary_dim features of each
head are rotated by the angles whose cos/sin are given as (seqlen_ro, rotary_dim / 2), or
per sequence as (batch, seqlen_ro, rotary_dim / 2): FlashAttention's `apply_rotary_emb`
convention. `interleaved` rotates the pairs (2i, 2i + 1) (GLM-4), otherwise the halves
(i, i + rotary_dim / 2) (Gemma 2, Llama); the rest of head_dim passes through. Token t of
sequence b sits at position t + seqlen_offsets[b] (KV-cache decode). The backward pass is
the rotation by -theta: the same kernel with sin negated.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tritium import autotune
from tritium.autotune import Config
from tritium.kernels.tiles import rounded
from tritium.kernels.validation import check_dim, check_like, check_tensor, is_empty
from tritium.runtime import cdiv, custom_op, needs_grad, next_power_of_2, run_function


@triton.jit
def _rotate_heads(
    X, Out, c, s, b, rows, row_ok, h0, heads,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_ob, stride_os, stride_oh, stride_od,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotate heads [h0, h0 + BLOCK_H) of the tokens `rows` of sequence b from X into Out.
    c, s: (BLOCK_S, BLOCK_HALF) float32. REST > 0 also copies the REST pass-through
    features (out of place; in place they are left alone)."""
    head = h0 + tl.arange(0, BLOCK_H)
    tok = rows.to(tl.int64)[:, None, None]
    x_base = X + b * stride_xb + tok * stride_xs + head[None, :, None] * stride_xh
    o_base = Out + b * stride_ob + tok * stride_os + head[None, :, None] * stride_oh
    ok = row_ok[:, None, None] & (head < heads)[None, :, None]
    c, s = c[:, None, :], s[:, None, :]
    if INTERLEAVED:
        # One contiguous (vectorised) load of the pairs, split in registers.
        cols = tl.arange(0, 2 * BLOCK_HALF)[None, None, :]
        mask = ok & (cols < 2 * HALF)
        x = tl.load(x_base + cols * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_H, BLOCK_HALF, 2)))
        out = tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), (BLOCK_S, BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_base + cols * stride_od, rounded(out, Out.dtype.element_ty), mask=mask)
    else:
        offs = tl.arange(0, BLOCK_HALF)[None, None, :]
        mask = ok & (offs < HALF)
        x1 = tl.load(x_base + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + (offs + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_base + offs * stride_od, rounded(x1 * c - x2 * s, Out.dtype.element_ty), mask=mask)
        tl.store(o_base + (offs + HALF) * stride_od, rounded(x2 * c + x1 * s, Out.dtype.element_ty), mask=mask)
    if REST > 0:
        cols = 2 * HALF + tl.arange(0, BLOCK_REST)[None, None, :]
        rest_mask = ok & (cols < 2 * HALF + REST)
        tl.store(o_base + cols * stride_od, tl.load(x_base + cols * stride_xd, mask=rest_mask), mask=rest_mask)


@triton.jit
def _rotary_kernel(
    Q, K, QOut, KOut, Cos, Sin, Offsets,
    seqlen, seqlen_ro, offset, heads_q, heads_kv, seq_blocks, q_blocks,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd, stride_offsets,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_S tokens of one sequence times BLOCK_H heads of q or of k. Grid
    axis 1 lists q's head blocks (q_blocks of them) and then k's, so one launch does both
    and cos/sin are loaded once per token block and reused across the heads."""
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_s // seq_blocks).to(tl.int64)
    rows = (pid_s % seq_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < seqlen
    # Positions in int64: an offset near 2**31 must not wrap back into the table.
    if HAS_OFFSETS:
        pos = rows.to(tl.int64) + tl.load(Offsets + b * stride_offsets)
    else:
        pos = rows.to(tl.int64) + offset
    offs = tl.arange(0, BLOCK_HALF)
    # Offsets given as a tensor cannot be checked on the host without a sync: a position
    # outside the cos/sin table rotates by 0 (cos 1, sin 0) rather than read out of bounds.
    cs_mask = (row_ok & (pos >= 0) & (pos < seqlen_ro))[:, None] & (offs < HALF)[None, :]
    pos = pos[:, None]
    c = tl.load(Cos + b * stride_cb + pos * stride_cs + offs[None, :] * stride_cd, mask=cs_mask, other=1.0)
    s = tl.load(Sin + b * stride_sb + pos * stride_ss + offs[None, :] * stride_sd, mask=cs_mask, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    if CONJUGATE:
        s = -s
    if pid_h < q_blocks:
        _rotate_heads(Q, QOut, c, s, b, rows, row_ok, pid_h * BLOCK_H, heads_q,
                      stride_qb, stride_qs, stride_qh, stride_qd, stride_qob, stride_qos, stride_qoh, stride_qod,
                      HALF, BLOCK_HALF, REST, BLOCK_REST, INTERLEAVED, BLOCK_S, BLOCK_H)
    else:
        _rotate_heads(K, KOut, c, s, b, rows, row_ok, (pid_h - q_blocks) * BLOCK_H, heads_kv,
                      stride_kb, stride_ks, stride_kh, stride_kd, stride_kob, stride_kos, stride_koh, stride_kod,
                      HALF, BLOCK_HALF, REST, BLOCK_REST, INTERLEAVED, BLOCK_S, BLOCK_H)


# ----------------------------------------------------------------------------- tuning

SPACE = {"BLOCK_S": (1, 2, 4, 8, 16, 32), "BLOCK_H": (1, 2, 4, 8), "num_warps": (1, 2, 4, 8), "num_stages": (1,)}
# Under the interpreter a program costs the same whatever its size: few, large ones.
INTERPRETER = Config({"BLOCK_S": 16, "BLOCK_H": 4}, num_warps=1, num_stages=1)
TILE = 4096  # elements per program the default aims for: enough loads in flight per SM
MAX_PER_THREAD = 64  # elements per thread past which the tile spills


def rotary_bucket(*, head_dim: int, rotary_dim: int, dtype: torch.dtype, interleaved: bool,
                  heads_q: int, heads_kv: int, tokens: int) -> dict:
    """Problems in one bucket share a config: exact model shapes, tokens by powers of two."""
    return {
        "head_dim": head_dim, "rotary_dim": rotary_dim, "dtype": str(dtype).replace("torch.", ""),
        "interleaved": interleaved, "heads_q": heads_q, "heads_kv": heads_kv, "tokens": min(next_power_of_2(tokens), 1 << 16),
    }


def _tile(config: Config, bucket: dict) -> int:
    return config.meta["BLOCK_S"] * config.meta["BLOCK_H"] * next_power_of_2(bucket["head_dim"])


def rotary_fits(config: Config, bucket: dict) -> bool:
    """No block larger than the tokens or heads there are; every thread busy, none spilling."""
    threads = 32 * config.num_warps
    return (
        config.meta["BLOCK_S"] <= bucket["tokens"]
        and config.meta["BLOCK_H"] <= next_power_of_2(max(bucket["heads_q"], bucket["heads_kv"]))
        and threads <= _tile(config, bucket) <= MAX_PER_THREAD * threads
    )


def rotary_default(*, head_dim: int, heads_q: int, heads_kv: int, tokens: int, **_) -> Config:
    """Heads per program up to 4, but no more than k has (GLM-4: 2), so k's blocks are
    full; tokens per program to reach TILE elements."""
    block_h = min(4, 1 << ((heads_kv or heads_q).bit_length() - 1))
    block_s = min(max(TILE // (block_h * next_power_of_2(head_dim)), 1), next_power_of_2(tokens))
    tile = block_s * block_h * next_power_of_2(head_dim)
    return Config({"BLOCK_S": block_s, "BLOCK_H": block_h}, num_warps=4 if tile >= 4096 else 2, num_stages=1)


ROTARY = autotune.Kernel(
    "rotary", space=SPACE, key=rotary_bucket, default=rotary_default, interpreter=INTERPRETER,
    prune=rotary_fits, sources=(_rotary_kernel, _rotate_heads, rounded),
)


# ----------------------------------------------------------------------------- launch


def _launch(q, k, q_out, k_out, cos, sin, offsets, offset, config, *, interleaved, conjugate, copy_rest):
    """Run `_rotary_kernel` with `config`: q -> q_out and k -> k_out (k may be None)."""
    batch, seqlen, heads_q, head_dim = q.shape
    heads_kv = k.shape[2] if k is not None else 0
    half = cos.shape[-1]
    if batch * seqlen == 0:
        return
    # One (batch, seqlen_ro, half) view for both cos layouts: a shared table gets stride 0.
    cos = cos.expand(batch, *cos.shape[-2:])
    sin = sin.expand(batch, *sin.shape[-2:])
    if k is None:  # no head blocks of k: its arguments are never read
        k, k_out = q, q_out
    block_s, block_h = config.meta["BLOCK_S"], config.meta["BLOCK_H"]
    seq_blocks, q_blocks = cdiv(seqlen, block_s), cdiv(heads_q, block_h)
    rest = head_dim - 2 * half if copy_rest else 0
    grid = (batch * seq_blocks, q_blocks + cdiv(heads_kv, block_h))
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos, sin, offsets if offsets is not None else cos,
        seqlen, cos.shape[1], offset, heads_q, heads_kv, seq_blocks, q_blocks,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        offsets.stride(0) if offsets is not None else 0,
        HALF=half, BLOCK_HALF=next_power_of_2(half), REST=rest, BLOCK_REST=next_power_of_2(rest), INTERLEAVED=interleaved,
        CONJUGATE=conjugate, HAS_OFFSETS=offsets is not None, **config.launch_kwargs(),
    )


def _nothing_to_rotate(q, k) -> bool:
    """No token, or no head in q and k together."""
    return is_empty(q.shape[0], q.shape[1], q.shape[2] + (k.shape[2] if k is not None else 0))


def _config(q, k, cos, interleaved, launch) -> Config:
    _, seqlen, heads_q, head_dim = q.shape
    return ROTARY.lookup(
        launch, head_dim=head_dim, rotary_dim=2 * cos.shape[-1], dtype=q.dtype, interleaved=interleaved,
        heads_q=heads_q, heads_kv=k.shape[2] if k is not None else 0, tokens=q.shape[0] * seqlen,
    )


@custom_op("tritium::rotary", mutates_args=())
def _rotary_op(
    q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    seqlen_offsets: Optional[torch.Tensor], offset: int, interleaved: bool, conjugate: bool,
) -> list[torch.Tensor]:
    q_out, k_out = (torch.empty_like(x) if x is not None else None for x in (q, k))

    def launch(config):
        _launch(q, k, q_out, k_out, cos, sin, seqlen_offsets, offset, config,
                interleaved=interleaved, conjugate=conjugate, copy_rest=True)

    if not _nothing_to_rotate(q, k):
        launch(_config(q, k, cos, interleaved, launch))
    return [q_out] if k is None else [q_out, k_out]


@_rotary_op.register_fake
def _(q, k, cos, sin, seqlen_offsets, offset, interleaved, conjugate):
    return [torch.empty_like(x) for x in (q, k) if x is not None]


@custom_op("tritium::rotary_", mutates_args=("q", "k"))
def _rotary_inplace_op(
    q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
    seqlen_offsets: Optional[torch.Tensor], offset: int, interleaved: bool,
) -> None:
    if _nothing_to_rotate(q, k):
        return
    options = dict(interleaved=interleaved, conjugate=False)

    def trial(config):
        # Tuning runs the kernel many times: out of place into scratch, so q and k are
        # rotated exactly once. Shares the out-of-place op's bucket.
        q_out, k_out = (torch.empty_like(x) if x is not None else None for x in (q, k))
        _launch(q, k, q_out, k_out, cos, sin, seqlen_offsets, offset, config, copy_rest=True, **options)

    config = _config(q, k, cos, interleaved, trial)
    _launch(q, k, q, k, cos, sin, seqlen_offsets, offset, config, copy_rest=False, **options)


@_rotary_inplace_op.register_fake
def _(q, k, cos, sin, seqlen_offsets, offset, interleaved):
    return None


class RotaryFunction(torch.autograd.Function):
    """Out-of-place rotation of q and k (k may be None); the backward rotates the output
    gradients by -theta. cos and sin are not differentiated."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, seqlen_offsets, offset, interleaved):
        outs = _rotary_op(q, k, cos, sin, seqlen_offsets, offset, interleaved, False)
        ctx.save_for_backward(cos, sin, seqlen_offsets)
        ctx.options = (offset, interleaved, k is not None)
        return outs[0], outs[1] if k is not None else None

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, seqlen_offsets = ctx.saved_tensors
        offset, interleaved, has_k = ctx.options
        grads = _rotary_op(dq, dk if has_k else None, cos, sin, seqlen_offsets, offset, interleaved, True)
        return grads[0], grads[1] if has_k else None, None, None, None, None, None


# ----------------------------------------------------------------------------- checks and API


def _check_table(name: str, x, q: torch.Tensor) -> None:
    """cos or sin: (seqlen_ro, half) or (batch, seqlen_ro, half), float32 or q's dtype."""
    ndim = 3 if isinstance(x, torch.Tensor) and x.dim() == 3 else 2
    shape = "(seqlen_ro, rotary_dim / 2) or (batch, seqlen_ro, rotary_dim / 2)"
    check_tensor(name, x, shape=shape, ndim=ndim, dtypes=(torch.float32, q.dtype))
    if x.device != q.device:
        raise ValueError(f"{name}: device {x.device} differs from q's {q.device}; they must match")


def check_rotary_args(q, k, cos, sin, rotary_dim, seqlen_offsets) -> None:
    """Validate `apply_rotary`'s arguments (see there) before any launch."""
    check_tensor("q", q, shape="(batch, seqlen, heads_q, head_dim)", ndim=4)
    batch, seqlen, _, head_dim = q.shape
    if k is not None:
        check_tensor("k", k, shape="(batch, seqlen, heads_kv, head_dim)", ndim=4)
        check_like("k", k, "q", q)
        for dim, what in ((0, "batch"), (1, "seqlen"), (3, "head_dim")):
            check_dim("k", k, dim, q.shape[dim], f"{what} (as q)")
    _check_table("cos", cos, q)
    _check_table("sin", sin, q)
    check_like("sin", sin, "cos", cos)
    if sin.shape != cos.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} must equal cos's {tuple(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, batch):
        raise ValueError(f"cos: expected batch = 1 or {batch} (as q) at dim 0, got shape {tuple(cos.shape)}")
    half = cos.shape[-1]
    if rotary_dim is not None:
        if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim!r}")
        if rotary_dim != 2 * half:
            raise ValueError(f"rotary_dim: {rotary_dim} must equal 2 * cos.shape[-1] = {2 * half}")
    if not 0 < 2 * half <= head_dim:
        raise ValueError(f"cos: rotary_dim = 2 * cos.shape[-1] = {2 * half} must be in [2, head_dim = {head_dim}]")
    _check_offsets(seqlen_offsets, q, seqlen, cos.shape[-2])


def _check_offsets(seqlen_offsets, q: torch.Tensor, seqlen: int, seqlen_ro: int) -> None:
    if isinstance(seqlen_offsets, torch.Tensor):
        check_tensor("seqlen_offsets", seqlen_offsets, shape="(batch,)", ndim=1, dtypes=(torch.int32,))
        check_dim("seqlen_offsets", seqlen_offsets, 0, q.shape[0], "batch (as q)")
        if seqlen_offsets.device != q.device:
            raise ValueError(f"seqlen_offsets: device {seqlen_offsets.device} differs from q's {q.device}")
        offset = 0  # the values stay on the device; the kernel clamps what exceeds the table
    elif isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool) and seqlen_offsets >= 0:
        offset = seqlen_offsets
    else:
        raise TypeError(f"seqlen_offsets: expected an int >= 0 or an int32 (batch,) tensor, got {seqlen_offsets!r}")
    if offset + seqlen > seqlen_ro:
        raise ValueError(
            f"cos: {seqlen_ro} positions (dim -2) do not cover seqlen_offsets + seqlen = {offset} + {seqlen}"
        )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    rotary_dim: int | None = None,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary position embeddings on q and k in one launch; differentiable in q and k.

    q: (batch, seqlen, heads_q, head_dim); k: (batch, seqlen, heads_kv, head_dim) or None;
    any strides; float16, bfloat16 or float32, computed in float32 and rounded once.
    cos, sin: (seqlen_ro, rotary_dim / 2) or per sequence (batch or 1, seqlen_ro,
    rotary_dim / 2), float32 or q's dtype; not differentiated. Token t of sequence b uses
    row t + seqlen_offsets[b] (an int, or an int32 (batch,) tensor, any stride, for KV-cache
    decode where cos/sin cover the whole cache; a tensor's values are not checked, which
    would need a sync: a token whose row falls outside the table, below 0 or past its end,
    is not rotated, and nothing outside cos/sin is read).
    rotary_dim: defaults to 2 * cos.shape[-1] and must equal it; <= head_dim, the rest
        passes through.
    interleaved: rotate the pairs (2i, 2i + 1) (GLM-4), otherwise the halves
        (i, i + rotary_dim / 2) (Gemma 2).
    inplace: write into q and k and return them (inference only: raises if they need a
        gradient); the pass-through features are not touched. Otherwise new tensors.

    Returns (q_rotated, k_rotated), k_rotated None when k is None.
    """
    check_rotary_args(q, k, cos, sin, rotary_dim, seqlen_offsets)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected bool, got {type(interleaved).__name__}")
    tensor_offsets = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if tensor_offsets is not None else seqlen_offsets
    if not inplace:
        return run_function(RotaryFunction, q, k, cos, sin, tensor_offsets, offset, interleaved)
    # Autograd could follow an in-place rotation (its backward needs no saved input), but
    # not on leaves, and on views (q and k sliced from one qkv) only for single-output ops.
    if needs_grad(q, k):
        raise ValueError("inplace=True is for inference: q or k requires grad; use inplace=False to train")
    _rotary_inplace_op(q, k, cos, sin, tensor_offsets, offset, interleaved)
    return q, k
