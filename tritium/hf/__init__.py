"""Hugging Face transformers integration. `import tritium.hf` registers
attn_implementation="tritium":

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tritium")

and offers opt-in patching of a loaded model's norms, MLPs, rotary embeddings (Gemma 2,
GLM-4), the attention modules that bypass the interface (MVP's, BigBird-Pegasus' encoder,
block-sparse included) and, with nf4=True, bitsandbytes' nf4 Linear4bit layers with
tritium's kernels:

    tritium.hf.apply(model)    # or apply_tritium_to_gemma2(model, mlp=False, rope=True, nf4=True)
    tritium.hf.revert(model)
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from tritium.hf.attention import ATTENTION_PARAMETERS, MASK_PARAMETERS, NAME, tritium_attention, tritium_mask
from tritium.hf.compat import NEWEST, OLDEST, UnsupportedTransformers, check_parameters, warn_if_untested
from tritium.hf.patch import (
    MODEL_TYPE_TO_APPLY,
    apply,
    apply_tritium_to_bert_generation,
    apply_tritium_to_bigbird_pegasus,
    apply_tritium_to_encoder_decoder,
    apply_tritium_to_gemma2,
    apply_tritium_to_glm4,
    apply_tritium_to_mvp,
    revert,
)

__all__ = [
    "MODEL_TYPE_TO_APPLY",
    "NAME",
    "NEWEST",
    "OLDEST",
    "UnsupportedTransformers",
    "apply",
    "apply_tritium_to_bert_generation",
    "apply_tritium_to_bigbird_pegasus",
    "apply_tritium_to_encoder_decoder",
    "apply_tritium_to_gemma2",
    "apply_tritium_to_glm4",
    "apply_tritium_to_mvp",
    "register",
    "revert",
]


def register() -> None:
    """Register "tritium" in transformers' AttentionInterface and AttentionMaskInterface
    (global mappings, so every model sees it). Idempotent.

    Warns once outside the tested transformers range; raises UnsupportedTransformers when
    transformers' own flash_attention_2 functions, whose calling convention "tritium"
    shares, take other arguments than it was written for."""
    warn_if_untested()
    check_parameters(flash_attention_forward, [ATTENTION_PARAMETERS], prefix=True)
    check_parameters(flash_attention_mask, [MASK_PARAMETERS], prefix=True)
    AttentionInterface.register(NAME, tritium_attention)
    AttentionMaskInterface.register(NAME, tritium_mask)


register()
