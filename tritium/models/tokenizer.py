"""A checkpoint's tokenizer without transformers: `load_tokenizer("google/gemma-2-2b")` or
`load_tokenizer("/path/to/folder")`.

The vocabulary comes from the first of these files the checkpoint has:

- `tokenizer.json`, through `tokenizers.Tokenizer.from_file`, as it is (normalizer, pre-tokenizer,
  model, post-processor and decoder): Gemma 2 and 3, GLM-4, and most current checkpoints;
- `tokenizer.model`, else `spiece.model`: a SentencePiece model, run by `sentencepiece`;
- `vocab.json` + `merges.txt`: a byte-level BPE, built the way transformers' RobertaTokenizer
  builds it (RoBERTa, BART, MVP);
- `vocab.txt`: a WordPiece vocabulary, built the way transformers' BertTokenizer builds it.

The special tokens and flags come from `tokenizer_config.json` and `special_tokens_map.json`, as
transformers 5 reads them (see `load_tokenizer`), so ids match `AutoTokenizer.from_pretrained` on the
same folder; the ids that end generation come from `generation_config.json` / `config.json`. Chat
templates are left to the caller: render one to a string and `encode(text, add_special_tokens=False)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tritium.models.config import read_json
from tritium.models.hub import CheckpointFiles

__all__ = ["Tokenizer", "TokenizerDecodeStream", "load_tokenizer"]

# Named special tokens, as transformers calls them (SPECIAL_TOKENS_ATTRIBUTES).
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The defaults a transformers tokenizer class gives the special tokens its config does not name
# (the class's __init__ signature). A class not listed has none (TokenizersBackend, alias
# PreTrainedTokenizerFast, loading a tokenizer.json has none either).
_CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "GemmaTokenizer": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "RobertaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                         "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"},
    "BertTokenizer": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                      "mask_token": "[MASK]"},
    "BertGenerationTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                "sep_token": "<::::>"},
    "PegasusTokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask_2>"},
}
# transformers' aliases (tokenizer_class_from_name): the class each of these names loads.
_CLASS_ALIASES = {"MvpTokenizer": "RobertaTokenizer", "BartTokenizer": "RobertaTokenizer",
                  "PreTrainedTokenizerFast": "TokenizersBackend", "PreTrainedTokenizer": "TokenizersBackend"}
# config.json model_type -> the class AutoTokenizer uses when tokenizer_config.json names none.
_MODEL_TYPE_CLASSES = {
    "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "gemma3": "GemmaTokenizer", "gemma3_text": "GemmaTokenizer",
    "glm": "TokenizersBackend", "glm4": "TokenizersBackend", "mvp": "RobertaTokenizer", "bart": "RobertaTokenizer",
    "roberta": "RobertaTokenizer", "bert": "BertTokenizer", "bert-generation": "BertGenerationTokenizer",
    "pegasus": "PegasusTokenizer", "bigbird_pegasus": "TokenizersBackend", "llama": "LlamaTokenizer",
}
# Classes transformers runs on sentencepiece itself (SentencePieceBackend, a Python tokenizer):
# no bos/eos added, and decode joins the pieces and strips the ends.
_SENTENCEPIECE_BACKEND_CLASSES = {"BertGenerationTokenizer"}
# The classes whose tokenizer this module reproduces from each kind of vocabulary other than
# tokenizer.json, the first one standing for "no class named" (None: transformers' generic
# conversion of a SentencePiece model). Other classes build their own pipeline (LlamaTokenizer: a
# dummy prefix on the first chunk only) or renumber the pieces (PegasusTokenizer, T5Tokenizer):
# for them, the checkpoint's tokenizer.json is needed.
_CLASSES_WITHOUT_TOKENIZER_JSON: dict[str, tuple[str | None, ...]] = {
    "sentencepiece": (None, "TokenizersBackend", "GemmaTokenizer", *sorted(_SENTENCEPIECE_BACKEND_CLASSES)),
    "bpe": ("RobertaTokenizer",),
    "wordpiece": ("BertTokenizer",),
}

_LOOKED_FOR = "tokenizer.json, tokenizer.model, spiece.model, vocab.json + merges.txt, or vocab.txt"


class _Token:
    """A special token named in a config: its text and the AddedToken flags given there."""

    def __init__(self, value: Any):
        if isinstance(value, dict):
            self.content = str(value["content"])
            self.flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "normalized", "single_word") if k in value}
            self.special = bool(value.get("special", True))
        else:
            self.content, self.flags, self.special = str(value), {}, True

    def added_token(self, special: bool | None = None):
        from tokenizers import AddedToken

        flags = {"normalized": False, **self.flags}
        return AddedToken(self.content, special=self.special if special is None else special, **flags)


def _token(value: Any) -> _Token | None:
    """A token named in a config (a string, or a dict with "content"); None for anything else."""
    if isinstance(value, dict):
        return _Token(value) if isinstance(value.get("content"), str) and value["content"] else None
    return _Token(value) if isinstance(value, str) and value else None


def _config_ids(key: str, generation: dict, config: dict) -> list[int]:
    """`key` (eos_token_id, pad_token_id: an int or a list of ints) from generation_config.json,
    else config.json, else config.json's text_config; [] where none has it."""
    text_config = config.get("text_config")
    for where, source in (("generation_config.json", generation), ("config.json", config),
                          ("config.json text_config", text_config if isinstance(text_config, dict) else {})):
        value = source.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: {key} should be an int or a list of ints, not {value!r}")
        return list(dict.fromkeys(values))
    return []


