"""The training loss of a transformers LM through tritium.linear_cross_entropy: the LM head,
its final softcap (Gemma 2) or final_logits_bias (MVP, BigBird-Pegasus) and the
cross-entropy in one op that never builds the (tokens, vocab) logits.

The seam is the LM's own forward, shadowed by an instance attribute: with labels, in
training mode, it runs the model's base model (`model.model`, transformers' own forward)
and the fused loss on its last hidden state, and returns transformers' output class with
`logits=None` (as Liger does: training needs the loss alone); otherwise, it is
transformers' forward unchanged. What the wrapper reproduces of the LM forward is its
loss, as transformers documents it, not its body:
- causal LMs: labels shifted by one inside (or `shift_labels` given), -100 ignored, the
  mean over the labels kept, or the sum over `num_items_in_batch` when the Trainer passes
  it (gradient accumulation);
- encoder-decoders: decoder inputs made from the labels by the modeling file's
  `shift_tokens_right` when none are given, the mean over the labels kept.
The forward's parameters are checked against the installed transformers first
(`tritium.hf.compat`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from tritium.hf import parallel
from tritium.kernels.loss import linear_cross_entropy

# The LM forwards the wrapper is written for (transformers 5.17 names the cache
# past_key_values, 5.24 cache); the first parameters, in order.
CAUSAL_LM_PARAMETERS = tuple(
    ("self", "input_ids", "attention_mask", "position_ids", cache, "inputs_embeds", "labels", "use_cache",
     "logits_to_keep", "kwargs") for cache in ("past_key_values", "cache"))
SEQ2SEQ_LM_PARAMETERS = tuple(
    ("self", "input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "encoder_outputs", cache,
     "inputs_embeds", "decoder_inputs_embeds", "labels", "use_cache") for cache in ("past_key_values", "cache"))


def _bound(original, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (transformers' **kwargs merged in)."""
    bound = inspect.signature(original).bind(*args, **kwargs).arguments
    return {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}


def _base_outputs(model: nn.Module, arguments: dict) -> tuple[torch.Tensor, dict]:
    """model.model run on the arguments its forward takes: (the last hidden state, its other
    outputs by name)."""
    takes = inspect.signature(model.model.forward).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    outputs = model.model(**{k: v for k, v in arguments.items() if open_ended or k in takes})
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    return outputs[0], rest


def causal_lm_forward(model: nn.Module, original, *args, **kwargs):
    """Gemma2ForCausalLM / Glm4ForCausalLM.forward, its training loss fused."""
    arguments = _bound(original, args, kwargs)
    labels, shift_labels = arguments.pop("labels", None), arguments.pop("shift_labels", None)
    if (labels is None and shift_labels is None) or not model.training:
        return original(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    arguments.pop("logits_to_keep", None)
    items = arguments.get("num_items_in_batch")
    hidden, rest = _base_outputs(model, arguments)
    head = dict(weight=model.lm_head.weight, bias=model.lm_head.bias)
    if parallel.is_sharded(head["weight"]):  # tp_plan: this rank's vocabulary rows, the slices merged
        head.update(parallel.vocab_shard(head["weight"], model.config.vocab_size))
    loss = linear_cross_entropy(hidden, labels=labels if shift_labels is None else shift_labels,
                                softcap=getattr(model.config, "final_logit_softcapping", None) or 0.0,
                                shift=shift_labels is None, reduction="mean" if items is None else "sum", **head)
    if items is not None:
        loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def seq2seq_lm_forward(model: nn.Module, original, shift_tokens_right, *args, **kwargs):
    """MvpForConditionalGeneration / BigBirdPegasusForConditionalGeneration.forward, its
    training loss fused (final_logits_bias as the head's bias)."""
    arguments = _bound(original, args, kwargs)
    labels = arguments.pop("labels", None)
    if labels is None or not model.training or arguments.get("return_dict") is False:
        return original(*args, **kwargs)
    from transformers.modeling_outputs import Seq2SeqLMOutput

    arguments["use_cache"] = False
    if arguments.get("decoder_input_ids") is None and arguments.get("decoder_inputs_embeds") is None:
        arguments["decoder_input_ids"] = shift_tokens_right(labels, model.config.pad_token_id,
                                                            model.config.decoder_start_token_id)
    hidden, rest = _base_outputs(model, arguments)
    weight = model.lm_head.weight
    loss = linear_cross_entropy(hidden, weight, labels, bias=model.final_logits_bias.reshape(-1).to(weight.dtype))
    return Seq2SeqLMOutput(loss=loss, logits=None, **rest)


def patch_causal_lm(model: nn.Module, set_forward) -> None:
    """Shadow model.forward (a Gemma2ForCausalLM / Glm4ForCausalLM) with causal_lm_forward
    over transformers' own forward; set_forward(obj, value) records the undo."""
    from tritium.hf import compat

    compat.check_forward(type(model), CAUSAL_LM_PARAMETERS)
    if parallel.is_sharded(model.lm_head.weight):
        if model.lm_head.bias is not None:
            raise ValueError("lm_head: a bias under tensor parallelism is not supported by the fused loss")
        parallel.vocab_shard(model.lm_head.weight, model.config.vocab_size)  # refuse another layout now
    set_forward(model, functools.partial(causal_lm_forward, model, type(model).forward.__get__(model)))


def patch_seq2seq_lm(model: nn.Module, modeling, set_forward) -> None:
    """Shadow model.forward (MVP / BigBird-Pegasus for conditional generation) with
    seq2seq_lm_forward, its labels shifted by the modeling file's shift_tokens_right."""
    from tritium.hf import compat

    compat.check_parameters(type(model).forward, SEQ2SEQ_LM_PARAMETERS, prefix=True)
    compat.check_parameters(modeling.shift_tokens_right, [("input_ids", "pad_token_id", "decoder_start_token_id")],
                            name=f"{modeling.__name__}.shift_tokens_right")
    set_forward(model, functools.partial(seq2seq_lm_forward, model, type(model).forward.__get__(model),
                                         modeling.shift_tokens_right))
