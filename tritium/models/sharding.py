"""One rank's part of a compact model under tensor parallelism (see parallel.py for the
layout and the collectives).

`shard(model, tp)` takes a model built on the meta device, resizes every split projection,
head count and vocabulary table to this rank's part, installs the collectives (forward
hooks, so the modules' code and parameter names stay as they are), and returns how each
checkpoint tensor is cut for this rank (`Slice`, or None: not read here), so the
checkpoint reader reads only that part of each safetensors tensor.

What is split, by module:
- SelfAttention / MultiHeadAttention: q/k/v rows by heads (parallel.head_split: GQA's kv
  heads replicated where a rank's query heads need them), o_proj/out_proj columns;
- GatedMLP / NF4GatedMLP, and the encoder-decoder layers' fc1/fc2: the intermediate
  features (gate and up rows, fc1 rows, down_proj and fc2 columns);
- the token embeddings, the LM head (weight and bias) and final_logits_bias: vocabulary
  rows (parallel.VocabParallelEmbedding, gather_vocab);
- MVP's prompts: computed whole, each rank keeping its heads' keys and values.
A row-parallel projection's bias is added once, on rank 0. Norms, positions, rotary tables
are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from tritium.models.attention import SelfAttention
from tritium.models.bert_generation import BertGenerationDecoder
from tritium.models.decoder import DecoderLM, NF4GatedMLP
from tritium.models.mlp import GatedMLP
from tritium.models.nf4_linear import NF4Linear
from tritium.models.parallel import TensorParallel, VocabParallelEmbedding, copy_in, head_split, reduce_sum, split
from tritium.models.seq2seq import EncoderDecoderLM, LayerPrompts, MultiHeadAttention, Seq2SeqLayer

VOCAB_TABLES = ("embed_tokens", "shared")  # attribute names of token embedding tables
WITH_HEADS = (DecoderLM, EncoderDecoderLM, BertGenerationDecoder)  # the models holding an LM head


@dataclass(frozen=True)
class Slice:
    """This rank's part of a checkpoint tensor: the index ranges along `dim`, concatenated,
    then zeros up to `size` along dim (a vocabulary slice's padding)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    size: int | None = None

    def take(self, source) -> torch.Tensor:
        """This part of `source`: a tensor, or a safetensors slice (whose indexing reads
        only the indexed part from the file)."""
        pieces = [source[self.index(a, b)] for a, b in self.ranges]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)
        missing = (self.size or 0) - t.shape[self.dim]
        if missing > 0:
            shape = list(t.shape)
            shape[self.dim] = missing
            t = torch.cat([t, t.new_zeros(shape)], self.dim)
        return t

    def index(self, start: int, stop: int) -> tuple[slice, ...]:
        """The indexing of a tensor (or a safetensors slice) that reads start:stop along dim."""
        return (slice(None),) * self.dim + (slice(start, stop),)


def shard(model: nn.Module, tp: TensorParallel) -> dict[str, Slice | None]:
    """Make `model` (on the meta device) this rank's part; returns its checkpoint slices by
    key (the unsharded model's state-dict keys; None: a key this rank does not read)."""
    plan: dict[str, Slice | None] = {}
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, (SelfAttention, MultiHeadAttention)):
            _attention(module, prefix, tp, plan, cross=name.endswith("encoder_attn"))
        elif isinstance(module, (GatedMLP, NF4GatedMLP)):
            _gated_mlp(module, prefix, tp, plan)
        elif isinstance(module, Seq2SeqLayer):
            _feed_forward(module, prefix, tp, plan)
        elif isinstance(module, LayerPrompts):
            attention_heads = module.heads
            start, stop, _ = head_split(attention_heads, attention_heads, tp.world, tp.rank)
            module.group, module.kept = tp.group, slice(start, stop)
    _vocabulary(model, tp, plan)
    for module in model.modules():
        if isinstance(module, WITH_HEADS):  # their heads gather the logits, their losses merge the slices
            module.tp = tp
    return plan


