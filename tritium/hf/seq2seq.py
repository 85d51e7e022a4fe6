"""Forwards for the attention modules that compute attention inline in transformers, so
no narrower seam exists: MvpAttention (every MVP attention) and BigBird-Pegasus' encoder
self-attention ("original_full" and "block_sparse"). Each names the parameters of the
forward it replaces (`*_PARAMETERS`, every supported version's spelling); `apply` checks
them with `tritium.hf.compat.check_forward` before patching anything.
"""

from __future__ import annotations

import numpy as np
import torch

from tritium.hf.attention import NAME, tritium_attention
from tritium.kernels.block_sparse import block_sparse_attention

# transformers renamed the attention forwards' cache argument past_key_values -> cache
# (5.24); every forward here takes both.
CACHE_NAMES = ("past_key_values", "cache")

MVP_ATTENTION_PARAMETERS = [("self", "hidden_states", "key_value_states", name, "attention_mask", "attn_prompt",
                             "output_attentions", "kwargs") for name in CACHE_NAMES]
BIGBIRD_FULL_PARAMETERS = [("self", "hidden_states", "attention_mask", "encoder_hidden_states",
                            "encoder_attention_mask", name, "kwargs") for name in CACHE_NAMES]
BIGBIRD_BLOCK_SPARSE_PARAMETERS = [("self", "hidden_states", "band_mask", "from_mask", "to_mask", "from_blocked_mask",
                                    "to_blocked_mask", "kwargs")]


def key_padding(additive_mask):
    """(batch, kv) bool from eager's additive (batch, 1, q, kv) mask. Its last query row sees
    every key but the padded ones, causal or not (the query is the newest token)."""
    return None if additive_mask is None else additive_mask[:, 0, -1, :] == 0


def _cached_keys_values(module, hidden_states, key_value_states, cache):
    """MvpAttention's keys and values (batch, heads, seqlen_k, head_dim): projected, or the
    cross-attention's encoder keys reused from the cache, after its cache update; a static
    self-attention cache is cut to its filled rows (causal alignment needs their count: a
    host sync for StaticLayer, whose count is a tensor)."""
    from transformers.cache_utils import EncoderDecoderCache

    is_cross, reuse, layer_cache = key_value_states is not None, False, cache
    if isinstance(cache, EncoderDecoderCache):
        reuse = is_cross and bool(cache.is_updated.get(module.layer_idx))
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if reuse:
        layer = layer_cache.layers[module.layer_idx]
        return layer.keys, layer.values
    batch = hidden_states.shape[0]
    states = key_value_states if is_cross else hidden_states
    k, v = (proj(states).view(batch, -1, module.num_heads, module.head_dim).transpose(1, 2)
            for proj in (module.k_proj, module.v_proj))
    if layer_cache is None:
        return k, v
    k, v = layer_cache.update(k, v, module.layer_idx)
    if is_cross and isinstance(cache, EncoderDecoderCache):
        cache.is_updated[module.layer_idx] = True
    if not is_cross:
        filled = int(layer_cache.layers[module.layer_idx].get_seq_length())
        k, v = k[:, :, :filled], v[:, :, :filled]
    return k, v


def mvp_attention(module, causal, hidden_states, key_value_states=None, cache=None, attention_mask=None,
                  attn_prompt=None, output_attentions=False, past_key_values=None, **kwargs):
    """MvpAttention.forward: encoder self-attention, decoder self-attention (causal: eager
    gets causality from its mask, this from `causal`) and cross-attention. attn_prompt
    (2, heads, prompt_length, head_dim), MVP's task prompts, are per-layer key/value
    prefixes every query sees: with keys [prompt; tokens] the bottom-right aligned causal
    mask is exactly eager's."""
    batch, seqlen, _ = hidden_states.shape
    k, v = _cached_keys_values(module, hidden_states, key_value_states,
                               cache if cache is not None else past_key_values)
    padding = key_padding(attention_mask)
    if padding is not None:
        padding = padding[:, : k.shape[2]]
    if attn_prompt is not None:
        prompt_k, prompt_v = (p.expand(batch, -1, -1, -1) for p in attn_prompt)
        k, v = torch.cat([prompt_k, k], dim=2), torch.cat([prompt_v, v], dim=2)
        if padding is not None:
            padding = torch.cat([padding.new_ones(batch, prompt_k.shape[2]), padding], dim=1)
    q = module.q_proj(hidden_states).view(batch, seqlen, module.num_heads, module.head_dim).transpose(1, 2)
    out, _ = tritium_attention(module, q, k, v, padding, is_causal=causal, scaling=module.scaling,
                               output_attentions=output_attentions,
                               dropout=module.dropout if module.training else 0.0)
    return module.out_proj(out.reshape(batch, seqlen, module.embed_dim)), None


