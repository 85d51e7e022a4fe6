"""What the compact decoders share: the sandwich-norm layer (Gemma 2, Gemma 3 and GLM-4
all norm before and after both the attention and the MLP, under different names) and the
causal LM around the layers (embedding, final norm, LM head and final softcap, the cache,
generate). A family file says which names and options its checkpoints use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tritium import reference
from tritium.models.attention import SelfAttention, Step, check_backend
from tritium.models.cache import StaticCache
from tritium.models.config import DecoderConfig
from tritium.models.generate import Session, check_length, decode_step, expand, generate
from tritium.models.loss import lm_loss
from tritium.models.mlp import GatedMLP, Linear
from tritium.models.nf4_linear import NF4Linear
from tritium.models.norms import RMSNorm
from tritium.models.parallel import TensorParallel, gather_vocab
from tritium.models.rotary import RotaryEmbedding


@dataclass
class CausalLMOutput:
    """logits: (batch, kept positions, vocab) in the model dtype, after the final softcap
    (None when a loss was computed without them); loss: the mean next-token cross-entropy
    (float32) when labels were given."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class NF4GatedMLP(nn.Module):
    """The gated MLP with NF4 projections: down(act(gate(x)) * up(x)). Holds the
    projections as the checkpoint names them: GLM-4's fused gate_up_proj, or Gemma's
    gate_proj and up_proj."""

    def __init__(self, hidden: int, intermediate: int, activation: str, *, fused: bool, factory: dict):
        super().__init__()
        if fused:
            self.gate_up_proj = NF4Linear(hidden, 2 * intermediate, False, **factory)
        else:
            self.gate_proj = NF4Linear(hidden, intermediate, False, **factory)
            self.up_proj = NF4Linear(hidden, intermediate, False, **factory)
        self.down_proj = NF4Linear(intermediate, hidden, False, **factory)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(reference.ACTIVATIONS[self.activation](gate) * up)


class SandwichLayer(nn.Module):
    """x + post_attn(attn(pre_attn(x))), then h + post_mlp(mlp(pre_mlp(h))).

    NORMS names the four norms as the family's checkpoints do (Gemma's by default). The
    residual add before the MLP norm is fused into it."""

    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

    def __init__(self, config: DecoderConfig, layer: int, *, fused_gate_up: bool, quantized: bool, factory: dict):
        super().__init__()
        dense = dict(device=factory["device"], dtype=factory["dtype"])
        norm = lambda size: RMSNorm(size, config.rms_norm_eps, config.norm_offset, **dense)  # noqa: E731
        if quantized:
            linear = lambda i, o, bias: NF4Linear(i, o, bias, **factory)  # noqa: E731
            self.mlp = NF4GatedMLP(config.hidden_size, config.intermediate_size, config.activation,
                                   fused=fused_gate_up, factory=factory)
        else:
            linear = lambda i, o, bias: Linear(i, o, bias, **dense)  # noqa: E731
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.activation,
                                separate_gate_up=not fused_gate_up, **dense)
        self.self_attn = SelfAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            linear=linear, bias=config.attention_bias, softmax_scale=config.softmax_scale,
            softcap=config.attn_softcap, window=config.window(layer), qk_norm=norm if config.qk_norm else None)
        for name in self.NORMS:
            setattr(self, name, norm(config.hidden_size))
        self.layer, self.layer_type = layer, config.layer_types[layer]

    def forward(self, x: torch.Tensor, rotary: dict, step: Step) -> torch.Tensor:
        pre_attn, post_attn, pre_mlp, post_mlp = (getattr(self, name) for name in self.NORMS)
        attn = self.self_attn(pre_attn(x), rotary[self.layer_type], step, self.layer)
        h, x = pre_mlp(post_attn(attn), residual=x)
        return x + post_mlp(self.mlp(h))


