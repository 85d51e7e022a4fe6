"""The encoder-decoder rows of the models suite: tritium.models' compact encoder-decoders
against transformers holding the same weights.

Models, with transformers' random initialization (seeded) at the real shapes, bfloat16 on
CUDA; on CPU a tiny MVP and BigBird-Pegasus, float32, one case per operator:
- mvp-summarization: MVP-large with task prompts (RUCAIBox/mvp-summarization's shape:
  prompt_length 100, prompt_mid_dim 800), a 1024-token article;
- bert2bert-large: an EncoderDecoderModel of two BertGeneration halves of
  google-bert/bert-large-uncased's shape, a 512-token article;
- bigbird-pegasus-large: google/bigbird-pegasus-large-arxiv's encoder (block_size 64, three
  random blocks), its positions extended to 16384 so that the 8k and 16k rows exist.

Operators:
- models_seq2seq_generate (x = batch): a whole greedy generate() of NEW_TOKENS tokens (eos
  and forced eos off, so every backend runs every step) after encoding the article. The
  output is the first step's logits, checked against transformers' model in float64.
  Backends: tritium (its CUDA-graph decode step on CUDA); hf, transformers as it builds the
  model (its default attention: sdpa for BertGeneration, eager for MVP, which has no
  other), the baseline; hf-eager.
- models_encode (x = seqlen): the BigBird-Pegasus encoder's forward over one document,
  block-sparse in eval (transformers' layout); checked against transformers' encoder in
  float64. Backends: tritium, hf-block-sparse (the baseline), and hf-full (transformers'
  original_full attention, eager, its only one, over the same tokens: timed beside, a
  different function).

Memory: a case's models are built on demand and the other backend's dropped, so a row's
peak memory counts its own model (the tritium model loads from transformers' checkpoint,
saved once per case to a temporary folder).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from collections.abc import Callable

import torch
from torch import nn

from tritium.bench.hf import no_progress_bar
from tritium.bench.operators import Backend, Case, Operator, register

SUITE = "models"
NEW_TOKENS, CPU_NEW_TOKENS = 64, 2
GENERATE_BATCHES = (1, 8, 32)
ENCODE_SEQLENS = (1024, 2048, 4096, 8192, 16384)
SEED = 0

# transformers config classes and their fields (the checkpoints' config.json).
MVP_LARGE = dict(vocab_size=50267, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                 use_prompt=True, prompt_length=100, prompt_mid_dim=800)
BERT_LARGE = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=512, bos_token_id=101, eos_token_id=102,
                  pad_token_id=0)
BIGBIRD_PEGASUS_LARGE = dict(vocab_size=96103, d_model=1024, encoder_layers=16, decoder_layers=16,
                             encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                             decoder_ffn_dim=4096, max_position_embeddings=16384, attention_type="block_sparse",
                             block_size=64, num_random_blocks=3)
_TINY_SEQ2SEQ = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256)
MODELS = {  # name -> (family, transformers config fields, source tokens for generation)
    "mvp-summarization": ("mvp", MVP_LARGE, 1024),
    "bert2bert-large": ("bert2bert", BERT_LARGE, 512),
    "bigbird-pegasus-large": ("bigbird_pegasus", BIGBIRD_PEGASUS_LARGE, None),
    "mvp-tiny": ("mvp", dict(_TINY_SEQ2SEQ, use_prompt=True, prompt_length=3, prompt_mid_dim=16), 8),
    "bigbird-pegasus-tiny": ("bigbird_pegasus", dict(_TINY_SEQ2SEQ, attention_type="block_sparse", block_size=16,
                                                     num_random_blocks=1), None),
}
TINY = ("mvp-tiny", "bigbird-pegasus-tiny")


# ----------------------------------------------------------------------------- models


def _transformers_model(family: str, fields: dict) -> nn.Module:
    """transformers' model of `family`, freshly initialized (call under a seed)."""
    import transformers as t

    if family == "mvp":
        return t.MvpForConditionalGeneration(t.MvpConfig(**fields, dropout=0.0))
    if family == "bigbird_pegasus":
        return t.BigBirdPegasusForConditionalGeneration(t.BigBirdPegasusConfig(**fields, dropout=0.0))
    halves = dict(fields, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = t.EncoderDecoderModel(
        encoder=t.BertGenerationEncoder(t.BertGenerationConfig(**halves)),
        decoder=t.BertGenerationDecoder(t.BertGenerationConfig(**halves, is_decoder=True, add_cross_attention=True)))
    model.config.decoder_start_token_id, model.config.pad_token_id = fields["bos_token_id"], fields["pad_token_id"]
    return model


class Pair:
    """One case's transformers model ("hf") and the tritium model loaded from its
    checkpoint ("tritium"), built on demand; get(kind) drops the other."""

    def __init__(self, model: str, dtype: torch.dtype, device):
        self.family, self.fields, _ = MODELS[model]
        self.dtype, self.device = dtype, torch.device(device)
        self.built: dict[str, nn.Module] = {}
        self.folder: str | None = None
        self.default_attention = "eager"  # transformers' choice for the model, once built

    def get(self, kind: str) -> nn.Module:
        if kind not in self.built:
            self.built.clear()
            self.built[kind] = self._hf() if kind == "hf" else self._tritium()
        return self.built[kind]

    def _hf(self) -> nn.Module:
        torch.manual_seed(SEED)
        with torch.device(self.device):
            model = _transformers_model(self.family, self.fields)
        self.default_attention = model.config._attn_implementation
        return model.to(self.dtype).eval()

    def _tritium(self) -> nn.Module:
        import tritium.models

        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="tritium-bench-")
            weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
            with no_progress_bar():
                self._hf().save_pretrained(self.folder)
        return tritium.models.load(self.folder, dtype=self.dtype, device=self.device)

    def float64_reference(self, run: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """run(transformers' model in float64, eager attention)."""
        model = copy.deepcopy(self.get("hf")).double()
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = run(model)
        del model
        return out


# ----------------------------------------------------------------------------- cases


def _case(model: str, kind: str, x: int) -> Case:
    family, fields, source = MODELS[model]
    tiny = model in TINY
    params = {"model": model, "family": family, "dtype": "float32" if tiny else "bfloat16"}
    if kind == "generate":
        params.update(batch=x, source=source, new_tokens=CPU_NEW_TOKENS if tiny else NEW_TOKENS)
        return Case(f"{model}-generate-b{x}-s{source}", x, f"{model}: {params['new_tokens']} tokens after a "
                    f"{source}-token source", params)
    params.update(batch=1, seqlen=x)
    return Case(f"{model}-encode{x}", x, f"{model} encoder, block_size {fields['block_size']}", params)


def _generate_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("mvp-tiny", "generate", 2)]  # bert2bert's generation is in the tests (CI time)
    batches = (1,) if quick else GENERATE_BATCHES
    return [_case(model, "generate", b) for model in ("mvp-summarization", "bert2bert-large") for b in batches]


