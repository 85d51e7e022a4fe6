"""Opt-in patching of a loaded transformers model with tritium's kernels: norms, MLPs,
rotary embeddings (Gemma 2, GLM-4), bitsandbytes' nf4 Linear4bit layers, and the attention
modules that bypass transformers' AttentionInterface (MVP's, BigBird-Pegasus' encoder,
"original_full" or "block_sparse"); the rest of the attention goes through
attn_implementation.

transformers rotates q and k with a module-level `apply_rotary_pos_emb` inside the
attention forward; patching that function would change every model in the process, so
`rope` replaces each attention module's forward instead (the same steps, the rotation on
tritium's kernel, whatever attn_implementation is set).

A patch replaces a module's `forward` by an instance attribute (or swaps a parameterless
activation module for nn.Identity when its activation moves into a GEMM epilogue). The
parameters, their names and their tensors are never touched, so checkpoints, optimizers
and state_dict see the same model, and `revert` restores it exactly by undoing the
recorded attribute changes.
"""

from __future__ import annotations

import weakref
from functools import partial

import numpy as np
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tritium.hf.attention import NAME, tritium_attention
from tritium.kernels.block_sparse import block_sparse_attention
from tritium.kernels.mlp import gated_mlp, linear
from tritium.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight
from tritium.kernels.nf4 import matmul as nf4_matmul
from tritium.kernels.norm import layer_norm, rms_norm
from tritium.kernels.rope import apply_rotary
from tritium.models.mlp import activation_from_hf

_ABSENT = object()
# model -> [(object, attribute, previous value or _ABSENT)], in patch order.
_PATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _set(model: nn.Module, obj, attr: str, value) -> None:
    """setattr, remembering what to restore. An instance `forward` shadows the class's."""
    previous = obj.__dict__.get(attr, _ABSENT) if attr == "forward" else getattr(obj, attr)
    _PATCHES.setdefault(model, []).append((obj, attr, previous))
    setattr(obj, attr, value)


def revert(model: nn.Module) -> None:
    """Undo every patch `apply` made to model (attention implementation included)."""
    for obj, attr, previous in reversed(_PATCHES.pop(model, [])):
        if attr == "attn_implementation":
            obj.set_attn_implementation(previous)
        elif previous is _ABSENT:
            delattr(obj, attr)
        else:
            setattr(obj, attr, previous)


def _patch_attention(model: nn.Module) -> None:
    _PATCHES.setdefault(model, []).append((model, "attn_implementation", model.config._attn_implementation))
    model.set_attn_implementation(NAME)


# Patched forwards: module first (bound with partial), then what the original took.

def _gemma_rms_norm(module, x):
    return rms_norm(x, module.weight, module.eps, offset=1.0)  # (1 + w), multiplied in float32


def _llama_rms_norm(module, x):
    return rms_norm(x, module.weight, module.variance_epsilon)  # cast to x's dtype, then * w


def _layer_norm(module, x):
    return layer_norm(x, module.weight, module.bias, module.eps)


def _linear(module, activation, x):
    return linear(x, module.weight, module.bias, activation)


def _fused_gate_up_mlp(module, activation, x):
    return gated_mlp(x, module.gate_up_proj.weight, module.down_proj.weight, activation)


def _split_gate_up_mlp(module, activation, x):
    # Gemma 2 keeps gate_proj and up_proj apart: gated_mlp reads the pair in place.
    return gated_mlp(x, (module.gate_proj.weight, module.up_proj.weight), module.down_proj.weight, activation)


def _nf4_linear(module, weight, x):
    # bitsandbytes' Linear4bit.forward: compute in compute_dtype (x's dtype when unset), the
    # result cast back to x's dtype.
    dtype = module.compute_dtype or x.dtype
    bias = None if module.bias is None else module.bias.to(dtype)
    return nf4_matmul(x.to(dtype), weight, bias).to(x.dtype)


def _nf4_weight(module) -> NF4Weight:
    """An NF4Weight over a bitsandbytes Linear4bit's own tensors (views, no copy)."""
    weight, state = module.weight, getattr(module.weight, "quant_state", None)
    if state is None:
        raise ValueError(f"nf4: {module} is not quantized yet (bitsandbytes quantizes when moved to a device)")
    if state.quant_type != "nf4":
        raise ValueError(f"nf4: bitsandbytes quant_type {state.quant_type!r} is not supported, only 'nf4'")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("nf4: bitsandbytes has repacked this weight for its CPU kernel (its first no-grad forward "
                         "on an AVX-512 CPU does so); call apply before running the model")
    nested = state.state2 if state.nested else None
    if nested is not None and nested.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"nf4: nested blocksize {nested.blocksize} is not supported, only {NESTED_BLOCKSIZE}")
    # bnb_4bit_quant_storage (FSDP) keeps the same bytes under another dtype.
    packed = weight.data.view(torch.uint8).reshape(-1, 1)
    double = dict(absmax2=nested.absmax, code2=nested.code, offset=state.offset) if nested is not None else {}
    return NF4Weight(packed=packed, absmax=state.absmax, blocksize=state.blocksize, shape=tuple(state.shape),
                     dtype=state.dtype, code=state.code, **double)


