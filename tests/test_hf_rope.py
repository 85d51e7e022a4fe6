"""tritium.hf.apply(model, rope=True): the rotation inside Gemma2Attention / Glm4Attention on
tritium's kernel (Gemma 2: halves, full head_dim; GLM-4: interleaved pairs, half of
head_dim) through the swapped module-level apply_rotary_pos_emb, against the unpatched
model under "eager": logits and training gradients (generation: test_hf_generate); the
swap reaches patched models only; revert, per model and exact. Tiny float32 models from
test_hf."""

import inspect

import pytest
import torch
from conftest import DEVICE
from test_hf import assert_grads_close, assert_logits_close, bert_encoder, gemma2, glm4, loss_grads, make, padded_batch

import tritium.hf

ROPE_FAMILIES = {"gemma2": gemma2, "glm4": glm4}


def attention_modules(model):
    """The model's Gemma2Attention / Glm4Attention modules."""
    modules = [m for m in model.modules() if type(m).__name__ in ("Gemma2Attention", "Glm4Attention")]
    assert modules, "no rotary attention module found"
    return modules


def eager_model(family):
    model = make(ROPE_FAMILIES[family])
    model.set_attn_implementation("eager")
    return model


# Gemma 2 refuses "sdpa" (no softcap there).
@pytest.mark.parametrize("family,attention", [("gemma2", "eager"), ("gemma2", "tritium"), ("glm4", "eager"),
                                              ("glm4", "sdpa"), ("glm4", "tritium")])
def test_logits_match_eager(family, attention):
    """The rotary step alone under "eager" / "sdpa" (norms and MLPs left to transformers), and
    everything patched under "tritium"; left-padded batch, so positions differ per row."""
    model = eager_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        if attention == "tritium":
            tritium.hf.apply(model)
        else:
            model.set_attn_implementation(attention)
            tritium.hf.apply(model, attention=False, norms=False, mlp=False)
        assert all("forward" in m.__dict__ for m in attention_modules(model))
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert_logits_close(expected, ours, mask)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_rope_false_leaves_attention_untouched(family):
    model = eager_model(family)
    tritium.hf.apply(model, rope=False)
    assert model.config._attn_implementation == "tritium"
    assert all("forward" not in m.__dict__ for m in attention_modules(model))


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_training_gradients(family):
    """Out-of-place rotation, its backward through the kernel. Right padding (see test_hf)."""
    model = eager_model(family).train()
    ids, mask = padded_batch(12, left=False)
    expected = loss_grads(model, ids, mask)
    assert_grads_close(expected, loss_grads(tritium.hf.apply(model), ids, mask))


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_revert_restores_attention_forwards(family):
    """Applied twice (patches stack), reverted once: every attention module back to its
    class's forward, no instance attribute left, logits bit for bit as before."""
    model = eager_model(family)
    ids = torch.randint(3, 100, (1, 6), device=DEVICE)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        tritium.hf.apply(tritium.hf.apply(model, attention=False))
        tritium.hf.revert(model)
        after = model(input_ids=ids).logits
    for module in attention_modules(model):
        assert "forward" not in module.__dict__
        assert module.forward.__func__ is type(module).forward
    assert model.config._attn_implementation == "eager"
    assert torch.equal(after, before)


def test_family_without_rotary_accepts_rope():
    model = make(bert_encoder)
    ids, mask = padded_batch(left=False)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = tritium.hf.apply(model, rope=True)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_logits_close(expected, ours, mask)


def test_one_signature_across_families():
    signatures = {name: inspect.signature(fn) for name, fn in tritium.hf.MODEL_TYPE_TO_APPLY.items()}
    expected = ["model", "attention", "norms", "mlp", "rope", "nf4", "loss"]
    assert all(list(s.parameters) == expected for s in signatures.values()), signatures


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_swap_reaches_patched_models_only(family):
    """Two models of one family: while one is patched, the other still runs transformers'
    rotation (bit for bit as before); the swap is held while any patched model holds it (a
    model dropped without revert, as earlier tests do, keeps holding it), then released."""
    import gc
    import sys
    import weakref

    patched, bystander = eager_model(family), eager_model(family)
    modeling = sys.modules[type(attention_modules(patched)[0]).__module__]
    key = (modeling.__name__, "apply_rotary_pos_emb")
    ids = torch.randint(3, 100, (1, 6), device=DEVICE)
    calls = []
    with torch.no_grad():
        before = bystander(input_ids=ids).logits
        holders = tritium.hf.patch._SWAPS.get(key, [None, 0])[1]
        tritium.hf.apply(patched, attention=False, norms=False, mlp=False)
        second = tritium.hf.apply(eager_model(family), attention=False, norms=False, mlp=False)
        assert tritium.hf.patch._SWAPS[key][1] == holders + 2
        assert modeling.apply_rotary_pos_emb.func is tritium.hf.rotary.rotary_pos_emb
        real_rotary = tritium.hf.rotary.apply_rotary
        tritium.hf.rotary.apply_rotary = lambda *a, **k: calls.append(1) or real_rotary(*a, **k)
        try:
            during = bystander(input_ids=ids).logits
            assert not calls
            patched(input_ids=ids)
            assert len(calls) == len(attention_modules(patched))
        finally:
            tritium.hf.rotary.apply_rotary = real_rotary
        tritium.hf.revert(patched)
        tritium.hf.revert(second)
    assert torch.equal(during, before)
    assert tritium.hf.patch._SWAPS.get(key, [None, 0])[1] == holders
    dropped = eager_model(family)
    tritium.hf.apply(dropped)
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None  # patches never keep a model alive
