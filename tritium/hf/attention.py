"""attn_implementation="tritium": the attention function and mask function transformers
calls through its AttentionInterface / AttentionMaskInterface.

transformers hands the attention function (batch, heads, seq, dim) tensors; tritium takes
(batch, seq, heads, dim) with any strides, so a transpose(1, 2) view is all it needs. The
mask function returns, like flash_attention_2's, a 2-D bool padding mask (batch, kv_len)
(None when no attention_mask is given), never a (batch, 1, q_len, kv_len) float mask: causality, the sliding window and
the KV-cache offset are all expressed by tritium's bottom-right aligned causal window.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import bidirectional_mask_function, eager_mask

from tritium.kernels.attention import flash_attention
from tritium.kernels.attention_kvcache import flash_attention_with_kvcache

NAME = "tritium"

# The leading parameters of transformers' flash_attention_2 attention and mask functions,
# whose calling convention these share (checked when registering: tritium.hf.register).
ATTENTION_PARAMETERS = ("module", "query", "key", "value", "attention_mask", "dropout", "scaling", "sliding_window",
                        "softcap", "is_causal")
MASK_PARAMETERS = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask")
# Attention-interface arguments some models pass that change the result and that the
# kernels do not implement: refused when set, never ignored.
UNSUPPORTED_ARGUMENTS = ("s_aux", "sinks", "position_bias", "head_mask", "cu_seq_lens_q", "cu_seq_lens_k")

# BigBird-Pegasus: the encoder's "original_full" attention computes scores itself and adds
# the mask made for `config._attn_implementation`, and the decoder's self-attention module
# has is_causal=False (eager gets causality from the mask). So its masks carry both facts
# in 4-D form (see `_mask_semantics`): bidirectional -> eager's additive (b, 1, q, kv)
# float mask; causal -> a (b, 1, 1, kv) bool key padding mask meaning "causal".
MASKS_CARRY_CAUSALITY = {"bigbird_pegasus"}

# Families that never call the interface in transformers: "tritium" would only swap
# their masks for ones their eager code cannot use. `tritium.hf.apply` patches them instead.
NOT_ROUTED = {"mvp": "MvpAttention computes attention itself (bmm + 4-D additive mask)"}


def _static_cache_keys(q_length: int, kv_length: int, q_offset) -> int | torch.Tensor | None:
    """How many leading keys a static cache layer has filled when this step's queries are
    in (its buffer is kv_length long, the rest unwritten), or None for a dynamic cache,
    whose keys are exactly the seen tokens. StaticLayer gives its offset as a tensor;
    StaticSlidingWindowLayer as an int that, until its buffer is full, falls short of it."""
    if isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_length:
        return q_offset + q_length
    return None


def tritium_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
    """AttentionMaskInterface entry: a (batch, kv_length) bool padding mask (True = attend)
    or None without an attention_mask (4-D forms for MASKS_CARRY_CAUSALITY).

    With a static cache the mask is shorter than the keys: it covers the filled part of the
    buffer (as flash_attention_2's does), which `tritium_attention` then attends alone."""
    model_type = getattr(config, "model_type", None)
    if model_type in NOT_ROUTED:
        raise ValueError(f'attn_implementation="{NAME}": {model_type} does not route attention through '
                         f"transformers' AttentionInterface ({NOT_ROUTED[model_type]}); keep \"eager\" and call "
                         "tritium.hf.apply(model), which patches its attention modules")
    if kwargs.get("use_vmap"):
        raise ValueError(f'attn_implementation="{NAME}": custom or_mask/and_mask functions are not supported')
    causal = mask_function is not bidirectional_mask_function
    if kwargs.get("allow_is_causal_skip") is False and causal and q_length > 1:
        # Set by the causal mask makers for packed sequences (position_ids restarting inside a
        # row, no attention mask), which a padding mask cannot separate (and by the makers of
        # bidirectional sliding-window masks, which tritium's attention refuses too). Static
        # caches set it for decode steps (q_length 1), where packing cannot occur.
        raise ValueError(f'attn_implementation="{NAME}": packed sequences are not supported; pass one sequence per '
                         "row with an attention_mask")
    filled = _static_cache_keys(q_length, kv_length, q_offset) if causal else None
    if filled is not None and attention_mask is None:
        # generate always passes a mask (its length is the filled count); a bare forward
        # needs the count on the host once.
        attention_mask = torch.ones(batch_size, int(filled), dtype=torch.bool, device=kwargs.get("device"))
    if model_type in MASKS_CARRY_CAUSALITY:
        if not causal:
            return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                              config=config, **kwargs)
        padding = attention_mask[:, -kv_length:] if attention_mask is not None else torch.ones(
            batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device"))
        return padding[:, None, None, :].bool()
    # Kept even when nothing is padded: testing that would sync the host with the GPU (and
    # break torch.compile graphs), while a key mask costs the kernels one byte per key.
    return None if attention_mask is None else attention_mask[:, -kv_length:].bool()


def _mask_semantics(attention_mask: torch.Tensor | None, causal: bool, seqlen_k: int, model_type: str | None):
    """(causal, key_padding_mask (batch, n) bool or None) from what `tritium_mask` produced:
    None or a 2-D padding mask (causality from the module), or one of the 4-D forms of
    MASKS_CARRY_CAUSALITY. n < seqlen_k for a static cache: only its first n keys are filled."""
    if attention_mask is None:
        return causal, None
    if attention_mask.dim() == 4:
        if model_type not in MASKS_CARRY_CAUSALITY:
            # A 4-D mask given by the caller reaches us untouched; its pattern is unknown.
            raise ValueError(f'attn_implementation="{NAME}" takes 2-D padding masks (batch, seqlen); got a 4-D '
                             f"mask of shape {tuple(attention_mask.shape)}")
        if attention_mask.dtype == torch.bool and attention_mask.shape[2] == 1:
            causal, attention_mask = True, attention_mask[:, 0, 0, :]
        elif attention_mask.dtype != torch.bool:
            # Bidirectional padding: every query row is the same; a visible key adds 0.
            causal, attention_mask = False, attention_mask[:, 0, -1, :] == 0
        else:
            raise ValueError(f'attn_implementation="{NAME}" takes 2-D padding masks; got a 4-D bool mask of shape '
                             f"{tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] > seqlen_k:
        raise ValueError(f'attn_implementation="{NAME}": padding mask covers {attention_mask.shape[-1]} keys, '
                         f"the attention has {seqlen_k}")
    return causal, attention_mask.bool()


def tritium_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry. query (batch, heads_q, seq_q, dim), key/value (batch,
    heads_kv, seq_k, dim), heads_kv dividing heads_q (GQA without repeat_kv). Returns
    (out (batch, seq_q, heads_q, dim), None)."""
    unsupported = [name for name in UNSUPPORTED_ARGUMENTS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f'attn_implementation="{NAME}" does not implement {", ".join(unsupported)} (given by '
                         f"{type(module).__name__}); use another attn_implementation for this model")
    if kwargs.get("output_attentions"):
        raise ValueError(f'attn_implementation="{NAME}" never materialises attention weights; use "eager" for '
                         "output_attentions=True")
    if dropout > 0 and module.training:
        raise ValueError(f'attn_implementation="{NAME}" has no attention dropout; got dropout={dropout} in '
                         "training mode (set the config's attention dropout to 0)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    causal, key_padding_mask = _mask_semantics(attention_mask, causal, key.shape[2], model_type)
    window = (-1, -1)
    if sliding_window:
        if not causal:
            raise ValueError(f'attn_implementation="{NAME}": sliding_window={sliding_window} needs causal attention')
        window = (sliding_window - 1, 0)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if key_padding_mask is not None and key_padding_mask.shape[-1] < k.shape[1]:
        # A static cache's buffer: the queries align with its filled keys, the rest is unwritten.
        k, v = k[:, : key_padding_mask.shape[-1]], v[:, : key_padding_mask.shape[-1]]
    options = dict(causal=causal, window_size=window, softcap=softcap or 0.0, softmax_scale=scaling)
    if q.shape[1] == 1 and not (torch.is_grad_enabled() and query.requires_grad):
        # Decode step: the split-KV kernel, over every key of the cache.
        return flash_attention_with_kvcache(q, k, v, k.shape[1], key_padding_mask=key_padding_mask, **options), None
    return flash_attention(q, k, v, key_padding_mask=key_padding_mask, **options), None
