"""tritium.models.tokenizer against transformers' AutoTokenizer on small tokenizers trained here, in
tmp folders shaped like the checkpoints tritium loads: a byte-level BPE tokenizer.json (GLM-4's
kind), a Gemma-shaped tokenizer.json, a Gemma-shaped SentencePiece tokenizer.model, a
BertGeneration spiece.model, RoBERTa's vocab.json + merges.txt and BERT's vocab.txt."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from tritium.models.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sentencepiece = pytest.importorskip("sentencepiece")

from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

WORDS = ["hello", "world", "token", "tokenizer", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
         "naïve", "café", "ünïcödé", "日本語", "テキスト", "🙂", "42", "3.14", "x_y", "don't", "it's", "(a)", "end."]
TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading and  double  spaces\n\nnew lines\t tab ",
    "naïve café — ünïcödé",
    "日本語のテキスト 🙂🚀 mixed",
    "rare: ∮ ⅷ ꙮ 𝔘 ﬁ",
    "the quick brown fox jumps over the lazy dog. It's 3.14, don't x_y!",
    "token" * 20,
]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        sep = rng.choice([" ", " ", " ", "  ", "\t", " \n"])
        lines.append(sep.join(words))
    return lines


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def hf(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def check_same_ids(ours, theirs, texts=TEXTS) -> None:
    for text in texts:
        for add in (True, False):
            expected = theirs.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == expected, (text, add)
            for skip in (False, True):
                assert ours.decode(expected, skip_special_tokens=skip) == theirs.decode(
                    expected, skip_special_tokens=skip), (text, add, skip)
    assert ours.vocab_size == len(theirs)
    # Arbitrary ids too: special tokens anywhere, pieces that start or end with a space, stray
    # byte pieces.
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(theirs)) for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id


def check_batch(ours, theirs, texts) -> None:
    for side in ("left", "right"):
        ids, mask = ours(texts, padding_side=side)
        expected = theirs(texts, padding=True, padding_side=side, return_tensors="pt")
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, expected["input_ids"]), side
        assert torch.equal(mask, expected["attention_mask"]), side


# ---- tokenizer.json ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bytelevel_folder(tmp_path_factory) -> Path:
    """A GLM-4-like byte-level BPE tokenizer.json whose post-processor adds <s>, loaded by
    transformers as PreTrainedTokenizerFast; eos is a list of three ids in generation_config.json,
    and the config names a mask token the vocabulary lacks (transformers adds it)."""
    folder = tmp_path_factory.mktemp("bytelevel")
    specials = ["<|endoftext|>", "<s>", "<pad>", "<|user|>", "<|assistant|>", "<|observation|>"]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": {"__type": "AddedToken", "content": "<pad>", "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True},
        "mask_token": "<mask>", "clean_up_tokenization_spaces": False})
    eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    write_json(folder / "generation_config.json", {"eos_token_id": eos, "pad_token_id": tok.token_to_id("<pad>")})
    return folder


def test_bytelevel_tokenizer_json_matches_transformers(bytelevel_folder):
    ours, theirs = load_tokenizer(bytelevel_folder), hf(bytelevel_folder)
    extra = ["<s>chat<|user|>\nhi<|assistant|>", "<|endoftext|><pad><mask>"]
    check_same_ids(ours, theirs, TEXTS + extra)
    assert theirs.encode("hi")[0] == ours.bos_token_id  # the post-processor adds bos
    assert ours.token_to_id("<mask>") == theirs.mask_token_id == len(theirs) - 1  # added, as transformers does
    generation = json.loads((bytelevel_folder / "generation_config.json").read_text())
    assert ours.eos_token_ids == generation["eos_token_id"]
    assert ours.eos_token_id == ours.eos_token_ids[0] == theirs.eos_token_id
    check_batch(ours, theirs, ["Hello world", "", "naïve café 日本語 🙂 and a longer line of text"])
    ids, mask = ours(["a", "a much longer line"])  # left padding by default
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and ids[0, 0] == ours.pad_token_id


@pytest.mark.parametrize("case", ["map_overrides", "added_tokens_decoder", "map_only"])
def test_special_token_precedence_matches_transformers(bytelevel_folder, tmp_path, case):
    """special_tokens_map.json overrides tokenizer_config.json, unless the latter has
    added_tokens_decoder; with no tokenizer_config.json, the map alone (and config.json's model
    type) decides."""
    (tmp_path / "tokenizer.json").write_bytes((bytelevel_folder / "tokenizer.json").read_bytes())
    write_json(tmp_path / "special_tokens_map.json", {"eos_token": "<|user|>", "pad_token": "<|endoftext|>",
                                                       "additional_special_tokens": ["<|observation|>"]})
    write_json(tmp_path / "config.json", {"model_type": "glm4"})
    if case != "map_only":
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
                  "pad_token": "<pad>"}
        if case == "added_tokens_decoder":
            config["added_tokens_decoder"] = {"0": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False, "special": True}}
        write_json(tmp_path / "tokenizer_config.json", config)
    ours, theirs = load_tokenizer(tmp_path), hf(tmp_path)
    check_same_ids(ours, theirs, ["<s>hi<|user|>x<|observation|>", "Hello world"])
    assert ours.eos_token_ids == [ours.eos_token_id]


def gemma_json_folder(folder: Path) -> Path:
    """A tokenizer.json shaped like Gemma 2's (BPE with byte fallback over <0x00>..<0xFF>, spaces
    as "▁", a post-processor adding <bos>), loaded by transformers as GemmaTokenizer, which
    rebuilds the pipeline from its own class and takes only vocab, merges and post-processor
    from the file."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials + byte_pieces, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    data = json.loads(tok.to_str())
    data["model"]["byte_fallback"] = True  # (the trainer drops it)
    # The byte pieces are ordinary vocabulary, as in Gemma's tokenizer.json, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    for t in data["added_tokens"]:
        t["special"] = t["content"] not in ("<start_of_turn>", "<end_of_turn>")
    write_json(folder / "tokenizer.json", data)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"})
    write_json(folder / "config.json", {"model_type": "gemma2", "eos_token_id": 1, "bos_token_id": 2,
                                        "pad_token_id": 0})
    return folder