# ---- backends -------------------------------------------------------------------------------


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`, used as transformers' TokenizersBackend uses it."""

    def __init__(self, tok, clean_up: bool):
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        # transformers skips the clean-up for BPE models (it strips legitimate spaces there).
        self.clean_up = clean_up and type(tok.model).__name__ != "BPE"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def add(self, token: _Token, special: bool) -> int:
        """Make `token` an added token (matched whole in text), special or not, as transformers
        does when it loads: an added token already is left as it is, a token the vocabulary lacks
        gets the next id. Returns its id."""
        for index, added in self.tok.get_added_tokens_decoder().items():
            if added.content == token.content:
                return index
        added = token.added_token(special)
        if special:
            self.tok.add_special_tokens([added])
        else:
            self.tok.add_tokens([added])
        return self.tok.token_to_id(token.content)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _spm_dummy_prefix(proto: bytes) -> bool:
    """The add_dummy_prefix flag of a serialized SentencePiece ModelProto, read from the protobuf
    wire format (no protobuf dependency)."""

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"unexpected protobuf wire type {wire} in a SentencePiece model")
            yield field, value

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, i
            shift += 7

    dummy_prefix = True  # the proto's default
    for field, value in fields(proto):
        if field == 3:  # ModelProto.normalizer_spec
            for f, v in fields(value):
                if f == 3:  # NormalizerSpec.add_dummy_prefix
                    dummy_prefix = bool(v)
    return dummy_prefix


class _SentencePieceBackend:
    """A SentencePiece model with transformers' added-token handling on top: text is split on the
    added tokens (the tokens the configs name, and, but for SentencePieceBackend classes, the
    model's control pieces), each piece between them encoded by SentencePiece (which matches the
    user-defined pieces itself), and bos/eos added per add_bos_token / add_eos_token. This is what
    transformers' tokenizers-based classes built from a .model file (GemmaTokenizer,
    TokenizersBackend) and its SentencePieceBackend classes (BertGenerationTokenizer) compute."""

    def __init__(self, path: Path, *, python_style: bool, clean_up: bool):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.python_style = python_style
        self.clean_up = clean_up
        self.pieces = self.sp.get_piece_size()
        self.dummy_prefix = _spm_dummy_prefix(self.sp.serialized_model_proto())
        self.added: dict[str, int] = {}  # content -> id, matched whole in the text
        self.added_by_id: dict[int, str] = {}
        self.special: set[int] = set()
        self._next = self.pieces
        self._pattern: re.Pattern | None = None
        if not python_style:
            # transformers' SentencePiece conversion: control pieces are special added tokens.
            for i in range(self.pieces):
                if self.sp.is_control(i):
                    self._register(self.sp.id_to_piece(i), i, special=True)
        from tokenizers import decoders

        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.dummy_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        self.decoder = decoders.Sequence(steps)
        self.add_bos: int | None = None
        self.add_eos: int | None = None

    def _register(self, content: str, index: int, special: bool) -> None:
        self.added[content] = index
        self.added_by_id[index] = content
        if special:
            self.special.add(index)
        else:
            self.special.discard(index)
        self._pattern = None

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        index = self.sp.piece_to_id(token)
        return index if self.sp.id_to_piece(index) == token else None

    def add(self, token: _Token, special: bool, index: int | None = None) -> int:
        """As _TokenizersBackend.add; `index` places a token the model lacks (added_tokens_decoder)."""
        if token.content in self.added:
            return self.added[token.content]
        existing = self.token_to_id(token.content)
        if existing is None:
            existing = index if index is not None else self._next
        self._next = max(self._next, existing + 1)
        self._register(token.content, existing, special)
        return existing

    def _split(self, text: str) -> Iterable[tuple[str, int | None]]:
        if not self.added:
            yield text, None
            return
        if self._pattern is None:
            self._pattern = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        start = 0
        for m in self._pattern.finditer(text):
            if m.start() > start:
                yield text[start:m.start()], None
            yield m.group(), self.added[m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:], None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for chunk, index in self._split(text):
            if index is not None:
                ids.append(index)
            else:
                ids.extend(self.sp.encode(chunk))
        if add_special_tokens:
            if self.add_bos is not None:
                ids.insert(0, self.add_bos)
            if self.add_eos is not None:
                ids.append(self.add_eos)
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        tokens = []
        for i in ids:
            if i in self.added_by_id:
                if not (skip_special_tokens and i in self.special):
                    tokens.append(self.added_by_id[i])
            elif 0 <= i < self.pieces:
                tokens.append(self.sp.id_to_piece(i))
        if self.python_style:
            text = "".join(tokens).replace("▁", " ").strip()
        else:
            text = self.decoder.decode(tokens) if tokens else ""
        return _clean_up_tokenization(text) if self.clean_up else text

    def __len__(self) -> int:
        return max(self.pieces, self._next)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (clean_up_tokenization_spaces=True)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---- the tokenizer --------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer (see `load_tokenizer`): text <-> token ids, ids equal to
    transformers' tokenizer for the same checkpoint."""

    def __init__(self, backend, *, name: str, bos_token_id: int | None, eos_token_id: int | None,
                 eos_token_ids: list[int], pad_token_id: int | None, unk_token_id: int | None = None):
        self._backend = backend
        self.name = name
        self._bos, self._eos, self._eos_all, self._pad = bos_token_id, eos_token_id, list(eos_token_ids), pad_token_id
        self._unk = unk_token_id

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_token_id={self._bos}, "
                f"eos_token_ids={self._eos_all}, pad_token_id={self._pad})")

    @property
    def bos_token_id(self) -> int | None:
        """The id of the tokenizer's bos token (None if it has none). Whether `encode` adds it is
        the checkpoint's choice (its post-processor, or add_bos_token)."""
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        """The id of the tokenizer's own eos token, as transformers reports it; when the tokenizer
        files name none, the first of `eos_token_ids` (None if that is empty too)."""
        return self._eos

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: generation_config.json's eos_token_id (an int or a list),
        else config.json's, else [eos_token_id]; `eos_token_id` first when it is among them."""
        return list(self._eos_all)

    @property
    def pad_token_id(self) -> int | None:
        """The id batches are padded with: the tokenizer's pad token, else generation_config.json's
        or config.json's pad_token_id (None if there is none: see `__call__`)."""
        return self._pad

    @property
    def unk_token_id(self) -> int | None:
        """The id of the unknown token, None if the tokenizer names none."""
        return self._unk

    @property
    def vocab_size(self) -> int:
        """How many ids the tokenizer can produce: the base vocabulary plus the added tokens
        (transformers' len(tokenizer), not its vocab_size, which leaves added tokens out)."""
        return len(self._backend)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (an added token such as "<end_of_turn>"
        included), None if there is no such token."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`. Added and special tokens written in the text (e.g. "<bos>") are
        recognised as such. add_special_tokens adds what the checkpoint adds around a sequence
        (e.g. Gemma's bos); pass False for text that already has them, like a rendered chat
        template."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (a list of ints or a 1-D tensor). skip_special_tokens leaves out the
        special tokens (bos, eos, pad, ...), as transformers' decode does."""
        return self._backend.decode(_id_list(ids), skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], *, add_special_tokens: bool = True,
                 padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch: returns (input_ids, attention_mask), both int64 (batch, seqlen). Shorter
        rows are padded with pad_token_id on `padding_side` ("left", the default, suits
        generation: every row ends at its last token), attention_mask 0 there and 1 elsewhere. A
        single str is a batch of one. ValueError when rows differ in length and the tokenizer has
        no pad token."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: 'left' or 'right', not {padding_side!r}")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: a str or a list of str")
        rows = self._backend.encode_batch(texts, add_special_tokens) if texts else []
        width = max((len(r) for r in rows), default=0)
        if any(len(r) != width for r in rows) and self._pad is None:
            raise ValueError(f"{self.name}: the texts encode to different lengths and the tokenizer has no pad token "
                             "(none in tokenizer_config.json, special_tokens_map.json, generation_config.json or "
                             "config.json); encode them one by one")
        input_ids = torch.full((len(rows), width), self._pad if self._pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, cols] = 1
        return input_ids, attention_mask

    def decode_stream(self, skip_special_tokens: bool = False,
                      context: Sequence[int] | torch.Tensor = ()) -> TokenizerDecodeStream:
        """An incremental decoder for printing tokens as they are generated: see
        `TokenizerDecodeStream`. `context`: ids already shown (the prompt), which the new text
        follows; without it, a tokenizer that drops the leading space of a sequence (SentencePiece's
        dummy prefix) drops the space before the first pushed word."""
        return TokenizerDecodeStream(self, skip_special_tokens, context)


