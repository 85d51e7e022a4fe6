"""`tritium generate MODEL "prompt"`: load a checkpoint as a compact tritium model, stream
the continuation as it is produced, then report the load, prefill, warm-up (compile and
CUDA-graph capture) and decode times, decode tokens/s and the memory bandwidth reached."""

from __future__ import annotations

import argparse
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
    return gen


@dataclass
class Clock:
    """Wall times of the steps of one generate call: each new token's arrival (synced to
    the host by the streamer, so the times are real on a GPU)."""

    start: float = field(default_factory=time.perf_counter)
    arrivals: list[float] = field(default_factory=list)

    def tick(self) -> None:
        self.arrivals.append(time.perf_counter())

    def report(self, model, batch: int, prompt: int) -> str:
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
                         f"{per_step * steps / seconds / 1e9:.1f} GB/s (weights + cache read per step)")
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
    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    return total + batch * cached * kv


def run(args: argparse.Namespace, device: str) -> None:
    import tritium.models

    if args.max_new_tokens < 1:
        args.error("--max-new-tokens must be at least 1")
    loaded = time.perf_counter()
    try:
        model = tritium.models.load(args.model, dtype=DTYPES[args.dtype], device=device,
                                    attn_implementation=args.attn, quantization="nf4" if args.nf4 else None,
                                    revision=args.revision)
        tokenizer = tritium.models.load_tokenizer(args.model, revision=args.revision)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"tritium generate: {error}") from None
    print(f"loaded {args.model} ({model.config.model_type}, {args.dtype}{', nf4' if args.nf4 else ''}, "
          f"attention {args.attn}) on {device} in {time.perf_counter() - loaded:.1f} s", file=sys.stderr)
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    # The prompt as context: a tokenizer that drops a sequence's leading space keeps the
    # one between the prompt and the first new word.
    stream, clock = tokenizer.decode_stream(skip_special_tokens=True, context=ids[0].tolist()), Clock()

    def show(tokens: torch.Tensor) -> None:
        token = int(tokens[0])  # a host sync: the clock sees the step done
        clock.tick()
        print(stream.push(token), end="", flush=True)

    print(args.prompt, end="", flush=True)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.sample else None
    model.generate(ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=generator, streamer=show,
                   eos_token_id=tokenizer.eos_token_ids or None,
                   cuda_graph=False if args.no_cuda_graph else None)
    print(stream.finish())
    print(clock.report(model, 1, ids.shape[1]), file=sys.stderr)
