"""Text for people: the summary of a tuning run and the `tritium env` report."""

from __future__ import annotations

import platform


def columns(headers: list[str], rows: list[list[str]]) -> str:
    """Rows aligned under headers, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]

    def line(cells):
        first, *rest = (str(c) for c in cells)
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:]))])

    return "\n".join([line(headers), line("-" * w for w in widths), *(line(r) for r in rows)])


def tuned_table(tuned) -> str:
    """One row per tuned bucket: chosen config, its time, the default's, the speedup."""
    rows = []
    for kernel, bucket, result in tuned:
        default = f"{result.default_ms:.3f}" if result.default_ms is not None else "failed"
        gain = f"{result.default_ms / result.ms:.2f}x" if result.default_ms else "n/a"
        rows.append([f"{kernel} [{bucket}]", str(result.config), f"{result.ms:.3f}", default, gain])
    if not rows:
        return "nothing tuned: every bucket was already in the cache or the shipped table"
    return columns(["kernel [bucket]", "chosen config", "ms", "default ms", "speedup"], rows)


def env_text(state: dict) -> str:
    """`tritium env`: device, versions, where tuned configs live, per-kernel counts."""
    import torch
    import triton

    import tritium

    sku = state["sku"]
    device = (f"{sku['name']} ({sku['sm_count']} SMs, {sku['memory_gib']} GiB, sm_{sku['capability'].replace('.', '')})"
              if sku else "no CUDA device")
    lines = [
        f"device      {device}",
        f"kernels     {_kernel_mode(state['interpreted'], sku is not None)}",
        f"versions    tritium {tritium.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}",
        f"tuning      {'on (misses are tuned)' if state['tuning'] else 'off (set TRITIUM_AUTOTUNE=1 or run tritium tune)'}",
        f"cache       {state['cache_path']}",
        f"shipped     {state['shipped_table'] or 'n/a without a GPU'}",
        "",
    ]
    rows = [
        [name, k["source"], str(k["cache_entries"]), str(k["shipped_entries"]), str(k["memo_hits"]),
         " ".join(f"{src}={n}" for src, n in k["resolved"].items() if n) or "-"]
        for name, k in state["kernels"].items()
    ]
    headers = ["kernel", "source hash", "cached", "shipped", "memo hits", "misses resolved by"]
    return "\n".join(lines) + columns(headers, rows)


def _kernel_mode(interpreted: bool, cuda: bool) -> str:
    """How a launch runs here, and on a CPU-only machine what to do about it."""
    if interpreted:
        return ("Triton interpreter (TRITON_INTERPRET=1): CPU tensors, run in numpy; for correctness and "
                "plumbing, not speed")
    if cuda:
        return "compiled by Triton for the CUDA device"
    return ("cannot launch: no CUDA device and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before "
            "importing tritium to run them on the CPU, slowly)")
