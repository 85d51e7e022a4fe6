"""The compact encoder-decoders (tritium.models) against transformers: tiny random MVP
models (with and without task prompts) built in transformers, saved, loaded with
tritium.models.load. float32 on both sides: logits, loss and gradients agree to float32
rounding (1e-4 of their scale), generation token for token and step by step."""

import re
import warnings

import pytest
import torch
from test_hf import SEQ2SEQ, assert_logits_close
from test_models import assert_generates_as_transformers
from transformers import MvpConfig, MvpForConditionalGeneration
from transformers.models.mvp.modeling_mvp import MvpEncoder

import tritium.models

# init_std 0.2: a tiny model with the default 0.02 predicts one token everywhere, and its
# generations would agree with anything.
MVP = dict(SEQ2SEQ, init_std=0.2)


def mvp():
    return MvpForConditionalGeneration(MvpConfig(**MVP))


def mvp_prompts():
    """Task prompts as transformers 5 builds them: the decoder's only."""
    return MvpForConditionalGeneration(MvpConfig(**MVP, use_prompt=True, prompt_length=3, prompt_mid_dim=32))


def mvp_encoder_prompts():
    """MVP's own layout, prompts in the encoder too: transformers' MvpEncoder built with
    use_prompt=True (its MvpModel passes the flag to the wrong parameter)."""
    model = mvp_prompts()
    encoder = MvpEncoder(model.config, use_prompt=True)
    encoder.embed_tokens = model.model.shared
    model.model.encoder = encoder
    return model


FAMILIES = {"mvp": mvp, "mvp_prompts": mvp_prompts, "mvp_encoder_prompts": mvp_encoder_prompts}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    saved = {}
    for name, factory in FAMILIES.items():
        torch.manual_seed(2)
        model = factory().eval()
        model.generation_config.forced_eos_token_id = 2  # as BART-style checkpoints set it: eos at max_length
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        saved[name] = (model, folder)
    return saved


def source_batch(seqlen=10):
    """Two sources, the second right-padded by 3 (as BART's tokenizer pads)."""
    ids = torch.randint(3, 100, (2, seqlen))
    mask = torch.ones_like(ids)
    mask[1, seqlen - 3:] = 0
    ids[1, seqlen - 3:] = 1
    return ids, mask


def load(folder, backend="tritium"):
    return tritium.models.load(folder, dtype=torch.float32, device="cpu", attn_implementation=backend)


@pytest.mark.parametrize("family,backend", [(f, b) for f in FAMILIES for b in ("tritium", "eager", "sdpa")])
def test_logits(checkpoints, family, backend):
    hf, folder = checkpoints[family]
    ours = load(folder, backend)
    if family == "mvp_encoder_prompts":
        assert hasattr(ours.model.encoder, "self_attn_prompt")
    ids, mask = source_batch()
    target = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        assert_logits_close(expected, ours(ids, mask, decoder_input_ids=target).logits)


@pytest.mark.parametrize("family", ["mvp", "mvp_encoder_prompts"])
def test_training_step(checkpoints, family):
    """Loss from labels (-100 ignored) and every parameter's gradient, through tritium's
    kernels (flash attention, linear, layer norm backward)."""
    hf, folder = checkpoints[family]
    ours = load(folder).train()
    hf.train()
    ids, mask = source_batch()
    labels = torch.randint(3, 100, (2, 7))
    labels[1, 5:] = -100
    expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(ids, mask, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    hf.zero_grad()
    expected.loss.backward()
    got.loss.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    mine = {("lm_head.weight" if n == "model.shared.weight" and "model.shared.weight" not in theirs else n): g
            for n, g in mine.items()}
    assert theirs.keys() == mine.keys()
    # A gradient that is zero in exact arithmetic (the key bias: softmax ignores a shift of
    # every score of a query) is float32 noise on both sides: judged against the model's scale.
    scale = max(g.abs().max().item() for g in theirs.values())
    for name, grad in theirs.items():
        assert (mine[name] - grad).abs().max().item() <= 1e-4 * grad.abs().max().item() + 1e-6 * scale, name
    hf.eval()


# Beam search runs on "eager" (what is tested is the search; the interpreted kernels would
# take most of a minute), greedy on tritium's kernels.
@pytest.mark.parametrize("family,backend,options", [
    ("mvp", "tritium", dict()),
    ("mvp_prompts", "tritium", dict()),
    ("mvp_encoder_prompts", "eager", dict(num_beams=3)),
    ("mvp", "eager", dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=2)),
])
def test_generation_step_by_step(checkpoints, family, backend, options):
    """Greedy and beam search from a padded batch of sources: tokens and each step's
    logits as transformers' (forced eos at the last step included)."""
    hf, folder = checkpoints[family]
    ours = load(folder, backend)
    assert_generates_as_transformers(ours, hf, *source_batch(), 6, **options)


