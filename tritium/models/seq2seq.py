"""What the compact encoder-decoders share (MVP / BART, BigBird-Pegasus, BertGeneration):
multi-head attention with BART's parameter names, the encoder and decoder layers (norm
after each block, or before it), learned positions, the cross-attention keys computed once,
and the generation session (encode once, then the decoder one token at a time on a static
cache). A family file says how its checkpoints differ: names, norms, embeddings, prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tritium import reference
from tritium.kernels.block_sparse import block_sparse_attention
from tritium.models.attention import attend, attend_fixed, check_backend
from tritium.models.cache import StaticCache
from tritium.models.generate import Session, check_length, decode_step, expand, generate
from tritium.models.loss import lm_loss
from tritium.models.mlp import FeedForward, Linear, activation_from_hf
from tritium.models.norms import LayerNorm
from tritium.models.parallel import TensorParallel, copy_in, gather_vocab


@dataclass
class Seq2SeqConfig:
    """Architecture of a compact encoder-decoder, in transformers' terms."""

    model_type: str
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    activation: str  # tritium's name
    max_position_embeddings: int
    decoder_cross_attention: bool = True  # a decoder-only BertGeneration has none
    attention_bias: bool = True  # q/k/v/out projections (BigBird-Pegasus: use_bias, false)
    attention_type: str = "original_full"  # the encoder's self-attention; BigBird-Pegasus: "block_sparse"
    block_size: int = 64
    num_random_blocks: int = 3
    pre_norm: bool = False  # BigBird-Pegasus: LayerNorm before each block, and one after the stack
    scale_embedding: bool = False
    position_offset: int = 2  # BART's learned positions start at row 2
    layernorm_embedding: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    use_prompt: bool = False  # MVP's task prompts
    encoder_prompt: bool = True  # with use_prompt: whether the encoder has its own (see mvp.py)
    prompt_length: int = 0
    prompt_mid_dim: int = 0
    attn_softcap: float = 0.0  # none of these models caps logits (check_backend reads it)

    @classmethod
    def from_hf(cls, raw: dict, **overrides) -> Seq2SeqConfig:
        """Fields a BART-style config.json names the same way."""
        fields = dict(
            model_type=raw["model_type"], vocab_size=raw["vocab_size"], d_model=raw["d_model"],
            encoder_layers=raw["encoder_layers"], decoder_layers=raw["decoder_layers"],
            encoder_attention_heads=raw["encoder_attention_heads"],
            decoder_attention_heads=raw["decoder_attention_heads"],
            encoder_ffn_dim=raw["encoder_ffn_dim"], decoder_ffn_dim=raw["decoder_ffn_dim"],
            activation=activation_from_hf(raw.get("activation_function", "gelu")),
            max_position_embeddings=raw["max_position_embeddings"],
            scale_embedding=bool(raw.get("scale_embedding", False)),
            dropout=float(raw.get("dropout", 0.0)), attention_dropout=float(raw.get("attention_dropout", 0.0)),
            activation_dropout=float(raw.get("activation_dropout", 0.0)),
            pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"),
            decoder_start_token_id=raw.get("decoder_start_token_id"),
            eos_token_ids=[raw["eos_token_id"]] if isinstance(raw.get("eos_token_id"), int) else list(
                raw.get("eos_token_id") or []),
            forced_bos_token_id=raw.get("forced_bos_token_id"), forced_eos_token_id=raw.get("forced_eos_token_id"),
        )
        return cls(**{**fields, **overrides})


