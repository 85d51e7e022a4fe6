"""Tuning through the real ops: each op's launch closure runs every candidate config (in
the interpreter here), the fastest by an injected timer wins, the result still equals the
reference, and a new process finds the winners in the cache. A fake SKU stands in for the GPU."""

import itertools

import pytest
import torch
from conftest import DEVICE

import tritium
from tritium import autotune, reference
from tritium.autotune import kernel as kernel_module
from tritium.autotune import store
from tritium.autotune.device import Sku
from tritium.kernels.attention import ATTENTION_FWD
from tritium.kernels.attention_backward import ATTENTION_BWD_DKDV, ATTENTION_BWD_DQ
from tritium.kernels.norm import NORM_BWD, NORM_FWD

SKU = Sku("NVIDIA Fake Tuning GPU", 8, 16, "9.0")


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(kernel_module, "interpreted", lambda: False)
    monkeypatch.setattr(kernel_module, "current_sku", lambda: SKU)
    for kernel in (ATTENTION_BWD_DQ, ATTENTION_BWD_DKDV):  # keep the interpreter's work small
        monkeypatch.setattr(kernel, "space", {"BLOCK_M": (16, 32), "BLOCK_N": (16, 32), "num_warps": (4,),
                                              "num_stages": (1,)})
    autotune.reset()
    yield
    autotune.reset()


class LaterIsFaster:
    """A timer under which every timing is faster than the one before: the last candidate
    of each search wins, and the calls are counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return 1.0 / self.calls


def test_attention_tunes_through_its_launch_closures(fake_gpu):
    q = torch.randn(1, 16, 2, 32, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 16, 1, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    timer = LaterIsFaster()
    with autotune.tuning(timer=timer):
        out = tritium.flash_attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
    truth = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert torch.allclose(out.double(), truth, atol=1e-5), "repeated launches changed the result"

    winners = {name: result for name, _, result in autotune.TUNED}
    assert set(winners) == {"attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"}
    problem = dict(head_dim=32, dtype=q.dtype, seqlen_q=16, seqlen_k=16, window_left=-1, window_right=0,
                   softcap=0.0, group=2)
    for name, result in winners.items():
        kernel = autotune.KERNELS[name]
        assert result.config == kernel.candidates(kernel.key(**problem))[-1]
    tried = sum(result.tried + 1 for result in winners.values())  # + the default of each
    assert timer.calls == tried

    autotune.reset()  # a new process: the cache answers, nothing is timed again
    with autotune.tuning(timer=timer):
        tritium.flash_attention(q, k, v, causal=True)
    assert timer.calls == tried and not autotune.TUNED



def _in_space(kernel, config) -> bool:
    values = {**config.meta, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return values.keys() == kernel.space.keys() and all(values[k] in kernel.space[k] for k in values)


@pytest.mark.parametrize("kernel", [ATTENTION_FWD, ATTENTION_BWD_DQ, ATTENTION_BWD_DKDV])
def test_attention_defaults_lie_in_their_space(kernel):
    # A default outside the space could never be compared with a tuned config of the
    # space, and a cached copy of it would be refused as foreign to the kernel.
    for head_dim, dtype, pack, seqlen in itertools.product(
        (8, 64, 96, 128, 192, 256), (torch.float16, torch.bfloat16, torch.float32), (1, 4, 16, 64), (1, 128, 16384)
    ):
        bucket = kernel.key(head_dim=head_dim, dtype=dtype, seqlen_q=seqlen, seqlen_k=seqlen, window_left=-1,
                            window_right=0, softcap=0.0, group=pack, pack=pack)
        assert _in_space(kernel, kernel.default(**bucket)), bucket


@pytest.mark.parametrize("kernel", [NORM_FWD, NORM_BWD])
def test_norm_defaults_lie_in_their_space(kernel):
    for hidden, rows in itertools.product((1, 16, 64, 1000, 4096, 65536), (1, 7, 512, 1 << 20)):
        bucket = kernel.key(hidden=hidden, dtype=torch.bfloat16, rows=rows)
        assert _in_space(kernel, kernel.default(**bucket)), bucket
