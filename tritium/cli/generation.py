"""`tritium generate MODEL "prompt"`: load a checkpoint as a compact tritium model, stream
the continuation as it is produced, then report the load, prefill, warm-up (compile and
CUDA-graph capture) and decode times, decode tokens/s and the memory bandwidth reached.

`--tp N` splits the model over N processes (tensor parallelism): the command starts
itself again under torchrun (torch.distributed.run) with N processes, one per GPU (gloo
processes on the CPU); rank 0 prints."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_parser(commands) -> argparse.ArgumentParser:
    gen = commands.add_parser("generate", help="generate text with a compact tritium model (Gemma 2/3, GLM-4)")
    gen.add_argument("model", help="a checkpoint folder or a Hugging Face Hub repository id")
    gen.add_argument("prompt", help="the prompt text (no chat template is applied)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    gen.add_argument("--nf4", action="store_true", help="quantize the decoder's linear layers to NF4 at load")
    gen.add_argument("--attn", choices=("tritium", "sdpa", "eager"), default="tritium",
                     help="attention implementation (default: tritium)")
    gen.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    gen.add_argument("--revision", help="hub revision (branch, tag or commit)")
    gen.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    gen.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor parallelism over N processes (GPUs), started through torchrun (default: 1)")
    return gen


@dataclass
class Clock:
    """Wall times of the steps of one generate call: each new token's arrival (synced to
    the host by the streamer, so the times are real on a GPU)."""

    start: float = field(default_factory=time.perf_counter)
    arrivals: list[float] = field(default_factory=list)

    def tick(self) -> None:
        self.arrivals.append(time.perf_counter())

    def report(self, model, batch: int, prompt: int, processes: int = 1) -> str:
        """Prefill (to the first token), warm-up (the first decode step: kernel compiles and
        the CUDA-graph capture) and steady decode, with the bytes each decode step reads."""
        lines = [f"prefill: {1e3 * (self.arrivals[0] - self.start):.1f} ms for {prompt} tokens (with the first token)"]
        if len(self.arrivals) > 1:
            lines.append(f"warm-up: {1e3 * (self.arrivals[1] - self.arrivals[0]):.1f} ms (first decode step: "
                         "compiles, CUDA-graph capture)")
        steps = len(self.arrivals) - 2
        if steps > 0:
            seconds = self.arrivals[-1] - self.arrivals[1]
            per_step = step_bytes(model, batch, prompt + 1 + steps / 2)
            lines.append(f"decode: {steps} steps in {seconds:.3f} s, {batch * steps / seconds:.1f} tokens/s, "
                         f"{per_step * steps / seconds / 1e9:.1f} GB/s (weights + cache read per step"
                         + (f", per process of {processes})" if processes > 1 else ")"))
        return "\n".join(lines)


def step_bytes(model, batch: int, cached: float) -> float:
    """Bytes one decode step reads: every weight once (the embedding table only through a
    tied LM head) plus the keys and values cached so far."""
    seen, total = set(), 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.data_ptr() in seen or (name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    c, kv_heads = model.config, model.model.layers[0].self_attn.kv_heads  # this rank's, under TP
    kv = 2 * c.num_hidden_layers * kv_heads * c.head_dim * model.dtype.itemsize
    return total + batch * cached * kv


def under_torchrun(processes: int, argv: list[str]) -> None:
    """Run this command again as `processes` torchrun processes, unless this is one of them."""
    if "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != processes:
            raise SystemExit(f"tritium generate: --tp {processes} inside a torchrun job of {os.environ['WORLD_SIZE']} "
                             f"processes; give --tp {os.environ['WORLD_SIZE']}, or run it without torchrun")
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tritium.cli", *argv]
    threads = str(max(1, (os.cpu_count() or 1) // processes))  # torchrun's default of 1, said in a banner otherwise
    env = {"OMP_NUM_THREADS": threads, **os.environ}
    raise SystemExit(subprocess.run(command, check=False, env=env).returncode)


def run(args: argparse.Namespace, device: str, argv: list[str]) -> None:
    import tritium.models
    from tritium.models import parallel

    if args.max_new_tokens < 1:
        args.error("--max-new-tokens must be at least 1")
    if args.tp < 1:
        args.error("--tp must be at least 1")
    tp = args.tp > 1
    if tp:
        try:  # a missing tokenizer is said once, before N processes start
            tritium.models.load_tokenizer(args.model, revision=args.revision)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"tritium generate: {error}") from None
        under_torchrun(args.tp, argv)
    loaded = time.perf_counter()
    try:
        model = tritium.models.load(args.model, dtype=DTYPES[args.dtype], device=None if tp and device == "cuda"
                                    else device, attn_implementation=args.attn,
                                    quantization="nf4" if args.nf4 else None, revision=args.revision, tp=tp)
        tokenizer = tritium.models.load_tokenizer(args.model, revision=args.revision)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"tritium generate: {error}") from None
    shown = model.tp is None or model.tp.rank == 0  # every rank computes the same tokens; one prints
    out = sys.stdout if shown else open(os.devnull, "w")  # noqa: SIM115 (closed at exit)
    where = f"{model.device}" + (f", tensor-parallel over {args.tp} processes" if tp else "")
    print(f"loaded {args.model} ({model.config.model_type}, {args.dtype}{', nf4' if args.nf4 else ''}, "
          f"attention {args.attn}) on {where} in {time.perf_counter() - loaded:.1f} s", file=sys.stderr if shown
          else out)
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=model.device)
    # The prompt as context: a tokenizer that drops a sequence's leading space keeps the
    # one between the prompt and the first new word.
    stream, clock = tokenizer.decode_stream(skip_special_tokens=True, context=ids[0].tolist()), Clock()

    def show(tokens: torch.Tensor) -> None:
        token = int(tokens[0])  # a host sync: the clock sees the step done
        clock.tick()
        print(stream.push(token), end="", flush=True, file=out)

    print(args.prompt, end="", flush=True, file=out)
    # The same seed on every rank: the ranks draw the same tokens.
    generator = torch.Generator(device=model.device).manual_seed(args.seed) if args.sample else None
    model.generate(ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=generator, streamer=show,
                   eos_token_id=tokenizer.eos_token_ids or None,
                   cuda_graph=False if args.no_cuda_graph else None)
    print(stream.finish(), file=out)
    if shown:
        print(clock.report(model, 1, ids.shape[1], args.tp), file=sys.stderr)
    if tp:
        parallel.exit_rank()
