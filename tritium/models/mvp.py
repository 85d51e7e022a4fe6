"""MVP (RUCAIBox/mvp, and its task variants) as a compact encoder-decoder on tritium's
kernels: BART's architecture (learned positions from row 2, layernorm_embedding, post-norm
layers, optional scale_embedding, the LM head tied to the shared embeddings plus
final_logits_bias) and, with use_prompt, MVP's task prompts: per stack a small MLP
(prompt_length vectors -> prompt_mid_dim -> one key and one value prefix per layer) whose
prefixes every encoder self-attention, decoder self-attention and cross-attention sees
before its own keys. `set_lightweight_tuning()` trains the prompts only.

The encoder's prompts exist when the checkpoint holds them: MVP's own checkpoints do;
transformers 5 builds and saves MVP without them (its MvpModel passes use_prompt where
MvpEncoder takes embed_tokens), and such a checkpoint loads as transformers runs it."""

from __future__ import annotations

from tritium.models.seq2seq import BartLM, Seq2SeqConfig


class MvpForConditionalGeneration(BartLM):
    """MVP / BART-style conditional generation; see tritium.models.load."""

    @staticmethod
    def fit_checkpoint(config: Seq2SeqConfig, keys) -> Seq2SeqConfig:
        """The config the checkpoint's tensors describe: encoder prompts only if it has them."""
        config.encoder_prompt = any(k.startswith("model.encoder.self_attn_prompt.") for k in keys)
        return config

    def set_lightweight_tuning(self) -> None:
        """Freeze everything but the task prompts (MVP's lightweight tuning), as
        transformers' MvpForConditionalGeneration.set_lightweight_tuning does."""
        if not self.config.use_prompt:
            raise ValueError("set_lightweight_tuning: this model has no prompts (config.json use_prompt is false)")
        self.requires_grad_(False)
        for stack in (self.model.encoder, self.model.decoder):
            for name in ("self_attn_prompt", "cross_attn_prompt"):
                if hasattr(stack, name):
                    getattr(stack, name).requires_grad_(True)


def config_from_hf(raw: dict) -> Seq2SeqConfig:
    """A Seq2SeqConfig from an MVP ("mvp") config.json, with transformers' defaults."""
    raw = {"vocab_size": 50267, "max_position_embeddings": 1024, "encoder_layers": 12, "decoder_layers": 12,
           "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096, "encoder_attention_heads": 16,
           "decoder_attention_heads": 16, "d_model": 1024, "dropout": 0.1, "pad_token_id": 1, "bos_token_id": 0,
           "eos_token_id": 2, "decoder_start_token_id": 2, "prompt_length": 100, "prompt_mid_dim": 800, **raw}
    use_prompt = bool(raw.get("use_prompt", False))
    return Seq2SeqConfig.from_hf(raw, use_prompt=use_prompt, prompt_length=raw["prompt_length"] if use_prompt else 0,
                                 prompt_mid_dim=raw["prompt_mid_dim"])
