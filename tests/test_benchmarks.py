"""The benchmark harness end to end on one tiny case: rows, files, the report command."""

import json
import sys

import pytest
import torch

from benchmarks import harness, timing
from benchmarks.__main__ import main
from tritium.bench.operators import install_hint


def test_run_and_report(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--suite", "attention", "--filter", "decode-b2", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    tritium_rows = [r for r in rows if r["backend"] == "tritium"]
    assert tritium_rows and all(r["ms_p50"] > 0 and r["max_abs_err"] < 1e-2 for r in tritium_rows)
    assert all(r["accuracy_failed"] is False and r["tolerance"] > r["max_abs_err"] for r in tritium_rows)
    assert all(r["reproduce"].startswith("python -m benchmarks run") for r in rows)
    assert {"README.md", "results.csv"} <= {p.name for p in out.iterdir()}
    assert any(p.suffix == ".png" for p in out.iterdir())
    assert "CPU-interpreter" in (out / "README.md").read_text()
    again = tmp_path / "again"
    main(["report", str(out / "results.json"), "--out", str(again)])
    assert (again / "README.md").read_text() == (out / "README.md").read_text()


def test_host_overhead_runs():
    """Its own process: it replaces the interpreter's launch for good."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--number", "5"], capture_output=True,
                         text=True, check=True).stdout
    rows = [line.rsplit(None, 2) for line in out.splitlines()[1:]]
    assert len(rows) == 6 and all(float(us) > 0 and int(launches) >= 1 for _, us, launches in rows), out


def test_run_without_transformers_skips_the_hf_suite(tmp_path, monkeypatch):
    """The base install has no transformers: the hf suite's model cannot be built, so every
    backend of every case is a row saying what to install, and the run succeeds."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ModuleNotFoundError
    assert main(["run", "--suite", "hf", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"hf_gemma2_prefill", "hf_gemma2_decode"}
    assert all(r["ms_p50"] is None and r["note"] == 'skipped: install transformers (pip install "tritium[hf]")'
               for r in rows)
    assert 'eager, 1 case(s): skipped: install transformers (pip install "tritium[hf]")' in (
        tmp_path / "README.md").read_text()


def test_install_hint_names_the_extra_or_package():
    assert install_hint(ModuleNotFoundError(name="transformers.models.gemma2")).startswith("install transformers")
    assert install_hint(ModuleNotFoundError(name="bitsandbytes")) == "install bitsandbytes (pip install bitsandbytes)"
    assert "FlexAttention" in install_hint(ModuleNotFoundError(name="torch.nn.attention.flex_attention"))
    assert install_hint(ModuleNotFoundError(name="fastattn")) is None
    assert install_hint(ImportError("cannot import name 'x' from 'transformers'", name="transformers")) is None


def test_loss_suite_on_cpu(tmp_path, monkeypatch):
    """The loss suite's tiny CPU case: tritium's fused loss (forward, and forward+backward
    with the hidden and weight gradients) within tolerance of float64; the CUDA-only rows
    skipped, saying so."""
    monkeypatch.setattr(timing, "CPU_REPEATS", 1)
    assert main(["run", "--suite", "loss", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    ours = [r for r in rows if r["backend"] == "tritium"]
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(r["accuracy_failed"] is False and r["ms_p50"] > 0 for r in ours), ours
    skipped = {r["backend"]: r["note"] for r in rows if r["ms_p50"] is None}
    assert set(skipped) == {"compile", "liger", "cce", "cce-exact"}
    assert all(note.endswith("benchmarked on CUDA only") for note in skipped.values())
    assert "install Liger-Kernel (pip install liger-kernel)" == install_hint(ModuleNotFoundError(name="liger_kernel"))


def _rows(folder) -> dict:
    return {(r["kernel"], r["backend"]): r for r in json.loads((folder / "results.json").read_text())["rows"]}


def test_models_suite_runs_every_operator_on_cpu(tmp_path, monkeypatch):
    """Each operator's tiny CPU case (Gemma 2 prefill, GLM-4 decode, Gemma 3 NF4 decode, MVP
    generation, BigBird-Pegasus encoder; the interpreted NF4 prefill has none): tritium's
    compact model within tolerance of float64 transformers holding the same weights, the
    CUDA-only backends skipped saying so, and no peak memory on CPU."""
    monkeypatch.setattr(timing, "CPU_REPEATS", 1)  # an interpreted forward takes about a second
    assert main(["run", "--suite", "models", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    kernels = ("models_prefill", "models_decode", "models_decode_nf4", "models_seq2seq_generate", "models_encode")
    assert {kernel for kernel, _ in rows} == set(kernels)
    for kernel in kernels:
        ours = rows[kernel, "tritium"]
        assert ours["ms_p50"] > 0 and ours["accuracy_failed"] is False and ours["max_abs_err"] < 1e-5, ours
        assert ours["peak_memory_gib"] is None and ours["speedup"] > 0
    for key in (("models_prefill", "hf-eager"), ("models_decode", "hf-eager"), ("models_decode", "hf-sdpa"),
                ("models_decode_nf4", "hf-eager-dequantized"), ("models_seq2seq_generate", "hf"),
                ("models_seq2seq_generate", "hf-eager"), ("models_encode", "hf-block-sparse")):
        assert rows[key]["accuracy_failed"] is False, rows[key]
    assert rows["models_prefill", "hf-sdpa"]["note"].startswith("skipped: Unsupported: SDPA cannot apply the attention "
                                                               "softcap (50)")
    assert rows["models_decode", "hf-static-compiled"]["note"].endswith("benchmarked on CUDA only")
    assert rows["models_decode_nf4", "hf-bnb-nf4"]["note"] == "skipped: Unsupported: bitsandbytes' NF4 is " \
                                                              "benchmarked on CUDA only"
    assert rows["models_decode_nf4", "hf-eager-dequantized"]["is_baseline"]
    assert rows["models_decode", "tritium"]["x_name"] == "batch" and rows["models_decode", "tritium"]["x"] == 2
    assert rows["models_encode", "hf-full"]["max_abs_err"] is None and rows["models_encode", "hf-full"]["ms_p50"] > 0
    assert rows["models_seq2seq_generate", "hf"]["is_baseline"]


def test_tensor_parallel_decode_rows_on_cpu(tmp_path):
    """`benchmarks tp`: one torchrun job per degree (gloo processes here), tritium and
    transformers (tp_plan="auto") at TP 1 and 2 on the same random weights: every row timed,
    the collectives' time of the split ones measured, every logits within float32 rounding
    of tritium-tp1's; a degree with too few GPUs would be a skipped row."""
    assert main(["tp", "--device", "cpu", "--tp", "1,2", "--quick", "--hf", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert set(rows) == {("models_decode_tp", f"{kind}-tp{n}") for kind in ("tritium", "hf") for n in (1, 2)}
    for (_, backend), row in rows.items():
        assert row["ms_p50"] > 0 and row["x"] == 1 and row["config"]["tokens"] == 32, row
        assert (row["collective_ms"] > 0) == backend.endswith("tp2"), row
        assert float(row["note"].split("within ")[1].split(" ")[0]) < 1e-5, row
    assert rows["models_decode_tp", "tritium-tp1"]["is_baseline"]
    assert "collectives" in (tmp_path / "README.md").read_text()


def test_models_suite_without_transformers_times_tritium(tmp_path, monkeypatch):
    """The base install: the compact model needs no transformers, so tritium is timed; its
    float64 reference and every transformers row say what to install."""
    monkeypatch.setattr(timing, "CPU_REPEATS", 1)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["run", "--suite", "models", "--filter", "prefill", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    hint = 'install transformers (pip install "tritium[hf]")'
    assert rows["models_prefill", "tritium"]["ms_p50"] > 0
    assert rows["models_prefill", "tritium"]["note"] == f"accuracy not checked: {hint}"
    assert rows["models_prefill", "hf-eager"]["note"] == rows["models_prefill", "hf-sdpa"]["note"] == f"skipped: {hint}"


def test_models_suite_shapes_are_transformers_shapes():
    """The real checkpoints' configs give the compact model and transformers' model the same
    tensors (names and shapes, built on the meta device) and the same layer types."""
    import transformers

    from tritium.bench import models
    from tritium.models import MODEL_TYPES

    counts = {}
    for name, raw in {**models.MODELS, **models.LARGE}.items():
        config_from_hf, model_class = MODEL_TYPES[raw["model_type"]]
        config = config_from_hf(raw)
        ours = model_class(config, dtype=torch.bfloat16, device="meta")
        hf_config = transformers.AutoConfig.for_model(**raw)
        with torch.device("meta"):
            theirs = getattr(transformers, models.HF_CLASSES[raw["model_type"]])(hf_config)
        shapes = {key: tuple(t.shape) for key, t in models._shared_state(ours).items()}
        assert shapes == {key: tuple(t.shape) for key, t in theirs.state_dict().items()}, name
        assert getattr(hf_config, "layer_types", config.layer_types) == config.layer_types, name
        counts[name] = sum(t.numel() for t in ours.parameters())
    assert counts["gemma-3-1b"] == pytest.approx(1.0e9, rel=0.01)
    assert counts["gemma-2-27b"] == pytest.approx(27.2e9, rel=0.01)


@pytest.mark.gpu
def test_models_suite_tiny_cases_on_cuda():
    """The CUDA paths on tiny models: tritium's decode replayed from a CUDA graph, transformers'
    static cache compiled, bitsandbytes' NF4, peak memory."""
    from tritium.bench import models
    from tritium.bench.operators import operators

    opts = harness.RunOptions(device="cuda", quick=True, filter=None, mode=None, peaks={})
    ops = {op.name: op for op in operators("models")}
    rows = {}
    for kernel, nf4 in (("models_decode", False), ("models_decode_nf4", True)):
        case = models.model_case("glm-4-tiny", "decode", 2, nf4)
        rows.update({(kernel, r["backend"]): r for r in harness._run_case(ops[kernel], case, "decode", opts)})
    for key in (("models_decode", "tritium"), ("models_decode", "hf-static-compiled"), ("models_decode_nf4", "tritium")):
        assert rows[key]["accuracy_failed"] is False and rows[key]["peak_memory_gib"] > 0, rows[key]
    bnb = rows["models_decode_nf4", "hf-bnb-nf4"]  # skipped only for a missing library
    assert bnb["ms_p50"] is not None or "install" in bnb["note"], bnb