def _encode_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":  # 8 blocks of 16: block-sparse (more than 5 + 2r blocks)
        return [_case("bigbird-pegasus-tiny", "encode", 128)]
    return [_case("bigbird-pegasus-large", "encode", s) for s in ((4096,) if quick else ENCODE_SEQLENS)]


def _inputs(case: Case, device: str) -> dict:
    p = case.params
    vocab = MODELS[p["model"]][1]["vocab_size"]
    length = p.get("source") or p["seqlen"]
    ids = torch.randint(3, vocab, (p["batch"], length), device=device)
    return {"ids": ids, "mask": torch.ones_like(ids), "pair": Pair(p["model"], getattr(torch, p["dtype"]), device)}


# ----------------------------------------------------------------------------- work


def _shape(case: Case) -> dict:
    """d, ffn, layers (encoder, decoder), heads and vocab of the case's model."""
    f = MODELS[case.params["model"]][1]
    if "hidden_size" in f:
        return dict(d=f["hidden_size"], ffn=f["intermediate_size"], enc=f["num_hidden_layers"],
                    dec=f["num_hidden_layers"], vocab=f["vocab_size"])
    return dict(d=f["d_model"], ffn=f["encoder_ffn_dim"], enc=f["encoder_layers"], dec=f["decoder_layers"],
                vocab=f["vocab_size"])


def _sparse_pairs(seqlen: int, size: int, r: int) -> int:
    """(query, key) pairs BigBird's layout scores: the first and last query blocks see
    every block, the second and second-to-last 4 + r, the others 5 + r."""
    blocks = seqlen // size
    return size * size * (2 * blocks + 2 * (4 + r) + (blocks - 4) * (5 + r))


def _flops(case: Case, mode: str) -> float:
    """GEMM flops (4 d^2 + 2 d ffn per token per layer, plus cross-attention's 4 d^2 per
    decoded token and the LM head), plus attention over every scored (query, key) pair."""
    s, p = _shape(case), case.params
    layer = 2 * (4 * s["d"] ** 2 + 2 * s["d"] * s["ffn"])
    if "seqlen" in p:
        f = MODELS[p["model"]][1]
        attention = 4 * s["d"] * _sparse_pairs(p["seqlen"], f["block_size"], f["num_random_blocks"])
        return s["enc"] * (layer * p["seqlen"] + attention)
    source, new = p["source"], p["new_tokens"]
    encode = s["enc"] * (layer * source + 4 * s["d"] * source**2) + s["dec"] * 4 * s["d"] ** 2 * source
    per_token = s["dec"] * (layer + 2 * 2 * s["d"] ** 2 + 4 * s["d"] * source) + 2 * s["d"] * s["vocab"]
    decode_self = s["dec"] * 4 * s["d"] * new * (new + 1) // 2
    return p["batch"] * (encode + new * per_token + decode_self)


