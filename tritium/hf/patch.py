"""Opt-in patching of a loaded transformers model with tritium's kernels: norms, MLPs,
rotary embeddings (Gemma 2, GLM-4), bitsandbytes' nf4 Linear4bit layers, and the attention
modules that bypass transformers' AttentionInterface (MVP's, BigBird-Pegasus' encoder,
"original_full" or "block_sparse"); the rest of the attention goes through
attn_implementation. An EncoderDecoderModel (bert2bert, roberta2roberta) is patched
through its encoder and decoder.

Each patch takes the narrowest seam transformers offers, and `tritium.hf.compat` checks
that seam against the installed version before anything is patched:
- a module-level function its forwards call (`apply_rotary_pos_emb`: tritium.hf.rotary)
  is swapped, and reaches only the patched models' modules;
- a module whose whole forward is one op (norms, MLPs, Linear4bit) gets a forward that
  calls the kernel;
- attention computed inline (MVP, BigBird-Pegasus' encoder: tritium.hf.seq2seq) gets a
  replacement forward written for the forward's checked parameters.

A patch sets an instance attribute (`forward` shadows the class's), swaps a parameterless
activation module for nn.Identity when its activation moves into a GEMM epilogue, or
swaps a module-level function. The parameters, their names and their tensors are never
touched, so checkpoints, optimizers and state_dict see the same model. `apply` is all or
nothing (a refusal leaves the model as it was), and `revert` restores it exactly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from tritium.hf import compat, loss, parallel, rotary, seq2seq
from tritium.hf.attention import NAME
from tritium.kernels.mlp import gated_mlp, linear
from tritium.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight
from tritium.kernels.nf4 import matmul as nf4_matmul
from tritium.kernels.norm import layer_norm, rms_norm
from tritium.models.mlp import activation_from_hf

_ABSENT = object()
GLM4_SPLIT_MLP = ("GLM-4's tp_plan splits the packed gate_up_proj by rows and gathers its output, so no rank holds "
                  "matching gate and up features for the fused kernel")
# The attribute holding, on the module a patch was applied through, the undo functions of
# its patches in patch order. On the module itself (not in a global table) so a model
# dropped without revert is freed: its undo closures only form a cycle with it.
_UNDO = "_tritium_undo"
# (modeling module name, function name) -> [transformers' function, models holding the swap].
_SWAPS: dict[tuple[str, str], list] = {}


def _record(model: nn.Module, undo: Callable[[], None]) -> None:
    model.__dict__.setdefault(_UNDO, []).append(undo)


def _set(model: nn.Module, obj, attr: str, value) -> None:
    """setattr, remembering what to restore. An instance `forward` shadows the class's."""
    previous = obj.__dict__.get(attr, _ABSENT) if attr == "forward" else getattr(obj, attr)
    _record(model, lambda: delattr(obj, attr) if previous is _ABSENT else setattr(obj, attr, previous))
    setattr(obj, attr, value)


def _swap_global(model: nn.Module, namespace, name: str, make: Callable[[Callable], Callable]) -> None:
    """namespace.name = make(transformers' function), once however many models ask; the
    original comes back when the last of them is reverted."""
    key = (namespace.__name__, name)
    if key not in _SWAPS:
        original = getattr(namespace, name)
        _SWAPS[key] = [original, 0]
        setattr(namespace, name, make(original))
    _SWAPS[key][1] += 1

    def undo():
        _SWAPS[key][1] -= 1
        if _SWAPS[key][1] == 0:
            setattr(namespace, name, _SWAPS.pop(key)[0])

    _record(model, undo)


def _undo(model: nn.Module, keep: dict | None = None) -> None:
    """Undo, newest first, the patches recorded through model and its submodules, all of
    them or those past keep[module] (a count taken before a failed apply)."""
    keep = keep or {}
    for module in model.modules():
        undos = module.__dict__.get(_UNDO, [])
        while len(undos) > keep.get(module, 0):
            undos.pop()()
        if not undos:
            module.__dict__.pop(_UNDO, None)


