"""Compile every kernel that models' calls launch, for sm_90 and sm_80, on a machine with
no GPU, and report what the compiler made of each: registers, stack (spill) bytes, shared
memory, and whether the code uses wgmma, mma.sync, cp.async, TMA and the hardware tanh.

    python -m benchmarks.compile_check [--arch 90 80] [--model gemma2-9b ...] [--json FILE]

The launches are the real ones: `tritium.cli.workloads` (what `tritium tune` runs), plus a
grid of attention calls at head_dim 64, 128 and 256 with and without softcap, calls the
public ops on meta tensors inside `tritium.compile_only.compile_for`, so each kernel is
compiled with the config, constexprs and argument specialisation its launch has (at the
heuristic defaults: there is no GPU to tune on). Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

import tritium

MODELS = ("gemma2-2b", "gemma2-9b", "gemma2-27b", "glm4-9b", "bigbird-pegasus-large")
ARCHS = (90, 80)
SM_COUNT = {90: 132, 80: 108}  # H100 SXM, A100: the split decisions of the launch paths
# What the PTX says, by instruction prefix.
INSTRUCTIONS = {"wgmma": "wgmma.mma_async", "mma_sync": "mma.sync", "cp_async": "cp.async.c",
                "tma": "cp.async.bulk.tensor", "tanh_approx": "tanh.approx.f32"}


@dataclass
class Row:
    """One compiled kernel variant and where it was met (model: step labels). meta: its
    constexprs (tile sizes and flags); config: the same with warps and stages, as text."""

    arch: int
    kernel: str
    meta: dict
    config: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    instructions: dict
    steps: list = field(default_factory=list)


def _meta(compiled) -> dict:
    """The constexpr flags and sizes of a launch (upper-case names, JSON scalars)."""
    return {k: v for k, v in sorted(compiled.constants.items()) if k.isupper() and isinstance(v, (int, str))}


def _config(compiled) -> str:
    meta = " ".join(f"{k}={v}" for k, v in _meta(compiled).items())
    return f"{meta} warps={compiled.num_warps} stages={compiled.num_stages}"


@functools.cache
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin, from the cuobjdump bundled with Triton (the CUDA
    toolkit's may be older than the code this Triton writes). Spilled registers live on
    the stack, so 0 stack bytes means no spills."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        log = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    registers, stack = re.search(r"REG:(\d+)", log), re.search(r"STACK:(\d+)", log)
    if not (registers and stack):
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK:\n{log}")
    return int(registers.group(1)), int(stack.group(1))


def _row(arch: int, compiled) -> Row:
    ptx = compiled.kernel.asm["ptx"]
    registers, stack = _resources(compiled.kernel.asm["cubin"])
    instructions = {name: ptx.count(prefix) for name, prefix in INSTRUCTIONS.items()}
    return Row(arch, compiled.name, _meta(compiled), _config(compiled), registers, stack, compiled.kernel.metadata.shared, instructions)


def attention_grid(seqlen: int) -> list:
    """Prefill and training steps at every head_dim the kernels are tuned for (64, 128,
    256), with and without softcap, GQA 2: the models alone miss some (no model has
    head_dim 256 without softcap)."""
    from tritium.cli.workloads import Step

    def run(head_dim, softcap):
        q = torch.empty(1, seqlen, 8, head_dim, dtype=torch.bfloat16, device="meta", requires_grad=True)
        k, v = (torch.empty(1, seqlen, 4, head_dim, dtype=torch.bfloat16, device="meta", requires_grad=True)
                for _ in range(2))
        out = tritium.flash_attention(q, k, v, causal=True, softcap=softcap)
        out.backward(torch.empty_like(out))

    return [Step(f"{d}d softcap={cap} 1x{seqlen} prefill +bwd", functools.partial(run, d, cap))
            for d in (64, 128, 256) for cap in (0.0, 50.0)]


def check(models=MODELS, archs=ARCHS, batches=(1,), seqlens=(4096,), progress=None) -> list[Row]:
    """Compile every launch of `models`' workloads (forward, backward, decode, NF4) and of
    the attention grid at these sizes in bfloat16 for each arch; one Row per distinct
    compiled kernel."""
    from tritium.cli import workloads
    from tritium.compile_only import compile_for

    rows: dict[tuple, Row] = {}
    for arch in archs:
        for model in (*models, "attention"):
            if model == "attention":
                steps = attention_grid(max(seqlens))
            else:
                steps = workloads.steps(model, list(batches), list(seqlens), torch.bfloat16, device="meta", nf4=True)
            for step in steps:
                if progress:
                    progress(f"sm_{arch} {model}: {step.label}")
                with compile_for(arch, SM_COUNT.get(arch, 132)) as compiled:
                    step.run()
                for launch in compiled:
                    key = (arch, launch.name, _config(launch))
                    if key not in rows:
                        rows[key] = _row(arch, launch)
                    rows[key].steps.append(f"{model}: {step.label}")
    return list(rows.values())


def table(rows: list[Row]) -> str:
    """One line per row: kernel, config, registers, stack, shared memory, instructions."""
    lines = []
    for row in rows:
        used = " ".join(f"{name}" for name, count in row.instructions.items() if count)
        lines.append(f"sm_{row.arch} {row.kernel:28s} reg {row.registers:>3} stack {row.stack_bytes:>4} B "
                     f"smem {row.shared_bytes:>6} B  [{used or '-'}]  {row.config}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="sm_XX targets (default 90 80)")
    parser.add_argument("--model", nargs="+", default=list(MODELS), help=f"models (default {' '.join(MODELS)})")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[4096])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON ('-': stdout only)")
    args = parser.parse_args(argv)
    import triton

    from tritium.cli import workloads

    unknown = sorted(set(args.model) - set(workloads.MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(workloads.MODELS)}")
    progress = None if args.json == "-" else (lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    rows = check(args.model, args.arch, args.batch, args.seqlen, progress)
    if args.json:
        document = {"triton": triton.__version__, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
        text = json.dumps(document, indent=1)
        if args.json == "-":
            print(text)
            return
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.json)), delete=False) as f:
            f.write(text + "\n")
        os.replace(f.name, args.json)
    print(f"triton {triton.__version__}: {len(rows)} kernels, bfloat16, heuristic default configs")
    print(table(rows))


if __name__ == "__main__":
    main()