def _nbytes(case: Case, mode: str) -> float:
    """Weights read once by the encoder and once per decoded token by the decoder and its
    LM head, plus the cross-attention keys and values each step reads."""
    s, p = _shape(case), case.params
    size = getattr(torch, p["dtype"]).itemsize
    layer = 4 * s["d"] ** 2 + 2 * s["d"] * s["ffn"]
    if "seqlen" in p:
        return (s["enc"] * layer + 2 * p["seqlen"] * s["d"]) * size
    per_token = s["dec"] * (layer + 2 * s["d"] ** 2 + 2 * p["source"] * s["d"] * p["batch"]) + s["d"] * s["vocab"]
    return (s["enc"] * layer + p["new_tokens"] * per_token) * size


def _generate_error(case: Case, t: dict, outputs: tuple, grad_out) -> float:
    """Max abs error of the first step's logits against transformers' model in float64."""
    if "reference" not in t:
        pair, ids, mask = t["pair"], t["ids"], t["mask"]

        def first_step(model):
            start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, device=ids.device)
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, -1]

        t["reference"] = pair.float64_reference(first_step)
    return (outputs[0].double() - t["reference"]).abs().max().item()


def _encode_error(case: Case, t: dict, outputs: tuple, grad_out) -> float:
    if "reference" not in t:
        pair, ids, mask = t["pair"], t["ids"], t["mask"]
        t["reference"] = pair.float64_reference(
            lambda model: model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
    return (outputs[0].double() - t["reference"]).abs().max().item()


# ----------------------------------------------------------------------------- backends


def _tritium_generate(case: Case, t: dict):
    model, ids, mask = t["pair"].get("tritium"), t["ids"], t["mask"]
    model.config.forced_eos_token_id = None

    def run():
        with torch.no_grad():
            out = model.generate(ids, case.params["new_tokens"], attention_mask=mask, eos_token_id=[],
                                 return_logits=True)
        return out.logits[0]

    return run


def _hf_generate(eager: bool):
    def setup(case: Case, t: dict):
        pair, ids, mask = t["pair"], t["ids"], t["mask"]
        model = pair.get("hf")
        wanted = "eager" if eager else pair.default_attention
        if model.config._attn_implementation != wanted:
            model.set_attn_implementation(wanted)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

        def run():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=case.params["new_tokens"],
                                     do_sample=False, num_beams=1, eos_token_id=None, forced_eos_token_id=None,
                                     forced_bos_token_id=None, pad_token_id=pad, output_logits=True,
                                     return_dict_in_generate=True)
            return out.logits[0]

        return run

    return setup


def _tritium_encode(case: Case, t: dict):
    model, ids, mask = t["pair"].get("tritium"), t["ids"], t["mask"]

    def run():
        with torch.no_grad():
            return model.encode(ids, mask)

    return run


def _hf_encode(attention_type: str):
    def setup(case: Case, t: dict):
        pair, ids, mask = t["pair"], t["ids"], t["mask"]
        encoder = pair.get("hf").get_encoder()
        encoder.set_attention_type(attention_type)

        def run():
            with torch.no_grad():
                return encoder(input_ids=ids, attention_mask=mask).last_hidden_state

        return run

    return setup


register(Operator(
    name="models_seq2seq_generate", suite=SUITE, modes=("generate",), cases=_generate_cases, inputs=_inputs,
    backends=(Backend("hf", _hf_generate(eager=False)), Backend("hf-eager", _hf_generate(eager=True)),
              Backend("tritium", _tritium_generate)),
    baseline={"cuda": "hf", "cpu": "hf"}, flops=_flops, nbytes=_nbytes, error=_generate_error,
    accuracy_reference="hf-eager", headline="gbps", x_name="batch"))
register(Operator(
    name="models_encode", suite=SUITE, modes=("fwd",), cases=_encode_cases, inputs=_inputs,
    backends=(Backend("hf-block-sparse", _hf_encode("block_sparse")),
              Backend("hf-full", _hf_encode("original_full"), exact=False), Backend("tritium", _tritium_encode)),
    baseline={"cuda": "hf-block-sparse", "cpu": "hf-block-sparse"}, flops=_flops, nbytes=_nbytes,
    error=_encode_error, accuracy_reference="hf-block-sparse", headline="tflops", x_name="seqlen"))