def test_lightweight_tuning(checkpoints):
    """Only the prompts train: as many parameters as transformers' prompt modules hold."""
    hf, folder = checkpoints["mvp_encoder_prompts"]
    ours = load(folder)
    ours.set_lightweight_tuning()
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    prompts = sum(p.numel() for n, p in hf.named_parameters() if "_attn_prompt." in n)
    assert trainable == prompts > 0
    with pytest.raises(ValueError, match="no prompts"):
        load(checkpoints["mvp"][1]).set_lightweight_tuning()


# ----------------------------------------------------------------------------- BertGeneration

# head_dim 8, as the tiny test checkpoints on the hub have; init 0.2 for varied outputs.
BERT = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=64, initializer_range=0.2)


def bert2bert():
    from transformers import BertGenerationConfig, BertGenerationDecoder, BertGenerationEncoder, EncoderDecoderModel

    encoder = BertGenerationEncoder(BertGenerationConfig(**BERT))
    decoder = BertGenerationDecoder(BertGenerationConfig(**BERT, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    return model


@pytest.fixture(scope="module")
def bert2bert_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = bert2bert().eval()
    folder = tmp_path_factory.mktemp("bert2bert")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("backend", ["tritium", "eager"])
def test_bert2bert_logits(bert2bert_checkpoint, backend):
    hf, folder = bert2bert_checkpoint
    ours = load(folder, backend)
    assert type(ours).__name__ == "EncoderDecoderModel"
    ids, mask = source_batch()
    target = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        assert_logits_close(expected, ours(ids, mask, decoder_input_ids=target).logits)


def test_bert2bert_training_step(bert2bert_checkpoint):
    hf, folder = bert2bert_checkpoint
    ours = load(folder).train()
    hf.train()
    ids, mask = source_batch()
    labels = torch.randint(3, 100, (2, 7))
    labels[0, 4:] = -100
    expected, got = hf(input_ids=ids, attention_mask=mask, labels=labels), ours(ids, mask, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    hf.zero_grad()
    expected.loss.backward()
    got.loss.backward()
    hf.eval()
    for ours_name, theirs_name in (("decoder.bert.layers.1.encoder_attn.q_proj.weight",
                                    "decoder.bert.encoder.layer.1.crossattention.self.query.weight"),
                                   ("encoder.layers.0.fc1.weight", "encoder.encoder.layer.0.intermediate.dense.weight"),
                                   ("encoder.embed_tokens.weight", "encoder.embeddings.word_embeddings.weight"),
                                   ("decoder.lm_head.bias", "decoder.lm_head.bias")):
        mine, theirs = ours.get_parameter(ours_name).grad, hf.get_parameter(theirs_name).grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), ours_name


@pytest.mark.parametrize("backend,options", [("tritium", dict()), ("eager", dict(num_beams=3, no_repeat_ngram_size=2))])
def test_bert2bert_generation(bert2bert_checkpoint, backend, options):
    hf, folder = bert2bert_checkpoint
    ours = load(folder, backend)
    assert_generates_as_transformers(ours, hf, *source_batch(), 5, **options)


def test_bert_generation_decoder_alone(tmp_path):
    """BertGenerationDecoder as a causal LM (no cross-attention): logits in a padded batch
    and the next-token loss, as transformers'."""
    from transformers import BertGenerationConfig, BertGenerationDecoder

    torch.manual_seed(5)
    hf = BertGenerationDecoder(BertGenerationConfig(**BERT, is_decoder=True)).eval()
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert type(ours).__name__ == "BertGenerationDecoder"
    ids, mask = source_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, mask, labels=labels, return_logits=True)
        assert ours(ids, mask, labels=labels).logits is None  # the fused loss builds none
    assert_logits_close(expected.logits, got.logits, valid=mask)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())


