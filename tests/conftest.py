"""Test setup: without a CUDA device, kernels run under the Triton interpreter. The variable
must be set before triton is first imported, which is why it happens here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bfloat16 is right under the interpreter too (test_bfloat16_interpreted.py runs it on
# every machine); these matrices run it on a GPU only, for CPU time.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# head_dims the attention kernels pad to BLOCK_D (a power of two >= 16): below tl.dot's
# minimum of 16, and between powers of two.
PADDED_HEAD_DIMS = (4, 8, 12, 24, 40, 72, 80, 96, 160, 192)


def nan_padded(shape, dtype) -> torch.Tensor:
    """Random values of `shape`, a view of a buffer whose last dim is 16 wider and NaN there:
    a kernel that loads past the view's last dim gets NaN into its result."""
    buffer = torch.full((*shape[:-1], shape[-1] + 16), float("nan"), device=DEVICE, dtype=dtype)
    buffer[..., : shape[-1]] = torch.randn(shape, device=DEVICE, dtype=dtype)
    return buffer[..., : shape[-1]]


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (kernels run compiled); this run uses the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
