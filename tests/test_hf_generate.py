"""Generation through transformers' `generate` with tritium, against "eager", step by step.

Greedy tokens alone cannot catch a wrong decode step: a tiny random model's top logits
tie or sit far apart, and equal tokens have hidden scores 1.9 apart before. So every test
compares each step's raw logits (`output_logits=True`), within float32 rounding of the
logits' scale (see test_hf.assert_logits_close), and the tokens.

The matrix: every family as users hold it (Gemma 2, GLM-4 (also at head_dim 8), MVP with and without task
prompts, bert2bert = EncoderDecoderModel(BertGenerationEncoder, BertGenerationDecoder),
BigBird-Pegasus), through attn_implementation="tritium" and through tritium.hf.apply, at
batch 1 and in a padded batch, with a DynamicCache and with a static cache. MVP computes
attention itself, so only `apply` reaches it.
"""

import copy

import pytest
import torch
from conftest import DEVICE
from test_hf import (
    BERT,
    DECODER,
    SEQ2SEQ,
    assert_grads_close,
    assert_logits_close,
    bigbird_pegasus,
    gemma2,
    glm4,
    grads_of,
    make,
)
from transformers import (
    BertGenerationConfig,
    BertGenerationDecoder,
    BertGenerationEncoder,
    EncoderDecoderModel,
    Glm4Config,
    Glm4ForCausalLM,
    MvpConfig,
    MvpForConditionalGeneration,
)

import tritium.hf


def mvp_prompts():
    """MVP+S: per-layer task prompts (3 tokens) as key/value prefixes of every attention."""
    return MvpForConditionalGeneration(MvpConfig(**SEQ2SEQ, use_prompt=True, prompt_length=3, prompt_mid_dim=32))


def mvp():
    return MvpForConditionalGeneration(MvpConfig(**SEQ2SEQ))


def glm4_head_dim_8():
    """A tiny test checkpoint's shape (hidden 32, 4 heads: head_dim 8, rotary on 4 of them),
    below tl.dot's minimum of 16: the kernels pad it."""
    config = Glm4Config(**dict(DECODER, hidden_size=32, head_dim=8), partial_rotary_factor=0.5, attention_dropout=0.0)
    return Glm4ForCausalLM(config)


def bert2bert():
    """The BertGeneration seed page's bert2bert: BERT layers as encoder and as a decoder with
    cross-attention, in an EncoderDecoderModel."""
    encoder = BertGenerationEncoder(BertGenerationConfig(**BERT))
    decoder = BertGenerationDecoder(BertGenerationConfig(**BERT, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    return model


# family: (factory, decoder-only, reachable through attn_implementation="tritium")
FAMILIES = {
    "gemma2": (gemma2, True, True),
    "glm4": (glm4, True, True),
    "glm4_head_dim_8": (glm4_head_dim_8, True, True),
    "mvp": (mvp, False, False),
    "mvp_prompts": (mvp_prompts, False, False),
    "bert2bert": (bert2bert, False, True),
    "bigbird_pegasus": (bigbird_pegasus, False, True),
}


def prompt(decoder_only: bool, padded: bool):
    """Decoder-only models: 10 tokens, left-padded by 4 in row 1 of a padded batch (Gemma 2's
    window, 6, slides during prefill and decode). Encoder-decoders: 12 source tokens, right-
    padded by 4. Batch 1 is row 0 alone."""
    ids = torch.randint(3, 100, (2, 10 if decoder_only else 12), device=DEVICE)
    mask = torch.ones_like(ids)
    if not padded:
        return dict(input_ids=ids[:1], attention_mask=mask[:1])
    pad = slice(0, 4) if decoder_only else slice(-4, None)
    mask[1, pad] = ids[1, pad] = 0
    return dict(input_ids=ids, attention_mask=mask)


def use_attention(model, name):
    """set_attn_implementation, also on the configs it does not reach: an EncoderDecoderModel
    built from two models keeps BertGenerationEncoder's layers on a config of their own
    (from_pretrained(..., attn_implementation=...) sets them all)."""
    model.set_attn_implementation(name)
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            module.config._attn_implementation = name


def generate(model, inputs, cache):
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, cache_implementation=cache)
    return out.sequences, out.logits


def assert_generate_matches_eager(model, inputs, cache, patch):
    """generate under "eager", then after patch(model): same tokens, each step's logits close."""
    use_attention(model, "eager")
    with torch.no_grad():
        tokens, logits = generate(model, inputs, cache)
        patch(model)
        our_tokens, our_logits = generate(model, inputs, cache)
    assert len(our_logits) == len(logits) == 5
    for step, (expected, ours) in enumerate(zip(logits, our_logits, strict=True)):
        assert torch.isfinite(ours).all(), f"step {step}"
        assert_logits_close(expected, ours)
    assert torch.equal(our_tokens, tokens)


PATCHES = {"attn_implementation": lambda m: use_attention(m, "tritium"), "apply": tritium.hf.apply}
CASES = [(family, how) for family, (_, _, routed) in FAMILIES.items() for how in PATCHES
         if how == "apply" or routed]


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "padded"])
@pytest.mark.parametrize("family,how", CASES)
def test_generate_scores_match_eager(family, how, padded, cache):
    factory, decoder_only, _ = FAMILIES[family]
    assert_generate_matches_eager(make(factory), prompt(decoder_only, padded), cache, PATCHES[how])


