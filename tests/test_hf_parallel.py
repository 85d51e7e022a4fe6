"""tritium.hf.apply on transformers models loaded with tensor parallelism
(from_pretrained(..., tp_plan="auto")) on two CPU processes with gloo, against one
process's unpatched transformers model: the logits, and a training step's loss (the fused
loss over the LM head's vocabulary slices) and gradients (the split ones gathered).

Gemma 2's fused MLP runs on each rank's features; GLM-4's MLP stays transformers' under
tensor parallelism (its plan splits the packed gate_up_proj by rows), said once."""

import warnings

import pytest
import torch
from distributed import run_ranks, saved_checkpoints
from test_hf import assert_logits_close, gemma2, glm4, padded_batch

import tritium.hf

WORLD = 2
FAMILIES = {"gemma2": gemma2, "glm4": glm4}


def batch():
    torch.manual_seed(0)
    ids, mask = padded_batch(seqlen=9, left=False)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def logits_and_training_step(model) -> tuple:
    """The eval logits of batch(), then its training loss, backward done: (logits, output)."""
    ids, mask, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return logits, out


def worker(rank: int, world: int, folders: dict) -> dict:
    from transformers import AutoModelForCausalLM

    results = {}
    for name, folder in folders.items():
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
            tritium.hf.apply(model)
        logits, out = logits_and_training_step(model)
        # A split parameter's gradient is a DTensor (its placement transformers' choice): gathered whole.
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad, hasattr(p, "placements"))
                 for n, p in model.named_parameters()}
        fused_mlp = "forward" in vars(model.model.layers[0].mlp)  # apply shadowed transformers' forward
        results[name] = dict(fused_mlp=fused_mlp, logits=logits, loss=out.loss.detach(),
                             logits_in_training=out.logits, grads=grads, said=[str(w.message) for w in said])
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folders = saved_checkpoints(tmp_path_factory, FAMILIES, seed=1)
    return folders, run_ranks(worker, WORLD, folders)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_under_transformers_tensor_parallelism(ranks, family):
    from transformers import AutoModelForCausalLM

    folders, results = ranks
    hf = AutoModelForCausalLM.from_pretrained(folders[family], dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    expected, reference = logits_and_training_step(hf)
    mask = batch()[1]
    for result in (r[family] for r in results):
        assert_logits_close(expected, result["logits"], valid=mask)
        assert result["logits_in_training"] is None  # the fused loss ran
        assert abs(result["loss"] - reference.loss.detach()) <= 1e-5 * reference.loss.abs()
        split = [n for n, (_, is_split) in result["grads"].items() if is_split]
        assert "model.layers.0.self_attn.q_proj.weight" in split
        assert {"lm_head.weight", "model.embed_tokens.weight"} & set(split)  # Gemma's head is the tied embedding
        for name, (grad, _) in result["grads"].items():
            whole = hf.get_parameter(name).grad
            assert (grad - whole).abs().max() <= 1e-4 * whole.abs().max(), name
        assert result["fused_mlp"] == (family == "gemma2")
        said_mlp = [m for m in result["said"] if "Glm4MLP" in m]
        assert len(said_mlp) == (1 if family == "glm4" else 0), result["said"]
