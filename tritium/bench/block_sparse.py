"""BigBird block-sparse suite: tritium against transformers' BigBirdPegasus block-sparse
attention (the baseline, whose error sets the accuracy tolerance), its original_full path
(dense attention with the padding mask), tritium's dense flash attention, and
FlexAttention with the equivalent block mask.

BigBird-Pegasus-large shape: 16 heads, head_dim 64; transformers' eval layout (every random
block is block 0, counted r more times), a padded tail on the last sequence.
"""

from __future__ import annotations

import torch

import tritium
from tritium import reference
from tritium.bench.operators import Backend, Case, Operator, Unsupported, max_abs_error, register

SUITE = "block_sparse"
HEADS, HEAD_DIM, RANDOM = 16, 64, 3
SEQLENS = (1024, 2048, 4096, 8192, 16384)
BWD_FLOPS = 2.5


def _case(seqlen: int, block_size: int, *, batch: int = 1, heads: int = HEADS, head_dim: int = HEAD_DIM,
          dtype: str = "bfloat16", random: int = RANDOM) -> Case:
    params = {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "block_size": block_size,
              "random": random, "dtype": dtype}
    return Case(f"bigbird-b{block_size}-s{seqlen}-h{heads}", seqlen, f"block {block_size}, hdim {head_dim}", params)


def _cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case(128, 16, heads=1, head_dim=16, dtype="float16", random=1)]
    if quick:
        return [_case(s, 64) for s in (4096, 8192)]
    return [_case(s, b) for b in (64, 32, 16) for s in SEQLENS if s // b <= 512]


def _inputs(case: Case, device: str) -> dict:
    p = case.params
    shape = (p["batch"], p["seqlen"], p["heads"], p["head_dim"])
    mask = torch.ones(p["batch"], p["seqlen"], dtype=torch.bool, device=device)
    mask[-1, -p["block_size"] - 7:] = False  # a padded tail, as after transformers' padding
    return {**{n: torch.randn(shape, dtype=getattr(torch, p["dtype"]), device=device) for n in "qkv"},
            "key_padding_mask": mask}


def _visited_pairs(case: Case) -> int:
    """(query, key) pairs the layout visits, duplicates counted: the work an exact kernel does."""
    p = case.params
    blocks = p["seqlen"] // p["block_size"]
    per_row = 2 * blocks + 2 * (4 + p["random"]) + (blocks - 4) * (5 + p["random"])
    return per_row * p["block_size"] ** 2


def _flops(case: Case, mode: str) -> float:
    p = case.params
    fwd = 4 * p["batch"] * p["heads"] * _visited_pairs(case) * p["head_dim"]
    return fwd * (1 + BWD_FLOPS) if mode == "fwd+bwd" else fwd


def _bytes(case: Case, mode: str) -> float:
    p = case.params
    tensor = p["batch"] * p["seqlen"] * p["heads"] * p["head_dim"] * getattr(torch, p["dtype"]).itemsize
    return tensor * (8 if mode == "fwd+bwd" else 4)


def _error(case: Case, inputs: dict, outputs: tuple, grad_out) -> float:
    """Against the dense float64 reference on batch 0, head 0 (heads are independent)."""
    p = case.params
    sub = {n: inputs[n][-1:, :, :1] for n in "qkv"}
    sub["key_padding_mask"] = inputs["key_padding_mask"][-1:]
    got = [x[-1:, :, :1] for x in outputs]

    def ref(q, k, v, key_padding_mask):
        return reference.block_sparse_attention(q, k, v, block_size=p["block_size"], num_random_blocks=p["random"],
                                                key_padding_mask=key_padding_mask)

    return max_abs_error(ref, sub, got, None if grad_out is None else grad_out[-1:, :, :1], ("q", "k", "v"))


# ----------------------------------------------------------------------------- backends


def _tritium(case: Case, t: dict):
    p = case.params
    return lambda: tritium.block_sparse_attention(t["q"], t["k"], t["v"], block_size=p["block_size"],
                                                  num_random_blocks=p["random"], key_padding_mask=t["key_padding_mask"])


def _transformers(case: Case, t: dict):
    from transformers import BigBirdPegasusConfig
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import (
        BigBirdPegasusBlockSparseAttention,
        BigBirdPegasusEncoder,
    )

    p = case.params
    config = BigBirdPegasusConfig(d_model=p["heads"] * p["head_dim"], encoder_attention_heads=p["heads"],
                                  block_size=p["block_size"], num_random_blocks=p["random"],
                                  max_position_embeddings=max(4096, p["seqlen"]))
    config.hidden_size, config.num_attention_heads = config.d_model, p["heads"]
    module = BigBirdPegasusBlockSparseAttention(config).eval()
    mask = t["key_padding_mask"].to(t["q"].dtype)
    blocked, band, from_mask, to_mask = BigBirdPegasusEncoder.create_masks_for_block_sparse_attn(mask, p["block_size"])
    sizes = (p["heads"], p["random"], p["head_dim"], p["block_size"], p["block_size"], p["batch"], p["seqlen"],
             p["seqlen"])

    def run():
        out, _ = module.bigbird_block_sparse_attention(
            t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2), band, from_mask, to_mask,
            blocked, blocked, *sizes, seed=None, plan_from_length=None, plan_num_rand_blocks=None)
        return out  # (batch, seqlen, heads, head_dim)

    return run


def _original_full(case: Case, t: dict):
    """transformers' original_full path: dense softmax attention with the padding mask."""
    return lambda: reference.attention(t["q"], t["k"], t["v"], key_padding_mask=t["key_padding_mask"])


def _flash_dense(case: Case, t: dict):
    return lambda: tritium.flash_attention(t["q"], t["k"], t["v"], key_padding_mask=t["key_padding_mask"])


def _flex(case: Case, t: dict):
    if t["q"].device.type != "cuda":
        raise Unsupported("FlexAttention is benchmarked compiled, on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    bs, blocks = p["block_size"], p["seqlen"] // p["block_size"]
    rand_attn = torch.zeros(p["heads"], blocks - 2, p["random"], dtype=torch.long, device=t["q"].device)
    counts = reference.bigbird_block_counts(blocks, rand_attn)
    # Duplicated blocks count twice: log(count) joins the score; padded keys get -10000.
    log_counts = torch.log(counts.clamp(min=1).float())
    penalty = (~t["key_padding_mask"]).float() * -10000.0

    def mask_mod(b, h, q_idx, kv_idx):
        return counts[h, q_idx // bs, kv_idx // bs] > 0

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + log_counts[h, q_idx // bs, kv_idx // bs] + penalty[b, kv_idx]

    block_mask = create_block_mask(mask_mod, None, p["heads"], p["seqlen"], p["seqlen"], device=t["q"].device,
                                   BLOCK_SIZE=max(bs, 128))
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    keep = t["key_padding_mask"][:, :, None, None].to(t["q"].dtype)
    return lambda: compiled(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2),
                            score_mod=score_mod, block_mask=block_mask).transpose(1, 2) * keep


register(Operator(
    name="block_sparse", suite=SUITE, modes=("fwd", "fwd+bwd"), cases=_cases, inputs=_inputs,
    backends=(Backend("tritium", _tritium), Backend("transformers", _transformers),
              Backend("original_full", _original_full, exact=False),
              Backend("tritium-dense", _flash_dense, exact=False), Backend("flex", _flex)),
    baseline={"cuda": "transformers", "cpu": "transformers"}, flops=_flops, nbytes=_bytes, error=_error,
    grad_inputs=("q", "k", "v"), accuracy_reference="transformers",
))
