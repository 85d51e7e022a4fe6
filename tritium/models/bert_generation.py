"""BertGeneration as compact models on tritium's kernels: BERT layers (post-norm, word and
position embeddings with a LayerNorm, GELU feed-forward) as an encoder
(`BertGenerationEncoder`), as a causal decoder with optional cross-attention and an LM
head (`BertGenerationDecoder`), and the two paired in an `EncoderDecoderModel`
(bert2bert, roberta2roberta) with its loss from labels.

The layers are the shared encoder-decoder layers (tritium/models/seq2seq.py, BART's
names); BERT's names are mapped to them as the checkpoint loads (CHECKPOINT_RENAMES).
`BertGenerationEncoder.from_pretrained` and `BertGenerationDecoder.from_pretrained` read a
plain BERT or RoBERTa checkpoint too (WARM_START), as the BertGeneration docs warm-start
bert2bert from google-bert/bert-large-uncased: the tensors BertGeneration has no use for
(token type embeddings, pooler, pre-training heads) are listed in a warning, and a
decoder's new cross-attention and LM-head bias are initialized as transformers does. Unlike
transformers, a RoBERTa checkpoint's weights under `roberta.` load too (transformers only
finds them without that prefix, and silently starts from random weights otherwise).
`EncoderDecoderModel(encoder=..., decoder=...)` pairs two such halves."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from torch import nn

from tritium.models.attention import check_backend
from tritium.models.loss import lm_loss
from tritium.models.mlp import Linear, activation_from_hf
from tritium.models.parallel import TensorParallel, gather_vocab
from tritium.models.seq2seq import EncoderDecoderLM, MultiHeadAttention, Seq2SeqConfig, Seq2SeqLMOutput, Stack

# transformers' BERT names -> the shared layers' (applied in order, to the whole key).
CHECKPOINT_RENAMES = (
    (r"\.attention\.self\.query\.", ".self_attn.q_proj."),
    (r"\.attention\.self\.key\.", ".self_attn.k_proj."),
    (r"\.attention\.self\.value\.", ".self_attn.v_proj."),
    (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
    (r"\.attention\.output\.LayerNorm\.", ".self_attn_layer_norm."),
    (r"\.crossattention\.self\.query\.", ".encoder_attn.q_proj."),
    (r"\.crossattention\.self\.key\.", ".encoder_attn.k_proj."),
    (r"\.crossattention\.self\.value\.", ".encoder_attn.v_proj."),
    (r"\.crossattention\.output\.dense\.", ".encoder_attn.out_proj."),
    (r"\.crossattention\.output\.LayerNorm\.", ".encoder_attn_layer_norm."),
    (r"\.intermediate\.dense\.", ".fc1."),
    (r"\.output\.dense\.", ".fc2."),
    (r"\.output\.LayerNorm\.", ".final_layer_norm."),
    (r"embeddings\.word_embeddings\.", "embed_tokens."),
    (r"embeddings\.position_embeddings\.", "embed_positions."),
    (r"embeddings\.LayerNorm\.", "layernorm_embedding."),
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"lm_head\.decoder\.", "lm_head."),
)


@dataclass(frozen=True)
class WarmStart:
    """How a plain BERT/RoBERTa checkpoint (model_type "bert" or "roberta") maps onto a
    BertGeneration half: renames applied before CHECKPOINT_RENAMES, the tensors left unused,
    and patterns of the half's parameters the checkpoint cannot hold (initialized fresh)."""

    renames: tuple = ()
    unused: tuple = (r"token_type_embeddings", r"(^|\.)pooler\.", r"^cls\.", r"^lm_head\.", r"position_ids$")
    fresh: tuple = ()


BASE_PREFIX = r"^(?:bert|roberta)\."  # the base model's prefix in a BertFor*/RobertaFor* checkpoint


def stack_config(raw: dict, decoder: dict | None = None, **ids) -> Seq2SeqConfig:
    """A Seq2SeqConfig from BERT / BertGeneration config.json fields (the encoder's, and the
    decoder's when it differs), with transformers' BertGeneration defaults."""
    raw = {"vocab_size": 50358, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
           "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
           "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, **raw}
    dec = {**raw, **(decoder or {})}
    if dec["hidden_size"] != raw["hidden_size"] or dec["vocab_size"] != raw["vocab_size"]:
        raise ValueError("config.json: an encoder and a decoder of different hidden or vocabulary sizes "
                         "(transformers' enc_to_dec_proj) are not supported")
    return Seq2SeqConfig(
        model_type=raw.get("model_type", "bert-generation"), vocab_size=raw["vocab_size"], d_model=raw["hidden_size"],
        encoder_layers=raw["num_hidden_layers"], decoder_layers=dec["num_hidden_layers"],
        encoder_attention_heads=raw["num_attention_heads"], decoder_attention_heads=dec["num_attention_heads"],
        encoder_ffn_dim=raw["intermediate_size"], decoder_ffn_dim=dec["intermediate_size"],
        activation=activation_from_hf(raw["hidden_act"]), max_position_embeddings=raw["max_position_embeddings"],
        position_offset=0, layer_norm_eps=float(raw["layer_norm_eps"]), dropout=float(raw["hidden_dropout_prob"]),
        attention_dropout=float(raw["attention_probs_dropout_prob"]),
        decoder_cross_attention=bool(dec.get("add_cross_attention", False)),
        pad_token_id=raw["pad_token_id"], bos_token_id=raw["bos_token_id"],
        eos_token_ids=[raw["eos_token_id"]] if isinstance(raw["eos_token_id"], int) else list(raw["eos_token_id"]),
        **ids)


class BertStack(Stack):
    """BERT's embeddings and layers as one Stack with its own word embeddings."""

    def __init__(self, config: Seq2SeqConfig, *, decoder: bool, cross: bool, factory: dict):
        embeddings = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id, **factory)
        super().__init__(config, embeddings, decoder=decoder, cross=cross, factory=factory)


