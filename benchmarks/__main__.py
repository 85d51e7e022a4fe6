"""`python -m benchmarks run` measures suites and writes a report, failing when a tritium
row fails accuracy; `tp` measures tensor-parallel decode (torchrun jobs, benchmarks/tp.py);
`report` rebuilds the report from one or more results.json; `compare` gates a run against
a baseline.

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

from benchmarks import accuracy, compare, results, tp


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure suites; write results.json/.csv, README.md, plots; "
                                          "exit status 1 when a tritium row fails accuracy")
    # Checked once the device is settled: the suite names live in tritium, which imports triton.
    run.add_argument("--suite", default="all", help="all (default), attention, block_sparse, hf, loss, mlp, models, nf4, norm or rope")
    run.add_argument("--quick", action="store_true", help="a handful of cases")
    run.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    run.add_argument("--out", help="output folder (default: reports/<device-slug>/)")
    run.add_argument("--filter", metavar="SUBSTRING", help="only cases whose name contains SUBSTRING")
    run.add_argument("--mode", choices=("fwd", "fwd+bwd", "prefill", "decode", "generate"), help="only this mode")
    rebuild = commands.add_parser("report", help="write README.md and plots from results.json files of one device")
    rebuild.add_argument("results", type=Path, nargs="+",
                         help="results.json files written by `run` (or their folders); a later file's rows "
                              "replace an earlier one's for the same (kernel, backend, mode, case)")
    rebuild.add_argument("--out", type=Path, help="output folder (default: the folder of the only results.json)")
    tp.add_parser(commands)
    gate = commands.add_parser("compare", help="compare two runs case by case; exit status 1 on a regression")
    gate.add_argument("new", type=Path, help="results.json (or its folder) of the run under test")
    gate.add_argument("baseline", type=Path, help="results.json (or its folder) to compare against")
    gate.add_argument("--max-regression", type=compare.parse_threshold, default=0.05, metavar="FRACTION",
                      help="slowdown of the median that fails, as 5%% or 0.05 (default 5%%)")
    gate.add_argument("--backend", default="tritium",
                      help='backends compared: a name, several comma-separated, or "all" (default: tritium)')
    gate.add_argument("--out", type=Path, help="also write the comparison as Markdown to this file")
    gate.add_argument("--allow-device-mismatch", action="store_true", help="compare runs from different devices")
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


def _load(parser: argparse.ArgumentParser, path: Path) -> tuple[dict, list[dict]]:
    try:
        return results.load(results.locate(path))
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"cannot read results from {path}: {exc!r}")


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    from benchmarks import report  # matplotlib: only for the commands that draw

    if args.out is None and len(args.results) > 1:
        parser.error("report: --out is required with several results files")
    runs = {str(path): _load(parser, path) for path in args.results}
    mismatch = results.device_mismatch({name: metadata for name, (metadata, _) in runs.items()})
    if mismatch:
        parser.error(f"report: cannot merge {mismatch}")
    out = args.out or results.locate(args.results[0]).parent
    report.write(out, *results.merge(list(runs.values())))
    return out


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    (new_meta, new_rows), (base_meta, base_rows) = _load(parser, args.new), _load(parser, args.baseline)
    mismatch = results.device_mismatch({"NEW": new_meta, "BASELINE": base_meta})
    if mismatch and not args.allow_device_mismatch:
        parser.error(f"compare: {mismatch}; pass --allow-device-mismatch to compare anyway")
    backends = None if args.backend == "all" else set(args.backend.split(","))
    result = compare.compare(new_rows, base_rows, args.max_regression, backends)
    if not result.compared:
        # A gate that compared nothing must not pass silently (a misspelt --backend, say).
        parser.error(f"compare: no case of backend {args.backend!r} was measured in both runs")
    sides = {"NEW": compare.describe(args.new, new_meta), "BASELINE": compare.describe(args.baseline, base_meta)}
    text = compare.markdown(result, args.max_regression, sides, new_meta["interpreted"] or base_meta["interpreted"])
    print(text, end="")
    if args.out:
        results.write_atomic(args.out, text)
    return 1 if result.regressions else 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    device = _choose_device(parser, args.device)
    from benchmarks import runner  # imports triton, so only after _choose_device
    from tritium import bench

    if args.suite not in ("all", *bench.NAMES):
        parser.error(f"--suite: unknown suite {args.suite!r}; suites: all, {', '.join(bench.NAMES)}")

    out, rows = runner.run(suite=args.suite, device=device, quick=args.quick, filter=args.filter,
                           mode=args.mode, out=args.out, command=argv)
    print(f"wrote {out / 'README.md'}")
    failed = accuracy.failures(rows, subject_only=True)
    if failed:
        # After the report is written: a failing run keeps its results, and says why here.
        print(f"{len(failed)} tritium row(s) failed accuracy (error against float64 over the tolerance):",
              *map(accuracy.describe, failed), sep="\n", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks`; returns the exit status (run: 1 when a tritium
    row failed accuracy; compare: 1 on a regression). Usage errors exit with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(parser, args)
    if args.command == "run":
        return _run(parser, args, argv)
    if args.command == "tp":
        device = _choose_device(parser, args.device)
        print(f"wrote {tp.launch(parser, args, argv, device) / 'README.md'}")
        return 0
    print(f"wrote {Path(_report(parser, args)) / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
