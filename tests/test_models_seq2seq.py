"""The compact encoder-decoders (tritium.models) against transformers: tiny random MVP
models (with and without task prompts) built in transformers, saved, loaded with
tritium.models.load. float32 on both sides: logits, loss and gradients agree to float32
rounding (1e-4 of their scale), generation token for token and step by step."""

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
        got = ours(ids, mask, labels=labels)
    assert_logits_close(expected.logits, got.logits, valid=mask)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())


def test_encoder_from_a_plain_bert_checkpoint(tmp_path):
    """A BERT checkpoint warm-starts BertGenerationEncoder (as the docs do with
    google-bert/bert-large-uncased): the same hidden states as transformers' warm start,
    the tensors it does not use named in a warning."""
    from transformers import BertConfig, BertGenerationEncoder, BertModel

    torch.manual_seed(4)
    BertModel(BertConfig(**BERT)).save_pretrained(tmp_path)
    theirs = BertGenerationEncoder.from_pretrained(tmp_path).eval()
    with pytest.warns(UserWarning, match="not used by BertGenerationEncoder: .*token_type_embeddings"):
        ours = tritium.models.BertGenerationEncoder.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    ids, mask = source_batch()
    with torch.no_grad():
        assert_logits_close(theirs(input_ids=ids, attention_mask=mask).last_hidden_state, ours(ids, mask))


# ----------------------------------------------------------------------------- BigBird-Pegasus

# block_size 16, one random block: block-sparse runs past (5 + 2) * 16 = 112 tokens.
BIGBIRD = dict(SEQ2SEQ, max_position_embeddings=256, attention_type="block_sparse", block_size=16,
               num_random_blocks=1, init_std=0.2)


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


def test_bigbird_pegasus_full_attention_training(bigbird_checkpoint):
    """original_full trains (loss and gradients as transformers'); block-sparse training is
    refused until transformers' random layout is reproduced."""
    hf, folder = bigbird_checkpoint
    ours = load(folder).train()
    ids, mask = source_batch(120)
    labels = torch.randint(3, 100, (2, 6))
    with pytest.raises(ValueError, match="random layout"):
        ours(ids, mask, labels=labels)
    ours.set_attention_type("original_full")
    hf.model.encoder.set_attention_type("original_full")
    hf.train()
    expected, got = hf(input_ids=ids, attention_mask=mask, labels=labels), ours(ids, mask, labels=labels)
    hf.zero_grad()
    expected.loss.backward()
    got.loss.backward()
    hf.eval()
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    for ours_name, theirs_name in (("model.encoder.layers.0.self_attn.q_proj.weight",
                                    "model.encoder.layers.0.self_attn.self.query.weight"),
                                   ("model.decoder.layers.1.fc2.weight", "model.decoder.layers.1.fc2.weight"),
                                   ("model.shared.weight", "model.shared.weight")):
        mine, theirs = ours.get_parameter(ours_name).grad, hf.get_parameter(theirs_name).grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), ours_name
