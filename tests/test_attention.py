"""flash_attention forward, lse and gradients against the float64 reference."""

from dataclasses import dataclass

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES, PADDED_HEAD_DIMS, nan_padded

import tritium
from tritium import autotune, reference


@dataclass(frozen=True)
class Case:
    seqlen_q: int = 113
    seqlen_k: int = 113
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 64
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    mask: str = ""  # "" | "random" (some keys padded) | "empty" (a sequence with no key)
    batch: int = 2


CASES = {
    "dense": Case(),
    "causal": Case(causal=True, head_dim=80),
    "causal-q<k-gqa2": Case(seqlen_q=17, seqlen_k=113, heads_q=4, heads_kv=2, causal=True, head_dim=96),
    "causal-q>k": Case(seqlen_q=113, seqlen_k=17, causal=True, head_dim=16),
    "window-0": Case(seqlen_q=67, seqlen_k=67, window=(0, 0)),
    "window-1-causal": Case(seqlen_q=67, seqlen_k=67, window=(1, 0), causal=True),
    "window-beyond-seq": Case(seqlen_q=40, seqlen_k=70, window=(300, 300)),
    "window-asymmetric-q>k": Case(seqlen_q=100, seqlen_k=37, window=(5, 19)),
    "window-right-only": Case(seqlen_q=37, seqlen_k=100, window=(-1, 3)),
    "window-left-only-q<k": Case(seqlen_q=37, seqlen_k=100, window=(24, -1), heads_q=4, heads_kv=1),
    "gemma2": Case(seqlen_q=65, seqlen_k=65, heads_q=4, heads_kv=2, head_dim=256, causal=True, window=(15, 0), softcap=50.0, batch=1),
    "softcap-mqa8": Case(seqlen_q=49, seqlen_k=80, heads_q=8, heads_kv=1, head_dim=128, softcap=30.0, batch=1),
    "single-token": Case(seqlen_q=1, seqlen_k=1, causal=True),
    "decode-shape": Case(seqlen_q=1, seqlen_k=257, heads_q=4, heads_kv=1, causal=True),
    "padding": Case(seqlen_q=57, seqlen_k=70, mask="random", heads_q=4, heads_kv=2),
    "padding-empty-causal": Case(seqlen_q=70, seqlen_k=70, mask="empty", causal=True, window=(9, 0)),
    "long-257": Case(seqlen_q=257, seqlen_k=257, heads_q=2, heads_kv=1, causal=True, softcap=20.0, mask="random", batch=1),
}


def make_inputs(case: Case, dtype, requires_grad=True):
    shape_q = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    shape_k = (case.batch, case.seqlen_k, case.heads_kv, case.head_dim)
    q, k, v = (torch.randn(s, device=DEVICE, dtype=dtype) for s in (shape_q, shape_k, shape_k))
    mask = None
    if case.mask:
        mask = torch.rand(case.batch, case.seqlen_k, device=DEVICE) > 0.3
        if case.mask == "empty":
            mask[-1] = False
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, mask


def options(case: Case) -> dict:
    return dict(causal=case.causal, window_size=case.window, softcap=case.softcap)


def check_against_reference(q, k, v, mask, opts, dout=None):
    """Forward, lse and (when dout is given) gradients vs float64, FA criterion."""
    dtype = q.dtype
    out, lse = tritium.flash_attention(q, k, v, key_padding_mask=mask, return_lse=True, **opts)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth, lse_truth = reference.attention(*leaves64, key_padding_mask=mask, return_lse=True, **opts)
    same, lse_same = reference.attention(*leaves, key_padding_mask=mask, return_lse=True, **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, same, truth, dtype)
    assert_close("lse", lse, lse_same, lse_truth, dtype)
    if dout is None:
        return
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth_grads = torch.autograd.grad(truth, leaves64, dout.double())
    same_grads = torch.autograd.grad(same, leaves, dout)
    for name, g, s, t in zip(("dq", "dk", "dv"), grads, same_grads, truth_grads):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close(name, g, s, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name, dtype):
    case = CASES[name]
    q, k, v, mask = make_inputs(case, dtype)
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    check_against_reference(q, k, v, mask, options(case), dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (1, *PADDED_HEAD_DIMS))
def test_padded_head_dims(head_dim, dtype):
    """The forward, dQ and dK/dV kernels on head_dims padded to BLOCK_D, over masked and
    unmasked key blocks, with GQA. q, k, v and dout are NaN past head_dim: a load of a
    padded column would show as NaN."""
    q = nan_padded((1, 20, 2, head_dim), dtype).requires_grad_()
    k, v = (nan_padded((1, 70, 1, head_dim), dtype).requires_grad_() for _ in range(2))
    check_against_reference(q, k, v, None, dict(causal=True), nan_padded(q.shape, dtype))


