"""`python -m benchmarks tp`: the models suite's tensor-parallel decode rows.

One torchrun job per tensor-parallel degree (`--tp 1,2,4,8`, one process per GPU; gloo
processes on the CPU) builds the model on every rank (tritium.bench.models_tp: seeded
random weights, the same model at every degree) and times its decode step after CONTEXT
cached tokens, for each batch: tritium's compact model (`tritium-tpN`, generate's
CUDA-graph step) and, with --hf, transformers under its own tensor parallelism
(`hf-tpN`, tp_plan="auto", a DynamicCache). Every rank runs the same fixed number of
steps (the collectives keep them in step); rank 0 reports its times, and the time a
profiled step spends in collectives (the all-reduces and the logits' all-gather).

The rows (kernel models_decode_tp, x = batch, tokens/s = batch / time) go to results.json
and the report like `run`'s, beside the other suites' (`report` merges them); the
baseline is tritium-tp1, so a row's speedup is its tokens/s over one GPU's. The logits of
each row are compared with tritium-tp1's (same weights): the difference is in the note.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONTEXT, CPU_CONTEXT = 511, 32
# (warm-up, timed, profiled) steps: the same on every rank. The CPU's interpreted steps are slow.
STEPS = {"cuda": (5, 50, 5), "cpu": (0, 2, 1)}
QUICK_BATCHES, BATCHES = (1,), (1, 16, 64)


def add_parser(commands) -> None:
    tp = commands.add_parser("tp", help="tensor-parallel decode of a compact model over 1-8 GPUs (torchrun jobs)")
    tp.add_argument("--model", help="a models-suite model (default: gemma-2-9b on CUDA, gemma-2-tiny on the CPU)")
    tp.add_argument("--tp", default="1,2,4,8", help="degrees, comma-separated (default 1,2,4,8; those with "
                                                    "enough GPUs run, the others are skipped rows)")
    tp.add_argument("--batches", help="decode batches, comma-separated (default 1,16,64; --quick: 1)")
    tp.add_argument("--quick", action="store_true", help="batch 1 only")
    tp.add_argument("--hf", action="store_true", help="also transformers' tp_plan='auto' (each rank draws the "
                                                      "whole state dict on the CPU first)")
    tp.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    tp.add_argument("--out", help="output folder (default: reports/<device-slug>/tp/)")


def _ints(text: str, name: str, parser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{name}: expected integers separated by commas, got {text!r}")
    if any(v < 1 for v in values):
        parser.error(f"{name}: every value must be at least 1, got {text!r}")
    return values


def launch(parser, args, argv: list[str], device: str) -> Path:
    """Run one torchrun job per degree; write the rows and the report; return the folder."""
    from benchmarks import environment, harness, report, results, timing
    from tritium.bench import models
    from tritium.bench.operators import Case

    model = args.model or ("gemma-2-9b" if device == "cuda" else "gemma-2-tiny")
    if model not in models.SHAPES:
        parser.error(f"--model: unknown {model!r}; models: {', '.join(models.SHAPES)}")
    degrees = _ints(args.tp, "--tp", parser)
    batches = _ints(args.batches, "--batches", parser) if args.batches else list(
        QUICK_BATCHES if args.quick else BATCHES)
    available = torch.cuda.device_count() if device == "cuda" else max(degrees)
    peaks = timing.measure_peaks(device)
    opts = harness.RunOptions(device=device, quick=args.quick, filter=None, mode=None, peaks=peaks)
    start, measured = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as folder:
        for n in degrees:
            if n <= available:
                measured[n] = _job(n, model, batches, args.hf, device, Path(folder))
    rows = []
    context = CPU_CONTEXT if model in models.TINY else CONTEXT
    for batch in batches:
        case = models.model_case(model, "decode", batch, False)
        case = Case(case.name, batch, f"{case.group}, tensor parallel", {**case.params, "tokens": context})
        rows += _case_rows(case, degrees, measured, batch, args, opts)
    metadata = {**environment.run_metadata(device, peaks, argv), "wall_s": time.perf_counter() - start,
                "operators": [models_tp_operator().name], "partial": None}
    out = Path(args.out) if args.out else environment.REPO / "reports" / environment.device_slug(device) / "tp"
    results.save(out, metadata, rows)
    report.write(out, metadata, rows)
    return out


def models_tp_operator():
    """The rows' operator: measured by this module's torchrun jobs, not by the harness, so
    it has no cases, inputs or backends of its own."""
    from tritium.bench import models
    from tritium.bench.operators import Operator

    return Operator(name="models_decode_tp", suite="models", modes=("decode",), cases=lambda device, quick: [],
                    inputs=lambda case, device: {}, backends=(), baseline={"cuda": "tritium-tp1", "cpu": "tritium-tp1"},
                    flops=models.model_flops, nbytes=models.model_bytes, error=lambda *_: None, headline="gbps",
                    x_name="batch")


def _case_rows(case, degrees, measured, batch, args, opts) -> list[dict]:
    from benchmarks import harness
    from tritium.bench.operators import Backend

    op = models_tp_operator()
    kinds = ("tritium", "hf") if args.hf else ("tritium",)
    rows, reference = [], measured.get(1, {}).get(("tritium", batch))
    for kind in kinds:
        for n in degrees:
            row = harness.new_row(op, Backend(f"{kind}-tp{n}", setup=None), case, "decode", opts)
            row["reproduce"] = (f"python -m benchmarks tp --model {case.params['model']} --tp {n} --batches {batch}"
                                + " --hf" * (kind == "hf") + f" --device {opts.device}")
            got = measured.get(n, {}).get((kind, batch))
            if got is None:
                row["note"] = f"skipped: needs {n} GPUs" if n not in measured else "skipped: see the job's log"
            else:
                _fill(row, got, n, reference, opts.peaks)
            rows.append(row)
    base = next((r for r in rows if r["backend"] == "tritium-tp1" and r["ms_p50"] is not None), None)
    for row in rows:
        if base is not None and row["ms_p50"] is not None:
            row["speedup"] = base["ms_p50"] / row["ms_p50"]
    return rows


def _fill(row: dict, got: dict, n: int, reference: dict | None, peaks: dict) -> None:
    from benchmarks import harness

    row["ms_p20"], row["ms_p50"], row["ms_p80"] = got["ms"]
    harness.add_throughput(row, peaks)
    for metric in ("tflops", "gbps"):  # n GPUs: the peak is n times one GPU's
        if row[f"{metric}_pct_peak"] is not None:
            row[f"{metric}_pct_peak"] /= n
    row["collective_ms"] = got["collective_ms"]
    row["peak_memory_gib"] = got["peak_memory_gib"]
    row["dtype"] = got["dtype"]
    if reference is not None:
        diff = (torch.tensor(got["logits"]) - torch.tensor(reference["logits"])).abs().max().item()
        row["note"] = f"logits within {diff:.3g} of tritium-tp1's"


def _job(n: int, model: str, batches: list[int], hf: bool, device: str, folder: Path) -> dict:
    """{(kind, batch): measurement} of one degree's torchrun job ({} if it failed)."""
    out = folder / f"tp{n}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "benchmarks.tp", "--model", model, "--batches", ",".join(map(str, batches)), "--device", device,
               "--json", str(out)] + ["--hf"] * hf
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n)), **os.environ}
    print(f"tp={n}: {' '.join(command[1:])}", file=sys.stderr)
    if subprocess.run(command, check=False, env=env).returncode != 0 or not out.exists():
        print(f"tp={n}: the job failed (its log is above); its rows are skipped", file=sys.stderr)
        return {}
    return {(m["kind"], m["batch"]): m for m in json.loads(out.read_text())}


