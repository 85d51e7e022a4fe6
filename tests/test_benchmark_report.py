"""The benchmark registry, results files, reports and accuracy verdicts, without timing a
kernel: a fake operator for the registry and `run`, and tests/data/results-synthetic.json
(made-up GPU numbers) for the JSON round trip and the report."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tritium.autotune
from benchmarks import accuracy, environment, harness, results
from benchmarks.__main__ import main
from benchmarks.summary import ordered
from tritium import bench
from tritium.bench import operators

RECORDED = Path(__file__).parent / "data" / "results-synthetic.json"
CASE = "d128-causal-s4096-b4-h16"
CPU_PEAKS = {"tflops": None, "gbps": None}


def _missing_library(case, inputs):
    raise ImportError("No module named 'fastattn'")


def _off_by(error: float):
    """A backend computing 2x, `error` away from it."""
    return lambda case, t: lambda: t["x"] * 2 + error


@pytest.fixture
def fake_suite(monkeypatch):
    """A suite "fake" that `python -m benchmarks run --suite fake` runs, and a function
    registering its operator: a tritium, an eager (the accuracy reference), an
    uninstallable and a peer backend, tritium and the peer `error` away from the truth. The
    registry and the suite list are restored afterwards, so no other test sees them."""
    monkeypatch.setattr(operators, "_OPERATORS", dict(operators._OPERATORS))
    monkeypatch.setattr(bench, "NAMES", (*bench.NAMES, "fake"))
    monkeypatch.setattr(bench, "load", lambda suite: None)

    def register(tritium_error: float = 0.0, peer_error: float = 0.0) -> operators.Operator:
        return operators.register(operators.Operator(
            name="double", suite="fake", modes=("fwd",),
            cases=lambda device, quick: [operators.Case("n8", 8, "vectors", {"n": 8})],
            inputs=lambda case, device: {"x": torch.randn(case.params["n"], device=device)},
            backends=(
                operators.Backend("tritium", _off_by(tritium_error)),
                operators.Backend("fastattn", _missing_library),
                operators.Backend("eager", lambda case, t: lambda: t["x"] + t["x"]),
                operators.Backend("peer", _off_by(peer_error)),
            ),
            baseline={"cpu": "eager"}, flops=lambda case, mode: 8, nbytes=lambda case, mode: 64,
            error=lambda case, inputs, outputs, grad_out: (outputs[0] - 2 * inputs["x"]).abs().max().item(),
        ))

    return register


@pytest.fixture
def fake_operator(fake_suite):
    return fake_suite()


def _run_fake(op) -> list[dict]:
    opts = harness.RunOptions(device="cpu", quick=True, filter=None, mode=None, peaks=CPU_PEAKS)
    return harness.run_operator(op, opts)


def test_registry_skips_a_backend_that_cannot_import(fake_operator):
    assert operators.operators("fake") == [fake_operator]
    rows = {r["backend"]: r for r in _run_fake(fake_operator)}
    assert rows["fastattn"]["ms_p50"] is None
    assert rows["fastattn"]["note"] == "skipped: ImportError: No module named 'fastattn'"
    assert rows["tritium"]["ms_p50"] > 0 and rows["tritium"]["max_abs_err"] == 0
    assert rows["eager"]["is_baseline"] and rows["eager"]["speedup"] == 1
    assert rows["tritium"]["speedup"] > 0
    assert rows["tritium"]["peak_memory_gib"] is None  # measured on CUDA only


def test_accuracy_reference_must_be_a_backend(fake_operator):
    with pytest.raises(ValueError, match="accuracy_reference 'torch' is not one of its backends"):
        operators.register(dataclasses.replace(fake_operator, accuracy_reference="torch"))


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
    assert "Accuracy: not judged (these results record no tolerances" in text
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


def test_report_shows_peak_memory_where_measured(tmp_path):
    """A CUDA row's peak memory is in its cell and in results.csv; rows without one (older
    results, CPU runs) show none, and a csv of both kinds of rows has the column."""
    metadata, rows = results.load(RECORDED)
    assert all("peak_memory_gib" not in r for r in rows)
    rows = [dict(r, peak_memory_gib=12.25) if r["backend"] == "sdpa-flash" else r for r in rows]
    results.save(tmp_path, metadata, rows)
    main(["report", str(tmp_path)])
    cells = [line for line in (tmp_path / "README.md").read_text().splitlines() if "GiB peak" in line]
    assert len(cells) == 3 and all(line.count("<br>12.2 GiB peak") == 1 for line in cells)
    assert "peak_memory_gib" not in rows[0]  # csv's columns cannot be the first row's alone
    with open(tmp_path / "results.csv", newline="") as f:
        assert sorted(r["peak_memory_gib"] for r in csv.DictReader(f)) == [""] * 3 + ["12.25"] * 3


@pytest.mark.gpu
def test_peak_memory_is_measured_on_cuda(fake_operator):
    """One untimed call's peak: at least the 32 MiB input and the 32 MiB output it returns."""
    n = 1 << 23
    op = dataclasses.replace(fake_operator, baseline={"cuda": "eager", "cpu": "eager"},
                             cases=lambda device, quick: [operators.Case("n8m", n, "vectors", {"n": n})])
    opts = harness.RunOptions(device="cuda", quick=True, filter=None, mode=None, peaks={})
    rows = {r["backend"]: r for r in harness.run_operator(op, opts)}
    assert rows["tritium"]["peak_memory_gib"] >= 2 * 4 * n / 2**30
    assert rows["fastattn"]["peak_memory_gib"] is None


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