def test_gemma_tokenizer_json_matches_transformers(tmp_path):
    folder = gemma_json_folder(tmp_path)
    ours, theirs = load_tokenizer(folder), hf(folder)
    assert type(theirs).__name__ == "GemmaTokenizer"
    chat = "<bos><start_of_turn>user\nWho are you? 日本語<end_of_turn>\n<start_of_turn>model\n"
    check_same_ids(ours, theirs, TEXTS + [chat, "\x00\x7f control \u200b zero width"])
    assert ours.encode("hello")[0] == ours.bos_token_id == 2
    assert ours.encode(chat, add_special_tokens=False).count(2) == 1
    assert ours.eos_token_ids == [1]
    check_batch(ours, theirs, ["hello", "<start_of_turn>user\n🙂🙂", ""])


# ---- SentencePiece ----------------------------------------------------------------------------

def train_sentencepiece(folder: Path, filename: str, **options) -> Path:
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus(400, seed=1)), encoding="utf-8")
    prefix = folder / "sp"
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), minloglevel=2, **options)
    prefix.with_suffix(".model").rename(folder / filename)
    text.unlink()
    prefix.with_suffix(".vocab").unlink()
    return folder / filename


GEMMA_SPM = dict(model_type="bpe", vocab_size=400, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                 eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
                 normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                 split_digits=True, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
                 control_symbols=["<mask>", "<ctrl99>"])


@pytest.fixture(scope="module")
def gemma_spm_folder(tmp_path_factory) -> Path:
    """Gemma's SentencePiece layout: pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy prefix;
    tokenizer.model alone, with a GemmaTokenizer tokenizer_config.json that adds bos."""
    folder = tmp_path_factory.mktemp("gemma_spm")
    train_sentencepiece(folder, "tokenizer.model", **GEMMA_SPM)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"})
    return folder