def as_ours(state: dict) -> dict:
    """A transformers BertGeneration state dict under our names."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in tritium.models.bert_generation.CHECKPOINT_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def test_bert2bert_warm_started_from_bert(tmp_path):
    """The docs' bert2bert: both halves from a plain BERT checkpoint (BertForPreTraining:
    bert.*, cls.*, pooler, token types), the decoder with new cross-attention, paired by
    EncoderDecoderModel(encoder=, decoder=). The unused and the new tensors are named in
    warnings; with transformers' random cross-attention copied in, the training loss of the
    docs' call, its gradients and a greedy generation are transformers'."""
    from transformers import BertConfig, BertForPreTraining
    from transformers import BertGenerationDecoder as TheirDecoder
    from transformers import BertGenerationEncoder as TheirEncoder
    from transformers import EncoderDecoderModel as TheirModel

    torch.manual_seed(4)
    BertForPreTraining(BertConfig(**BERT)).save_pretrained(tmp_path)
    theirs = TheirModel(encoder=TheirEncoder.from_pretrained(tmp_path, bos_token_id=1, eos_token_id=2),
                        decoder=TheirDecoder.from_pretrained(tmp_path, add_cross_attention=True, is_decoder=True,
                                                             bos_token_id=1, eos_token_id=2)).eval()
    options = dict(dtype=torch.float32, device="cpu", bos_token_id=1, eos_token_id=2)
    with pytest.warns(UserWarning, match="not used by BertGenerationEncoder: .*token_type_embeddings"):
        encoder = tritium.models.BertGenerationEncoder.from_pretrained(tmp_path, **options)
    with pytest.warns(UserWarning, match=r"BertGenerationDecoder are not in the checkpoint and were initialized "
                                         r"\(train before use\): .*encoder_attn"):
        decoder = tritium.models.BertGenerationDecoder.from_pretrained(
            tmp_path, add_cross_attention=True, is_decoder=True, **options)
    ours = tritium.models.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    fresh = {k: v for k, v in as_ours(theirs.state_dict()).items() if "encoder_attn" in k or k.endswith("lm_head.bias")}
    assert len(fresh) == 2 * 10 + 1
    assert all(not torch.equal(ours.state_dict()[k], v) for k, v in fresh.items() if k.endswith("proj.weight"))
    ours.load_state_dict(fresh, strict=False)

    ids, mask = source_batch()
    labels = torch.randint(3, 100, (2, 7))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        ours(ids, mask, labels=labels)
    ours.train(), theirs.train()
    expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=labels, labels=labels)
    got = ours(ids, mask, decoder_input_ids=labels, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    expected.loss.backward()
    got.loss.backward()
    ours.eval(), theirs.eval()
    for ours_name, theirs_name in (("decoder.bert.layers.1.encoder_attn.k_proj.weight",
                                    "decoder.bert.encoder.layer.1.crossattention.self.key.weight"),
                                   ("encoder.layers.0.self_attn.q_proj.weight",
                                    "encoder.encoder.layer.0.attention.self.query.weight")):
        mine, their = ours.get_parameter(ours_name).grad, theirs.get_parameter(theirs_name).grad
        assert (mine - their).abs().max() <= 1e-4 * their.abs().max(), ours_name
    assert_generates_as_transformers(ours, theirs, ids, mask, 4)


def test_roberta_warm_start(tmp_path):
    """RoBERTa checkpoints warm-start both halves: a RobertaModel's (no prefix) as
    transformers loads it, and a RobertaForMaskedLM's (roberta.*, lm_head.*), whose weights
    transformers does not find; the two load the same."""
    from transformers import BertGenerationEncoder as TheirEncoder
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(7)
    masked_lm = RobertaForMaskedLM(RobertaConfig(**{**BERT, "pad_token_id": 1, "bos_token_id": 0}))
    masked_lm.save_pretrained(tmp_path / "mlm")
    masked_lm.roberta.save_pretrained(tmp_path / "base")
    theirs = TheirEncoder.from_pretrained(tmp_path / "base").eval()
    ids, mask = source_batch()
    for kind in ("base", "mlm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = tritium.models.BertGenerationEncoder.from_pretrained(tmp_path / kind, dtype=torch.float32,
                                                                           device="cpu")
            decoder = tritium.models.BertGenerationDecoder.from_pretrained(
                tmp_path / kind, is_decoder=True, add_cross_attention=True, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            assert_logits_close(theirs(input_ids=ids, attention_mask=mask).last_hidden_state, encoder(ids, mask))
        assert torch.equal(decoder.bert.layers[1].fc2.weight, masked_lm.roberta.encoder.layer[1].output.dense.weight)
        assert torch.equal(decoder.lm_head.weight, masked_lm.roberta.embeddings.word_embeddings.weight)


def test_encoder_decoder_of_bert_halves_refused(tmp_path):
    """An EncoderDecoderModel of BertModel halves is not BertGeneration's: refused by name."""
    from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    model = EncoderDecoderModel(encoder=BertModel(BertConfig(**BERT)),
                                decoder=BertLMHeadModel(BertConfig(**BERT, is_decoder=True, add_cross_attention=True)))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"EncoderDecoderModel of \['bert'\].*pairs BertGeneration halves"):
        load(tmp_path)