# ----------------------------------------------------------------------------- accuracy


def _judged(tritium_err: float, reference_err: float | None = 0.00390625) -> list[dict]:
    """The recorded rows (bfloat16) with tritium's error in CASE set to tritium_err and
    sdpa-flash's (PyTorch in bfloat16: the accuracy reference) to reference_err, judged."""
    _, recorded = results.load(RECORDED)
    errors = {(CASE, "tritium"): tritium_err, (CASE, "sdpa-flash"): reference_err}
    rows = [dict(r, dtype="bfloat16", max_abs_err=errors.get((r["case"], r["backend"]), r["max_abs_err"]))
            for r in recorded]
    for case in ordered(r["case"] for r in rows):
        accuracy.judge([r for r in rows if r["case"] == case], "sdpa-flash")
    return rows


def _tritium_row(rows: list[dict]) -> dict:
    return next(r for r in rows if (r["case"], r["backend"]) == (CASE, "tritium"))


def test_tolerance_is_twice_pytorchs_error_plus_a_floor():
    bound = 2 * 0.00390625 + accuracy.FLOOR[torch.bfloat16]
    at_bound, over, nan = _tritium_row(_judged(bound)), _tritium_row(_judged(0.577)), _tritium_row(_judged(float("nan")))
    assert at_bound["tolerance"] == over["tolerance"] == pytest.approx(0.0238125)
    assert at_bound["accuracy_failed"] is False and over["accuracy_failed"] and nan["accuracy_failed"]
    assert sum(r["accuracy_failed"] for r in _judged(0.577)) == 1
    # Without PyTorch's error the per-dtype bound stands in.
    unscaled = _tritium_row(_judged(0.1, reference_err=None))
    assert unscaled["tolerance"] == accuracy.BOUND[torch.bfloat16] and not unscaled["accuracy_failed"]


def _report_text(folder, tritium_error: float) -> str:
    """The Markdown report of the recorded results with tritium's error set to tritium_error."""
    metadata, _ = results.load(RECORDED)
    results.save(folder, metadata, _judged(tritium_error))
    main(["report", str(folder)])
    return (folder / "README.md").read_text()


