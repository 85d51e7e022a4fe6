"""`python -m benchmarks run` measures suites and writes a report; `python -m benchmarks
report results.json` rebuilds README.md and the plots from a results file.

Only torch is imported before the device is known: without CUDA, TRITON_INTERPRET=1 must
be set before triton or tritium is first imported, because Triton chooses between the
compiler and the interpreter when a kernel is decorated.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from benchmarks import suites


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure suites; write results.json/.csv, README.md, plots")
    run.add_argument("--suite", default="all", choices=("all", *suites.NAMES))
    run.add_argument("--quick", action="store_true", help="a handful of cases")
    run.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    run.add_argument("--out", help="output folder (default: reports/<device-slug>/)")
    run.add_argument("--filter", metavar="SUBSTRING", help="only cases whose name contains SUBSTRING")
    run.add_argument("--mode", choices=("fwd", "fwd+bwd", "decode"), help="only this mode")
    rebuild = commands.add_parser("report", help="rebuild README.md and plots from a results.json")
    rebuild.add_argument("results", type=Path, help="a results.json written by `run`")
    rebuild.add_argument("--out", type=Path, help="output folder (default: the folder of results.json)")
    return parser


def _choose_device(parser: argparse.ArgumentParser, requested: str | None) -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 would run the kernels interpreted: unset it to benchmark on CUDA")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        # The interpreter evaluates masked-off lanes in numpy too; their overflows are noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    return device


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m benchmarks`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        from benchmarks import report, results

        metadata, rows = results.load(args.results)
        out = args.out or args.results.parent
        report.write(out, metadata, rows)
    else:
        device = _choose_device(parser, args.device)
        from benchmarks import runner  # imports triton, so only after _choose_device

        out = runner.run(suite=args.suite, device=device, quick=args.quick, filter=args.filter,
                         mode=args.mode, out=args.out, command=argv)
    print(f"wrote {Path(out) / 'README.md'}")


if __name__ == "__main__":
    main()
