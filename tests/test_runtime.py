"""tritium.runtime: custom ops whose plain eager calls skip torch's dispatcher, the
host-side integer helpers, and the interpreter's version check."""

import importlib.metadata

import numpy
import pytest
import torch
import triton
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode

import tritium
from tritium import runtime
from tritium.kernels import attention_kvcache


def kvcache_inputs():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    k_cache, v_cache = (torch.randn(1, 32, 2, 16, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(1, 1, 2, 16, device=DEVICE) for _ in range(2))
    return q, k_cache, v_cache, k, v


def test_eager_call_skips_dispatcher_and_bumps_versions(monkeypatch):
    q, k_cache, v_cache, k, v = kvcache_inputs()
    versions = k_cache._version, v_cache._version
    monkeypatch.setattr(attention_kvcache._kvcache_op, "op", None)  # any dispatcher call would fail
    out = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, 5, k=k, v=v)
    assert torch.equal(k_cache[0, 5], k[0, 0]) and out.shape == q.shape
    assert k_cache._version > versions[0] and v_cache._version > versions[1], "in-place writes went unrecorded"


def test_profiler_sees_the_op_by_name():
    q, k_cache, v_cache, k, v = kvcache_inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tritium.flash_attention_with_kvcache(q, k_cache, v_cache, 5, k=k, v=v)
    assert "tritium::flash_attention_with_kvcache" in {e.name for e in prof.events()}


@pytest.mark.parametrize("where", ["fake", "meta", "plain"])
def test_needs_dispatcher(where):
    if where == "fake":
        with FakeTensorMode():
            assert runtime._needs_dispatcher((torch.empty(2), 3))
    elif where == "meta":
        assert runtime._needs_dispatcher((torch.empty(2, device="meta"),))
    else:
        assert not runtime._needs_dispatcher((torch.empty(2), torch.nn.Parameter(torch.empty(2)), 1.0, None))


def test_fake_tensors_get_shapes_from_the_op():
    with FakeTensorMode() as mode:
        q, k_cache, v_cache, k, v = (mode.from_tensor(x) for x in kvcache_inputs())
        out = attention_kvcache._kvcache_op(q, k_cache, v_cache, torch.zeros(1, dtype=torch.int32), k, v, None,
                                            -1, 0, 0.0, 0.25, 0)
    assert out[0].shape == q.shape and out[1].shape == (1, 4, 1)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 1000, 1 << 20])
def test_integer_helpers_match_triton(n):
    assert runtime.next_power_of_2(max(n, 1)) == triton.next_power_of_2(max(n, 1))
    for b in (1, 3, 16, 64):
        assert runtime.cdiv(n, b) == triton.cdiv(n, b)


def test_inference_skips_autograd_function(monkeypatch):
    """Nothing requires grad: the Function's forward runs alone; with grad it is recorded."""
    from tritium.kernels.norm import NormFunction

    x, w = torch.randn(3, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    expected = tritium.rms_norm(x, w, 1e-6)
    monkeypatch.setattr(NormFunction, "apply", None)  # calling it would fail
    assert torch.equal(tritium.rms_norm(x, w, 1e-6), expected)
    monkeypatch.undo()
    y = tritium.rms_norm(x, w.requires_grad_(), 1e-6)
    assert y.grad_fn is not None and torch.equal(y.detach(), expected)


def test_interpreter_and_numpy_versions(monkeypatch):
    """Triton's interpreter before 3.7 with numpy 2.4 or newer fails inside every kernel with
    a runtime loop bound: under TRITON_INTERPRET=1, importing tritium says so, with the fix."""
    for triton_version, numpy_version in (("3.9.0", "2.4.6"), ("3.7.0", "2.4.0"), ("3.6.0", "2.3.5"),
                                          ("3.10.1", "3.0.0")):
        assert runtime.interpreter_problem(triton_version, numpy_version) is None
    for triton_version, numpy_version in (("3.6.0", "2.4.6"), ("3.5.1+git8a1f0c2", "2.5.0rc1")):
        problem = runtime.interpreter_problem(triton_version, numpy_version)
        assert f"Triton {triton_version} cannot run tritium's kernels with numpy {numpy_version}" in problem
        assert problem.endswith("install 'numpy<2.4' or 'triton>=3.7'")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"triton": "3.6.0"}[name])
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(ImportError, match=r"Triton 3.6.0 cannot run .* numpy 2.4.6"):
        runtime._check_interpreter()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    runtime._check_interpreter()