def revert(model: nn.Module) -> None:
    """Undo every patch `apply` made to model (attention implementation included), and to
    its submodules (an EncoderDecoderModel's halves)."""
    _undo(model)


def _family(model_type: str):
    """For apply_tritium_to_<family>: the model must be of model_type and the options bools,
    and the apply is all or nothing (a refusal, such as an unsupported transformers, leaves
    the model as it was)."""
    def decorate(apply_fn):
        @functools.wraps(apply_fn)
        def wrapper(model, **options):
            found = getattr(getattr(model, "config", None), "model_type", None)
            if found != model_type:
                raise ValueError(f"{apply_fn.__name__}: expected a model of model_type {model_type!r}, got {found!r} "
                                 "(tritium.hf.apply(model) picks the function by model_type)")
            for name, value in options.items():
                if not isinstance(value, bool):
                    raise TypeError(f"{apply_fn.__name__}: {name} must be True or False, got {value!r}")
            keep = {module: len(module.__dict__.get(_UNDO, [])) for module in model.modules()}
            try:
                return apply_fn(model, **options)
            except BaseException:
                _undo(model, keep)
                raise
        return wrapper
    return decorate


def _patch_attention(model: nn.Module) -> None:
    """attn_implementation="tritium" for model and for every config its modules hold: inside
    an EncoderDecoderModel, BertGenerationEncoder's layers keep a config of their own that
    set_attn_implementation does not reach (they would pair "tritium" masks with sdpa)."""
    previous = model.config._attn_implementation
    _record(model, lambda: model.set_attn_implementation(previous))
    model.set_attn_implementation(NAME)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                        "_attn_implementation")}
    for config in configs.values():
        if config._attn_implementation != NAME:
            _set(model, config, "_attn_implementation", NAME)


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
    if parallel.is_sharded(module.down_proj.weight):  # transformers' tp_plan: this rank's features
        return parallel.gated_mlp_shards(module, activation, x)
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
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError as error:
        raise ImportError("nf4=True patches bitsandbytes' Linear4bit layers: pip install bitsandbytes") from error

    weights = {module: _nf4_weight(module) for module in model.modules() if isinstance(module, Linear4bit)}
    for module, weight in weights.items():
        _set(model, module, "forward", partial(_nf4_linear, module, weight))


def _dense(module: nn.Module) -> bool:
    """False when one of module's Linear layers holds a quantized (bitsandbytes) weight: the
    fused MLP kernels read weights directly, so those MLPs are left to `nf4=True`."""
    return all(m.weight.is_floating_point() for m in module.modules() if isinstance(m, nn.Linear))


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


def _patch_forwards(model: nn.Module, module_type: type, forward, *args, dense_only: bool = False,
                    unsplit_only: str | None = None) -> None:
    """dense_only: skip modules holding 4-bit Linear layers (for forwards that read weights).
    unsplit_only: skip modules whose parameters tensor parallelism split, saying once why."""
    split = 0
    for module in model.modules():
        if not isinstance(module, module_type) or (dense_only and not _dense(module)):
            continue
        if unsplit_only and any(parallel.is_sharded(p) for p in module.parameters()):
            split += 1
            continue
        _set(model, module, "forward", partial(forward, module, *args))
    if split:
        warnings.warn(f"{module_type.__name__}: {split} modules split by tensor parallelism stay transformers' "
                      f"({unsplit_only})", stacklevel=4)


def _check_split_mlps(model: nn.Module, module_type: type, names: tuple[str, ...]) -> None:
    """Refuse, before patching, a tensor-parallel MLP layout the local kernel cannot run."""
    for module in model.modules():
        if isinstance(module, module_type) and parallel.is_sharded(module.down_proj.weight):
            parallel.check_gated_mlp(module, names)