def bigbird_full_self_attention(module, hidden_states, attention_mask=None, encoder_hidden_states=None,
                                encoder_attention_mask=None, cache=None, past_key_values=None, **kwargs):
    """BigBirdPegasusSelfAttention.forward (the encoder's "original_full"), which computes
    scores itself instead of calling the attention interface. Bidirectional; the encoder
    never passes encoder states or a cache."""
    if encoder_hidden_states is not None or cache is not None or past_key_values is not None:
        raise ValueError(f"{NAME}: BigBirdPegasusSelfAttention patched for encoder self-attention got encoder states "
                         "or a cache")
    shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
    out, _ = tritium_attention(module, q, k, v, key_padding(attention_mask), is_causal=False,
                               dropout=module.dropout.p if module.training else 0.0, **kwargs)
    return out.reshape(*hidden_states.shape[:-1], -1), None


def _transformers_rand_attn(module, seqlen: int, device) -> torch.Tensor:
    """The training-mode rand_attn (heads, seqlen / block_size - 2, r) that
    BigBirdPegasusBlockSparseAttention draws, drawn the same way (its own numpy helpers, the
    global numpy RNG seeded with the layer's seed, as its forward does), so training matches
    eager exactly. Host-side numpy: not capturable in a CUDA graph."""
    size, r, heads = module.block_size, module.num_random_blocks, module.num_attention_heads
    np.random.seed(module.seed)
    if seqlen in (1024, 3072, 4096):  # transformers' "old plans used in paper"
        rows = [module._bigbird_block_rand_mask(module.max_seqlen, module.max_seqlen, size, size, r,
                                                last_idx=1024)[: seqlen // size - 2] for _ in range(heads)]
    else:
        plan_from_length, plan_num_rand_blocks = module._get_rand_attn_plan(seqlen, size, r)
        rows = module._bigbird_block_rand_mask_with_head(
            from_seq_length=seqlen, to_seq_length=seqlen, from_block_size=size, to_block_size=size, num_heads=heads,
            plan_from_length=plan_from_length, plan_num_rand_blocks=plan_num_rand_blocks)
    return torch.from_numpy(np.stack(rows, axis=0)).to(device=device, dtype=torch.int64)


def bigbird_block_sparse_attention(module, hidden_states, band_mask=None, from_mask=None, to_mask=None,
                                   from_blocked_mask=None, to_blocked_mask=None, **kwargs):
    """BigBirdPegasusBlockSparseAttention.forward (the encoder's "block_sparse"). The encoder
    has padded the sequence to a multiple of block_size and made (batch, 1, 1, seqlen)
    to_mask; the band/blocked masks are views of the same padding. The dense attention
    probabilities transformers also returns are never built: None (the encoder layer
    discards them)."""
    batch, seqlen, _ = hidden_states.shape
    shape = (batch, seqlen, module.num_attention_heads, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape) for proj in (module.query, module.key, module.value))
    rand_attn = _transformers_rand_attn(module, seqlen, q.device) if module.training else None
    padding = None if to_mask is None else to_mask[:, 0, 0, :] != 0
    out = block_sparse_attention(q, k, v, block_size=module.block_size, num_random_blocks=module.num_random_blocks,
                                 rand_attn=rand_attn, key_padding_mask=padding)
    return out.reshape(batch, seqlen, -1), None
