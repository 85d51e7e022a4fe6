"""The `tritium` command.

`tritium generate MODEL "prompt"` streams text from a compact tritium model and reports
its prefill and decode speed.
`tritium profile CASE` runs one benchmark case under the profiler: a Chrome/Perfetto trace,
a per-kernel table, and a region nsys/ncu capture by itself. `tritium tune --model NAME`
tunes every kernel for a model's shapes on this GPU; `tritium env` shows the device,
versions and the autotune cache.

The cases are tritium.bench's suites; they import triton, so they are imported only once
the device (and so TRITON_INTERPRET) is settled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from tritium import autotune, runtime
from tritium.autotune import store
from tritium.cli import generation, profiling, text, workloads

# (steps, warm-up) by device: a compiled step takes micro- to milliseconds and its first
# calls autotune; an interpreted one takes about a second.
DEFAULT_STEPS = {"cuda": (20, 5), "cpu": (3, 1)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritium", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prof = commands.add_parser("profile", help="profile one benchmark case: trace, per-kernel table, NVTX")
    prof.add_argument("case", nargs="?", help="KERNEL/CASE_NAME, or a unique part of one (see --list)")
    prof.add_argument("--list", nargs="?", const="all", metavar="SUITE",
                      help="list the cases (of SUITE) that run on this device, and exit")
    prof.add_argument("--all", action="store_true", help="with --list: also the other device's cases")
    prof.add_argument("--backend", default="tritium", help="which implementation runs (default: tritium)")
    prof.add_argument("--mode", choices=("fwd", "fwd+bwd", "prefill", "decode", "generate"), help="default: the case's first mode")
    prof.add_argument("--trace", type=Path, help="trace file (default: KERNEL.CASE.BACKEND.MODE.trace.json)")
    prof.add_argument("--steps", type=int, help="measured steps (default: 20 on cuda, 3 on cpu)")
    prof.add_argument("--warmup", type=int, help="unrecorded steps first (default: 5 on cuda, 1 on cpu)")
    prof.add_argument("--top", type=int, default=profiling.TOP, help="table rows before 'other'")
    prof.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    prof.set_defaults(run=_profile_command, error=prof.error)  # errors show this command's usage
    tune = commands.add_parser("tune", help="tune every kernel for a model's shapes on this GPU")
    tune.add_argument("--model", required=True, choices=sorted(workloads.MODELS))
    tune.add_argument("--batch", type=_ints, default=[1, 8], help="batch sizes, e.g. 1,8 (default)")
    tune.add_argument("--seqlen", type=_ints, default=[512, 2048, 8192], help="lengths (default 512,2048,8192)")
    tune.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    tune.add_argument("--no-backward", action="store_true", help="inference only: skip the backward kernels")
    tune.add_argument("--nf4", action="store_true", help="also the 4-bit (NF4) matmuls of the MLP weights")
    tune.add_argument("--export", nargs="?", const="", metavar="FILE",
                      help="also write the valid cached entries as a table to ship "
                           "(default FILE: tritium/autotune/configs/<sku>.json)")
    tune.set_defaults(run=_tune_command, error=tune.error)
    env = commands.add_parser("env", help="device, versions, autotune cache and per-kernel statistics")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(run=_env_command, error=env.error)
    gen = generation.add_parser(commands)
    gen.set_defaults(run=_generate_command, error=gen.error)
    return parser


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tritium` command."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.run(args, argv)


def _profile_command(args: argparse.Namespace, argv: list[str]) -> None:
    if args.list:
        _print_list(_import_cases(), args)
    elif args.case is None:
        args.error("give a CASE, or --list")
    else:
        device = _choose_device(args, argv)
        _profile(_import_cases(), args, device)


def _generate_command(args: argparse.Namespace, argv: list[str]) -> None:
    generation.run(args, _choose_device(args, argv), argv)


def _import_cases():
    from tritium.cli import cases  # imports the suites, and so triton

    return cases


def _choose_device(args: argparse.Namespace, argv: list[str]) -> str:
    """The device to run on. The CPU needs the Triton interpreter, which Triton picks when
    a kernel is decorated, i.e. when tritium was imported, before this module ran: without
    it, the command runs again in a fresh interpreter with TRITON_INTERPRET=1."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        args.error("--device cuda: no CUDA device is available")
    if device == "cuda" and runtime.interpreted():
        args.error("TRITON_INTERPRET=1 would run the kernels interpreted: unset it to run on CUDA")
    if device == "cpu" and not runtime.interpreted():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        raise SystemExit(subprocess.run([sys.executable, "-m", "tritium.cli", *argv], check=False, env=env).returncode)
    if device == "cpu":
        # The interpreter evaluates masked-off lanes in numpy too; their overflows are noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    return device


