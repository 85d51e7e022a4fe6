"""`tritium profile`: a trace and a per-kernel table for one benchmark case; case lookup."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

from tritium.cli import cases, main, profiling

# The smallest case of each device's list: the CPU one runs interpreted in about a second.
SMALL_CASE = {"cpu": "attention/d32-full-s64-b1-h2", "cuda": "attention_decode/decode-b1-ctx1024"}
REPO = Path(__file__).resolve().parents[1]


def test_profile_writes_trace_and_table(tmp_path, capsys):
    trace = tmp_path / "traces" / "case.json"
    main(["profile", SMALL_CASE[DEVICE], "--device", DEVICE, "--steps", "2", "--warmup", "1", "--trace", str(trace)])
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "step 0" for e in events)
    assert list(trace.parent.iterdir()) == [trace]  # the temporary file is gone
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(profiling.ROW_KIND[DEVICE]))
    summary = next(i for i, line in enumerate(lines) if line.startswith("step time"))
    assert summary > header + 1  # at least one kernel or op row
    if DEVICE == "cpu":
        assert any(line.startswith("tritium::flash_attention_forward") for line in lines[header:summary])
        assert profiling.CPU_LABEL in lines


def test_table_top_rows_and_other_line(tmp_path):
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    result = profiling.profile(lambda: (a @ b).relu().sum(), steps=2, warmup=1, trace_path=tmp_path / "t.json",
                               flops=2 * 64**3, nbytes=3 * 64 * 64 * 4, device="cpu")
    assert result.step_us > 0 and result.ops[0].calls == 2
    lines = result.table(top=1).splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"other ({len(result.ops) - 1} more)")
    assert max(len(line) for line in lines) < 100
    assert "TFLOP/s" in result.summary()


def test_unknown_case_names_close_matches(capsys):
    with pytest.raises(ValueError, match="close matches: attention/d32-full-s64-b1-h2"):
        cases.resolve("attention/d32-full-s64-b1-h3", "cpu")
    with pytest.raises(ValueError, match=r"matches \d+ benchmark cases"):
        cases.resolve("attention/", "cpu")
    with pytest.raises(SystemExit):
        main(["profile", "no-such-case", "--device", DEVICE])
    assert "no benchmark case" in capsys.readouterr().err


def test_resolve_by_unique_substring():
    assert cases.resolve("decode-b1-ctx32768", "cuda").name == "attention_decode/decode-b1-ctx32768"
    assert cases.resolve("attention/d128-causal-s4096-b4-h16", "cuda").modes == ("fwd", "fwd+bwd")


def test_list_shows_this_device_then_all(capsys):
    main(["profile", "--list", "attention", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("cpu:") and "attention/d32-full-s64-b1-h2" in out
    assert "attention/d128-causal-s4096-b4-h16" not in out and "--list --all shows them" in out
    main(["profile", "--list", "attention", "--device", "cpu", "--all"])
    out = capsys.readouterr().out
    assert out.index("attention/d32-full-s64-b1-h2") < out.index("cuda:") < out.index("decode-b1-ctx32768")


def test_list_works_outside_the_checkout(tmp_path):
    # As from a plain install: only the package on the path, run from another folder, where
    # the repository's benchmarks/ cannot be imported.
    site = tmp_path / "site"
    site.mkdir()
    (site / "tritium").symlink_to(REPO / "tritium")
    check = ("import importlib.util; assert importlib.util.find_spec('benchmarks') is None; "
             "import sys; from tritium.cli import main; main(['profile', '--list', 'norm']); "
             "assert 'benchmarks' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
    assert "norm/" in out


def test_a_missing_library_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(SystemExit):
        main(["profile", cases.available(DEVICE, "hf")[0].name, "--device", DEVICE])
    assert 'install transformers (pip install "tritium[hf]")' in capsys.readouterr().err