class DecoderLM(nn.Module):
    """A causal LM with transformers' parameter names (model.embed_tokens, model.layers.N.*,
    model.norm, lm_head), built from a DecoderConfig. Family files subclass it to choose
    the layer class (LAYER) and the MLP layout (FUSED_GATE_UP)."""

    LAYER = SandwichLayer
    FUSED_GATE_UP = False
    tp: TensorParallel | None = None  # set when sharded (tritium.models.load(..., tp=True))

    def __init__(self, config: DecoderConfig, *, quantization: str | None = None, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if quantization not in (None, "nf4"):
            raise ValueError(f"quantization: expected None or 'nf4', got {quantization!r}")
        self.config, self.quantization = config, quantization
        factory = dict(device=device, dtype=dtype)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, **factory)
        self.model.layers = nn.ModuleList(
            self.LAYER(config, i, fused_gate_up=self.FUSED_GATE_UP, quantized=quantization == "nf4", factory=factory)
            for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset, **factory)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # One rotary table per layer type (Gemma 3's local and global layers differ); they
        # are not submodules of the layers, so a shared table is held once.
        self.rotary = nn.ModuleDict({
            layer_type: RotaryEmbedding(config.rotary_dim, rope.theta, config.max_position_embeddings,
                                        config.interleaved_rotary, device, scaling=rope.factor, dtype=dtype)
            for layer_type, rope in config.rope.items() if layer_type in config.layer_types})
        self.attn_implementation = "tritium"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer's attention to "tritium", "sdpa" or "eager"; "sdpa" is refused
        when the model caps attention logits (it cannot, and the results would change)."""
        check_backend(name, self.config.attn_softcap)
        for layer in self.model.layers:
            layer.self_attn.backend = name
        self.attn_implementation = name

    def new_cache(self, batch: int, max_seqlen: int) -> StaticCache:
        """An empty static cache for `batch` sequences of up to `max_seqlen` positions."""
        c, attention = self.config, self.model.layers[0].self_attn  # its kv heads: this rank's under TP
        return StaticCache(c.num_hidden_layers, batch, max_seqlen, attention.kv_heads, c.head_dim,
                           dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cache: StaticCache | None = None,
                logits_to_keep: int = 0, labels: torch.Tensor | None = None,
                return_logits: bool | None = None) -> CausalLMOutput:
        """input_ids: (batch, seqlen) int; attention_mask: (batch, seqlen), 1 = token, 0 =
        padding (padded positions are never attended to); position_ids: (batch, seqlen),
        by default seqlen positions from the cache's length (0 without a cache), as
        transformers does. cache: extended in place by these tokens. logits_to_keep: > 0
        computes the logits of the last that many positions only.

        labels: (batch, seqlen), -100 = ignored: the loss of predicting labels[:, t + 1] at
        position t, averaged over the labels not ignored, as transformers computes it; on
        the "tritium" backend through tritium.linear_cross_entropy, which never builds the
        (tokens, vocab) logits. return_logits: also return the logits (default: only
        without labels)."""
        batch, seqlen = self._check_inputs(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + seqlen, device=input_ids.device).expand(batch, seqlen)
        mask = None if attention_mask is None else attention_mask.bool()
        if cache is not None:
            if mask is not None:
                cache.set_padding(start, mask)
            mask = cache.attend_mask
        step = Step(position_ids, mask, cache)
        x = self.embed(input_ids)
        for layer in self.model.layers:
            x = layer(x, self.rotary, step)
        if cache is not None and not cache.graph_lengths:
            cache.advance(seqlen)
        if labels is not None:
            return self._loss(self.model.norm(x), labels, bool(return_logits))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(self.logits(self.model.norm(x)))

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, return_logits: bool) -> CausalLMOutput:
        loss = lm_loss(self.attn_implementation, hidden, self.lm_head.weight, labels,
                       softcap=self.config.final_softcap, shift=True, tp=self.tp)
        return CausalLMOutput(self.logits(hidden) if return_logits else None, loss)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            # Gemma: sqrt(hidden) rounded to the model dtype first, as transformers does.
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype).item()
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return gather_vocab(self.tp, torch.tanh(logits / cap) * cap if cap else logits)

    def _check_inputs(self, input_ids, attention_mask, position_ids, cache, logits_to_keep) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected an int tensor (batch, seqlen), got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        batch, seqlen = input_ids.shape
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, seqlen)):
                raise ValueError(f"{name}: expected shape {(batch, seqlen)} like input_ids, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if cache is not None:
            if cache.batch != batch:
                raise ValueError(f"cache: it holds {cache.batch} sequences, input_ids has {batch}")
            cache.check_room(seqlen)
        end = seqlen + (cache.length if cache is not None else 0)
        if position_ids is None and end > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: positions up to {end} exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep: expected an int >= 0, got {logits_to_keep!r}")
        return batch, seqlen

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens new tokens; see
        tritium.models.generate.generate for the options."""
        return generate(self, input_ids, max_new_tokens, **options)

    def start_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, beams: int,
                         max_new_tokens: int, cuda_graph: bool | None) -> Session:
        """The prefill of a generation: every prompt (repeated `beams` times) into a static
        cache sized for it, positions counted over the real tokens as transformers counts
        them for left padding; then one token per step."""
        check_length("the prompt plus max_new_tokens", input_ids.shape[1] + max_new_tokens,
                     self.config.max_position_embeddings)
        ids, mask = expand(input_ids.long(), beams), expand(attention_mask, beams)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self(ids, mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]
        def run(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self(tokens, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]

        decode, position = decode_step(self, cache, ids.shape[0], cuda_graph, run), positions[:, -1:]

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal position
            position = position + 1
            return decode(tokens[:, None], position)

        def reorder(index: torch.Tensor) -> None:
            nonlocal position
            cache.reorder(index)
            position = position[index]

        return Session(ids, logits, step, reorder)