class MultiHeadAttention(nn.Module):
    """BART's attention: q_proj, k_proj, v_proj, out_proj (with bias), `heads` heads of
    hidden / heads features, scale head_dim ** -0.5. Queries attend to keys that are the
    layer's own (self-attention, through a cache when generating) or computed once
    (cross-attention); `prefix` (k, v), each (prefix, heads, head_dim), goes before the
    keys (MVP's prompts) and is always visible."""

    def __init__(self, hidden: int, heads: int, *, bias: bool = True, factory: dict):
        super().__init__()
        self.q_proj = Linear(hidden, hidden, bias, **factory)
        self.k_proj = Linear(hidden, hidden, bias, **factory)
        self.v_proj = Linear(hidden, hidden, bias, **factory)
        self.out_proj = Linear(hidden, hidden, bias, **factory)
        self.heads, self.head_dim = heads, hidden // heads
        self.first_head = 0  # of the model's heads (tensor parallelism gives a rank a run of them)
        self.backend, self.dropout = "tritium", 0.0

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.heads, self.head_dim)

    def keys(self, x: torch.Tensor, prefix=None) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of x (batch, seqlen, hidden), after the prefix when there is one."""
        k, v = self.split(self.k_proj(x)), self.split(self.v_proj(x))
        if prefix is None:
            return k, v
        batch = x.shape[0]
        return (torch.cat([prefix[0].expand(batch, -1, -1, -1), k], 1),
                torch.cat([prefix[1].expand(batch, -1, -1, -1), v], 1))

    def forward(self, x: torch.Tensor, *, causal: bool = False, mask=None, prefix=None, cache=None, layer: int = 0,
                memory=None, sparse: tuple[int, int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """x: (batch, seqlen, hidden). Self-attention over x (causal or not; with a cache, over
        the cached keys too); or, with memory = (k, v, mask), cross-attention over them.
        mask: (batch, keys) bool, True = attend, over the keys after the prefix. sparse:
        (block_size, num_random_blocks, rand_attn): BigBird's block-sparse self-attention,
        rand_attn None for the eval layout (tritium's kernel; its plain-PyTorch reference on
        the other backends)."""
        if self.training and self.dropout > 0:
            raise ValueError("attention dropout in training: tritium's attention kernels have no dropout; "
                             "set attention_dropout=0")
        q = self.split(self.q_proj(x))
        scale = self.head_dim**-0.5
        if memory is not None:
            k, v, memory_mask = memory
            out = attend_fixed(self.backend, q, k, v, key_padding_mask=memory_mask, softmax_scale=scale)
        elif sparse is not None:
            attention = block_sparse_attention if self.backend == "tritium" else reference.block_sparse_attention
            k, v = self.keys(x)
            block_size, num_random_blocks, rand_attn = sparse
            if rand_attn is not None:  # the layout of this module's heads
                rand_attn = rand_attn[self.first_head: self.first_head + self.heads]
            out = attention(q, k, v, block_size=block_size, num_random_blocks=num_random_blocks, rand_attn=rand_attn,
                            key_padding_mask=mask, softmax_scale=scale)
        else:
            k, v = self.keys(x, None if cache is not None else prefix)
            if cache is None:
                mask = with_prefix(mask, prefix)
            out = attend(self.backend, q, k, v, cache=cache, layer=layer, key_padding_mask=mask, causal=causal,
                         softmax_scale=scale)
        return self.out_proj(out.reshape(*x.shape[:2], -1))


def with_prefix(mask: torch.Tensor | None, prefix) -> torch.Tensor | None:
    """The key mask with the (always visible) prefix keys in front."""
    if mask is None or prefix is None:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], prefix[0].shape[0]), mask], 1)


class Seq2SeqLayer(nn.Module):
    """One encoder layer (self-attention, feed-forward) or decoder layer (causal
    self-attention, cross-attention, feed-forward), BART's names: self_attn,
    self_attn_layer_norm, encoder_attn, encoder_attn_layer_norm, fc1, fc2,
    final_layer_norm. Post-norm (BART, MVP: LayerNorm(x + block(x))) or pre-norm
    (BigBird-Pegasus: x + block(LayerNorm(x))). cross: whether a decoder layer has
    cross-attention (a decoder-only BertGeneration has none)."""

    def __init__(self, config: Seq2SeqConfig, *, decoder: bool, cross: bool, factory: dict):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        heads = config.decoder_attention_heads if decoder else config.encoder_attention_heads
        ffn = config.decoder_ffn_dim if decoder else config.encoder_ffn_dim
        self.self_attn = MultiHeadAttention(d, heads, bias=config.attention_bias, factory=factory)
        self.self_attn_layer_norm = LayerNorm(d, eps, **factory)
        if cross:
            self.encoder_attn = MultiHeadAttention(d, heads, bias=config.attention_bias, factory=factory)
            self.encoder_attn_layer_norm = LayerNorm(d, eps, **factory)
        self.fc1 = Linear(d, ffn, True, config.activation, **factory)
        self.fc2 = Linear(ffn, d, True, **factory)
        self.final_layer_norm = LayerNorm(d, eps, **factory)
        self.pre_norm, self.decoder = config.pre_norm, decoder
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def block(self, x: torch.Tensor, norm: LayerNorm, body) -> torch.Tensor:
        """x + body(x) with the layer's norm placement and dropout."""
        h = body(norm(x) if self.pre_norm else x)
        h = F.dropout(h, self.dropout, self.training)
        return x + h if self.pre_norm else norm(h, residual=x)[0]

    def forward(self, x: torch.Tensor, *, mask=None, prompts=None, cache=None, layer: int = 0,
                memory=None, sparse=None) -> torch.Tensor:
        """prompts: this layer's (self, cross) prefixes, or None; memory: the cross-attention
        (k, v, mask) of this layer (decoders); sparse: see MultiHeadAttention."""
        self_prefix = None if prompts is None else prompts[0]
        x = self.block(x, self.self_attn_layer_norm, lambda h: self.self_attn(
            h, causal=self.decoder, mask=mask, prefix=self_prefix, cache=cache, layer=layer, sparse=sparse))
        if memory is not None:
            x = self.block(x, self.encoder_attn_layer_norm, lambda h: self.encoder_attn(h, memory=memory))
        # FeedForward's forward on this layer's own fc1 and fc2 (BART names them here).
        return self.block(x, self.final_layer_norm, lambda h: FeedForward.forward(self, h))