class TokenizerDecodeStream:
    """Text from a growing sequence of ids, one id at a time: `push(id)` returns the text that id
    adds (possibly ""), so the pushes concatenate to `decode(all ids)`. A piece that ends inside a
    multi-byte character (byte-fallback or byte-level tokens) gives "" until the character is
    complete: text is emitted only once it no longer ends in U+FFFD. `finish()` returns what is
    still held back. Each push decodes a short window of ids, the tokens since the previous
    emission, so the cost per token does not grow with the sequence. `context`: ids already
    shown, which the pushed ones follow (their text is not returned)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 context: Sequence[int] | torch.Tensor = ()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = _id_list(context)
        self._read = len(self._ids)  # ids before this one have been emitted (or were context)
        self._prefix = max(0, self._read - 5)  # the window decoded to find what a new id adds starts here

    def push(self, token_id: int | torch.Tensor) -> str:
        """Add one id; return the new printable text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tokenizer.decode(self._ids[self._prefix:], self._skip)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def finish(self) -> str:
        """The text held back at the end of the sequence (an incomplete character, as U+FFFD)."""
        before = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tokenizer.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(before):]


def _id_list(ids: Sequence[int] | torch.Tensor | int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode takes a 1-D tensor of ids, not shape {tuple(ids.shape)}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


# ---- loading --------------------------------------------------------------------------------


def load_tokenizer(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint: a local folder, or a hub repository id (its local cache first;
    see tritium.models.hub.CheckpointFiles). Gives the same ids as transformers'
    `AutoTokenizer.from_pretrained` for that checkpoint.

    Vocabulary: the first of `tokenizer.json` (loaded as it is with `tokenizers`), `tokenizer.model`
    or `spiece.model` (SentencePiece), `vocab.json` + `merges.txt` (byte-level BPE, RoBERTa / MVP)
    and `vocab.txt` (WordPiece, BERT); FileNotFoundError naming them when there is none. A
    SentencePiece model without tokenizer.json is read for GemmaTokenizer, BertGenerationTokenizer
    and generic (TokenizersBackend, or no class named) checkpoints only; other classes (Llama,
    Pegasus, T5: transformers builds their own pipeline or renumbers the pieces) raise ValueError.

    Special tokens, as transformers 5 resolves them: a token (a string, or a dict with "content")
    is taken from tokenizer_config.json; special_tokens_map.json overrides it unless
    tokenizer_config.json has "added_tokens_decoder"; then the defaults of the transformers class
    the config names (tokenizer_class, else config.json's model_type; e.g. GemmaTokenizer: <bos>,
    <eos>, <pad>, <unk>, <mask>); for a SentencePiece model loaded as a generic class, its own
    bos/eos/unk pieces. A named token the vocabulary lacks is added with the next id, as
    transformers does. `bos_token_id` and `pad_token_id` are those tokens' ids, as transformers
    reports them, except that where the tokenizer files name no pad token (transformers: None),
    generation_config.json's, else config.json's pad_token_id fills in. eos: `eos_token_id` is the
    tokenizer's eos token (where the tokenizer files name none, the first of `eos_token_ids`);
    `eos_token_ids` (what ends generation) is generation_config.json's eos_token_id, else
    config.json's (an int or a list), else [eos_token_id], with eos_token_id moved first when it
    is among them.

    What `encode` adds around a sequence: tokenizer.json's post-processor (transformers then
    ignores add_bos_token / add_eos_token); for a SentencePiece model, bos if add_bos_token and eos
    if add_eos_token (both default false, as in transformers 5; none for BertGenerationTokenizer);
    RoBERTa's <s> ... </s> and BERT's [CLS] ... [SEP]. decode applies clean_up_tokenization_spaces
    when the config sets it, except to BPE models (as transformers does).
    """
    files = CheckpointFiles(path_or_repo_id, revision)
    name = files.name
    tk_config = read_json(files.get("tokenizer_config.json", required=False))
    generation = read_json(files.get("generation_config.json", required=False))
    config = read_json(files.get("config.json", required=False))

    cls = tk_config.get("tokenizer_class") or config.get("tokenizer_class") or \
        _MODEL_TYPE_CLASSES.get(str(config.get("model_type")))
    if isinstance(cls, str):
        if cls.endswith("Fast") and cls != "PreTrainedTokenizerFast":
            cls = cls[:-4]
        cls = _CLASS_ALIASES.get(cls, cls)
    else:
        cls = None
    kind, paths = _vocabulary_files(files)
    if kind != "tokenizer.json":
        # Without tokenizer.json, transformers builds the tokenizer from the class: only the
        # classes reproduced here are accepted.
        supported = _CLASSES_WITHOUT_TOKENIZER_JSON[kind]
        if cls is None and kind != "sentencepiece":
            cls = supported[0]
        if cls not in supported:
            names = ", ".join(c for c in supported if c) + (", or none named" if None in supported else "")
            raise ValueError(f"{name}: tokenizer_class {cls} from {' + '.join(p.name for p in paths)} alone is not "
                             f"supported (only {names}); a checkpoint with tokenizer.json is")

    # The named special tokens, in transformers' order of precedence.
    tokens: dict[str, _Token | None] = {key: _token(tk_config.get(key)) for key in _NAMED}
    if "added_tokens_decoder" not in tk_config:
        special_map = read_json(files.get("special_tokens_map.json", required=False))
        for key in _NAMED:
            if _token(special_map.get(key)) is not None:
                tokens[key] = _token(special_map[key])
        extra_from_map = special_map.get("additional_special_tokens") or special_map.get("extra_special_tokens")
    else:
        extra_from_map = None
    for key, default in _CLASS_DEFAULTS.get(cls or "", {}).items():
        if tokens[key] is None and key not in tk_config:
            tokens[key] = _Token(default)
    clean_up = bool(tk_config.get("clean_up_tokenization_spaces", False))

    backend, after_specials = _load_backend(kind, paths, cls, tk_config, tokens, clean_up)

    # Other special tokens: model-specific *_token keys, additional/extra special tokens.
    extras: list[_Token] = []
    for key, value in tk_config.items():
        if key.endswith("_token") and key not in _NAMED and _token(value) is not None:
            extras.append(_Token(value))
    for source in (tk_config.get("additional_special_tokens"), tk_config.get("extra_special_tokens"), extra_from_map):
        values = source.values() if isinstance(source, dict) else source if isinstance(source, list) else []
        extras.extend(t for t in (_token(v) for v in values) if t is not None)
    added_decoder = tk_config.get("added_tokens_decoder") or {}

    # Register them as transformers does: the added_tokens_decoder entries, then every special token.
    for index, value in sorted(((int(i), v) for i, v in added_decoder.items()), key=lambda kv: kv[0]):
        token = _token(value)
        if token is None:
            continue
        if isinstance(backend, _SentencePieceBackend):
            backend.add(token, token.special, index)
        elif backend.token_to_id(token.content) is None:
            backend.add(token, token.special)
    ids: dict[str, int | None] = {}
    for key in _NAMED:
        token = tokens[key]
        ids[key] = None if token is None else backend.add(token, True)
    for token in extras:
        backend.add(token, True)
    if after_specials is not None:
        after_specials(ids)

    bos, pad, eos = ids["bos_token"], ids["pad_token"], ids["eos_token"]
    if pad is None:
        pad = next(iter(_config_ids("pad_token_id", generation, config)), None)
    eos_ids = _config_ids("eos_token_id", generation, config)
    if not eos_ids and eos is not None:
        eos_ids = [eos]
    if eos is None and eos_ids:
        eos = eos_ids[0]
    if eos in eos_ids:
        eos_ids.remove(eos)
        eos_ids.insert(0, eos)
    return Tokenizer(backend, name=name, bos_token_id=bos, eos_token_id=eos, eos_token_ids=eos_ids,
                     pad_token_id=pad, unk_token_id=ids["unk_token"])


def _vocabulary_files(files: CheckpointFiles) -> tuple[str, list[Path]]:
    """Which vocabulary the checkpoint has, the first of: tokenizer.json, tokenizer.model or
    spiece.model ("sentencepiece"), vocab.json + merges.txt ("bpe"), vocab.txt ("wordpiece")."""
    path = files.get("tokenizer.json", required=False)
    if path is not None:
        return "tokenizer.json", [path]
    path = files.get("tokenizer.model", required=False) or files.get("spiece.model", required=False)
    if path is not None:
        return "sentencepiece", [path]
    vocab, merges = files.get("vocab.json", required=False), files.get("merges.txt", required=False)
    if vocab is not None and merges is not None:
        return "bpe", [vocab, merges]
    vocab = files.get("vocab.txt", required=False)
    if vocab is not None:
        return "wordpiece", [vocab]
    where = "" if files.folder is not None else " (with HF_HUB_OFFLINE set, in the local Hugging Face cache)"
    raise FileNotFoundError(f"{files.name}: no tokenizer files{where}: looked for {_LOOKED_FOR}")


def _load_backend(kind: str, paths: list[Path], cls: str | None, tk_config: dict,
                  tokens: dict[str, _Token | None], clean_up: bool):
    """The backend for the checkpoint's vocabulary files, and a function to finish it once the
    special tokens have ids (or None)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    if kind == "tokenizer.json":
        return _TokenizersBackend(tokenizers.Tokenizer.from_file(str(paths[0])), clean_up), None

    if kind == "sentencepiece":
        path = paths[0]
        python_style = cls in _SENTENCEPIECE_BACKEND_CLASSES
        backend = _SentencePieceBackend(path, python_style=python_style, clean_up=clean_up)
        if cls in (None, "TokenizersBackend"):
            sp = backend.sp
            for key, index in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                if tokens[key] is None and key not in tk_config and index >= 0:
                    tokens[key] = _Token(sp.id_to_piece(index))

        def finish(ids: dict[str, int | None]) -> None:
            if python_style:
                return
            if tk_config.get("add_bos_token", False) and ids["bos_token"] is not None:
                backend.add_bos = ids["bos_token"]
            if tk_config.get("add_eos_token", False) and ids["eos_token"] is not None:
                backend.add_eos = ids["eos_token"]

        return backend, finish

    if kind == "bpe":
        # transformers' RobertaTokenizer (also MvpTokenizer and BartTokenizer).
        vocab, merges = paths
        prefix = bool(tk_config.get("add_prefix_space", False))
        trim = bool(tk_config.get("trim_offsets", True))
        vocab_dict, merge_list = models.BPE.read_file(str(vocab), str(merges))
        tok = tokenizers.Tokenizer(models.BPE(vocab_dict, merge_list, dropout=None, continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        tok.decoder = decoders.ByteLevel()
        backend = _TokenizersBackend(tok, clean_up)

        def finish(ids: dict[str, int | None]) -> None:
            sep, cls_ = tokens["sep_token"], tokens["cls_token"]
            if sep is not None and cls_ is not None:
                tok.post_processor = processors.RobertaProcessing((sep.content, ids["sep_token"]),
                                                                  (cls_.content, ids["cls_token"]), trim, prefix)

        return backend, finish

    if kind == "wordpiece":
        # transformers' BertTokenizer.
        vocab = paths[0]
        unk = tokens["unk_token"].content if tokens["unk_token"] is not None else "[UNK]"
        tok = tokenizers.Tokenizer(models.WordPiece(models.WordPiece.read_file(str(vocab)), unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(tk_config.get("tokenize_chinese_chars", True)),
            strip_accents=tk_config.get("strip_accents"), lowercase=bool(tk_config.get("do_lower_case", True)))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        backend = _TokenizersBackend(tok, clean_up)

        def finish(ids: dict[str, int | None]) -> None:
            sep, cls_ = tokens["sep_token"], tokens["cls_token"]
            sep_s, cls_s = (sep.content if sep else "[SEP]"), (cls_.content if cls_ else "[CLS]")
            sep_i = ids["sep_token"] if ids["sep_token"] is not None else 3
            cls_i = ids["cls_token"] if ids["cls_token"] is not None else 2
            tok.post_processor = processors.TemplateProcessing(
                single=f"{cls_s}:0 $A:0 {sep_s}:0", pair=f"{cls_s}:0 $A:0 {sep_s}:0 $B:1 {sep_s}:1",
                special_tokens=[(cls_s, cls_i), (sep_s, sep_i)])

        return backend, finish

    raise AssertionError(kind)
