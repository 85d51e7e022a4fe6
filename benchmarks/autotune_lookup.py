"""Cost of the autotune lookup on a warm process, per call (target: <= 5 us).

    python -m benchmarks.autotune_lookup

Measured on the CPU: the lookup is host-side Python and does not touch the GPU. The
interpreter check is bypassed so the GPU path (memo hit) is what runs.
"""

from __future__ import annotations

import timeit

import torch


def main() -> None:
    from tritium.autotune import kernel as autotune_kernel
    from tritium.kernels.attention import forward_config

    autotune_kernel.interpreted = lambda: False  # time the compiled-GPU path
    q = torch.empty(2, 4096, 16, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 4096, 8, 128, dtype=torch.bfloat16, device="meta")

    def call():
        return forward_config(q, k, window_left=-1, window_right=0, softcap=0.0)

    call()  # the miss: bucket, tables, default
    number = 100_000
    runs = timeit.repeat(call, number=number, repeat=5)
    per_call = sorted(runs)[len(runs) // 2] / number * 1e6
    print(f"attention_fwd lookup, warm: {per_call:.2f} us per call (median of 5 x {number})")


if __name__ == "__main__":
    main()
