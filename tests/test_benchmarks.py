"""The benchmark harness end to end on one tiny case: rows, files, the report command."""

import json
import sys

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