def _patch_linear4bit(model: nn.Module) -> None:
    """Every bitsandbytes Linear4bit (nf4) computes with tritium.nf4.matmul; the NF4Weight
    is built here, once, over the module's tensors (so move the model before apply, not
    after). fp4 layers are refused, all checked before any is patched."""
    from bitsandbytes.nn import Linear4bit

    weights = {module: _nf4_weight(module) for module in model.modules() if isinstance(module, Linear4bit)}
    for module, weight in weights.items():
        _set(model, module, "forward", partial(_nf4_linear, module, weight))


def _dense(module: nn.Module) -> bool:
    """False when one of module's Linear layers holds a quantized (bitsandbytes) weight: the
    fused MLP kernels read weights directly, so those MLPs are left to `nf4=True`."""
    return all(m.weight.is_floating_point() for m in module.modules() if isinstance(m, nn.Linear))


def _key_padding(additive_mask):
    """(batch, kv) bool from eager's additive (batch, 1, q, kv) mask. Its last query row sees
    every key but the padded ones, causal or not (the query is the newest token)."""
    return None if additive_mask is None else additive_mask[:, 0, -1, :] == 0


def _bigbird_full_self_attention(module, hidden_states, attention_mask=None, **kwargs):
    # BigBirdPegasusSelfAttention (the encoder's "original_full"), which computes scores
    # itself instead of calling the attention interface. Bidirectional.
    shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
    out, _ = tritium_attention(module, q, k, v, _key_padding(attention_mask), is_causal=False,
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


def _bigbird_block_sparse_attention(module, hidden_states, band_mask=None, from_mask=None, to_mask=None,
                                    from_blocked_mask=None, to_blocked_mask=None, **kwargs):
    # BigBirdPegasusBlockSparseAttention (the encoder's "block_sparse"). The encoder has
    # padded the sequence to a multiple of block_size and made (batch, 1, 1, seqlen) to_mask;
    # the band/blocked masks are views of the same padding. The dense attention probabilities
    # transformers also returns are never built: None (the encoder layer discards them).
    batch, seqlen, _ = hidden_states.shape
    shape = (batch, seqlen, module.num_attention_heads, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape) for proj in (module.query, module.key, module.value))
    rand_attn = _transformers_rand_attn(module, seqlen, q.device) if module.training else None
    padding = None if to_mask is None else to_mask[:, 0, 0, :] != 0
    out = block_sparse_attention(q, k, v, block_size=module.block_size, num_random_blocks=module.num_random_blocks,
                                 rand_attn=rand_attn, key_padding_mask=padding)
    return out.reshape(batch, seqlen, -1), None


def _mvp_attention(module, causal, hidden_states, key_value_states=None, past_key_values=None, attention_mask=None,
                   attn_prompt=None, output_attentions=False, **kwargs):
    # MvpAttention, which computes scores itself; causality comes from its mask in eager,
    # from the decoder self-attention's `causal` here. Cache handling as MvpAttention's.
    from transformers.cache_utils import EncoderDecoderCache

    if attn_prompt is not None:
        raise ValueError(f"{NAME}: MVP's prompt tokens (config.use_prompt) are not supported")
    batch, seqlen, _ = hidden_states.shape
    is_cross = key_value_states is not None
    cache, reuse = past_key_values, False
    if isinstance(cache, EncoderDecoderCache):
        reuse = is_cross and bool(cache.is_updated.get(module.layer_idx))
        cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    if reuse:
        k, v = cache.layers[module.layer_idx].keys, cache.layers[module.layer_idx].values
    else:
        states = key_value_states if is_cross else hidden_states
        k, v = (proj(states).view(batch, -1, module.num_heads, module.head_dim).transpose(1, 2)
                for proj in (module.k_proj, module.v_proj))
        if cache is not None:
            k, v = cache.update(k, v, module.layer_idx)
            if is_cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[module.layer_idx] = True
    padding = _key_padding(attention_mask)
    if cache is not None and not is_cross:
        # A static cache returns its whole buffer: causal alignment needs the filled count
        # (a host sync for StaticLayer, whose count is a tensor).
        filled = int(cache.layers[module.layer_idx].get_seq_length())
        k, v = k[:, :, :filled], v[:, :, :filled]
        padding = None if padding is None else padding[:, :filled]
    q = module.q_proj(hidden_states).view(batch, seqlen, module.num_heads, module.head_dim).transpose(1, 2)
    out, _ = tritium_attention(module, q, k, v, padding, is_causal=causal,
                               scaling=module.scaling, output_attentions=output_attentions,
                               dropout=module.dropout if module.training else 0.0)
    return module.out_proj(out.reshape(batch, seqlen, module.embed_dim)), None