def test_mvp_is_refused_by_attn_implementation():
    """MvpAttention never calls the attention interface: "tritium" says so instead of
    handing it masks its eager code cannot use."""
    model = MvpForConditionalGeneration._from_config(MvpConfig(**SEQ2SEQ), attn_implementation="tritium")
    ids = torch.randint(3, 100, (1, 8), device=DEVICE)
    with pytest.raises(ValueError, match="does not route attention"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_mvp_loaded_with_tritium_then_applied():
    """The README's snippet followed literally for MVP: loaded with attn_implementation=
    "tritium" (which MVP never calls), then apply: it runs on eager's masks, matches eager,
    and revert gives back what was loaded."""
    model = make(mvp_prompts)
    config = copy.deepcopy(model.config)
    loaded = MvpForConditionalGeneration._from_config(config, attn_implementation="tritium").to(DEVICE).eval()
    loaded.load_state_dict(model.state_dict())
    assert loaded.config._attn_implementation == "tritium" and model.config._attn_implementation == "eager"
    inputs = dict(prompt(decoder_only=False, padded=True), decoder_input_ids=torch.randint(3, 100, (2, 5)))
    with torch.no_grad():
        expected = model(**inputs).logits
        ours = tritium.hf.apply(loaded)(**inputs).logits
    assert_logits_close(expected, ours)
    tritium.hf.revert(loaded)
    assert loaded.config._attn_implementation == "tritium"


def test_mvp_prompts_lightweight_tuning_gradients():
    """Lightweight tuning: only the prompt MLPs train; their gradients through tritium's
    attention (the prompts are key/value prefixes) as eager's. Padded source, decoder labels.

    transformers (5.17 to 5.24) builds MvpEncoder with use_prompt in the embed_tokens slot,
    so the encoder has no prompts and set_lightweight_tuning() raises AttributeError; its
    effect on the prompts that exist is reproduced here."""
    model = make(mvp_prompts).train()
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("prompt" in name)
    inputs = prompt(decoder_only=False, padded=True)
    labels = torch.randint(3, 100, (2, 6), device=DEVICE)

    def loss(m):
        return m(**inputs, labels=labels).loss

    model.set_attn_implementation("eager")
    eager = grads_of(model, loss)
    assert eager and all("prompt" in name for name in eager)
    assert_grads_close(eager, grads_of(tritium.hf.apply(model), loss))


def test_bert2bert_training_gradients():
    """The seed page's bert2bert training step (labels as decoder inputs): gradients as eager's."""
    model = make(bert2bert).train()
    inputs = prompt(decoder_only=False, padded=True)
    labels = torch.randint(3, 100, (2, 6), device=DEVICE)

    def loss(m):
        return m(**inputs, decoder_input_ids=labels, labels=labels).loss

    model.set_attn_implementation("eager")
    eager = grads_of(model, loss)
    assert_grads_close(eager, grads_of(tritium.hf.apply(model), loss))


def test_encoder_decoder_apply_patches_both_halves_and_reverts():
    model = make(bert2bert)
    model.set_attn_implementation("eager")
    tritium.hf.apply(model)
    assert model.encoder.config._attn_implementation == model.decoder.config._attn_implementation == "tritium"
    assert model.config._attn_implementation == "tritium"
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert any(m in set(model.encoder.modules()) for m in patched)
    assert any(m in set(model.decoder.modules()) for m in patched)
    tritium.hf.revert(model)
    assert model.encoder.config._attn_implementation == model.decoder.config._attn_implementation == "eager"
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_encoder_decoder_with_an_unsupported_half_is_refused_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=1, n_head=4, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=BertGenerationEncoder(BertGenerationConfig(**BERT)), decoder=decoder)
    with pytest.raises(ValueError, match="decoder: model_type 'gpt2'"):
        tritium.hf.apply(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.encoder.config._attn_implementation != "tritium"
