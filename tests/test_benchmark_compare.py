"""`python -m benchmarks compare` as a CI gate, on runs derived from the recorded synthetic
results (p20-p80 ranges of +-1% around each median)."""

import argparse
from pathlib import Path

import pytest

from benchmarks import results
from benchmarks.__main__ import main
from benchmarks.compare import parse_threshold

RECORDED = Path(__file__).parent / "data" / "results-synthetic.json"
CASE = "d128-causal-s4096-b4-h16"


def _new_run(tmp_path: Path, factor: float, *, backend="tritium", spread=0.01, **metadata) -> Path:
    """The recorded run with `backend`'s CASE row `factor` times slower, its p20-p80 range
    +-spread around the new median; written to a folder, which is returned."""
    base_metadata, rows = results.load(RECORDED)
    changed = [
        dict(r, ms_p20=r["ms_p50"] * factor * (1 - spread), ms_p50=r["ms_p50"] * factor,
             ms_p80=r["ms_p50"] * factor * (1 + spread))
        if (r["case"], r["backend"]) == (CASE, backend) else r
        for r in rows
    ]
    results.save(tmp_path / "new", {**base_metadata, **metadata}, changed)
    return tmp_path / "new"


def _compare(new: Path, *options: str) -> int:
    return main(["compare", str(new), str(RECORDED), *options])


def test_ten_percent_slowdown_fails(tmp_path, capsys):
    assert _compare(_new_run(tmp_path, 1.10)) == 1
    out = capsys.readouterr().out
    assert out.startswith("# Benchmark comparison: FAIL (1 regressed)")
    assert "## Regressions" in out and f"| attention | tritium | fwd | {CASE} |" in out and "| 1.100 |" in out


def test_two_percent_slowdown_passes(tmp_path, capsys):
    assert _compare(_new_run(tmp_path, 1.02)) == 0
    assert "3 cases: 0 regressed, 0 improved, 3 unchanged" in capsys.readouterr().out


def test_slowdown_within_overlapping_ranges_passes(tmp_path, capsys):
    assert _compare(_new_run(tmp_path, 1.10, spread=0.15)) == 0
    out = capsys.readouterr().out
    assert "(1 of them moved past the threshold within noise)" in out and "## Within noise" in out


def test_improvement_passes_and_is_listed(tmp_path, capsys):
    assert _compare(_new_run(tmp_path, 0.80)) == 0
    out = capsys.readouterr().out
    assert "# Benchmark comparison: PASS" in out and "## Improvements" in out and "| 0.800 |" in out


def test_missing_cases_are_listed(tmp_path, capsys):
    metadata, rows = results.load(RECORDED)
    kept = [r for r in rows if r["case"] != CASE]
    renamed = [dict(r, case="d128-causal-s8192-b2-h16") for r in rows if r["case"] == CASE]
    results.save(tmp_path / "new", metadata, kept + renamed)
    assert _compare(tmp_path / "new") == 0
    out = capsys.readouterr().out
    assert f"| attention | tritium | fwd | {CASE} | only in BASELINE |" in out
    assert "| attention | tritium | fwd | d128-causal-s8192-b2-h16 | only in NEW |" in out


def test_only_tritium_gates_unless_asked(tmp_path):
    slower_peer = _new_run(tmp_path, 1.10, backend="sdpa-flash")
    assert _compare(slower_peer) == 0
    assert _compare(slower_peer, "--backend", "all") == 1


def test_threshold_forms(tmp_path):
    assert parse_threshold("5%") == parse_threshold("0.05") == 0.05
    for bad in ("5", "five", "-1%"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_threshold(bad)
    assert _compare(_new_run(tmp_path, 1.10), "--max-regression", "15%") == 0


def test_devices_must_match_unless_allowed(tmp_path, capsys):
    other = _new_run(tmp_path, 1.0, device="another GPU")
    with pytest.raises(SystemExit) as exit_info:
        _compare(other)
    assert exit_info.value.code == 2 and "--allow-device-mismatch" in capsys.readouterr().err
    assert _compare(other, "--allow-device-mismatch") == 0


def test_usage_errors_exit_2(tmp_path):
    for options in (["--backend", "no-such-backend"], ["--max-regression", "5x"]):
        with pytest.raises(SystemExit) as exit_info:
            _compare(_new_run(tmp_path, 1.0), *options)
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        _compare(tmp_path / "nowhere")
    assert exit_info.value.code == 2


def test_markdown_file_matches_the_printed_table(tmp_path, capsys):
    assert _compare(_new_run(tmp_path, 1.10), "--out", str(tmp_path / "compare.md")) == 1
    assert (tmp_path / "compare.md").read_text() == capsys.readouterr().out
