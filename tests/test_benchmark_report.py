"""The benchmark registry, results files and reports, without timing a kernel: a fake
operator for the registry, and tests/data/results-synthetic.json (made-up GPU numbers) for
the JSON round trip and the report."""

import json
from pathlib import Path

import pytest
import torch

import tritium.autotune
from benchmarks import environment, harness, results
from benchmarks.__main__ import main

RECORDED = Path(__file__).parent / "data" / "results-synthetic.json"
CPU_PEAKS = {"tflops": None, "gbps": None}


def _missing_library(case, inputs):
    raise ImportError("No module named 'fastattn'")


@pytest.fixture
def fake_operator(monkeypatch):
    """A registered operator with a tritium, an eager and an uninstallable backend; the
    registry is restored afterwards, so no other test sees it."""
    monkeypatch.setattr(harness, "_OPERATORS", dict(harness._OPERATORS))
    return harness.register(harness.Operator(
        name="double", suite="fake", modes=("fwd",),
        cases=lambda device, quick: [harness.Case("n8", 8, "vectors", {"n": 8})],
        inputs=lambda case, device: {"x": torch.randn(case.params["n"], device=device)},
        backends=(
            harness.Backend("tritium", lambda case, t: lambda: t["x"] * 2),
            harness.Backend("fastattn", _missing_library),
            harness.Backend("eager", lambda case, t: lambda: t["x"] + t["x"]),
        ),
        baseline={"cpu": "eager"}, flops=lambda case, mode: 8, nbytes=lambda case, mode: 64,
        error=lambda case, inputs, outputs, grad_out: (outputs[0] - 2 * inputs["x"]).abs().max().item(),
    ))


def _run_fake(op) -> list[dict]:
    opts = harness.RunOptions(device="cpu", quick=True, filter=None, mode=None, peaks=CPU_PEAKS)
    return harness.run_operator(op, opts)


def test_registry_skips_a_backend_that_cannot_import(fake_operator):
    assert harness.operators("fake") == [fake_operator]
    rows = {r["backend"]: r for r in _run_fake(fake_operator)}
    assert rows["fastattn"]["ms_p50"] is None
    assert rows["fastattn"]["note"] == "skipped: ImportError: No module named 'fastattn'"
    assert rows["tritium"]["ms_p50"] > 0 and rows["tritium"]["max_abs_err"] == 0
    assert rows["eager"]["is_baseline"] and rows["eager"]["speedup"] == 1
    assert rows["tritium"]["speedup"] > 0


def test_results_round_trip(tmp_path, fake_operator):
    recorded = results.load(RECORDED)
    results.save(tmp_path / "recorded", *recorded)
    assert results.load(tmp_path / "recorded" / "results.json") == recorded
    # A fresh run's metadata and rows (None times, notes, nested configs) survive too.
    fresh = environment.run_metadata("cpu", CPU_PEAKS, ["run"]), _run_fake(fake_operator)
    results.save(tmp_path / "fresh", *fresh)
    assert results.load(results.locate(tmp_path / "fresh")) == fresh
    assert fresh[0]["driver"] == "n/a" and fresh[0]["device_sku"]["sm_count"] is None
    assert (tmp_path / "fresh" / "results.csv").read_text().count("\n") == 1 + len(fresh[1])


def test_autotune_state_survives_a_redesigned_module(monkeypatch):
    assert isinstance(environment.autotune_state(), dict)
    monkeypatch.delattr(tritium.autotune, "state")
    assert environment.autotune_state() == "unknown"


def test_report_from_recorded_results(tmp_path):
    assert main(["report", str(RECORDED), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "## Summary" in text and "| attention | sdpa-flash | 1.09x | 3 | 1.07x to 1.11x |" in text
    assert "| GPU driver | 000.00 (synthetic) |" in text and "132 SMs" in text
    assert "| attention_fwd | table 3 | 2400 | BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 |" in text
    for kind in ("throughput", "speedup", "roofline"):
        image = tmp_path / f"attention-fwd-{kind}.png"
        assert image.stat().st_size > 1000 and f"]({image.name})" in text


def test_report_without_peaks_says_roofline_is_n_a(tmp_path, fake_operator):
    metadata = {**environment.run_metadata("cpu", CPU_PEAKS, ["run"]), "wall_s": 1.0}
    results.save(tmp_path, metadata, _run_fake(fake_operator))
    main(["report", str(tmp_path)])
    text = (tmp_path / "README.md").read_text()
    assert "Roofline plots (% of the measured peak): n/a on CPU-interpreter" in text
    assert "- fastattn, 1 case(s): skipped: ImportError" in text
    assert not list(tmp_path.glob("*roofline.png"))


def _split_recorded(tmp_path: Path) -> tuple[Path, Path]:
    """The recorded run as two files: the first two cases, then the last two, the shared
    case with tritium 2x slower in the second (later files win)."""
    metadata, rows = results.load(RECORDED)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    first = [r for r in rows if r["case"] in cases[:2]]
    second = [dict(r, ms_p50=2 * r["ms_p50"]) if r["case"] == cases[1] and r["backend"] == "tritium" else r
              for r in rows if r["case"] in cases[1:]]
    results.save(tmp_path / "a", metadata, first)
    results.save(tmp_path / "b", {**metadata, "git_commit": "1" * 40}, second)
    return tmp_path / "a" / "results.json", tmp_path / "b"


def test_report_merges_runs_of_one_device(tmp_path):
    first, second = _split_recorded(tmp_path)
    main(["report", str(first), str(second), "--out", str(tmp_path / "merged")])
    text = (tmp_path / "merged" / "README.md").read_text()
    assert "| merged runs | 2 |" in text and "0000000000000000000000000000000000000000<br>1111" in text
    assert "| attention | sdpa-flash | 0.863x | 3 | 0.536x to 1.11x |" in text  # the later, slower row won


def test_report_refuses_mixed_devices(tmp_path, capsys):
    first, second = _split_recorded(tmp_path)
    data = json.loads((second / "results.json").read_text())
    data["metadata"]["device"] = "another GPU"
    (second / "results.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(first), str(second), "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 2
    assert "different devices" in capsys.readouterr().err
