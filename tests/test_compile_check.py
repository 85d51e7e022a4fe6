"""What the compiler makes of the real launches for sm_90 (no GPU needed): every kernel at
its heuristic default for the Gemma 2 (2B, 9B, 27B), GLM-4 9B and BigBird-Pegasus shapes
(the decoders' training loss included) and attention at head_dim 64, 128, 256 with and without softcap, compiled by
`python -m benchmarks.compile_check` through `tritium.compile_only`.

These run in a subprocess: the test session imports Triton in interpreter mode, and a
kernel is compiled or interpreted from the moment it is decorated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
BLOCK_SPARSE = {"_bs_fwd_kernel", "_bs_bwd_dq_kernel", "_bs_bwd_dkdv_kernel"}
GEMMS = {"_linear_kernel", "_gate_up_kernel", "_gemm_kernel"}  # dense MLP, NF4
LOSS = {"_lce_fwd_kernel", "_lce_dx_kernel", "_lce_dw_kernel"}  # the fused LM head + cross-entropy


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _python(code: str, timeout: int = 900) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_compiled_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("compile") / "sm90.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--arch", "90", "--json", str(path)],
                          cwd=ROOT, env=_compiled_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())["rows"]


def _shown(row: dict) -> str:
    return f"{row['kernel']} [{row['config']}] reg {row['registers']} stack {row['stack_bytes']} {row['instructions']}"


def test_every_model_kernel_is_compiled(rows):
    kernels = {row["kernel"] for row in rows}
    expected = ATTENTION | BLOCK_SPARSE | GEMMS | LOSS | {"_gemv_kernel", "_norm_fwd_kernel", "_norm_bwd_kernel",
                                                   "_rotary_kernel", "_combine_kernel"}
    assert expected <= kernels, f"never compiled: {sorted(expected - kernels)}"


def test_every_head_dim_and_softcap_is_compiled(rows):
    """Forward, dQ and dK/dV at head_dim 64, 128, 256, with and without softcap: the
    defaults the facts below are held for."""
    seen = {(row["kernel"], row["meta"]["HEAD_DIM"], row["meta"]["SOFTCAP"]) for row in rows
            if row["kernel"] in ATTENTION and row["meta"].get("PACK", 1) == 1}
    expected = {(kernel, d, cap) for kernel in ATTENTION for d in (64, 128, 256) for cap in (False, True)}
    assert expected <= seen, f"never compiled: {sorted(expected - seen)}"


def test_no_kernel_spills(rows):
    spilling = [_shown(row) for row in rows if row["stack_bytes"]]
    assert not spilling, "register spills (stack bytes) at the default config:\n" + "\n".join(spilling)


def test_prefill_and_training_kernels_use_wgmma(rows):
    """Hopper's warpgroup MMA in attention forward (prefill), dQ and dK/dV, block-sparse
    forward and backward, the MLP and NF4 GEMMs at prefill token counts, and the fused loss's
    three kernels. Decode tiles
    (a few rows: mma.sync) are not held to it: wgmma needs 64 rows per warpgroup."""
    prefill = [row for row in rows if any("4096 tokens" in s or "prefill" in s or "block-sparse" in s or "loss" in s
                                          for s in row["steps"])]
    must = [row for row in prefill if row["kernel"] in ATTENTION | BLOCK_SPARSE | GEMMS | LOSS
            and row["meta"].get("PACK", 1) == 1 and not row["meta"].get("HAS_SEQLENS")]
    assert {row["kernel"] for row in must} >= ATTENTION | BLOCK_SPARSE | GEMMS | LOSS
    without = [_shown(row) for row in must if not row["instructions"]["wgmma"] and not _known_mma_sync(row)]
    assert not without, "no wgmma:\n" + "\n".join(without)


def _known_mma_sync(row: dict) -> bool:
    """The one known exception (attention_tuning.dkdv_default): dK/dV at head_dim 256, where
    every wgmma tile spills. When it stops being one, this test says so."""
    return row["kernel"] == "_attn_bwd_dkdv_kernel" and row["meta"]["HEAD_DIM"] > 128


def test_the_known_exception_is_still_needed(rows):
    known = [row for row in rows if _known_mma_sync(row)]
    assert known and not any(row["instructions"]["wgmma"] for row in known), (
        "dK/dV at head_dim 256 now uses wgmma: drop _known_mma_sync")


def test_softcap_uses_the_hardware_tanh(rows):
    capped = [row for row in rows if row["meta"].get("SOFTCAP")]
    assert capped, "no softcap launch compiled (Gemma 2 caps every attention)"
    software = [_shown(row) for row in capped if not row["instructions"]["tanh_approx"]]
    assert not software, "softcap without tanh.approx.f32:\n" + "\n".join(software)


def test_launch_specialisation_comes_from_the_arguments():
    """A 16-byte aligned tensor compiles to 16-byte vector loads; the same call on a view
    one element off compiles to 2-byte loads: what is compiled follows the launch's
    arguments, as on a GPU, rather than a signature written out by hand."""
    out = _python(
        "import re, torch, tritium\n"
        "from tritium.compile_only import compile_for\n"
        "flat = torch.empty(4 * 1024 + 8, dtype=torch.bfloat16, device='meta')\n"
        "w = torch.empty(1024, dtype=torch.bfloat16, device='meta')\n"
        "for rows in (flat[:4096].view(4, 1024), flat[1:4097].view(4, 1024)):\n"
        "    with compile_for(90) as compiled:\n"
        "        tritium.rms_norm(rows, w)\n"
        "    ptx = compiled[0].kernel.asm['ptx']\n"
        "    print(compiled[0].name, 'ld.global.v4.b32' in ptx, 'ld.global.b16' in ptx)\n")
    assert out.split() == ["_norm_fwd_kernel", "True", "False", "_norm_fwd_kernel", "False", "True"], out
