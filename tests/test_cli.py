"""`tritium env` and `tritium tune` without a GPU; the workloads `tune` runs."""

import dataclasses
import json

import pytest
import torch

from tritium.autotune.config import Config
from tritium.autotune.tuner import Result
from tritium.cli import main, text, workloads


def test_env_text_and_json(capsys):
    main(["env"])
    text = capsys.readouterr().out
    assert "attention_fwd" in text and "triton" in text and "cache" in text
    main(["env", "--json"])
    state = json.loads(capsys.readouterr().out)
    assert {"attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"} <= set(state["kernels"])
    assert state["interpreted"] is True and state["sku"] is None


@pytest.mark.parametrize("interpreted, cuda, says", [
    (True, False, "Triton interpreter (TRITON_INTERPRET=1)"),
    (False, False, "set TRITON_INTERPRET=1 before importing tritium"),
    (False, True, "compiled by Triton"),
])
def test_env_says_how_kernels_run(interpreted, cuda, says):
    assert says in text._kernel_mode(interpreted, cuda)


def test_tune_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["tune", "--model", "gemma2-2b"])


@pytest.mark.parametrize("bad", ["--model=llama", "--batch=0", "--seqlen=a,b"])
def test_tune_rejects_bad_arguments(bad):
    with pytest.raises(SystemExit) as info:
        main(["tune", "--model", "gemma2-2b", bad] if not bad.startswith("--model") else ["tune", bad])
    assert info.value.code == 2


@pytest.mark.parametrize("model", ["gemma2-2b", "glm4-9b", "mvp", "bigbird-pegasus-large"])
def test_workloads_run(model, monkeypatch):
    """Every kind of problem a model's tuning meets runs: real attention and rotary shapes,
    MLP, norm and LM-head sizes shrunk so the interpreter gets through them."""
    small = dataclasses.replace(workloads.LAYERS[model], hidden=64, intermediate=96)
    monkeypatch.setitem(workloads.LAYERS, model, small)
    monkeypatch.setitem(workloads.BLOCK_SPARSE, "bigbird-pegasus-large", (2, 16, 16, 1))
    if model in workloads.LM_HEADS:  # a vocabulary the interpreter gets through
        monkeypatch.setitem(workloads.LM_HEADS, model, (100, workloads.LM_HEADS[model][1]))
    seqlens = [128] if model == "bigbird-pegasus-large" else [16]  # 128: the shortest block-sparse sequence
    todo = list(workloads.steps(model, [1], seqlens, torch.float32, device="cpu", nf4=model == "glm4-9b"))
    assert todo
    for step in todo:
        step.run()


def test_all_models_have_workloads():
    assert set(workloads.MODELS) == set(workloads.LAYERS) == {"gemma2-2b", "gemma2-9b", "gemma2-27b", "glm4-9b", "mvp",
                                     "bigbird-pegasus-large", "bert-large"}


def test_tuned_table():
    result = Result(Config({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3), ms=1.0, default_ms=1.25, tried=40)
    table = text.tuned_table([("attention_fwd", "head_dim=128", result)])
    assert "1.25x" in table and "BLOCK_M=128" in table
    assert "nothing tuned" in text.tuned_table([])