class LayerPrompts(nn.Module):
    """MVP's task prompts of one stack: `prompt_length` learned vectors through an MLP
    (prompt_embedding, prompt_trans: Linear, GELU, Linear) into one key and one value
    prefix per layer. forward() -> per layer (k, v), each (prompt_length, heads,
    head_dim)."""

    def __init__(self, config: Seq2SeqConfig, layers: int, heads: int, factory: dict):
        super().__init__()
        d, mid = config.d_model, config.prompt_mid_dim
        self.prompt_embedding = nn.Embedding(config.prompt_length, d, **factory)
        self.prompt_trans = nn.Sequential(Linear(d, mid, True, "gelu", **factory), nn.Identity(),
                                          Linear(mid, layers * 2 * d, True, **factory))
        self.layers, self.heads, self.dropout = layers, heads, config.dropout
        self.group, self.kept = None, slice(None)  # tensor parallelism: its group, the rank's heads

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        prompt = copy_in(self.group, self.prompt_trans(self.prompt_embedding.weight))
        prompt = prompt.view(prompt.shape[0], self.layers, 2, self.heads, -1)[:, :, :, self.kept]
        prompt = F.dropout(prompt, self.dropout, self.training)
        return [(prompt[:, i, 0], prompt[:, i, 1]) for i in range(self.layers)]


class Stack(nn.Module):
    """The encoder or the decoder: token embeddings (the model's shared table) times
    sqrt(d_model) when scale_embedding, plus learned positions (row position + offset),
    layernorm_embedding (BART), the layers, and a final layer_norm (pre-norm models). MVP's
    prompts: self_attn_prompt (and the decoder's cross_attn_prompt)."""

    def __init__(self, config: Seq2SeqConfig, shared: nn.Embedding, *, decoder: bool, factory: dict,
                 cross: bool | None = None):
        super().__init__()
        d = config.d_model
        self.embed_tokens = shared
        self.embed_positions = nn.Embedding(config.max_position_embeddings + config.position_offset, d, **factory)
        if config.layernorm_embedding:
            self.layernorm_embedding = LayerNorm(d, config.layer_norm_eps, **factory)
        count = config.decoder_layers if decoder else config.encoder_layers
        cross = decoder if cross is None else cross
        self.layers = nn.ModuleList(Seq2SeqLayer(config, decoder=decoder, cross=cross, factory=factory)
                                    for _ in range(count))
        if config.pre_norm:
            self.layer_norm = LayerNorm(d, config.layer_norm_eps, **factory)
        if config.use_prompt and (decoder or config.encoder_prompt):
            heads = config.decoder_attention_heads if decoder else config.encoder_attention_heads
            self.self_attn_prompt = LayerPrompts(config, count, heads, factory)
            if decoder:
                self.cross_attn_prompt = LayerPrompts(config, count, heads, factory)
        self.scale = d**0.5 if config.scale_embedding else 1.0
        self.offset, self.dropout = config.position_offset, config.dropout

    def positions(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Positions start .. start + seqlen of each row of ids (batch, seqlen), checked
        against the table."""
        end = start + ids.shape[1]
        check_length("the sequence", end, self.embed_positions.num_embeddings - self.offset)
        return torch.arange(start, end, device=ids.device).expand_as(ids)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: (batch, seqlen) -> (batch, seqlen, d_model)."""
        x = self.embed_tokens(ids) * self.scale + self.embed_positions(positions + self.offset)
        if hasattr(self, "layernorm_embedding"):
            x = self.layernorm_embedding(x)
        return F.dropout(x, self.dropout, self.training)

    def prompts(self) -> list | None:
        """Per layer (self prefix, cross prefix), or None without prompts."""
        if not hasattr(self, "self_attn_prompt"):
            return None
        cross = self.cross_attn_prompt() if hasattr(self, "cross_attn_prompt") else [None] * len(self.layers)
        return list(zip(self.self_attn_prompt(), cross))

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x) if hasattr(self, "layer_norm") else x


