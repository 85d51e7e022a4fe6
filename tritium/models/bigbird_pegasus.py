"""BigBird-Pegasus (google/bigbird-pegasus-large-arxiv, -pubmed, -bigpatent) as a compact
encoder-decoder on tritium's kernels: Pegasus' pre-norm layers (a LayerNorm before each
block, one after each stack, which transformers names layernorm_embedding), embeddings
scaled by sqrt(d_model), learned positions from row 0, gelu_new, projections without bias
(use_bias), the LM head tied to the shared embeddings plus final_logits_bias; and BigBird's
block-sparse encoder self-attention (attention_type "block_sparse"), on
tritium.block_sparse_attention: transformers' eval layout in eval mode, its seeded random
layout (bigbird_layout.py) in training.

As transformers does, the encoder pads a block-sparse input to a multiple of block_size
(pad-token embeddings, masked) and cuts the padding off after; an input too short for the
layout ((5 + 2 * num_random_blocks) * block_size tokens or fewer) runs full attention,
said once, and unlike transformers a later long input runs block-sparse again.
`set_attention_type("original_full")` selects full attention for every input.
"""

from __future__ import annotations

import warnings

import torch

from tritium.models.bigbird_layout import random_layout
from tritium.models.seq2seq import BartLM, Seq2SeqConfig

CHECKPOINT_RENAMES = (
    (r"(encoder\.layers\.\d+\.self_attn)\.self\.query\.", r"\1.q_proj."),
    (r"(encoder\.layers\.\d+\.self_attn)\.self\.key\.", r"\1.k_proj."),
    (r"(encoder\.layers\.\d+\.self_attn)\.self\.value\.", r"\1.v_proj."),
    (r"(encoder\.layers\.\d+\.self_attn)\.output\.", r"\1.out_proj."),
    (r"((?:en|de)coder)\.layernorm_embedding\.", r"\1.layer_norm."),
)
ATTENTION_TYPES = ("original_full", "block_sparse")


class BigBirdPegasusForConditionalGeneration(BartLM):
    """BigBird-Pegasus conditional generation; see tritium.models.load."""

    CHECKPOINT_RENAMES = CHECKPOINT_RENAMES

    def __init__(self, config: Seq2SeqConfig, **factory):
        super().__init__(config, **factory)
        self.said_full = False

    def set_attention_type(self, value: str) -> None:
        """The encoder's self-attention: "block_sparse" (full attention still runs for
        inputs too short for the layout) or "original_full"."""
        if value not in ATTENTION_TYPES:
            raise ValueError(f"attention_type: expected one of {ATTENTION_TYPES}, got {value!r}")
        self.config.attention_type = value

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        c, seqlen = self.config, input_ids.shape[1]
        shortest = (5 + 2 * c.num_random_blocks) * c.block_size
        if c.attention_type != "block_sparse" or seqlen <= shortest:
            if c.attention_type == "block_sparse" and not self.said_full:
                warnings.warn(f"BigBird-Pegasus: an input of {seqlen} tokens is too short for block-sparse attention "
                              f"(more than {shortest} needed with block_size {c.block_size} and num_random_blocks "
                              f"{c.num_random_blocks}): full attention for such inputs", stacklevel=2)
                self.said_full = True
            return super().encode(input_ids, attention_mask)
        encoder = self.encoder_stack
        x = encoder.embed(input_ids, encoder.positions(input_ids))
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pad = -seqlen % c.block_size
        if pad:  # transformers' padding: pad-token embeddings (scaled, no position), masked
            pad_ids = input_ids.new_full((input_ids.shape[0], pad), c.pad_token_id)
            x = torch.cat([x, encoder.embed_tokens(pad_ids) * encoder.scale], 1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
        for seed, layer in enumerate(encoder.layers):
            layout = None
            if self.training:  # transformers' random blocks, seeded with the layer's index
                layout = random_layout(x.shape[1], block_size=c.block_size, num_random_blocks=c.num_random_blocks,
                                       heads=c.encoder_attention_heads, seed=seed,
                                       max_seqlen=c.max_position_embeddings).to(x.device)
            x = layer(x, mask=mask, sparse=(c.block_size, c.num_random_blocks, layout))
        return encoder.finish(x)[:, :seqlen]


def config_from_hf(raw: dict) -> Seq2SeqConfig:
    """A Seq2SeqConfig from a BigBird-Pegasus ("bigbird_pegasus") config.json, with
    transformers' defaults."""
    raw = {"vocab_size": 96103, "max_position_embeddings": 4096, "encoder_layers": 16, "decoder_layers": 16,
           "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096, "encoder_attention_heads": 16,
           "decoder_attention_heads": 16, "activation_function": "gelu_new", "d_model": 1024, "dropout": 0.1,
           "decoder_start_token_id": 2, "scale_embedding": True, "pad_token_id": 0, "bos_token_id": 2,
           "eos_token_id": 1, **raw}
    attention_type = raw.get("attention_type", "block_sparse")
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"config.json: attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    return Seq2SeqConfig.from_hf(raw, pre_norm=True, position_offset=0, layernorm_embedding=False,
                                 attention_bias=bool(raw.get("use_bias", False)), attention_type=attention_type,
                                 block_size=int(raw.get("block_size", 64)),
                                 num_random_blocks=int(raw.get("num_random_blocks", 3)))