def _set_backend(module: nn.Module, config: Seq2SeqConfig, name: str) -> None:
    check_backend(name, 0.0)
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.backend, m.dropout = name, config.attention_dropout


class BertGenerationEncoder(BertStack):
    """BERT layers over word and position embeddings: forward(input_ids, attention_mask)
    -> the last hidden state (batch, seqlen, hidden)."""

    CHECKPOINT_RENAMES = CHECKPOINT_RENAMES
    WARM_START = WarmStart(renames=((BASE_PREFIX, ""),))

    def __init__(self, config: Seq2SeqConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(config, decoder=False, cross=False, factory=dict(device=device, dtype=dtype))
        self.config = config
        self.set_attn_implementation("tritium")

    def set_attn_implementation(self, name: str) -> None:
        """Every attention on "tritium", "sdpa" or "eager"."""
        _set_backend(self, self.config, name)
        self.attn_implementation = name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids, self.positions(input_ids))
        mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs) -> BertGenerationEncoder:
        """A BertGeneration, BERT or RoBERTa checkpoint as an encoder; see from_pretrained."""
        return from_pretrained(cls, path_or_repo_id, kwargs)


class BertGenerationDecoder(nn.Module):
    """BERT layers as a causal decoder (bert.*), with cross-attention when the config says
    add_cross_attention, and an LM head (lm_head, its weight tied to the word embeddings,
    with a bias). forward(input_ids, attention_mask, labels=None) is a causal LM (its loss
    predicts each next token)."""

    CHECKPOINT_RENAMES = CHECKPOINT_RENAMES
    WARM_START = WarmStart(renames=((BASE_PREFIX, "bert."), (r"^(embeddings|encoder)\.", r"bert.\1.")),
                           fresh=(r"\.encoder_attn\.", r"\.encoder_attn_layer_norm\.", r"^lm_head\.bias$"))
    tp: TensorParallel | None = None  # set when sharded (tritium.models.load(..., tp=True))

    def __init__(self, config: Seq2SeqConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.config = config
        self.bert = BertStack(config, decoder=True, cross=config.decoder_cross_attention, factory=factory)
        self.lm_head = Linear(config.d_model, config.vocab_size, True, **factory)
        self.lm_head.weight = self.bert.embed_tokens.weight
        self.set_attn_implementation("tritium")

    def set_attn_implementation(self, name: str) -> None:
        """Every attention on "tritium", "sdpa" or "eager"."""
        _set_backend(self, self.config, name)
        self.attn_implementation = name

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs) -> BertGenerationDecoder:
        """A BertGeneration, BERT or RoBERTa checkpoint as a decoder (add_cross_attention=True
        for one in an EncoderDecoderModel); see from_pretrained."""
        return from_pretrained(cls, path_or_repo_id, kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, return_logits: bool | None = None) -> Seq2SeqLMOutput:
        """As a causal LM; labels (batch, seqlen): the loss of predicting labels[:, t + 1]
        at position t (models.loss.lm_loss; the logits only with return_logits=True)."""
        x = self.bert.embed(input_ids, self.bert.positions(input_ids))
        mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.bert.layers:
            x = layer(x, mask=mask)
        if labels is None:
            return Seq2SeqLMOutput(self.head(x))
        loss = lm_loss(self.attn_implementation, x, self.lm_head.weight, labels, bias=self.lm_head.bias, shift=True,
                       tp=self.tp)
        return Seq2SeqLMOutput(self.head(x) if return_logits else None, loss)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (..., vocab) of hidden states x (..., hidden)."""
        return gather_vocab(self.tp, self.lm_head(x))

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.lm_head.weight, self.lm_head.bias


class EncoderDecoderModel(EncoderDecoderLM):
    """transformers' EncoderDecoderModel of two BertGeneration halves (encoder.*, decoder.*):
    bert2bert, roberta2roberta. forward(..., labels) gives the loss as transformers does
    (labels shifted right behind decoder_start_token_id as the decoder inputs)."""

    CHECKPOINT_RENAMES = CHECKPOINT_RENAMES

    def __init__(self, config: Seq2SeqConfig | None = None, *, encoder: BertGenerationEncoder | None = None,
                 decoder: BertGenerationDecoder | None = None, dtype: torch.dtype = torch.float32, device=None):
        """From a config (new halves), or from two loaded halves, as transformers'
        EncoderDecoderModel(encoder=..., decoder=...) pairs warm-started ones: the decoder
        needs cross-attention, the halves the same hidden size; set
        config.decoder_start_token_id (and pad_token_id) before training from labels alone."""
        super().__init__()
        if (config is None) == (encoder is None or decoder is None):
            raise TypeError("EncoderDecoderModel: give a config, or both encoder= and decoder=")
        if config is None:
            config = _paired_config(encoder, decoder)
        else:
            encoder = BertGenerationEncoder(config, dtype=dtype, device=device)
            decoder = BertGenerationDecoder(config, dtype=dtype, device=device)
        self.config, self.encoder, self.decoder = config, encoder, decoder
        self.tp = decoder.tp
        self.finish_init()

    @property
    def encoder_stack(self) -> Stack:
        return self.encoder

    @property
    def decoder_stack(self) -> Stack:
        return self.decoder.bert

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.head(x)

    def head_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.decoder.head_parameters()


def _paired_config(encoder: BertGenerationEncoder, decoder: BertGenerationDecoder) -> Seq2SeqConfig:
    if not isinstance(encoder, BertGenerationEncoder) or not isinstance(decoder, BertGenerationDecoder):
        raise TypeError(f"EncoderDecoderModel: expected a BertGenerationEncoder and a BertGenerationDecoder, got "
                        f"{type(encoder).__name__} and {type(decoder).__name__}")
    e, d = encoder.config, decoder.config
    if not d.decoder_cross_attention:
        raise ValueError("EncoderDecoderModel: the decoder has no cross-attention; load it with "
                         "add_cross_attention=True")
    if (e.d_model, e.vocab_size) != (d.d_model, d.vocab_size):
        raise ValueError(f"EncoderDecoderModel: the halves differ in hidden or vocabulary size "
                         f"({e.d_model}, {e.vocab_size}) and ({d.d_model}, {d.vocab_size})")
    return replace(d, encoder_layers=e.encoder_layers, encoder_attention_heads=e.encoder_attention_heads,
                   encoder_ffn_dim=e.encoder_ffn_dim, decoder_start_token_id=None)


def from_pretrained(cls, path_or_repo_id, kwargs: dict):
    """cls from a checkpoint: kwargs that are tritium.models.load's options go to it (dtype,
    device, attn_implementation, ...), the others override config.json (bos_token_id,
    add_cross_attention, is_decoder, ...), as transformers' from_pretrained takes them."""
    from tritium.models.auto import load

    options = inspect.signature(load).parameters
    overrides = {k: v for k, v in kwargs.items() if k not in options}
    return load(path_or_repo_id, model_class=cls, config_overrides=overrides,
                **{k: v for k, v in kwargs.items() if k in options})


