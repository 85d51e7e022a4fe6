"""Host time per call of tritium's public ops at Gemma 2 2B decode sizes, with every
kernel launch stubbed out: what the Python around the kernels costs, and how many
launches a call makes.

    python -m benchmarks.host_overhead [--number N]

A decode step at batch 1 is launch-bound: a layer's kernels take tens of microseconds on
an H100, so the host time of each call adds to the step unless the step is replayed from
a CUDA graph. Measured on the CPU, under the Triton interpreter with its launch replaced
by a counter (so the interpreter's heuristic configs are what the lookups return).
Triton's own cost per launch on a GPU (binding the arguments, the driver call) comes on
top, once per launch counted here.
"""

from __future__ import annotations

import argparse
import os
import timeit

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

DTYPE = torch.bfloat16
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 2304, 9216, 8, 4, 256, 4096


def _cases() -> dict:
    """name -> a no-argument call at decode size (one token)."""
    import tritium
    from tritium import nf4

    def randn(*shape):
        return torch.randn(*shape, dtype=DTYPE)

    q, k, v = randn(1, 1, HEADS, HEAD_DIM), randn(1, 1, KV_HEADS, HEAD_DIM), randn(1, 1, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = randn(1, CONTEXT + 1, KV_HEADS, HEAD_DIM), randn(1, CONTEXT + 1, KV_HEADS, HEAD_DIM)
    x, norm_weight = randn(1, 1, HIDDEN), randn(HIDDEN)
    cos, sin = torch.randn(CONTEXT, HEAD_DIM // 2), torch.randn(CONTEXT, HEAD_DIM // 2)
    gate, up, down = randn(INTERMEDIATE, HIDDEN), randn(INTERMEDIATE, HIDDEN), randn(HIDDEN, INTERMEDIATE)
    h = randn(1, INTERMEDIATE)
    quantized = nf4.quantize(randn(HIDDEN, INTERMEDIATE))  # before the launches are stubbed
    return {
        "flash_attention_with_kvcache (softcap, window)": lambda: tritium.flash_attention_with_kvcache(
            q, k_cache, v_cache, CONTEXT, k=k, v=v, softcap=50.0, window_size=(4095, 0)),
        "rms_norm (Gemma, residual)": lambda: tritium.rms_norm(x, norm_weight, 1e-6, offset=1.0, residual=x),
        "apply_rotary (q and k, in place)": lambda: tritium.apply_rotary(q, k, cos, sin, inplace=True,
                                                                         seqlen_offsets=CONTEXT - 1),
        "gated_mlp (gate/up pair)": lambda: tritium.gated_mlp(x, (gate, up), down, "gelu_tanh"),
        "linear (down projection)": lambda: tritium.linear(h, down),
        "nf4.matmul (GEMV)": lambda: nf4.matmul(h, quantized),
    }


def _stub_launches() -> dict:
    """Replace the interpreter's launch by a counter; returns the counter."""
    from triton.runtime.interpreter import InterpretedFunction

    count = {"launches": 0}

    def run(self, *args, grid, warmup, **kwargs):
        count["launches"] += 1

    InterpretedFunction.run = run
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per timing (median of 5)")
    number = parser.parse_args(argv).number
    cases = _cases()
    count = _stub_launches()
    print(f"{'op':<50} {'host us/call':>12} {'launches':>9}")
    for name, call in cases.items():
        call()  # the autotune miss and first-call setup
        count["launches"] = 0
        call()
        launches = count["launches"]
        per_call = sorted(timeit.repeat(call, number=number, repeat=5))[2] / number * 1e6
        print(f"{name:<50} {per_call:>12.1f} {launches:>9}")


if __name__ == "__main__":
    main()
