"""transformers integration: tiny random models with attn_implementation="tritium" against
"eager" (same weights, the implementation switched with set_attn_implementation).

Both paths run in float32; they differ only by summation order (tritium's online softmax
vs eager's materialised scores), so logits agree to float32 rounding amplified through a
few layers: we allow 1e-4 of the logits' scale."""

import pytest
import torch
from transformers import (
    BertGenerationConfig,
    BertGenerationDecoder,
    BertGenerationEncoder,
    BigBirdPegasusConfig,
    BigBirdPegasusForConditionalGeneration,
    Gemma2Config,
    Gemma2ForCausalLM,
    Glm4Config,
    Glm4ForCausalLM,
    MvpConfig,
    MvpForConditionalGeneration,
)

import tritium.hf
from tests.conftest import DEVICE

TINY = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(TINY, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
SEQ2SEQ = dict(TINY, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, decoder_start_token_id=1)
BERT = dict(TINY, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)


def gemma2():
    # Window 6 < sequence. Softcap 2 and init std 0.2 (scores of a few units): without the
    # softcap the logits move by ~30% of their scale, so a dropped softcap cannot pass.
    config = Gemma2Config(**DECODER, sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                          query_pre_attn_scalar=16, attention_dropout=0.0, initializer_range=0.2)
    return Gemma2ForCausalLM(config)


def glm4():
    return Glm4ForCausalLM(Glm4Config(**DECODER, partial_rotary_factor=0.5, attention_dropout=0.0))


def bert_decoder():
    return BertGenerationDecoder(BertGenerationConfig(**BERT, is_decoder=True))


def bigbird_pegasus():
    return BigBirdPegasusForConditionalGeneration(BigBirdPegasusConfig(**SEQ2SEQ, attention_type="original_full"))


CAUSAL_LMS = {"gemma2": gemma2, "glm4": glm4, "bert_generation": bert_decoder}


def make(factory):
    return factory().to(DEVICE).eval()


def padded_batch(seqlen=14, left=True):
    """Two sequences, the second padded by 4 tokens (left for decoders, right for encoders)."""
    ids = torch.randint(3, 100, (2, seqlen), device=DEVICE)
    mask = torch.ones_like(ids)
    pad = slice(0, 4) if left else slice(seqlen - 4, seqlen)
    mask[1, pad] = 0
    ids[1, pad] = 0
    return ids, mask


def run_both(model, fn):
    """fn(model) under "eager", then under "tritium"."""
    model.set_attn_implementation("eager")
    eager = fn(model)
    model.set_attn_implementation("tritium")
    return eager, fn(model)


def assert_logits_close(eager, ours, valid=None):
    if valid is not None:  # padded query rows differ (eager: uniform softmax; tritium: 0) and are never read
        eager, ours = eager[valid.bool()], ours[valid.bool()]
    tol = 1e-4 * eager.abs().max().item()
    assert (ours - eager).abs().max().item() <= tol


def assert_each_step_close(model, steps):
    """steps(model) -> a list of logits, under "eager" and "tritium", compared step by step."""
    with torch.no_grad():
        eager, ours = run_both(model, steps)
    for e, o in zip(eager, ours, strict=True):
        assert_logits_close(e, o)


def grads_of(model, loss):
    """The gradients of loss(model) for the parameters that get one."""
    model.zero_grad()
    loss(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_grads(model, ids, mask):
    """Parameter gradients of the LM loss, padded label positions ignored."""
    return grads_of(model, lambda m: m(input_ids=ids, attention_mask=mask,
                                       labels=ids.masked_fill(mask == 0, -100)).loss)


def assert_grads_close(eager, ours):
    assert eager.keys() == ours.keys()
    for name in eager:
        assert (ours[name] - eager[name]).abs().max().item() <= 1e-4 * eager[name].abs().max().item() + 1e-7, name


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_causal_lm_logits_padded(family):
    model = make(CAUSAL_LMS[family])
    ids, mask = padded_batch()
    with torch.no_grad():
        eager, ours = run_both(model, lambda m: m(input_ids=ids, attention_mask=mask).logits)
    assert_logits_close(eager, ours, mask)


@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_training_gradients(family):
    """Right padding: with left padding the shifted loss reads the logits of the last pad
    position, which eager fills with a uniform average and tritium with 0."""
    model = make(CAUSAL_LMS[family]).train()
    ids, mask = padded_batch(12, left=False)
    assert_grads_close(*run_both(model, lambda m: loss_grads(m, ids, mask)))


def test_bert_generation_encoder_and_cross_attention():
    """The encoder is bidirectional (right padding); the decoder attends causally to itself
    and, through cross-attention, to the padded encoder states."""
    encoder = BertGenerationEncoder(BertGenerationConfig(**BERT)).to(DEVICE).eval()
    decoder = BertGenerationDecoder(BertGenerationConfig(**BERT, is_decoder=True, add_cross_attention=True))
    decoder = decoder.to(DEVICE).eval()
    src, src_mask = padded_batch(12, left=False)
    tgt = torch.randint(3, 100, (2, 7), device=DEVICE)

    def forward(_):
        states = encoder(input_ids=src, attention_mask=src_mask).last_hidden_state
        logits = decoder(input_ids=tgt, encoder_hidden_states=states, encoder_attention_mask=src_mask).logits
        return states, logits

    with torch.no_grad():
        encoder.set_attn_implementation("eager")
        decoder.set_attn_implementation("eager")
        eager = forward(None)
        encoder.set_attn_implementation("tritium")
        decoder.set_attn_implementation("tritium")
        ours = forward(None)
    assert_logits_close(eager[0], ours[0], src_mask)
    assert_logits_close(eager[1], ours[1])


def test_bigbird_pegasus_seq2seq():
    """Encoder ("original_full", padded) and decoder (self- and cross-attention): logits
    (generation: test_hf_generate)."""
    model = make(bigbird_pegasus)
    src, src_mask = padded_batch(12, left=False)
    tgt = torch.randint(3, 100, (2, 6), device=DEVICE)
    with torch.no_grad():
        eager, ours = run_both(model, lambda m: m(input_ids=src, attention_mask=src_mask,
                                                  decoder_input_ids=tgt).logits)
    assert_logits_close(eager, ours)


def test_refuses_attention_weights_4d_masks_and_dropout():
    model = make(glm4)
    model.set_attn_implementation("tritium")
    ids = torch.randint(3, 100, (1, 8), device=DEVICE)
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(ValueError, match="4-D"):  # a caller's 4-D mask could hold any pattern
        model(input_ids=ids, attention_mask=torch.zeros(1, 1, 8, 8, device=DEVICE))
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model.train()(input_ids=ids)


@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_static_cache_forward_without_mask(family):
    """A bare forward over a StaticCache (no attention_mask): a 4-token prefill, a 3-token
    chunk, then decode steps, each step's logits against eager's."""
    from transformers import StaticCache

    model = make(CAUSAL_LMS[family])
    ids = torch.randint(3, 100, (2, 10), device=DEVICE)

    def steps(m):
        cache, logits, start = StaticCache(config=m.config, max_cache_len=16), [], 0
        for length in (4, 3, 1, 1, 1):
            logits.append(m(input_ids=ids[:, start:start + length], past_key_values=cache, use_cache=True).logits)
            start += length
        return logits

    assert_each_step_close(model, steps)


def test_static_cache_decode_under_torch_compile_fullgraph():
    """Compiled decode as generate runs it: a StaticCache, a left-padded attention_mask that
    grows by one each step, the forward compiled with fullgraph=True (so no host sync or
    graph break in the mask function or the attention)."""
    from transformers import StaticCache

    model = make(gemma2)
    ids, mask = padded_batch(10)

    def decode(m):
        forward = m.forward
        if m.config._attn_implementation == "tritium":
            forward = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
        cache, step_mask = StaticCache(config=m.config, max_cache_len=16), mask
        token, logits = m(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1), []
        for _ in range(3):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
            logits.append(forward(input_ids=token, attention_mask=step_mask, past_key_values=cache).logits)
            token = logits[-1].argmax(-1)
        return logits

    assert_each_step_close(model, decode)


def test_packed_sequences_are_refused_clearly():
    model = make(glm4)
    model.set_attn_implementation("tritium")
    ids = torch.randint(3, 100, (1, 8), device=DEVICE)
    positions = torch.arange(4, device=DEVICE).repeat(2)[None]  # two sequences of 4 in one row
    with pytest.raises(ValueError, match="packed"):
        model(input_ids=ids, position_ids=positions, use_cache=False)


def test_register_twice_and_from_config():
    tritium.hf.register()
    tritium.hf.register()
    model = Glm4ForCausalLM._from_config(Glm4Config(**DECODER), attn_implementation="tritium")
    assert model.config._attn_implementation == "tritium"


def mvp():
    return MvpForConditionalGeneration(MvpConfig(**SEQ2SEQ))


def bert_encoder():
    return BertGenerationEncoder(BertGenerationConfig(**BERT))


def seq2seq_inputs():
    src, src_mask = padded_batch(12, left=False)
    return dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=torch.randint(3, 100, (2, 6), device=DEVICE))


APPLY_CASES = {  # family: (factory, inputs, attribute holding the output)
    "gemma2": (gemma2, lambda: dict(zip(("input_ids", "attention_mask"), padded_batch())), "logits"),
    "glm4": (glm4, lambda: dict(zip(("input_ids", "attention_mask"), padded_batch())), "logits"),
    "mvp": (mvp, seq2seq_inputs, "logits"),
    "bigbird_pegasus": (bigbird_pegasus, seq2seq_inputs, "logits"),
    "bert_generation": (bert_encoder, lambda: dict(zip(("input_ids", "attention_mask"),
                                                       padded_batch(left=False))), "last_hidden_state"),
}


@pytest.mark.parametrize("family", APPLY_CASES)
def test_apply_matches_eager_and_revert_restores(family):
    factory, inputs, output = APPLY_CASES[family]
    model = make(factory)
    model.set_attn_implementation("eager")
    kwargs = inputs()
    valid = kwargs["attention_mask"] if output != "logits" or family in CAUSAL_LMS else None
    state = {name: t.clone() for name, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        eager = getattr(model(**kwargs), output)
        tritium.hf.apply(model)
        assert state.keys() == model.state_dict().keys()
        assert any("forward" in m.__dict__ for m in model.modules())
        ours = getattr(model(**kwargs), output)
        tritium.hf.revert(model)
        restored = getattr(model(**kwargs), output)
    assert_logits_close(eager, ours, valid)
    assert torch.equal(restored, eager)
    assert model.config._attn_implementation == "eager"
    assert dict(model.named_modules()) == modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name


@pytest.mark.parametrize("family", ["gemma2", "mvp", "bigbird_pegasus"])  # GLM-4's loss: Gemma 2's path
def test_apply_training_gradients(family):
    """Training with labels after apply: the loss through the fused LM head +
    cross-entropy (Gemma 2's final softcap, MVP's and BigBird-Pegasus' final_logits_bias
    kept), no logits, and every gradient as eager transformers'; loss=False, or eval mode,
    gives transformers' logits."""
    model = make(APPLY_CASES[family][0]).train()
    model.set_attn_implementation("eager")
    if hasattr(model, "final_logits_bias"):  # zeros at init: make a dropped bias show
        model.final_logits_bias.normal_(generator=torch.Generator(DEVICE).manual_seed(0))
    ids, mask = padded_batch(12, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    eager = loss_grads(model, ids, mask)
    tritium.hf.apply(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert_grads_close(eager, loss_grads(model, ids, mask))
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
    tritium.hf.revert(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    tritium.hf.apply(model.train(), loss=False)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_apply_loss_with_num_items_in_batch():
    """The Trainer's gradient accumulation: the summed loss over num_items_in_batch, as
    transformers' loss_function computes it."""
    model = make(gemma2).train()
    model.set_attn_implementation("eager")
    ids, mask = padded_batch(12, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    items = torch.tensor(40, device=DEVICE)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
    got = tritium.hf.apply(model)(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.parametrize("family", ["gemma2", "glm4"])
def test_apply_under_torch_compile_fullgraph(family):
    """The patched model (tritium attention, norms, MLP, in-place rotary) traces into one
    graph: the kernels are torch.library custom ops and the patches are plain Python."""
    model = make(CAUSAL_LMS[family])
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 100, (2, 14), device=DEVICE)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        ours = torch.compile(tritium.hf.apply(model), fullgraph=True)(input_ids=ids).logits
    assert_logits_close(eager, ours)


def test_apply_mvp_static_cache():
    """MVP's patched attention over static caches: the self-attention buffer (16) is longer
    than what is filled, so causal alignment needs the filled count; a 6-token decoder
    prefill, then two decode steps, each step's logits against eager's."""
    from transformers import EncoderDecoderCache, StaticCache

    model = make(mvp)
    kwargs = seq2seq_inputs()
    decoder_ids = torch.cat([kwargs.pop("decoder_input_ids"), torch.randint(3, 100, (2, 2), device=DEVICE)], 1)

    def steps(m):
        cache = EncoderDecoderCache(StaticCache(config=m.config, max_cache_len=16),
                                    StaticCache(config=m.config, max_cache_len=kwargs["input_ids"].shape[1]))
        encoder = m.get_encoder()(**kwargs)
        return [m(encoder_outputs=encoder, attention_mask=kwargs["attention_mask"], past_key_values=cache,
                  decoder_input_ids=decoder_ids[:, start:stop]).logits for start, stop in ((0, 6), (6, 7), (7, 8))]

    def patched(m):
        tritium.hf.apply(m)
        try:
            return steps(m)
        finally:
            tritium.hf.revert(m)

    model.set_attn_implementation("eager")
    with torch.no_grad():
        for e, o in zip(steps(model), patched(model), strict=True):
            assert_logits_close(e, o)


def bigbird_block_sparse():
    """128 encoder tokens: the shortest the block-sparse layout takes with block_size 16
    and one random block (transformers falls back to full attention up to 112). Two encoder
    heads, each with its own random blocks: the interpreted kernels' time goes with them."""
    config = BigBirdPegasusConfig(**dict(SEQ2SEQ, max_position_embeddings=128, encoder_attention_heads=2),
                                  attention_type="block_sparse", block_size=16, num_random_blocks=1)
    return BigBirdPegasusForConditionalGeneration(config)


def block_sparse_inputs():
    """The second row padded from token 90: two whole key blocks and part of a third."""
    ids = torch.randint(3, 100, (2, 128), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 90:] = ids[1, 90:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, 100, (2, 6), device=DEVICE))


def test_apply_bigbird_block_sparse_encoder():
    """The encoder's BigBirdPegasusBlockSparseAttention through tritium.block_sparse_attention
    (eval layout): encoder states and logits as eager's; revert restores exactly."""
    model = make(bigbird_block_sparse)
    model.set_attn_implementation("eager")
    kwargs = block_sparse_inputs()
    with torch.no_grad():
        eager = model(**kwargs)
        ours = tritium.hf.apply(model)(**kwargs)
        tritium.hf.revert(model)
        restored = model(**kwargs)
    assert model.model.encoder.attention_type == "block_sparse"
    assert_logits_close(eager.encoder_last_hidden_state, ours.encoder_last_hidden_state, kwargs["attention_mask"])
    assert_logits_close(eager.logits, ours.logits)
    assert torch.equal(restored.logits, eager.logits)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_apply_bigbird_block_sparse_training_gradients():
    """Training draws transformers' own seeded random layout: gradients as eager's."""
    model = make(bigbird_block_sparse).train()
    model.set_attn_implementation("eager")
    kwargs = block_sparse_inputs()

    def loss(m):
        return m(**kwargs).logits.square().mean()

    eager = grads_of(model, loss)
    assert_grads_close(eager, grads_of(tritium.hf.apply(model), loss))


def quantized_glm4(tmp_path, quant_type="nf4"):
    """A tiny GLM-4 whose Linear layers transformers converted to bitsandbytes Linear4bit
    (double quantization; lm_head stays dense). Sizes are multiples of the block size (see
    tests/test_nf4.py: bitsandbytes' CPU kernel is wrong otherwise)."""
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")  # transformers' bitsandbytes integration needs it
    glm4().save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return Glm4ForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization,
                                           attn_implementation="eager").to(DEVICE).eval()


def test_apply_nf4_matches_bitsandbytes_and_revert_restores(tmp_path):
    model = quantized_glm4(tmp_path)
    ids, mask = padded_batch()
    # With gradients enabled: bitsandbytes' first no-grad CPU forward repacks its weights
    # into another layout, which the reference must not do here.
    reference = model(input_ids=ids, attention_mask=mask).logits.detach()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        ours = tritium.hf.apply(model, nf4=True)(input_ids=ids, attention_mask=mask).logits
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 2 * 6 and all("forward" in m.__dict__ for m in four_bit)  # q k v o gate_up down
    tritium.hf.revert(model)
    restored = model(input_ids=ids, attention_mask=mask).logits
    assert_logits_close(reference, ours, mask)
    assert torch.equal(restored, reference)
    assert all("forward" not in m.__dict__ for m in model.modules())
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_apply_nf4_refuses_fp4(tmp_path):
    """Refused before anything is patched."""
    model = quantized_glm4(tmp_path, quant_type="fp4")
    with pytest.raises(ValueError, match="'fp4' is not supported"):
        tritium.hf.apply(model, nf4=True)
    assert model.config._attn_implementation == "eager"
    assert all("forward" not in m.__dict__ for m in model.modules())
