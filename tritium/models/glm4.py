"""GLM-4 (THUDM/GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1) as a compact decoder on tritium's
kernels: q/k/v projections with bias (o_proj without); rotary on the first
partial_rotary_factor (0.5) of each head, rotating interleaved pairs (2i, 2i + 1); a fused
gate_up_proj SwiGLU; four RMSNorms per layer (input_layernorm, post_self_attn_layernorm,
post_attention_layernorm before the MLP, post_mlp_layernorm) multiplied in the model dtype,
as Llama's; three eos ids by default."""

from __future__ import annotations

from tritium.models.config import DecoderConfig, activation, common_fields, rope_of
from tritium.models.decoder import DecoderLM, SandwichLayer


class Glm4Layer(SandwichLayer):
    NORMS = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")


class Glm4ForCausalLM(DecoderLM):
    """GLM-4 causal LM; see tritium.models.load."""

    LAYER = Glm4Layer
    FUSED_GATE_UP = True


def config_from_hf(raw: dict) -> DecoderConfig:
    """A DecoderConfig from a GLM-4 ("glm4") config.json, with transformers' defaults."""
    raw = {"max_position_embeddings": 131072, "partial_rotary_factor": 0.5, "attention_bias": True,
           "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, **raw}
    fields = common_fields(raw)
    rope, partial = rope_of(raw, {"full_attention": 1e4})
    return DecoderConfig(
        **fields,
        activation=activation(raw, "hidden_act", default="silu"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1.5625e-07)), norm_offset=0.0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        softmax_scale=fields["head_dim"] ** -0.5,
        layer_types=["full_attention"] * fields["num_hidden_layers"], rope=rope,
        rotary_dim=int(fields["head_dim"] * partial), interleaved_rotary=True,
    )
