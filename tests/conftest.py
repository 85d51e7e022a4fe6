"""Test setup: without a CUDA device, kernels run under the Triton interpreter. The variable
must be set before triton is first imported, which is why it happens here, at collection."""

import os
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _patch_language_once_per_launch() -> None:
    """Under the interpreter, every call of a @triton.jit helper inside a kernel patches
    triton.language again (an inspect.getmembers sweep, about a millisecond), though the
    launch already did and restores it at its end: a third of an interpreted BigBird
    forward. Helpers whose language modules the launch has patched skip it (the patch
    would set the same values). Nothing but speed: a helper that still needed patching
    would fail loudly on a raw builtin, not compute something else."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or not hasattr(interpreter, "_LangPatchScope"):
        return  # another interpreter layout: tests run as they are, only slower

    def patch_unless_patched(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and not any(tl.core.is_builtin(lang.program_id) for lang in langs):
            return interpreter._LangPatchScope()  # restores nothing
        return patch(fn)

    interpreter._patch_lang = patch_unless_patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()

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


# What fills the fences around a fenced tensor: a kernel that reads one gets NaN, or an
# index far out of any range, into its result.
FENCE_VALUES = {torch.uint8: 0xFF, torch.int32: 2**30, torch.int64: 2**40}


def fenced(x: torch.Tensor, pad: int = 1024) -> tuple[torch.Tensor, Callable[[], None]]:
    """x copied into the middle of a buffer with `pad` fence elements on each side (NaN for
    floats, FENCE_VALUES for integers): returns the copy (x's shape, contiguous) and a
    function asserting that the fences still hold their values, bit for bit (nothing wrote
    past the tensor)."""
    fill = float("nan") if x.is_floating_point() else FENCE_VALUES[x.dtype]
    buffer = torch.full((x.numel() + 2 * pad,), fill, dtype=x.dtype, device=x.device)
    inner = buffer[pad : pad + x.numel()].view(x.shape)
    inner.copy_(x)
    fences = torch.cat([buffer[:pad], buffer[pad + x.numel() :]]).clone()

    def untouched() -> None:
        now = torch.cat([buffer[:pad], buffer[pad + x.numel() :]])
        same = now.view(torch.uint8) == fences.view(torch.uint8)
        assert bool(same.all()), f"{int((~same).sum())} bytes written past a {tuple(x.shape)} {x.dtype} tensor"

    return inner, untouched


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