def test_rows_without_keys_give_zero_and_finite_grads():
    q, k, v, mask = make_inputs(Case(mask="empty", seqlen_q=20, seqlen_k=30), torch.float32)
    out, lse = tritium.flash_attention(q, k, v, key_padding_mask=mask, return_lse=True)
    assert torch.all(out[-1] == 0) and torch.all(lse[-1] == float("-inf"))
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.all(q.grad[-1] == 0)


def test_noncontiguous_inputs():
    """Transposed (batch, heads, seq, dim) views and slices of a packed qkv need no copy."""
    b, s, h, d = 2, 45, 4, 32
    qkv = torch.randn(b, s, 3, h, d + 8, device=DEVICE)[..., :d]
    q, k, v = (qkv[:, :, i] for i in range(3))
    qt = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)
    dout = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)
    for x in (q, k, v, qt):
        assert not x.is_contiguous()
        x.requires_grad_()
    check_against_reference(qt, k, v, None, dict(causal=True), dout)
    check_against_reference(q, k, v, None, dict(window_size=(7, 3)), dout)


def test_expanded_grad_output():
    """out.sum().backward() hands the backward a stride-0 dout."""
    q, k, v, _ = make_inputs(Case(seqlen_q=20, seqlen_k=33, heads_q=4, heads_kv=2), torch.float32)
    dout = torch.ones(1, device=DEVICE).expand(q.shape)
    assert dout.stride() == (0, 0, 0, 0)
    check_against_reference(q, k, v, None, dict(causal=True), dout)


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (64, 16), (16, 16), (128, 64)])
def test_tile_shapes(block_m, block_n):
    """The span logic (masked edges, unmasked middle) must hold for any tile shape."""
    config = autotune.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
    case = Case(seqlen_q=75, seqlen_k=130, causal=True, window=(40, 0), mask="random", heads_q=2, heads_kv=1)
    q, k, v, mask = make_inputs(case, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    with autotune.override("attention_fwd", config), autotune.override("attention_bwd_dq", config), \
            autotune.override("attention_bwd_dkdv", config):
        check_against_reference(q, k, v, mask, options(case), dout)


def test_backward_is_deterministic():
    case = Case(seqlen_q=70, seqlen_k=90, heads_q=4, heads_kv=1, causal=True)
    q, k, v, _ = make_inputs(case, torch.float16)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float16)
    first = torch.autograd.grad(tritium.flash_attention(q, k, v, causal=True), (q, k, v), dout)
    second = torch.autograd.grad(tritium.flash_attention(q, k, v, causal=True), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_default_scale_and_explicit_scale():
    q, k, v, _ = make_inputs(Case(seqlen_q=30, seqlen_k=30), torch.float32, requires_grad=False)
    scale = 0.05
    out = tritium.flash_attention(q, k, v, softmax_scale=scale)
    truth = reference.attention(q.double(), k.double(), v.double(), softmax_scale=scale)
    same = reference.attention(q, k, v, softmax_scale=scale)
    assert_close("out", out, same, truth, torch.float32)


def test_torch_compile_fullgraph():
    case = Case(seqlen_q=33, seqlen_k=33, heads_q=4, heads_kv=2, causal=True, softcap=30.0)
    q, k, v, _ = make_inputs(case, torch.float32)

    def step(q, k, v):
        return tritium.flash_attention(q, k, v, causal=True, softcap=30.0).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = step(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    assert torch.allclose(loss, loss_eager)
    assert all(torch.allclose(a, b) for a, b in zip(grads, grads_eager))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_shapes_default_configs(head_dim, dtype):
    """Long sequences with the compiled, tuned tile shapes (several blocks in every phase)."""
    case = Case(seqlen_q=1500, seqlen_k=2100, heads_q=8, heads_kv=2, head_dim=head_dim, causal=True,
                window=(1000, 0), softcap=50.0 if head_dim == 256 else 0.0, batch=2)
    q, k, v, _ = make_inputs(case, dtype)
    check_against_reference(q, k, v, None, options(case), torch.randn(q.shape, device=DEVICE, dtype=dtype))