# ----------------------------------------------------------------------------- BigBird-Pegasus

# block_size 16, one random block: block-sparse runs past (5 + 2) * 16 = 112 tokens.
# Two encoder heads (each its own random blocks): the interpreted block-sparse kernels'
# time goes with the heads.
BIGBIRD = dict(SEQ2SEQ, max_position_embeddings=256, attention_type="block_sparse", block_size=16,
               num_random_blocks=1, init_std=0.2, encoder_attention_heads=2)


@pytest.fixture(scope="module")
def bigbird_checkpoint(tmp_path_factory):
    from transformers import BigBirdPegasusConfig, BigBirdPegasusForConditionalGeneration

    torch.manual_seed(6)
    model = BigBirdPegasusForConditionalGeneration(BigBirdPegasusConfig(**BIGBIRD)).eval()
    folder = tmp_path_factory.mktemp("bigbird_pegasus")
    model.save_pretrained(folder)
    return model, folder


def test_bigbird_pegasus_block_sparse_and_short_inputs(bigbird_checkpoint):
    """A 120-token padded batch (padded to 128 inside, block-sparse), then a 40-token one
    (full attention, said once), then 120 tokens again: block-sparse again, where
    transformers would have stayed on full attention (it is switched back here)."""
    hf, folder = bigbird_checkpoint
    ours = load(folder)
    target = torch.randint(3, 100, (2, 5))
    for seqlen in (120, 40, 120):
        hf.model.encoder.set_attention_type("block_sparse")
        ids, mask = source_batch(seqlen)
        with torch.no_grad(), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = ours(ids, mask, decoder_input_ids=target).logits
            expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        assert_logits_close(expected, got)
        assert any("too short for block-sparse" in str(w.message) for w in said) == (seqlen == 40)
    assert ours.config.attention_type == "block_sparse"


def test_bigbird_pegasus_generation(bigbird_checkpoint):
    hf, folder = bigbird_checkpoint
    hf.model.encoder.set_attention_type("block_sparse")
    assert_generates_as_transformers(load(folder), hf, *source_batch(120), 4)


@pytest.mark.parametrize("attention_type", ["block_sparse"])
def test_bigbird_pegasus_training(bigbird_checkpoint, attention_type):
    """A block-sparse training step (transformers' seeded random layout, 120 tokens padded
    to 8 blocks): loss and gradients as transformers'. (Full-attention training runs the
    layers MVP's training test covers; set_attention_type is tested above.)"""
    hf, folder = bigbird_checkpoint
    ours = load(folder).train()
    ours.set_attention_type(attention_type)
    hf.model.encoder.set_attention_type(attention_type)
    ids, mask = source_batch(120)
    labels = torch.randint(3, 100, (2, 6))
    hf.train()
    expected, got = hf(input_ids=ids, attention_mask=mask, labels=labels), ours(ids, mask, labels=labels)
    hf.zero_grad()
    expected.loss.backward()
    got.loss.backward()
    hf.eval()
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    for ours_name, theirs_name in (("model.encoder.layers.0.self_attn.q_proj.weight",
                                    "model.encoder.layers.0.self_attn.self.query.weight"),
                                   ("model.encoder.layers.1.self_attn.v_proj.weight",
                                    "model.encoder.layers.1.self_attn.self.value.weight"),
                                   ("model.decoder.layers.1.fc2.weight", "model.decoder.layers.1.fc2.weight"),
                                   ("model.shared.weight", "model.shared.weight")):
        mine, theirs = ours.get_parameter(ours_name).grad, hf.get_parameter(theirs_name).grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), ours_name