def _print_list(cases, args: argparse.Namespace) -> None:
    """The cases of this device (--device, else cuda when available), then with --all the
    other device's; without --all, one line says how many those are."""
    here = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    others = [d for d in cases.DEVICES if d != here]
    try:
        lists = {device: cases.available(device, args.list) for device in [here, *others]}
    except ValueError as exc:
        args.error(str(exc))
    for device in [here, *others] if args.all else [here]:
        print(f"{device}:{'  # ' + profiling.CPU_LABEL if device == 'cpu' else ''}")
        width = max(len(t.name) for t in lists[device])
        for target in lists[device]:
            print(f"  {target.name:<{width}}  {', '.join(target.modes)}")
    if not args.all:
        hidden = ", ".join(f"{len(lists[d])} {d}" for d in others)
        print(f"(not shown: {hidden} cases; --list --all shows them)")


def _profile(cases, args: argparse.Namespace, device: str) -> None:
    default_steps, default_warmup = DEFAULT_STEPS[device]
    steps = default_steps if args.steps is None else args.steps
    warmup = default_warmup if args.warmup is None else args.warmup
    if steps < 1 or warmup < 0:
        args.error("--steps must be at least 1 and --warmup at least 0")
    try:
        target = cases.resolve(args.case, device)
        mode = args.mode or target.modes[0]
        step = target.step(args.backend, mode, device)
    except ValueError as exc:
        args.error(str(exc))
    trace = args.trace or Path(f"{target.name.replace('/', '.')}.{args.backend}.{mode}.trace.json")
    print(f"tritium profile {target.name}: backend {args.backend}, mode {mode}, {device}, "
          f"{steps} steps after {warmup} warm-up")
    if device == "cpu":
        print(profiling.CPU_LABEL)
    result = profiling.profile(step, steps=steps, warmup=warmup, trace_path=trace,
                               flops=target.flops(mode), nbytes=target.nbytes(mode), device=device)
    print(result.table(args.top))
    print(result.summary())
    print(f"trace: {result.trace_path} (open in https://ui.perfetto.dev or chrome://tracing)")


def _tune_command(args: argparse.Namespace, argv: list[str]) -> None:
    from tqdm import tqdm

    if runtime.interpreted() or not torch.cuda.is_available():
        raise SystemExit("tritium tune needs a CUDA device: under the Triton interpreter every kernel "
                         "runs its interpreter config and nothing is tuned")
    sku = autotune.active_sku()
    print(f"tuning {args.model} on {sku.name} ({sku.slug}); cache: {store.cache_path(sku)}")
    todo = list(workloads.steps(args.model, args.batch, args.seqlen, getattr(torch, args.dtype),
                                backward=not args.no_backward, nf4=args.nf4))
    skipped = []
    with autotune.tuning():
        for step in tqdm(todo, desc=f"tune {args.model}", unit="problem"):
            try:
                step.run()
            except torch.OutOfMemoryError:
                skipped.append(step.label)
                torch.cuda.empty_cache()
    print(text.tuned_table(autotune.TUNED))
    for label in skipped:
        print(f"skipped (out of memory): {label}")
    if args.export is not None:
        path = Path(args.export) if args.export else store.shipped_path(sku)
        entries = autotune.valid_entries(sku)
        if not store.write_entries(path, sku, entries):
            raise SystemExit(f"nothing exported: {path} could not be written (the warning above says why)")
        print(f"exported {sum(map(len, entries.values()))} entries to {path}")


def _env_command(args: argparse.Namespace, argv: list[str]) -> None:
    state = autotune.state()
    if args.json:
        import json

        print(json.dumps(state, indent=1))
    else:
        print(text.env_text(state))


if __name__ == "__main__":
    main()