def test_sentencepiece_gemma_matches_sentencepiece(gemma_spm_folder):
    """The reference that needs no protobuf: SentencePiece itself, on text without added tokens."""
    ours = load_tokenizer(gemma_spm_folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(gemma_spm_folder / "tokenizer.model"))
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    assert ours.eos_token_ids == [1]
    for text in TEXTS:
        expected = sp.encode(text)
        assert ours.encode(text) == [2] + expected, text
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected) == sp.decode(expected) == text, text
        assert ours.decode([2] + expected, skip_special_tokens=True) == text
    # Control pieces written in the text are special tokens, as in transformers (SentencePiece
    # itself would spell "<bos>" out), named in the config or not (<ctrl99>).
    ctrl = sp.piece_to_id("<ctrl99>")
    assert ours.encode("<bos>hi<start_of_turn>user<ctrl99>", add_special_tokens=False) == (
        [2] + sp.encode("hi") + [sp.piece_to_id("<start_of_turn>")] + sp.encode("user") + [ctrl])
    assert ours.decode([2, ctrl] + sp.encode("hi")) == "<bos><ctrl99>hi"
    assert ours.decode([2, ctrl] + sp.encode("hi"), skip_special_tokens=True) == "hi"
    assert ours.vocab_size == sp.get_piece_size()


def has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not has_protobuf(),
                    reason="transformers needs protobuf to convert a SentencePiece model for GemmaTokenizer")
def test_sentencepiece_gemma_matches_transformers(gemma_spm_folder):
    ours, theirs = load_tokenizer(gemma_spm_folder), hf(gemma_spm_folder)
    assert type(theirs).__name__ == "GemmaTokenizer"
    check_same_ids(ours, theirs, TEXTS + ["<bos>hi<start_of_turn>user\n日本語<end_of_turn><eos><pad><unk><mask>",
                                          "a<ctrl99> b <ctrl99>"])
    check_batch(ours, theirs, ["hello", "naïve 🙂 café", ""])


@pytest.mark.skipif(not has_protobuf(), reason="transformers needs protobuf to convert a SentencePiece model")
@pytest.mark.skipif(tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 24),
                    reason="before 5.24 transformers converted a SentencePiece model that names no tokenizer class "
                           "with another dummy-prefix split; tritium follows 5.24's conversion")
@pytest.mark.parametrize("model_type,add", [("unigram", True), ("bpe", False)])
def test_sentencepiece_generic_matches_transformers(tmp_path, model_type, add):
    """A tokenizer.model with SentencePiece's default normalization (NFKC, dummy prefix, extra
    whitespace removed) and a config naming no class: transformers' generic conversion
    (TokenizersBackend), which adds bos and eos when add_bos_token / add_eos_token say so."""
    train_sentencepiece(tmp_path, "tokenizer.model", model_type=model_type, vocab_size=200, hard_vocab_limit=False,
                        character_coverage=1.0, user_defined_symbols=["<u1>"], control_symbols=["<c1>"])
    if add:
        write_json(tmp_path / "tokenizer_config.json", {"add_bos_token": True, "add_eos_token": True})
    ours, theirs = load_tokenizer(tmp_path), hf(tmp_path)
    assert type(theirs).__name__ == "TokenizersBackend"
    check_same_ids(ours, theirs, TEXTS + ["<s>hi</s> x<u1>y <c1> z", " <s> a", "▁x"])
    assert (ours.encode("a")[0] == ours.bos_token_id) == add and (ours.encode("a")[-1] == ours.eos_token_id) == add