# ----------------------------------------------------------------------------- one rank


def _timed(step, device: torch.device) -> tuple[float, float, float]:
    """(p20, p50, p80) ms of the timed steps after the warm-up ones."""
    warmup, steps, _ = STEPS[device.type]
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in times]
    return tuple(float(q) for q in np.percentile(times, [20, 50, 80]))


def _measure(kind: str, model, batch: int, context: int, vocab: int, device: torch.device) -> dict:
    from tritium.bench import models, models_tp

    ids = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(models.SEED))
    ids = ids.to(device)
    step = models.decode_step(model, ids) if kind == "tritium" else models.hf_decode_step(model, ids, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # from here: the model, its cache and the step
    logits = step()
    ms = _timed(step, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = STEPS[device.type][2]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(profiled):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"kind": kind, "batch": batch, "ms": ms, "collective_ms": models_tp.collective_ms(profile, profiled),
            "peak_memory_gib": peak, "dtype": str(logits.dtype).removeprefix("torch."),
            "logits": logits[:2].float().cpu().tolist()}


def worker(argv: list[str]) -> None:
    """One rank of one degree's job (under torchrun): build, time, and on rank 0 write the
    measurements to --json."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tp")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--hf", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch.distributed as dist

    from tritium.bench import models, models_tp
    from tritium.models import parallel

    group = parallel.process_group(True)
    device = parallel.local_device() if args.device == "cuda" else torch.device("cpu")
    dtype = torch.float32 if args.model in models.TINY else torch.bfloat16
    context = CPU_CONTEXT if args.model in models.TINY else CONTEXT
    vocab = models.SHAPES[args.model]["vocab_size"]
    measured = []
    builders = {"tritium": lambda: models_tp.random_model(args.model, dtype, device, group)}
    if args.hf:
        builders["hf"] = lambda: models_tp.transformers_model(args.model, dtype, device,
                                                                        split=dist.get_world_size() > 1)
    for kind, build in builders.items():
        model = build()
        for batch in map(int, args.batches.split(",")):
            measured.append(_measure(kind, model, batch, context, vocab, device))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        from benchmarks.results import write_atomic

        write_atomic(Path(args.json), json.dumps(measured))
    parallel.exit_rank()


if __name__ == "__main__":
    worker(sys.argv[1:])