def test_report_marks_and_counts_accuracy_failures(tmp_path):
    text = _report_text(tmp_path, 0.577)
    assert "**Accuracy: 1 of 6 rows failed accuracy (1 of them tritium's).**" in text
    assert f"| attention | fwd | {CASE} | tritium | 0.577 | 0.0238 |" in text
    marked = [line for line in text.splitlines() if "**accuracy FAIL**: err" in line]
    assert len(marked) == 1 and marked[0].startswith(f"| {CASE} |") and "err 0.577 > tol 0.0238" in marked[0]
    assert "| accuracy (error within tolerance) | | **FAIL** in 1 of 3 | ok (3 of 3) |" in text


def test_report_within_tolerance_marks_nothing(tmp_path):
    text = _report_text(tmp_path, 0.0078125)
    assert "**Accuracy: all 6 rows with an error are within their tolerance.**" in text
    assert "**accuracy FAIL**: err" not in text and "| ok (3 of 3) | ok (3 of 3) |" in text


def test_run_exits_1_after_writing_when_tritium_fails_accuracy(tmp_path, fake_suite, capsys):
    fake_suite(tritium_error=0.1)
    assert main(["run", "--suite", "fake", "--device", "cpu", "--out", str(tmp_path)]) == 1
    rows = {r["backend"]: r for r in results.load(tmp_path / "results.json")[1]}
    assert rows["tritium"]["accuracy_failed"] and rows["tritium"]["tolerance"] == accuracy.FLOOR[torch.float32]
    assert rows["eager"]["accuracy_failed"] is False and rows["fastattn"]["accuracy_failed"] is None
    assert "**accuracy FAIL**: err 0.1 > tol 1e-05" in (tmp_path / "README.md").read_text()
    err = capsys.readouterr().err
    assert "1 tritium row(s) failed accuracy" in err and "double · fwd · n8 · tritium: max abs error 0.1 > " in err


def test_run_exits_0_when_only_a_peer_fails_accuracy(tmp_path, fake_suite):
    fake_suite(peer_error=0.1)
    assert main(["run", "--suite", "fake", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "**Accuracy: 1 of 3 rows failed accuracy (0 of them tritium's).**" in (tmp_path / "README.md").read_text()


def test_run_keeps_the_operators_measured_before_an_interrupt(tmp_path, fake_suite, capsys):
    """Results are written after each operator: while the second runs, the first's rows are
    on disk, marked in progress (what a killed run leaves); Ctrl-C in the second keeps them,
    and the report says the run is partial and what it lacks."""
    first = fake_suite()
    on_disk = {}

    def interrupted(case, device):
        on_disk.update(zip(("metadata", "rows"), results.load(tmp_path / "results.json")))
        raise KeyboardInterrupt

    operators.register(dataclasses.replace(first, name="triple", inputs=interrupted))
    with pytest.raises(KeyboardInterrupt):
        main(["run", "--suite", "fake", "--device", "cpu", "--out", str(tmp_path)])
    assert on_disk["metadata"]["partial"] == "in progress when written: 1 of 2 operators measured; not measured: triple"
    metadata, rows = results.load(tmp_path / "results.json")
    assert rows == on_disk["rows"] and {r["kernel"] for r in rows} == {"double"} and len(rows) == len(first.backends)
    assert metadata["operators"] == ["double"]
    partial = "stopped by KeyboardInterrupt while measuring triple: 1 of 2 operators measured; not measured: triple"
    assert metadata["partial"] == partial
    text = (tmp_path / "README.md").read_text()
    assert f"> **Partial run**: {partial}." in text and "| operators | double |" in text
    assert "## double · fwd" in text and "## triple" not in text
    assert f"the 1 operator(s) measured so far are in {tmp_path}" in capsys.readouterr().err


def test_a_complete_run_is_not_partial(tmp_path, fake_suite):
    fake_suite()
    assert main(["run", "--suite", "fake", "--device", "cpu", "--out", str(tmp_path)]) == 0
    metadata, _ = results.load(tmp_path / "results.json")
    assert metadata["partial"] is None and metadata["operators"] == ["double"]
    assert "Partial run" not in (tmp_path / "README.md").read_text()
