"""Gemma 2 and Gemma 3 (text) as compact decoders on tritium's kernels.

Gemma 2 (google/gemma-2-2b, -9b, -27b): embeddings times sqrt(hidden_size) rounded to the
model dtype; four RMSNorms per layer with scale 1 + w multiplied in float32; attention
scaled by query_pre_attn_scalar ** -0.5 and its logits capped (attn_logit_softcapping,
50); a sliding window on the layers `layer_types` marks "sliding_attention" (by default
every other one, the first included); the final logits capped (final_logit_softcapping,
30); the LM head tied to the embeddings; GeGLU MLP (gate_proj, up_proj, down_proj).

Gemma 3 text (Gemma3ForCausalLM: google/gemma-3-270m, -1b): the same layer, plus an
RMSNorm of each query and key head before rotary (q_norm, k_norm), rope bases per layer
type (rope_local_base_freq, 10k, on sliding layers; rope_theta, 1M, with optional linear
scaling, on global ones), five sliding layers in six by default, and no softcaps.
"""

from __future__ import annotations

from tritium.models.config import DecoderConfig, activation, common_fields, rope_of, softcap
from tritium.models.decoder import DecoderLM


class Gemma2ForCausalLM(DecoderLM):
    """Gemma 2 / Gemma 3 text causal LM; see tritium.models.load."""


def config_from_hf(raw: dict) -> DecoderConfig:
    """A DecoderConfig from a Gemma 2 ("gemma2") or Gemma 3 text ("gemma3_text") config.json,
    with transformers' defaults for the fields it leaves out."""
    gemma3 = raw["model_type"] == "gemma3_text"
    if raw.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention (an embedding model) is not a causal LM; "
                         "tritium's compact Gemma is causal")
    raw = {"head_dim": 256, "max_position_embeddings": 131072 if gemma3 else 8192, "pad_token_id": 0,
           "eos_token_id": 1, "bos_token_id": 2, **raw}
    fields = common_fields(raw)
    layers = fields["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern", 6) if gemma3 else 2
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                         f"{layers} layers, got {layer_types}")
    defaults = {"full_attention": 1e6, "sliding_attention": 1e4} if gemma3 else dict.fromkeys(
        ("full_attention", "sliding_attention"), 1e4)
    rope, _ = rope_of(raw, defaults, local_key="rope_local_base_freq" if gemma3 else None)
    return DecoderConfig(
        **fields,
        activation=activation(raw, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), norm_offset=1.0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        softmax_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        layer_types=layer_types, rope=rope, rotary_dim=fields["head_dim"],
        sliding_window=raw.get("sliding_window", 4096),
        attn_softcap=softcap(raw.get("attn_logit_softcapping", None if gemma3 else 50.0)),
        final_softcap=softcap(raw.get("final_logit_softcapping", None if gemma3 else 30.0)),
        scale_embeddings=True, qk_norm=gemma3,
    )
