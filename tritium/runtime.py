"""Where tritium's kernels run: compiled on a CUDA device, or under the Triton interpreter.

Triton decides between the two when a kernel is decorated, so the choice is read once, at
import, from TRITON_INTERPRET (the test setup and the benchmark runner set it before
importing triton when no GPU is present).
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """True when kernels run under the Triton interpreter (CPU tensors, slow, for testing)."""
    return INTERPRETED


def capturing() -> bool:
    """True inside CUDA-graph capture or torch.compile tracing, where a host sync (reading a
    tensor's values) or a tuning run (dozens of launches) must not happen."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
