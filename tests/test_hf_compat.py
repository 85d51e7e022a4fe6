"""tritium.hf refuses transformers code of a shape it was not written for: a clear
UnsupportedTransformers naming the version and the function, and the model untouched."""

import pytest
import torch
from conftest import DEVICE
from test_hf import gemma2, make
from test_hf_generate import mvp_prompts

import tritium.hf
from tritium.hf import compat


def untouched(model):
    return model.config._attn_implementation == "eager" and all("forward" not in m.__dict__ for m in model.modules())


def test_release_and_tested_range():
    assert compat._release("5.24.0.dev0+abc") == (5, 24, 0)
    assert compat.in_tested_range("5.17.0") and compat.in_tested_range("5.24.3")
    assert not compat.in_tested_range("5.16.1") and not compat.in_tested_range("5.25.0")
    assert compat.in_tested_range()  # CI installs both ends of the range


def test_changed_attention_forward_is_refused_untouched(monkeypatch):
    """An MvpAttention.forward whose parameters differ (here: the cache renamed again)."""
    from transformers.models.mvp.modeling_mvp import MvpAttention

    def forward(self, hidden_states, key_value_states=None, kv_cache=None, attention_mask=None, attn_prompt=None,
                output_attentions=False, **kwargs):
        raise AssertionError("never called")

    model = make(mvp_prompts)
    model.set_attn_implementation("eager")
    monkeypatch.setattr(MvpAttention, "forward", forward)
    with pytest.raises(tritium.hf.UnsupportedTransformers, match=r"transformers \S+'s \S+MvpAttention.forward takes .*kv_cache"):
        tritium.hf.apply(model)
    assert untouched(model)


def test_changed_rotary_function_is_refused_untouched(monkeypatch):
    """A rotary function with another signature, or a forward that stopped calling it: the
    norms patched before the check are undone too (apply is all or nothing)."""
    from transformers.models.gemma2 import modeling_gemma2

    model = make(gemma2)
    model.set_attn_implementation("eager")
    # As in a process where no model holds the swap (earlier tests' models may still).
    monkeypatch.delitem(tritium.hf.patch._SWAPS, (modeling_gemma2.__name__, "apply_rotary_pos_emb"), raising=False)
    monkeypatch.setattr(modeling_gemma2, "apply_rotary_pos_emb", lambda q, k, cos, sin, position_ids=None: (q, k))
    with pytest.raises(tritium.hf.UnsupportedTransformers, match="apply_rotary_pos_emb.*position_ids"):
        tritium.hf.apply(model)
    assert untouched(model)
    monkeypatch.undo()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return hidden_states, None

    monkeypatch.setattr(modeling_gemma2.Gemma2Attention, "forward", forward)
    with pytest.raises(tritium.hf.UnsupportedTransformers, match="no longer calls the module-level"):
        tritium.hf.apply(model)
    assert untouched(model)


def test_changed_attention_interface_is_refused(monkeypatch):
    import transformers.integrations.flash_attention as fa

    def flash_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                is_causal=None, sliding_window=None, softcap=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(tritium.hf, "flash_attention_forward", flash_attention_forward)
    with pytest.raises(tritium.hf.UnsupportedTransformers, match="flash_attention_forward"):
        tritium.hf.register()
    assert fa.flash_attention_forward is not flash_attention_forward


def test_untested_version_with_matching_seams_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "in_tested_range", lambda version=None: False)
    monkeypatch.setattr(compat, "_warned", False)
    model = make(gemma2)
    with pytest.warns(UserWarning, match="tested with transformers"):
        tritium.hf.apply(model)
    ids = torch.randint(3, 100, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    tritium.hf.revert(model)


def test_semantic_interface_arguments_are_refused():
    """An argument such as an attention sink changes the result: refused, never ignored."""
    from tritium.hf.attention import tritium_attention

    model = make(gemma2)
    q = torch.randn(1, 4, 3, 16, device=DEVICE)
    k = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="s_aux"):
        tritium_attention(model.model.layers[0].self_attn, q, k, k, None, s_aux=torch.zeros(4))


def test_wrong_family_function_and_bad_options_are_refused_untouched():
    model = make(gemma2)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="expected a model of model_type 'glm4', got 'gemma2'"):
        tritium.hf.apply_tritium_to_glm4(model)
    with pytest.raises(TypeError, match="attention must be True or False, got 'no'"):
        tritium.hf.apply(model, attention="no")
    with pytest.raises(TypeError, match="unexpected keyword"):
        tritium.hf.apply(model, rotary=True)
    assert untouched(model)
