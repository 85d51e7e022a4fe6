"""Timing: run-time quantiles of a callable, and the hardware peaks figures are compared to."""

from __future__ import annotations

import time

import numpy as np
import torch

# Under the interpreter a call takes ~0.1-1 s and the numbers only show the plumbing works.
CPU_REPEATS = 5
GEMM_SIZE = 8192
COPY_BYTES = 1 << 30


def time_quantiles(fn, device: str) -> tuple[float, float, float]:
    """(p20, p50, p80) run time of fn() in milliseconds.

    CUDA: triton.testing.do_bench, which flushes L2 before every run. Its `quantiles=`
    keyword returns the quantiles in the order asked, on Triton 3.6 and 3.9 alike.
    CPU: time.perf_counter over CPU_REPEATS calls after one warm-up call.
    """
    if device == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return p20, p50, p80
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    p20, p50, p80 = np.percentile(times, [20, 50, 80])
    return float(p20), float(p50), float(p80)


def measure_peaks(device: str) -> dict:
    """Measured peaks: {"tflops": bf16 GEMM TFLOP/s, "gbps": device-to-device copy GB/s}.

    Median of do_bench on a GEMM_SIZE^3 bf16 matmul and on a COPY_BYTES copy (read + write
    counted). None on CPU, where the interpreter's speed says nothing about the hardware.
    """
    if device != "cuda":
        return {"tflops": None, "gbps": None}
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=torch.bfloat16, device=device)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=torch.bfloat16, device=device)
    gemm_ms = time_quantiles(lambda: a @ b, device)[1]
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_quantiles(lambda: dst.copy_(src), device)[1]
    return {
        "tflops": 2 * GEMM_SIZE**3 / (gemm_ms * 1e-3) / 1e12,
        "gbps": 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
    }