def _patch_rotary(model: nn.Module, modeling, attention_type: type, interleaved: bool) -> None:
    """The rotation inside each attention_type forward on tritium.apply_rotary, through the
    modeling file's apply_rotary_pos_emb (see tritium.hf.rotary). The forwards stay
    transformers': each runs inside rotary_scope."""
    swapped = _SWAPS.get((modeling.__name__, rotary.ROTARY_FUNCTION))
    transformers_function = swapped[0] if swapped else getattr(modeling, rotary.ROTARY_FUNCTION)
    compat.check_parameters(transformers_function, rotary.ROTARY_PARAMETERS,
                            name=f"{modeling.__name__}.{rotary.ROTARY_FUNCTION}")
    compat.check_calls(attention_type, rotary.ROTARY_FUNCTION)
    _swap_global(model, modeling, rotary.ROTARY_FUNCTION,
                 lambda original: partial(rotary.rotary_pos_emb, original, interleaved))
    for module in model.modules():
        if isinstance(module, attention_type):
            _set(model, module, "forward", partial(rotary.rotary_scope, module.forward))


def _checked_forwards(model: nn.Module, module_type: type, forward, parameters, *args) -> None:
    """_patch_forwards for a replacement written for module_type.forward's parameters."""
    compat.check_forward(module_type, parameters)
    _patch_forwards(model, module_type, forward, *args)


def _patch_loss(model: nn.Module, seq2seq_modeling=None) -> None:
    """The LM's training loss through tritium.linear_cross_entropy (tritium.hf.loss)."""
    def set_forward(obj, value):
        _set(model, obj, "forward", value)

    if seq2seq_modeling is None:
        loss.patch_causal_lm(model, set_forward)
    else:
        loss.patch_seq2seq_lm(model, seq2seq_modeling, set_forward)


@_family("gemma2")
def apply_tritium_to_gemma2(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                            rope: bool = True, nf4: bool = False, loss: bool = True):
    """Gemma 2: attn_implementation="tritium", Gemma2RMSNorm, Gemma2MLP (GeGLU), the rotary
    step of Gemma2Attention (halves, full head_dim), and (Gemma2ForCausalLM) the training
    loss with its final softcap through the fused LM head + cross-entropy."""
    from transformers.models.gemma2 import modeling_gemma2 as modeling

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
    if rope:
        _patch_rotary(model, modeling, modeling.Gemma2Attention, interleaved=False)
    if norms:
        _patch_forwards(model, modeling.Gemma2RMSNorm, _gemma_rms_norm)
    if mlp:
        _check_split_mlps(model, modeling.Gemma2MLP, ("gate_proj", "up_proj"))
        _patch_forwards(model, modeling.Gemma2MLP, _split_gate_up_mlp,
                        activation_from_hf(model.config.hidden_activation), dense_only=True)
    if loss and isinstance(model, modeling.Gemma2ForCausalLM):
        _patch_loss(model)
    return model


@_family("glm4")
def apply_tritium_to_glm4(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                          rope: bool = True, nf4: bool = False, loss: bool = True):
    """GLM-4: attn_implementation="tritium", Glm4RMSNorm, Glm4MLP (SwiGLU, gate_up_proj), the
    rotary step of Glm4Attention (interleaved pairs, partial_rotary_factor of head_dim), and
    (Glm4ForCausalLM) the training loss through the fused LM head + cross-entropy."""
    from transformers.models.glm4 import modeling_glm4 as modeling

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        _patch_attention(model)
    if rope:
        _patch_rotary(model, modeling, modeling.Glm4Attention, interleaved=True)
    if norms:
        _patch_forwards(model, modeling.Glm4RMSNorm, _llama_rms_norm)
    if mlp:
        _patch_forwards(model, modeling.Glm4MLP, _fused_gate_up_mlp, activation_from_hf(model.config.hidden_act),
                        dense_only=True, unsplit_only=GLM4_SPLIT_MLP)
    if loss and isinstance(model, modeling.Glm4ForCausalLM):
        _patch_loss(model)
    return model