def config_from_hf(raw: dict) -> Seq2SeqConfig:
    """A Seq2SeqConfig from a BertGeneration / BERT config.json, or from an
    EncoderDecoderModel's ("encoder-decoder": the two halves under "encoder" and
    "decoder", the generation ids at the top)."""
    if raw["model_type"] != "encoder-decoder":
        return stack_config(raw)
    halves = (raw.get("encoder") or {}, raw.get("decoder") or {})
    kinds = {half.get("model_type") for half in halves}
    if kinds != {"bert-generation"}:
        raise ValueError(f"config.json: an EncoderDecoderModel of {sorted(kinds, key=str)}: tritium's compact "
                         "encoder-decoder pairs BertGeneration halves (BertModel/RobertaModel halves add token type "
                         "embeddings and another LM head; warm-start BertGeneration halves from those checkpoints "
                         "instead)")
    if not halves[1].get("add_cross_attention", False):
        raise ValueError("config.json: the decoder has no cross-attention (add_cross_attention is false)")
    # The generation ids at the top of the config (transformers reads them there) win.
    top = {k: raw[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if raw.get(k) is not None}
    return stack_config({**halves[0], **top}, halves[1], decoder_start_token_id=raw.get("decoder_start_token_id"),
                        forced_bos_token_id=raw.get("forced_bos_token_id"),
                        forced_eos_token_id=raw.get("forced_eos_token_id"))


def model_class(raw: dict):
    """Which class a config.json describes."""
    if raw["model_type"] == "encoder-decoder":
        return EncoderDecoderModel
    return BertGenerationDecoder if raw.get("is_decoder") else BertGenerationEncoder
