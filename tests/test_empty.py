"""Empty inputs: every op returns results of the right shape, dtype and device (empty, or
0 and lse -inf for queries that see no key), gradients of its inputs' shapes (zeros where
an input had no effect), and launches no kernel where there is nothing to compute; the
fake implementations torch.compile traces agree."""

import functools
from typing import Callable, NamedTuple

import pytest
import torch
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import tritium
from tritium import nf4
from tritium.models.mlp import FeedForward, GatedMLP, Linear
from tritium.models.nf4_linear import NF4Linear
from tritium.models.norms import LayerNorm, RMSNorm
from tritium.models.rotary import RotaryEmbedding
from tritium.runtime import interpreted

H, F = torch.float16, torch.float32
INF = float("-inf")


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """The names of the Triton kernels launched while the test runs."""
    names = []
    kernel_class = InterpretedFunction if interpreted() else JITFunction
    run = kernel_class.run

    def counted(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counted)
    return names


def rand(*shape, dtype=H) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def table(seqlen: int, half: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and sin."""
    return rand(seqlen, half, dtype=F), rand(seqlen, half, dtype=F)


def zeros_layout(heads: int, seqlen: int = 128, block: int = 16, r: int = 1) -> torch.Tensor:
    """The eval layout, passed explicitly (no shared cache is filled under FakeTensorMode)."""
    return torch.zeros(heads, seqlen // block - 2, r, dtype=torch.int64, device=DEVICE)


def block_sparse(q, k, v):
    return tritium.block_sparse_attention(q, k, v, block_size=16, num_random_blocks=1, rand_attn=zeros_layout(q.shape[2]),
                                          return_lse=True)


def kvcache(batch, seqlen_q, max_seqlen, cache_seqlens, new=None):
    """flash_attention_with_kvcache with 4 q heads, 2 kv heads, head_dim 16."""
    k = v = None if new is None else rand(batch, new, 2, 16)
    if not isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens[0], dtype=torch.int32, device=DEVICE)
    return tritium.flash_attention_with_kvcache(rand(batch, seqlen_q, 4, 16), rand(batch, max_seqlen, 2, 16),
                                                rand(batch, max_seqlen, 2, 16), cache_seqlens, k=k, v=v,
                                                return_lse=True)


@functools.cache
def nf4_weight(out_features: int, double_quant: bool = False) -> nf4.NF4Weight:
    """A (out_features, 64) NF4 weight, quantized once (by an eager call: quantize reads
    its code tables on the host, which FakeTensorMode cannot)."""
    return nf4.quantize(rand(out_features, 64), blocksize=64, double_quant=double_quant)


def no_labels() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=DEVICE)


class Case(NamedTuple):
    op: Callable  # the differentiable inputs -> the outputs
    inputs: list  # shapes of the differentiable inputs (float16)
    outputs: list  # (shape, dtype) of each output, None for an output that is None
    fills: tuple = ()  # each output's value everywhere (None: not checked)
    work: bool = False  # something is still computed (a kernel runs), so grads are not all zero
    grad: bool = True  # the inputs require grad


CASES = {
    "attention-batch0": Case(
        lambda q, k, v: tritium.flash_attention(q, k, v, return_lse=True),
        [(0, 5, 2, 16), (0, 7, 1, 16), (0, 7, 1, 16)], [((0, 5, 2, 16), H), ((0, 2, 5), F)]),
    "attention-seqlen_q0": Case(
        lambda q, k, v: tritium.flash_attention(q, k, v, causal=True, return_lse=True),
        [(2, 0, 2, 16), (2, 7, 1, 16), (2, 7, 1, 16)], [((2, 0, 2, 16), H), ((2, 2, 0), F)]),
    "attention-seqlen_k0": Case(
        lambda q, k, v: tritium.flash_attention(q, k, v, causal=True, return_lse=True,
                                                key_padding_mask=torch.ones(2, 0, dtype=torch.bool, device=DEVICE)),
        [(2, 5, 2, 16), (2, 0, 1, 16), (2, 0, 1, 16)], [((2, 5, 2, 16), H), ((2, 2, 5), F)], fills=(0.0, INF)),
    "attention-heads0": Case(
        lambda q, k, v: tritium.flash_attention(q, k, v, return_lse=True),
        [(2, 5, 0, 16), (2, 7, 1, 16), (2, 7, 1, 16)], [((2, 5, 0, 16), H), ((2, 0, 5), F)]),
    "kvcache-batch0": Case(
        lambda: kvcache(0, 1, 10, (3,), new=1), [], [((0, 1, 4, 16), H), ((0, 4, 1), F)], grad=False),
    "kvcache-batch0-int-seqlens": Case(
        lambda: kvcache(0, 1, 10, 3, new=1), [], [((0, 1, 4, 16), H), ((0, 4, 1), F)], grad=False),
    "kvcache-seqlen_q0": Case(
        lambda: kvcache(2, 0, 10, 3), [], [((2, 0, 4, 16), H), ((2, 4, 0), F)], grad=False),
    "kvcache-max_seqlen0": Case(
        lambda: kvcache(2, 3, 0, 0), [], [((2, 3, 4, 16), H), ((2, 4, 3), F)], fills=(0.0, INF), grad=False),
    "block_sparse-batch0": Case(
        block_sparse, [(0, 128, 2, 16), (0, 128, 1, 16), (0, 128, 1, 16)], [((0, 128, 2, 16), H), ((0, 2, 128), F)]),
    "block_sparse-heads0": Case(
        block_sparse, [(1, 128, 0, 16), (1, 128, 1, 16), (1, 128, 1, 16)], [((1, 128, 0, 16), H), ((1, 0, 128), F)]),
    "bigbird_random_layout-heads0": Case(
        lambda: tritium.bigbird_random_layout(128, 16, 1, 0, device=DEVICE), [], [((0, 6, 1), torch.int64)]),
    "bigbird_random_layout-r0": Case(
        lambda: tritium.bigbird_random_layout(96, 16, 0, 2, device=DEVICE), [], [((2, 4, 0), torch.int64)]),
    "linear-rows0": Case(
        lambda x, w, b: tritium.linear(x, w, b, "gelu"), [(2, 0, 8), (6, 8), (6,)], [((2, 0, 6), H)]),
    "linear-out_features0": Case(
        lambda x, w, b: tritium.linear(x, w, b, "silu"), [(3, 8), (0, 8), (0,)], [((3, 0), H)]),
    "linear-in_features0": Case(  # act(bias): the GEMM's epilogue still runs
        lambda x, w, b: tritium.linear(x, w, b), [(3, 0), (6, 0), (6,)], [((3, 6), H)], work=True),
    "gated_mlp-rows0": Case(
        lambda x, gu, d: tritium.gated_mlp(x, gu, d, "gelu_tanh"), [(0, 3, 8), (12, 8), (8, 6)], [((0, 3, 8), H)]),
    "gated_mlp-pair-rows0": Case(
        lambda x, g, u, d: tritium.gated_mlp(x, (g, u), d, "silu"), [(0, 8), (6, 8), (6, 8), (8, 6)], [((0, 8), H)]),
    "gated_mlp-intermediate0": Case(  # the down projection of nothing: zeros
        lambda x, gu, d: tritium.gated_mlp(x, gu, d, "silu"), [(3, 8), (0, 8), (8, 0)], [((3, 8), H)], fills=(0.0,),
        work=True),
    "rms_norm-rows0": Case(
        lambda x, w: tritium.rms_norm(x, w, 1e-6, offset=1.0), [(2, 0, 8), (8,)], [((2, 0, 8), H)]),
    "rms_norm-residual-rows0": Case(
        lambda x, r, w: tritium.rms_norm(x, w, 1e-6, residual=r), [(0, 8), (0, 8), (8,)], [((0, 8), H), ((0, 8), H)]),
    "layer_norm-rows0": Case(
        lambda x, w, b: tritium.layer_norm(x, w, b, 1e-5), [(0, 4, 8), (8,), (8,)], [((0, 4, 8), H)]),
    "rotary-batch0": Case(
        lambda q, k: tritium.apply_rotary(q, k, *table(4)), [(0, 4, 2, 16), (0, 4, 1, 16)],
        [((0, 4, 2, 16), H), ((0, 4, 1, 16), H)]),
    "rotary-seqlen0": Case(
        lambda q, k: tritium.apply_rotary(q, k, *table(0), interleaved=True), [(2, 0, 2, 16), (2, 0, 1, 16)],
        [((2, 0, 2, 16), H), ((2, 0, 1, 16), H)]),
    "rotary-heads0-no-k": Case(
        lambda q: tritium.apply_rotary(q, None, *table(4)), [(2, 4, 0, 16)], [((2, 4, 0, 16), H), None]),
    "rotary-heads_q0": Case(  # k still rotated
        lambda q, k: tritium.apply_rotary(q, k, *table(4)), [(2, 4, 0, 16), (2, 4, 1, 16)],
        [((2, 4, 0, 16), H), ((2, 4, 1, 16), H)], work=True),
    "rotary-inplace-seqlen0": Case(
        lambda: tritium.apply_rotary(rand(2, 0, 2, 16), rand(2, 0, 1, 16), *table(0), inplace=True), [],
        [((2, 0, 2, 16), H), ((2, 0, 1, 16), H)]),
    "nf4.matmul-rows0": Case(
        lambda x, b: nf4.matmul(x, nf4_weight(6), b), [(2, 0, 64), (6,)], [((2, 0, 6), H)]),
    "nf4.matmul-out_features0": Case(
        lambda x, b: nf4.matmul(x, nf4_weight(0, True), b), [(3, 64), (0,)], [((3, 0), H)]),
    "nf4.dequantize-empty": Case(
        lambda: nf4.dequantize(nf4_weight(0, True), F), [], [((0, 64), F)]),
    "linear_cross_entropy-tokens0-sum": Case(
        lambda h, w: tritium.linear_cross_entropy(h, w, no_labels(), reduction="sum"), [(0, 16), (30, 16)],
        [((), F)], fills=(0.0,)),
    "linear_cross_entropy-tokens0-none": Case(
        lambda h, w, b: tritium.linear_cross_entropy(h, w, no_labels(), bias=b, reduction="none"),
        [(0, 16), (30, 16), (30,)], [((0,), F)]),
}


def run_case(case: Case):
    """(outputs, inputs) of one call, the outputs as a tuple."""
    inputs = [rand(*shape).requires_grad_(case.grad) for shape in case.inputs]
    outs = case.op(*inputs)
    return (outs if isinstance(outs, tuple) else (outs,)), inputs


def check_shapes(case: Case, outs, inputs, device) -> None:
    assert len(outs) == len(case.outputs)
    for out, expected in zip(outs, case.outputs):
        if expected is None:
            assert out is None
            continue
        assert (tuple(out.shape), out.dtype, out.device.type) == (*expected, device)
    differentiable = [out for out in outs if out is not None and out.requires_grad]
    assert bool(differentiable) == bool(case.inputs and case.grad)
    if differentiable:
        sum(out.float().sum() for out in differentiable).backward()
        for x in inputs:
            assert x.grad is not None and (x.grad.shape, x.grad.dtype) == (x.shape, x.dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_empty_inputs(name, launches):
    case = CASES[name]
    outs, inputs = run_case(case)
    check_shapes(case, outs, inputs, torch.device(DEVICE).type)
    for out, fill in zip(outs, case.fills):
        if fill is not None:
            assert torch.equal(out, torch.full_like(out, fill))
    if not case.work:
        assert launches == []
        assert all(not x.grad.count_nonzero() for x in inputs if x.grad is not None)


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("bigbird")])
def test_fake_implementations_agree(name):
    """Under FakeTensorMode, as torch.compile traces (no host reads of tensor values), the
    custom ops' fake implementations give the shapes and dtypes of an eager call, gradients
    included."""
    case = CASES[name]
    check_shapes(case, *run_case(case), torch.device(DEVICE).type)
    with FakeTensorMode(allow_non_fake_inputs=True):  # real: tables cached on the host
        outs, inputs = run_case(case)
        check_shapes(case, outs, inputs, torch.device(DEVICE).type)


def test_linear_without_in_features_is_act_bias():
    x, w, b = (rand(*shape).requires_grad_() for shape in ((3, 0), (6, 0), (6,)))
    out = tritium.linear(x, w, b, "gelu")
    expected = torch.nn.functional.gelu(b.detach().float()).half().expand(3, 6)
    assert torch.allclose(out, expected, atol=1e-3)
    out.float().sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (6, 0) and b.grad.shape == (6,)


def test_rotary_without_q_heads_rotates_k():
    cos, sin = table(4)
    q, k = rand(2, 4, 0, 16), rand(2, 4, 1, 16)
    _, k_alone = tritium.apply_rotary(q, k, cos, sin)
    _, k_with_q = tritium.apply_rotary(rand(2, 4, 1, 16), k, cos, sin)
    assert torch.equal(k_alone, k_with_q)


def test_kvcache_without_new_tokens_leaves_the_cache(launches):
    k_cache, v_cache = rand(2, 10, 2, 16), rand(2, 10, 2, 16)
    before = k_cache.clone(), v_cache.clone()
    q, seqlens = rand(2, 1, 4, 16), torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)
    empty = rand(2, 0, 2, 16)
    out = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=empty, v=empty)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    assert "_append_kernel" not in launches
    assert torch.equal(out, tritium.flash_attention_with_kvcache(q, k_cache, v_cache, seqlens))


def test_kvcache_without_queries_still_appends(launches):
    """seqlen_q = 0 with new keys: the cache is written (the caller advances
    cache_seqlens past them), no attention runs."""
    k_cache, v_cache = rand(2, 10, 2, 16), rand(2, 10, 2, 16)
    k, v = rand(2, 2, 2, 16), rand(2, 2, 2, 16)
    out = tritium.flash_attention_with_kvcache(rand(2, 0, 4, 16), k_cache, v_cache, 3, k=k, v=v)
    assert out.shape == (2, 0, 4, 16)
    assert torch.equal(k_cache[:, 3:5], k) and torch.equal(v_cache[:, 3:5], v)
    assert launches == ["_append_kernel"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_nf4_empty_weight():
    w = nf4_weight(0, double_quant=True)
    assert w.shape == (0, 64) and w.packed.shape == (0, 1) and w.absmax.shape == (0,) and w.absmax2.shape == (0,)
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 0, device=DEVICE, dtype=H))
    assert layer(rand(3, 64)).shape == (3, 0)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: Linear(8, 6, activation="gelu"), (2, 0, 8)),
        (lambda: FeedForward(8, 12), (0, 8)),
        (lambda: GatedMLP(8, 6, "gelu_tanh"), (0, 3, 8)),
        (lambda: RMSNorm.gemma2(8), (0, 8)),
        (lambda: LayerNorm(8), (2, 0, 8)),
        (lambda: NF4Linear.from_linear(torch.nn.Linear(64, 6)), (0, 64)),
    ],
    ids=["Linear", "FeedForward", "GatedMLP", "RMSNorm", "LayerNorm", "NF4Linear"],
)
def test_model_modules(make, shape, launches):
    module = make().to(device=DEVICE, dtype=H)
    x = rand(*shape).requires_grad_()
    y = module(x)
    assert y.shape == (*shape[:-1], y.shape[-1]) and y.numel() == 0 and y.dtype == H
    y.float().sum().backward()
    leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
    assert all(p.grad is not None and p.grad.shape == p.shape and not p.grad.count_nonzero() for p in leaves)
    assert launches == []


def test_rotary_embedding_module_without_tokens(launches):
    rotary = RotaryEmbedding(16, max_position_embeddings=32, device=DEVICE)
    q, k = rand(2, 0, 2, 16), rand(2, 0, 1, 16)
    q_rot, k_rot = rotary(q, k, torch.zeros(2, 0, dtype=torch.long, device=DEVICE))
    assert q_rot.shape == q.shape and k_rot.shape == k.shape and launches == []


def test_torch_compile_fullgraph(launches):
    """Empty problems traced with fullgraph=True: attention without keys, a linear over no
    rows and a KV-cache step over an empty batch; gradients as in eager."""

    def step(q, k, v, x, w, q_cache, k_cache, v_cache):
        out, lse = tritium.flash_attention(q, k, v, causal=True, return_lse=True)
        y = tritium.rms_norm(tritium.linear(x, w, None, "gelu"), torch.ones(6, device=DEVICE, dtype=H))
        decoded = tritium.flash_attention_with_kvcache(q_cache, k_cache, v_cache, 0)
        return out, lse, y, decoded

    leaves = [rand(2, 5, 2, 16), rand(2, 0, 1, 16), rand(2, 0, 1, 16), rand(0, 8), rand(6, 8)]
    leaves = [x.requires_grad_() for x in leaves]
    out, lse, y, decoded = torch.compile(step, fullgraph=True, backend="aot_eager")(
        *leaves, rand(0, 1, 4, 16), rand(0, 10, 2, 16), rand(0, 10, 2, 16))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, INF))
    assert (y.shape, decoded.shape) == ((0, 6), (0, 1, 4, 16))
    (out.float().sum() + y.float().sum()).backward()
    assert all(x.grad.shape == x.shape and not x.grad.count_nonzero() for x in leaves)
    assert launches == []
