"""Run metadata stored once at the top of results.json: device, driver, versions, commit,
date, and the launch configurations tritium's autotuner chose during the run."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Marketing names say more than torch's device names (an "H100 80GB HBM3" is the SXM part).
_SLUGS = (
    ("H100 80GB HBM3", "h100-sxm"),
    ("H100 PCIe", "h100-pcie"),
    ("H100 NVL", "h100-nvl"),
)


def device_name(device: str) -> str:
    """Human-readable name of the device the run measures."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU (Triton interpreter)"


def device_slug(device: str) -> str:
    """Folder name under reports/ for this device, e.g. h100-sxm or cpu-interpreter."""
    if device != "cuda":
        return "cpu-interpreter"
    name = device_name(device)
    for marker, slug in _SLUGS:
        if marker in name:
            return slug
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_metadata(device: str, peaks: dict, command: list[str]) -> dict:
    """Everything needed to interpret and reproduce a run, measured peaks included."""
    import triton

    import tritium
    from tritium.runtime import interpreted

    status = _git("status", "--porcelain")
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_sku": device_sku(device),
        "driver": driver_version(device),
        "interpreted": interpreted(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tritium": tritium.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *command]),
        "peak_bf16_tflops": peaks["tflops"],
        "peak_copy_gbps": peaks["gbps"],
        "autotune": autotune_state(),
    }


def device_sku(device: str) -> dict:
    """Name, SM count, memory (GiB) and compute capability of the device; None where a
    CPU has no such figure."""
    if device != "cuda":
        return {"name": device_name(device), "sm_count": None, "memory_gib": None, "compute_capability": None}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def driver_version(device: str) -> str:
    """The NVIDIA driver version (nvidia-smi), else the CUDA driver API version torch sees,
    else "n/a" (no CUDA device)."""
    if device != "cuda":
        return "n/a"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              check=False, capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.split()[0]  # one line per GPU; one driver serves them all
    except (OSError, subprocess.SubprocessError):
        pass
    # Private torch API: the build in use may lack it, which must not cost the run.
    api = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    return f"CUDA driver API {api // 1000}.{api % 1000 // 10}" if api else "n/a"


def autotune_state() -> dict | str:
    """Per kernel registered with tritium.autotune (tritium.autotune.state()["kernels"]):
    "resolved", where its lookups found a config (cache, table, tuned or default);
    "memo_hits"; "configs", the distinct launch configs it used. "unknown" if unavailable."""
    try:
        from tritium import autotune

        return autotune.state()["kernels"]
    except Exception:  # noqa: BLE001 -- a report field must never cost the run
        return "unknown"