@_family("mvp")
def apply_tritium_to_mvp(model: nn.Module, *, attention: bool = True, norms: bool = True, mlp: bool = True,
                         rope: bool = True, nf4: bool = False, loss: bool = True):
    """MVP: every MvpAttention (encoder, decoder self- and cross-attention, task prompts
    included; they never call the attention interface, so attn_implementation stays as it
    is and keeps making eager's masks), LayerNorms, fc1 + activation, and
    (MvpForConditionalGeneration) the training loss with final_logits_bias through the
    fused LM head + cross-entropy. No rotary embedding: rope is ignored."""
    from transformers.models.mvp import modeling_mvp as modeling
    from transformers.models.mvp.modeling_mvp import MvpAttention, MvpDecoderLayer, MvpEncoderLayer

    if nf4:  # first: it validates every layer before anything is patched
        _patch_linear4bit(model)
    if attention:
        compat.check_forward(MvpAttention, seq2seq.MVP_ATTENTION_PARAMETERS)
        if model.config._attn_implementation == NAME:
            # Loaded with attn_implementation="tritium", which MVP never calls: its patched
            # modules take the masks "eager" makes. (set_attn_implementation leaves MVP's
            # config as it is.)
            _set(model, model.config, "_attn_implementation", "eager")
        for module in model.modules():
            if isinstance(module, (MvpEncoderLayer, MvpDecoderLayer)):
                causal = isinstance(module, MvpDecoderLayer)
                _set(model, module.self_attn, "forward", partial(seq2seq.mvp_attention, module.self_attn, causal))
                if causal:
                    _set(model, module.encoder_attn, "forward",
                         partial(seq2seq.mvp_attention, module.encoder_attn, False))
    if norms:
        _patch_layer_norms(model)
    if mlp:
        for layer_type in (MvpEncoderLayer, MvpDecoderLayer):
            _patch_fc_activation(model, layer_type, "fc1", "activation_fn", model.config.activation_function)
    if loss and isinstance(model, modeling.MvpForConditionalGeneration):
        _patch_loss(model, modeling)
    return model


@_family("bigbird_pegasus")
def apply_tritium_to_bigbird_pegasus(model: nn.Module, *, attention: bool = True, norms: bool = True,
                                     mlp: bool = True, rope: bool = True, nf4: bool = False, loss: bool = True):
    """BigBird-Pegasus: attn_implementation="tritium" (decoder self- and cross-attention) and
    the encoder's self-attention, "original_full" or "block_sparse" (training included: the
    random layout is transformers' own seeded draw), LayerNorms, fc1 + activation, and
    (BigBirdPegasusForConditionalGeneration) the training loss with final_logits_bias
    through the fused LM head + cross-entropy. No rotary embedding: rope is ignored.

    transformers' encoder replaces its "block_sparse" modules by unpatched "original_full"
    ones for good when it first sees a sequence of (5 + 2r) * block_size tokens or fewer;
    call apply again after that."""
    from transformers.models.bigbird_pegasus import modeling_bigbird_pegasus as modeling
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
        _checked_forwards(model, BigBirdPegasusSelfAttention, seq2seq.bigbird_full_self_attention,
                          seq2seq.BIGBIRD_FULL_PARAMETERS)
        _checked_forwards(model, BigBirdPegasusBlockSparseAttention, seq2seq.bigbird_block_sparse_attention,
                          seq2seq.BIGBIRD_BLOCK_SPARSE_PARAMETERS)
    if norms:
        _patch_layer_norms(model)
    if mlp:
        for layer_type in (BigBirdPegasusEncoderLayer, BigBirdPegasusDecoderLayer):
            _patch_fc_activation(model, layer_type, "fc1", "activation_fn", model.config.activation_function)
    if loss and isinstance(model, modeling.BigBirdPegasusForConditionalGeneration):
        _patch_loss(model, modeling)
    return model