@dataclass
class Seq2SeqLMOutput:
    """logits: (batch, target length, vocab), None when a loss was computed without them;
    loss: the mean cross-entropy over the labels that are not -100, when labels were given."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class EncoderDecoderLM(nn.Module):
    """What every compact encoder-decoder does with its two stacks (`encoder_stack`,
    `decoder_stack`: Stack modules, as the subclass lays them out) and its `head`.

    forward(input_ids, attention_mask, decoder_input_ids | labels) computes logits (and the
    loss: labels shifted right behind decoder_start_token_id give the decoder inputs, as
    transformers does); generate() encodes once and decodes on a static cache with the
    cross-attention keys computed once."""

    config: Seq2SeqConfig
    tp: TensorParallel | None = None  # set when sharded (tritium.models.load(..., tp=True))

    def finish_init(self) -> None:
        self.attn_implementation = "tritium"
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.dropout = self.config.attention_dropout

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_stack.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder_stack.embed_tokens.weight.device

    def set_attn_implementation(self, name: str) -> None:
        """Every attention on "tritium", "sdpa" or "eager"."""
        check_backend(name, 0.0)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.backend = name
        self.attn_implementation = name

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (batch, seqlen, d_model)."""
        encoder = self.encoder_stack
        x = encoder.embed(input_ids, encoder.positions(input_ids))
        mask = None if attention_mask is None else attention_mask.bool()
        prompts = encoder.prompts() or [None] * len(encoder.layers)
        for layer, prompt in zip(encoder.layers, prompts):
            x = layer(x, mask=mask, prompts=prompt)
        return encoder.finish(x)

    def memory(self, encoded: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple]:
        """Each decoder layer's cross-attention (k, v, mask) over the encoder's output: the
        keys and values computed once (with MVP's cross prompts in front)."""
        decoder = self.decoder_stack
        mask = None if attention_mask is None else attention_mask.bool()
        prompts = decoder.prompts() or [(None, None)] * len(decoder.layers)
        memory = []
        for layer, (_, cross) in zip(decoder.layers, prompts):
            k, v = layer.encoder_attn.keys(encoded, cross)
            memory.append((k, v, with_prefix(mask, cross)))
        return memory

    def decode(self, decoder_input_ids: torch.Tensor, memory: list[tuple], *, positions=None, cache=None,
               decoder_attention_mask=None, hidden: bool = False) -> torch.Tensor:
        """The decoder's logits (batch, seqlen, vocab) for decoder_input_ids (batch, seqlen)
        at `positions` (default: from the cache's length, 0 without one); with hidden, its
        last hidden states (before the head) instead."""
        decoder = self.decoder_stack
        if positions is None:
            positions = decoder.positions(decoder_input_ids, 0 if cache is None else cache.length - self.prompt_rows())
        x = decoder.embed(decoder_input_ids, positions)
        mask = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        prompts = decoder.prompts() if cache is None else None
        prompts = prompts or [None] * len(decoder.layers)
        for i, (layer, prompt) in enumerate(zip(decoder.layers, prompts)):
            x = layer(x, mask=mask, prompts=prompt, cache=cache, layer=i, memory=memory[i])
        if cache is not None and not cache.graph_lengths:
            cache.advance(decoder_input_ids.shape[1])
        x = decoder.finish(x)
        return x if hidden else self.head(x)

    def prompt_rows(self) -> int:
        return self.config.prompt_length if self.config.use_prompt else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_logits: bool | None = None) -> Seq2SeqLMOutput:
        """input_ids, attention_mask: (batch, source length); decoder_input_ids and
        decoder_attention_mask (batch, target length), or labels (batch, target length;
        -100 = ignored) from which the decoder inputs are made. With labels the loss goes
        through models.loss.lm_loss (no logits built on the tritium backend) and the logits come back
        only with return_logits=True."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("decoder_input_ids or labels: give one (the decoder needs its inputs)")
            if self.config.decoder_start_token_id is None:
                raise ValueError("labels without decoder_input_ids: the decoder inputs are the labels shifted right "
                                 "behind config.decoder_start_token_id, which is not set; set it (e.g. to the "
                                 "tokenizer's cls/bos id) or give decoder_input_ids")
            decoder_input_ids = shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        memory = self.memory(self.encode(input_ids, attention_mask), attention_mask)
        x = self.decode(decoder_input_ids, memory, decoder_attention_mask=decoder_attention_mask, hidden=True)
        if labels is None:
            return Seq2SeqLMOutput(self.head(x))
        weight, bias = self.head_parameters()
        loss = lm_loss(self.attn_implementation, x, weight, labels, bias=bias, tp=self.tp)
        return Seq2SeqLMOutput(self.head(x) if return_logits else None, loss)

    def start_token_id(self) -> int:
        """The token generation starts the decoder with: decoder_start_token_id, else (as
        transformers falls back) bos_token_id."""
        c = self.config
        if c.decoder_start_token_id is None and c.bos_token_id is None:
            raise ValueError("generate: neither config.decoder_start_token_id nor config.bos_token_id is set; "
                             "set the token the decoder starts from")
        return c.bos_token_id if c.decoder_start_token_id is None else c.decoder_start_token_id

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """The decoder start token followed by up to max_new_tokens new tokens per input;
        see tritium.models.generate.generate for the options."""
        return generate(self, input_ids, max_new_tokens, **options)

    def start_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, beams: int,
                         max_new_tokens: int, cuda_graph: bool | None) -> Session:
        """Encode once (at batch size; the beams share it), compute every layer's
        cross-attention keys, put the decoder's prompts in the cache, then decode from the
        decoder start token, one token per step."""
        check_length("the source", input_ids.shape[1], self.config.max_position_embeddings)
        check_length("1 + max_new_tokens", 1 + max_new_tokens, self.config.max_position_embeddings)
        encoded = expand(self.encode(input_ids, attention_mask), beams)
        memory = self.memory(encoded, expand(attention_mask, beams))
        rows, attention = encoded.shape[0], self.decoder_stack.layers[0].self_attn  # this rank's heads under TP
        cache = StaticCache(len(self.decoder_stack.layers), rows, self.prompt_rows() + 1 + max_new_tokens,
                            attention.heads, attention.head_dim, dtype=self.dtype, device=self.device)
        for i, ((k, v), _) in enumerate(self.decoder_stack.prompts() or []):  # the self-attention prompts
            cache.keys[i][:, : len(k)], cache.values[i][:, : len(v)] = k, v
        cache.advance(self.prompt_rows())
        start = torch.full((rows, 1), self.start_token_id(), dtype=torch.long, device=self.device)

        def run(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.decode(tokens, memory, positions=positions, cache=cache)[:, -1]

        logits = run(start, torch.zeros_like(start))
        decode, position = decode_step(self, cache, rows, cuda_graph, run), 0

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal position
            position += 1
            return decode(tokens[:, None], torch.full_like(tokens[:, None], position))

        return Session(start, logits, step, cache.reorder)


class BartLM(EncoderDecoderLM):
    """BART's layout (MVP, BigBird-Pegasus): model.shared, model.encoder.*, model.decoder.*,
    lm_head tied to the shared embeddings, plus final_logits_bias."""

    def __init__(self, config: Seq2SeqConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.config = config
        self.model = nn.Module()
        self.model.shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id, **factory)
        self.model.encoder = Stack(config, self.model.shared, decoder=False, factory=factory)
        self.model.decoder = Stack(config, self.model.shared, decoder=True, factory=factory)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False, **factory)
        self.lm_head.weight = self.model.shared.weight
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size, **factory))
        self.finish_init()

    @property
    def encoder_stack(self) -> Stack:
        return self.model.encoder

    @property
    def decoder_stack(self) -> Stack:
        return self.model.decoder

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return gather_vocab(self.tp, self.lm_head(x) + self.final_logits_bias.to(x.dtype))

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.lm_head.weight, self.final_logits_bias.reshape(-1)


def shift_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """The decoder inputs for `labels`: start token, then labels[:-1], -100 read as pad."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)