def _resize(linear: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
    """An empty meta-device projection of the new shape, keeping the module (and its name)."""
    if isinstance(linear, NF4Linear):  # rebuilt empty: its NF4 state depends on the shape
        linear.__init__(in_features, out_features, bias, blocksize=linear.blocksize,
                        double_quant=linear.nested_absmax is not None, dtype=linear.weight_dtype, device="meta")
        return
    factory = dict(device="meta", dtype=linear.weight.dtype)
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
    linear.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
    linear.in_features, linear.out_features = in_features, out_features


def _length(ranges) -> int:
    return sum(b - a for a, b in ranges)


def _column(linear: nn.Module, key: str, rows: tuple, plan: dict) -> None:
    """Column-parallel: the output rows `rows` (and their bias)."""
    bias = linear.bias is not None
    _resize(linear, linear.in_features, _length(rows), bias)
    plan[f"{key}.weight"] = Slice(0, rows)
    if bias:
        plan[f"{key}.bias"] = Slice(0, rows)


def _row(linear: nn.Module, key: str, columns: tuple, tp: TensorParallel, plan: dict) -> None:
    """Row-parallel: the input columns `columns`; the bias on rank 0 only (added once)."""
    bias = linear.bias is not None
    _resize(linear, _length(columns), linear.out_features, bias and tp.rank == 0)
    plan[f"{key}.weight"] = Slice(1, columns)
    if bias:
        plan[f"{key}.bias"] = Slice(0, ((0, linear.out_features),)) if tp.rank == 0 else None


def _reduce_output(module: nn.Module, tp: TensorParallel) -> None:
    module.register_forward_hook(lambda _module, _args, out: reduce_sum(tp.group, out))


def _copy_input(module: nn.Module, tp: TensorParallel) -> None:
    module.register_forward_pre_hook(lambda _module, args: (copy_in(tp.group, args[0]), *args[1:]))


def _head_rows(heads, head_dim: int) -> tuple:
    """Row ranges of the listed heads, runs of consecutive heads merged."""
    ranges = []
    for h in heads:
        if ranges and ranges[-1][1] == h * head_dim:
            ranges[-1] = (ranges[-1][0], (h + 1) * head_dim)
        else:
            ranges.append((h * head_dim, (h + 1) * head_dim))
    return tuple(ranges)


def _attention(module: nn.Module, prefix: str, tp: TensorParallel, plan: dict, *, cross: bool) -> None:
    heads, kv_heads, head_dim = module.heads, getattr(module, "kv_heads", module.heads), module.head_dim
    start, stop, kv = head_split(heads, kv_heads, tp.world, tp.rank)
    q_rows, kv_rows = _head_rows(range(start, stop), head_dim), _head_rows(kv, head_dim)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        _column(getattr(module, name), prefix + name, rows, plan)
    out = "o_proj" if hasattr(module, "o_proj") else "out_proj"
    _row(getattr(module, out), prefix + out, q_rows, tp, plan)
    _reduce_output(getattr(module, out), tp)
    _copy_input(module, tp)
    if cross:  # the keys and values come from the encoder's output, outside forward
        _copy_input(module.k_proj, tp)
        _copy_input(module.v_proj, tp)
    held = [h for rank in range(tp.world) for h in head_split(heads, kv_heads, tp.world, rank)[2]]
    if len(held) > kv_heads:  # some kv head has several copies: see sum_kv_copies
        module.kv_copies = (tuple(kv), kv_heads)
    module.heads = stop - start
    if hasattr(module, "kv_heads"):
        module.kv_heads = len(kv)
    if hasattr(module, "first_head"):
        module.first_head = start


def sum_kv_copies(model: nn.Module, tp: TensorParallel) -> None:
    """Training with replicated kv heads: each copy of a kv head (on several ranks, or
    twice on one) gets only its own query heads' part of the gradient; a hook on the loaded
    k/v parameters adds the copies' parts (one all-reduce of a kv-sized tensor per
    parameter and backward), so the copies get the whole gradient and stay equal."""
    for module in model.modules():
        if not hasattr(module, "kv_copies"):
            continue
        kv, kv_heads = module.kv_copies
        for linear in (module.k_proj, module.v_proj):
            for param in (linear.weight, linear.bias):
                if param is not None and param.requires_grad:
                    param.register_hook(partial(_summed_copies, kv=kv, kv_heads=kv_heads, tp=tp))


def _summed_copies(grad: torch.Tensor, *, kv: tuple, kv_heads: int, tp: TensorParallel) -> torch.Tensor:
    per_head = grad.reshape(len(kv), -1)
    total = per_head.new_zeros(kv_heads, per_head.shape[1])
    index = torch.tensor(kv, device=grad.device)
    total.index_add_(0, index, per_head)
    dist.all_reduce(total, group=tp.group)
    return total[index].reshape(grad.shape)


def _gated_mlp(module: nn.Module, prefix: str, tp: TensorParallel, plan: dict) -> None:
    intermediate = module.down_proj.in_features
    a, b = split(intermediate, tp.world, tp.rank)
    mine = ((a, b),)
    # The checkpoint holds gate_proj and up_proj (Gemma) or gate_up_proj, gate rows first (GLM-4).
    plan[f"{prefix}gate_proj.weight"] = plan[f"{prefix}up_proj.weight"] = Slice(0, mine)
    plan[f"{prefix}gate_up_proj.weight"] = Slice(0, ((a, b), (intermediate + a, intermediate + b)))
    for name in ("gate_proj", "up_proj"):
        if isinstance(getattr(module, name, None), NF4Linear):
            _resize(getattr(module, name), module.down_proj.out_features, b - a, False)
    if hasattr(module, "gate_up_proj"):
        _resize(module.gate_up_proj, module.down_proj.out_features, 2 * (b - a), False)
    _row(module.down_proj, f"{prefix}down_proj", mine, tp, plan)
    _reduce_output(module, tp)  # the fused kernel computes the whole MLP: its output is the partial sum
    _copy_input(module, tp)


def _feed_forward(layer: Seq2SeqLayer, prefix: str, tp: TensorParallel, plan: dict) -> None:
    mine = (split(layer.fc1.out_features, tp.world, tp.rank),)
    _column(layer.fc1, f"{prefix}fc1", mine, plan)
    _row(layer.fc2, f"{prefix}fc2", mine, tp, plan)
    _reduce_output(layer.fc2, tp)
    _copy_input(layer.fc1, tp)


def _vocabulary(model: nn.Module, tp: TensorParallel, plan: dict) -> None:
    """Token tables, LM heads and final_logits_bias to this rank's vocabulary rows."""
    mine = Slice(0, ((tp.vocab_start, tp.vocab_start + tp.vocab_valid),), tp.vocab_rows)
    tables = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        leaf = name.rpartition(".")[2]
        if leaf in VOCAB_TABLES and isinstance(module, nn.Embedding):
            new = tables.setdefault(id(module), VocabParallelEmbedding(
                tp, module.embedding_dim, module.padding_idx, dtype=module.weight.dtype, device="meta"))
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, new)
            plan[f"{name}.weight"] = mine
        elif leaf == "lm_head":
            _resize(module, module.in_features, tp.vocab_rows, module.bias is not None)
            plan[f"{name}.weight"] = mine
            if module.bias is not None:
                plan[f"{name}.bias"] = mine
    if "final_logits_bias" in dict(model.named_buffers()):
        model.final_logits_bias = model.final_logits_bias.new_empty(1, tp.vocab_rows)
        plan["final_logits_bias"] = Slice(1, mine.ranges, tp.vocab_rows)