# Gemma2Attention.forward's extra attention-interface arguments: {argument: module attribute}.
GEMMA2_ATTENTION_ARGS = {"sliding_window": "sliding_window", "softcap": "attn_logit_softcapping"}


def _rotary_attention(module, interleaved, eager_attention, attribute_args, hidden_states, position_embeddings,
                      attention_mask=None, past_key_values=None, **kwargs):
    # Gemma2Attention / Glm4Attention.forward (transformers 5.23) with the rotation on
    # apply_rotary: q and k in one launch, in the (batch, seq, heads, dim) layout the
    # projections give. transformers' cos/sin (batch or 1, seq, rotary_dim) hold [freqs,
    # freqs] (GLM-4's apply_rotary_pos_emb too reads only the first half): ours are views of
    # that half. GLM-4's rotary_dim < head_dim: the rest passes through, as in transformers.
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    q, k, v = (proj(hidden_states).view(shape) for proj in (module.q_proj, module.k_proj, module.v_proj))
    cos, sin = (t[..., : t.shape[-1] // 2] for t in position_embeddings)
    # In place (no copy) unless autograd must see the rotation, where apply_rotary refuses it.
    inplace = not (q.requires_grad or k.requires_grad)
    q, k = apply_rotary(q, k, cos, sin, interleaved=interleaved, inplace=inplace)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, module.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention)
    extra = {arg: getattr(module, attr) for arg, attr in attribute_args.items()}
    dropout = module.attention_dropout if module.training else 0.0
    out, weights = interface(module, q, k, v, attention_mask, dropout=dropout, scaling=module.scaling, **extra,
                             **kwargs)
    return module.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _patch_layer_norms(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1 and module.elementwise_affine:
            _set(model, module, "forward", partial(_layer_norm, module))


def _patch_fc_activation(model: nn.Module, owner_type: type, linear_attr: str, act_attr: str, hf_name: str) -> None:
    """act(fc(x)) -> fc with the activation in its epilogue, the activation module replaced
    by nn.Identity (BART-style layers: fc1 + activation_fn; BERT: dense + intermediate_act_fn)."""
    activation = activation_from_hf(hf_name)
    for module in model.modules():
        if isinstance(module, owner_type) and _dense(getattr(module, linear_attr)):
            fc = getattr(module, linear_attr)
            _set(model, fc, "forward", partial(_linear, fc, activation))
            _set(model, module, act_attr, nn.Identity())


def _patch_forwards(model: nn.Module, module_type: type, forward, *args, dense_only: bool = False) -> None:
    """dense_only: skip modules holding 4-bit Linear layers (for forwards that read weights)."""
    for module in model.modules():
        if isinstance(module, module_type) and (not dense_only or _dense(module)):
            _set(model, module, "forward", partial(forward, module, *args))


def apply_tritium_to_gemma2(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                            rope: bool = True, nf4: bool = False):
    """Gemma 2: attn_implementation="tritium", Gemma2RMSNorm, Gemma2MLP (GeGLU), the rotary
    step of Gemma2Attention (halves, full head_dim)."""
    from transformers.models.gemma2.modeling_gemma2 import (
        Gemma2Attention,
        Gemma2MLP,
        Gemma2RMSNorm,
        eager_attention_forward,
    )

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
    if rope:
        _patch_forwards(model, Gemma2Attention, _rotary_attention, False, eager_attention_forward,
                        GEMMA2_ATTENTION_ARGS)
    if norms:
        _patch_forwards(model, Gemma2RMSNorm, _gemma_rms_norm)
    if mlp:
        _patch_forwards(model, Gemma2MLP, _split_gate_up_mlp, activation_from_hf(model.config.hidden_activation),
                        dense_only=True)
    return model


def apply_tritium_to_glm4(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                          rope: bool = True, nf4: bool = False):
    """GLM-4: attn_implementation="tritium", Glm4RMSNorm, Glm4MLP (SwiGLU, gate_up_proj), the
    rotary step of Glm4Attention (interleaved pairs, partial_rotary_factor of head_dim)."""
    from transformers.models.glm4.modeling_glm4 import Glm4Attention, Glm4MLP, Glm4RMSNorm, eager_attention_forward

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
    if rope:
        _patch_forwards(model, Glm4Attention, _rotary_attention, True, eager_attention_forward, {})
    if norms:
        _patch_forwards(model, Glm4RMSNorm, _llama_rms_norm)
    if mlp:
        _patch_forwards(model, Glm4MLP, _fused_gate_up_mlp, activation_from_hf(model.config.hidden_act),
                        dense_only=True)
    return model


def apply_tritium_to_mvp(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                         rope: bool = True, nf4: bool = False):
    """MVP: every MvpAttention (encoder, decoder self- and cross-attention; they never call
    the attention interface, so attn_implementation stays as it is and keeps making
    eager's masks), LayerNorms, fc1 + activation. No rotary embedding: rope is ignored."""
    from transformers.models.mvp.modeling_mvp import MvpDecoderLayer, MvpEncoderLayer

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        for module in model.modules():
            if isinstance(module, (MvpEncoderLayer, MvpDecoderLayer)):
                causal = isinstance(module, MvpDecoderLayer)
                _set(model, module.self_attn, "forward", partial(_mvp_attention, module.self_attn, causal))
                if causal:
                    _set(model, module.encoder_attn, "forward", partial(_mvp_attention, module.encoder_attn, False))
    if norms:
        _patch_layer_norms(model)
    if mlp:
        for layer_type in (MvpEncoderLayer, MvpDecoderLayer):
            _patch_fc_activation(model, layer_type, "fc1", "activation_fn", model.config.activation_function)
    return model


def apply_tritium_to_bigbird_pegasus(model: nn.Module, *, attention: bool = True, norms: bool = True,
                                     mlp: bool = True, rope: bool = True, nf4: bool = False):
    """BigBird-Pegasus: attn_implementation="tritium" (decoder self- and cross-attention) and
    the encoder's self-attention, "original_full" or "block_sparse" (training included: the
    random layout is transformers' own seeded draw), LayerNorms, fc1 + activation. No
    rotary embedding: rope is ignored.

    transformers' encoder replaces its "block_sparse" modules by unpatched "original_full"
    ones for good when it first sees a sequence of (5 + 2r) * block_size tokens or fewer;
    call apply again after that."""
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import (
        BigBirdPegasusBlockSparseAttention,
        BigBirdPegasusDecoderLayer,
        BigBirdPegasusEncoderLayer,
        BigBirdPegasusSelfAttention,
    )

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
        _patch_forwards(model, BigBirdPegasusSelfAttention, _bigbird_full_self_attention)
        _patch_forwards(model, BigBirdPegasusBlockSparseAttention, _bigbird_block_sparse_attention)
    if norms:
        _patch_layer_norms(model)
    if mlp:
        for layer_type in (BigBirdPegasusEncoderLayer, BigBirdPegasusDecoderLayer):
            _patch_fc_activation(model, layer_type, "fc1", "activation_fn", model.config.activation_function)
    return model


def apply_tritium_to_bert_generation(model: nn.Module, *, attention: bool = True, norms: bool = True,
                                     mlp: bool = True, rope: bool = True, nf4: bool = False):
    """BertGeneration: attn_implementation="tritium", LayerNorms, intermediate.dense + act.
    No rotary embedding: rope is ignored."""
    from transformers.models.bert_generation.modeling_bert_generation import BertGenerationIntermediate

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
    if norms:
        _patch_layer_norms(model)
    if mlp:
        _patch_fc_activation(model, BertGenerationIntermediate, "dense", "intermediate_act_fn", model.config.hidden_act)
    return model


MODEL_TYPE_TO_APPLY = {
    "gemma2": apply_tritium_to_gemma2,
    "glm4": apply_tritium_to_glm4,
    "mvp": apply_tritium_to_mvp,
    "bigbird_pegasus": apply_tritium_to_bigbird_pegasus,
    "bert-generation": apply_tritium_to_bert_generation,
}


def apply(model: nn.Module, **options) -> nn.Module:
    """Patch model with its family's `apply_tritium_to_<family>(model, **options)`
    (options: attention, norms, mlp, rope, nf4; all but nf4 default to True).
    rope=True: each attention module's forward rotates q and k with
    tritium.kernels.rope.apply_rotary (Gemma 2, GLM-4; families without rotary embeddings
    ignore it), under whichever attn_implementation the model uses. nf4=True: bitsandbytes'
    nf4 Linear4bit layers compute with tritium.nf4.matmul (their MLPs keep their Linear
    modules: the fused MLP kernels need dense weights). Patches stack; `revert` undoes them
    all."""
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY:
        raise ValueError(f"apply: model_type {model_type!r} has no tritium patches; supported: "
                         f"{sorted(MODEL_TYPE_TO_APPLY)}")
    return MODEL_TYPE_TO_APPLY[model_type](model, **options)