def test_sentencepiece_bert_generation_matches_transformers(tmp_path):
    """A unigram spiece.model with SentencePiece's default normalization (NFKC, dummy prefix,
    extra whitespace removed), loaded by transformers as BertGenerationTokenizer (it runs
    sentencepiece itself; no protobuf needed). Its default sep token <::::> is not in the model:
    both add it."""
    train_sentencepiece(tmp_path, "spiece.model", model_type="unigram", vocab_size=200,
                        hard_vocab_limit=False, pad_id=0, eos_id=1,
                        bos_id=2, unk_id=3, character_coverage=1.0, control_symbols=["<c1>"],
                        user_defined_symbols=["<u1>"])
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "BertGenerationTokenizer",
                                                    "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                    "unk_token": "<unk>"})
    ours, theirs = load_tokenizer(tmp_path), hf(tmp_path)
    assert type(theirs).__name__ == "BertGenerationTokenizer"
    check_same_ids(ours, theirs, TEXTS + ["<s>hello</s> world<pad>", "x<u1>y <c1> z"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    assert ours.token_to_id("<::::>") == theirs.sep_token_id == sp.get_piece_size()
    check_batch(ours, theirs, ["hello", "the quick brown fox", ""])
    # Streaming after a prompt: transformers' decode strips the leading space of a sequence, so a
    # stream must know what came before to keep the space between the prompt and the new text.
    ids = theirs.encode("hello world the quick fox")
    stream = ours.decode_stream(context=ids[:2])
    text = "".join(stream.push(i) for i in ids[2:]) + stream.finish()
    full, prompt = theirs.decode(ids), theirs.decode(ids[:2])
    assert prompt + text == full and text.startswith(" ")


# ---- vocab.json + merges.txt, vocab.txt -------------------------------------------------------

def test_roberta_vocab_merges_matches_transformers(tmp_path):
    """MVP's files: vocab.json + merges.txt, no tokenizer.json (MvpTokenizer, i.e. RobertaTokenizer)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.model.save(str(tmp_path))
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "MvpTokenizer"})
    write_json(tmp_path / "config.json", {"model_type": "mvp", "bos_token_id": 0, "eos_token_id": 2,
                                          "pad_token_id": 1})
    ours, theirs = load_tokenizer(tmp_path), hf(tmp_path)
    check_same_ids(ours, theirs, TEXTS + ["<s>already</s><mask> there"])
    assert ours.encode("hi")[0] == 0 and ours.encode("hi")[-1] == 2
    check_batch(ours, theirs, ["hello", "the quick brown fox", ""])


def test_bert_vocab_txt_matches_transformers(tmp_path):
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.model.save(str(tmp_path))
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                    "clean_up_tokenization_spaces": True})
    ours, theirs = load_tokenizer(tmp_path), hf(tmp_path)
    check_same_ids(ours, theirs, TEXTS + ["[CLS] Hello, World! [SEP] it 's [MASK]"])
    assert ours.bos_token_id is None and ours.pad_token_id == 0
    check_batch(ours, theirs, ["hello", "the quick brown fox", ""])


# ---- errors, streaming ------------------------------------------------------------------------

def test_no_tokenizer_files(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "gemma2"})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model.*vocab\.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("files,tokenizer_class", [(["tokenizer.model"], "LlamaTokenizer"),
                                                   (["spiece.model"], "PegasusTokenizer"),
                                                   (["vocab.json", "merges.txt"], "GPT2Tokenizer"),
                                                   (["vocab.txt"], "ElectraTokenizer")])
def test_unsupported_class_without_tokenizer_json(tmp_path, files, tokenizer_class):
    if files[0].endswith(".model"):
        train_sentencepiece(tmp_path, files[0], model_type="bpe", vocab_size=100, hard_vocab_limit=False)
    else:
        for f in files:
            (tmp_path / f).write_text('{"a": 0}' if f.endswith(".json") else "#version: 0.2\n", encoding="utf-8")
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": tokenizer_class})
    with pytest.raises(ValueError, match=f"{tokenizer_class}.*not supported.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_padding_needs_a_pad_token(tmp_path):
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert ours.pad_token_id is None and ours.eos_token_ids == []
    ids, mask = ours(["a b", "b a"])  # equal lengths: nothing to pad
    assert ids.tolist() == [[0, 1], [1, 0]] and mask.tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="no pad token"):
        ours(["a b", "a"])


@pytest.mark.parametrize("kind", ["bytelevel", "gemma_json", "gemma_spm"])
def test_decode_stream(kind, bytelevel_folder, gemma_spm_folder, tmp_path):
    folder = {"bytelevel": bytelevel_folder, "gemma_spm": gemma_spm_folder}.get(kind) or gemma_json_folder(tmp_path)
    ours = load_tokenizer(folder)
    text = "naïve café: 日本語のテキスト 🙂🚀 ∮ ⅷ — done\n  next line"
    ids = ours.encode(text, add_special_tokens=False)
    # Byte-level / byte-fallback tokens split the multi-byte characters: some ids decode alone
    # to U+FFFD, which the stream must hold back.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    stream = ours.decode_stream()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == ours.decode(ids) == text
    # A 1-D tensor decodes like a list; a stream ending inside a character gives it at finish().
    assert ours.decode(torch.tensor(ids)) == text
    partial = ours.encode("ok ꙮ", add_special_tokens=False)  # ꙮ is not in the corpus: 3 byte tokens
    stream = ours.decode_stream()
    assert "".join(stream.push(i) for i in partial[:-1]) == "ok "
    held = stream.finish()  # the first two bytes of ꙮ: U+FFFD, one per byte with byte fallback
    assert held == ours.decode(partial[-3:-1]) and set(held) == {"\ufffd"}
