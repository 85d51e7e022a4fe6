"""tritium.linear_cross_entropy against a float64 PyTorch reference: the loss and the
gradients of hidden, weight and bias, at most twice as far from float64 as eager PyTorch in
the same dtype (logits materialised there, as training computes them); odd token and
vocabulary counts, softcap, ignored rows (all of them too), label smoothing, z-loss, both
reductions and none, the causal shift, strided inputs; memory that never holds the logits,
determinism, torch.compile, and the errors bad input gets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from accuracy import assert_close
from torch.overrides import TorchFunctionMode

import tritium
from tritium import reference


@dataclass
class Case:
    tokens: int = 17
    hidden: int = 24
    vocab: int = 113
    softcap: float = 0.0
    smoothing: float = 0.0
    z_loss: float = 0.0
    reduction: str = "mean"
    bias: bool = False
    ignored: str = "some"  # "none", "some" or "all"
    shift: bool = False
    strided: bool = False


CASES = [
    Case(),
    Case(tokens=1, vocab=50, reduction="sum"),
    Case(tokens=33, hidden=40, vocab=70, softcap=30.0, smoothing=0.1, z_loss=1e-3, bias=True, reduction="sum"),
    Case(tokens=20, vocab=97, softcap=5.0, reduction="none", ignored="none", strided=True),
    Case(tokens=16, vocab=64, smoothing=0.2, ignored="all"),
    Case(tokens=16, vocab=129, z_loss=1e-2, bias=True, shift=True),
]


def make_inputs(case: Case, dtype: torch.dtype):
    """hidden ((2, tokens / 2, hidden) with shift, else (tokens, hidden)), weight scaled so
    the logits span a few units, labels with every fourth (or every) row ignored."""
    generator = torch.Generator().manual_seed(case.tokens * 1000 + case.vocab)
    shape = (2, case.tokens // 2) if case.shift else (case.tokens,)
    if case.strided:  # a transposed view: rows are not contiguous
        hidden = torch.randn(case.hidden, *shape, generator=generator).to(dtype).movedim(0, -1)
    else:
        hidden = torch.randn(*shape, case.hidden, generator=generator).to(dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=generator) * 2 / case.hidden**0.5).to(dtype)
    bias = torch.randn(case.vocab, generator=generator).to(dtype) if case.bias else None
    labels = torch.randint(0, case.vocab, shape, generator=generator)
    if case.ignored == "all":
        labels.fill_(-100)
    elif case.ignored == "some":
        labels.view(-1)[::4] = -100
    return hidden, weight, bias, labels


def loss_and_grads(fn, case: Case, hidden, weight, bias, labels, grad=None):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None, softcap=case.softcap,
              reduction=case.reduction, label_smoothing=case.smoothing, z_loss=case.z_loss, shift=case.shift)
    if grad is None:
        grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((loss.double() * grad).nan_to_num().sum(), leaves)
    return loss, grads, grad


def case_id(case: Case) -> str:
    return f"t{case.tokens}v{case.vocab}{case.reduction}-{case.ignored}{'-cap' if case.softcap else ''}" \
           f"{'-shift' if case.shift else ''}"


# Every case in float32 and float16; bfloat16 (slow under the interpreter) on the plain case
# and on the one with every option.
MATRIX = [(case, dtype) for case in CASES for dtype in (torch.float32, torch.float16)] + [
    (CASES[0], torch.bfloat16), (CASES[2], torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", MATRIX, ids=[f"{case_id(c)}-{str(d)[6:]}" for c, d in MATRIX])
def test_loss_and_gradients_against_float64(case, dtype):
    inputs = make_inputs(case, dtype)
    ours, ours_grads, grad = loss_and_grads(tritium.linear_cross_entropy, case, *inputs)
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    truth, truth_grads, _ = loss_and_grads(reference.linear_cross_entropy, case, *wide, grad=grad)
    same, same_grads, _ = loss_and_grads(reference.linear_cross_entropy, case, *inputs, grad=grad)
    assert ours.dtype == torch.float32 and ours.shape == truth.shape
    if case.ignored == "all" and case.reduction == "mean":  # 0 / 0, as torch: NaN, and zero gradients
        assert ours.isnan() and truth.isnan()
        assert all(not g.any() for g in ours_grads)
        return
    assert_close("loss", ours, same, truth, dtype)
    for name, mine, their, true in zip(("dhidden", "dweight", "dbias"), ours_grads, same_grads, truth_grads):
        assert mine.dtype == dtype and mine.shape == true.shape
        assert_close(name, mine, their, true, dtype)


class Allocations(TorchFunctionMode):
    """The largest tensor any torch function returns inside the block (kernels' buffers
    included: tritium's launchers call torch from Python)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits(monkeypatch):
    """Forward and backward at 64 tokens x 2048 classes, hidden 16: no tensor as large as
    the logits (131072), none larger than the weight (32768) but the scratch, here made
    small; eager PyTorch builds the logits (the check can fail)."""
    monkeypatch.setattr(tritium.kernels.loss, "SCRATCH_BYTES", 4 * 16 * 512)
    case = Case(tokens=64, hidden=16, vocab=2048, softcap=30.0, smoothing=0.1, bias=True)
    inputs = make_inputs(case, torch.float32)
    logits = case.tokens * case.vocab
    for fn, large in ((tritium.linear_cross_entropy, False), (reference.linear_cross_entropy, True)):
        with Allocations() as seen:
            loss_and_grads(fn, case, *inputs)
        assert (seen.largest >= logits) == large, (fn, seen.largest)
        if not large:
            assert seen.largest <= case.vocab * case.hidden


def test_deterministic_and_chunked(monkeypatch):
    """Two runs give the same bits; so does a scratch small enough that the rows and the
    vocabulary go through it in several chunks."""
    case = Case(tokens=40, hidden=24, vocab=200, bias=True, softcap=10.0)
    inputs = make_inputs(case, torch.bfloat16)
    first = loss_and_grads(tritium.linear_cross_entropy, case, *inputs)
    again = loss_and_grads(tritium.linear_cross_entropy, case, *inputs)
    monkeypatch.setattr(tritium.kernels.loss, "SCRATCH_BYTES", 4 * 24 * 48)
    chunked = loss_and_grads(tritium.linear_cross_entropy, case, *inputs)
    for run in (again, chunked):
        assert torch.equal(first[0], run[0])
        assert all(torch.equal(a, b) for a, b in zip(first[1], run[1]))


def test_torch_compile_fullgraph():
    case = Case(tokens=16, vocab=50, softcap=30.0, bias=True)
    hidden, weight, bias, labels = make_inputs(case, torch.float32)

    def step(hidden, weight, bias):
        return tritium.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=30.0, label_smoothing=0.1)

    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    eager = step(*leaves)
    assert torch.allclose(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        assert torch.allclose(a, b)


def test_bad_input_is_refused_by_name():
    hidden, weight, bias, labels = make_inputs(Case(), torch.float32)
    bad = [
        (dict(hidden=hidden[0]), ValueError, "hidden: expected a tensor"),
        (dict(weight=weight.double()), TypeError, "weight"),
        (dict(weight=weight[:, :5]), ValueError, "weight"),
        (dict(labels=labels[:5]), ValueError, "labels: shape"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(labels=labels.clone().fill_(113)), ValueError, "labels: 113 is neither ignore_index"),
        (dict(bias=bias if bias is not None else weight[:, 0].clone()[:7]), ValueError, "bias"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(shift=True), ValueError, "shift=True"),
        (dict(vocab_start=3), ValueError, "only with process_group"),
        (dict(process_group=object(), vocab_start=10, vocab_size=weight.shape[0] + 5), ValueError,
         "must lie inside the vocabulary"),
        (dict(process_group=object(), vocab_start=0), ValueError, "must lie inside the vocabulary"),
        (dict(process_group=object(), vocab_start=1.0, vocab_size=1000), TypeError, "vocab_start"),
    ]
    for change, error, message in bad:
        args = dict(hidden=hidden, weight=weight, labels=labels)
        options = {k: v for k, v in change.items() if k not in args}
        args.update({k: v for k, v in change.items() if k in args})
        with pytest.raises(error, match=message):
            tritium.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **options)