@_family("bert-generation")
def apply_tritium_to_bert_generation(model: nn.Module, *, attention: bool = True, norms: bool = True,
                                     mlp: bool = True, rope: bool = True, nf4: bool = False, loss: bool = True):
    """BertGeneration: attn_implementation="tritium", LayerNorms, intermediate.dense + act.
    No rotary embedding and no fused loss: rope and loss are ignored."""
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


@_family("encoder-decoder")
def apply_tritium_to_encoder_decoder(model: nn.Module, *, attention: bool = True, norms: bool = True,
                                     mlp: bool = True, rope: bool = True, nf4: bool = False, loss: bool = True):
    """EncoderDecoderModel (bert2bert, roberta2roberta: BertGenerationEncoder +
    BertGenerationDecoder, or any pair of supported families): each half patched by its own
    family's function; refused before anything is patched unless both are supported."""
    halves = {"encoder": model.encoder, "decoder": model.decoder}
    for half, module in halves.items():
        _family_apply(module, f"EncoderDecoderModel's {half}")
    if nf4:  # the whole model's layers validated first
        _patch_linear4bit(model)
    for module in halves.values():
        # The halves' own losses never run: EncoderDecoderModel computes its loss itself (not fused).
        _family_apply(module)(module, attention=attention, norms=norms, mlp=mlp, rope=rope, nf4=False, loss=False)
    if attention:  # after the halves, which record their own previous implementations
        _set(model, model.config, "_attn_implementation", NAME)
    return model


MODEL_TYPE_TO_APPLY = {
    "gemma2": apply_tritium_to_gemma2,
    "glm4": apply_tritium_to_glm4,
    "mvp": apply_tritium_to_mvp,
    "bigbird_pegasus": apply_tritium_to_bigbird_pegasus,
    "bert-generation": apply_tritium_to_bert_generation,
    "encoder-decoder": apply_tritium_to_encoder_decoder,
}


def _family_apply(model: nn.Module, what: str = "apply"):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY:
        raise ValueError(f"{what}: model_type {model_type!r} has no tritium patches; supported: "
                         f"{sorted(MODEL_TYPE_TO_APPLY)}")
    return MODEL_TYPE_TO_APPLY[model_type]


def apply(model: nn.Module, **options) -> nn.Module:
    """Patch model with its family's `apply_tritium_to_<family>(model, **options)`
    (options: attention, norms, mlp, rope, nf4, loss; all but nf4 default to True).
    loss=True: Gemma2ForCausalLM, Glm4ForCausalLM, MvpForConditionalGeneration and
    BigBirdPegasusForConditionalGeneration, called with labels in training mode, compute
    their loss with tritium.linear_cross_entropy (the final softcap and final_logits_bias
    kept) and return logits=None, never building the (tokens, vocab) logits; in eval mode,
    or without labels, their forward is transformers' (see tritium.hf.loss).
    rope=True: the rotation inside each attention forward runs on
    tritium.kernels.rope.apply_rotary (Gemma 2, GLM-4; families without rotary embeddings
    ignore it), under whichever attn_implementation the model uses. nf4=True: bitsandbytes'
    nf4 Linear4bit layers compute with tritium.nf4.matmul (their MLPs keep their Linear
    modules: the fused MLP kernels need dense weights). An EncoderDecoderModel is patched
    through its encoder and decoder.

    Every seam is checked against the installed transformers first: code of a shape
    tritium.hf was not written for raises tritium.hf.UnsupportedTransformers (naming the
    version and the function) and leaves the model untouched; a transformers outside the
    tested range whose seams match is patched, with one warning. Patches stack; `revert`
    undoes them all."""
    compat.warn_if_untested()
    return _family_apply(model)(model, **options)
