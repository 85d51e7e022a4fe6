"""rms_norm and layer_norm: outputs and gradients against the float64 reference and against
transformers' own modules, the fused residual, strides, tile shapes, errors, torch.compile."""

from dataclasses import dataclass

import pytest
import torch
import triton
from accuracy import assert_close
from conftest import DEVICE, DTYPES
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.glm4.modeling_glm4 import Glm4RMSNorm

from tritium import autotune, reference
from tritium.kernels import norm
from tritium.models.norms import LayerNorm, RMSNorm


@dataclass(frozen=True)
class Style:
    rms: bool = True
    offset: float = 0.0
    multiply_in_float32: bool | None = None
    bias: bool = True  # LayerNorm only
    eps: float = 1e-6

    def __call__(self, impl, x, weight, bias=None, residual=None):
        """The op of `impl` (tritium.kernels.norm or tritium.reference) in this style."""
        if self.rms:
            return impl.rms_norm(x, weight, self.eps, offset=self.offset, residual=residual,
                                 multiply_in_float32=self.multiply_in_float32)
        return impl.layer_norm(x, weight, bias, self.eps, residual=residual)


STYLES = {
    "gemma2": Style(offset=1.0),
    "llama": Style(),
    "offset-cast-first": Style(offset=1.0, multiply_in_float32=False),
    "layer": Style(rms=False, eps=1e-5),
    "layer-no-bias": Style(rms=False, bias=False, eps=1e-5),
}
SHAPES = [(1, 2304), (7, 1000), (129, 100), (2, 3, 64)]


def make_inputs(style: Style, shape, dtype, residual: bool) -> dict:
    """Leaves by argument name (None where absent); weights near the scale 1 they encode."""
    hidden = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    weight = (1 - style.offset + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)
    bias = torch.randn(hidden, device=DEVICE, dtype=dtype) if not style.rms and style.bias else None
    res = torch.randn(shape, device=DEVICE, dtype=dtype) if residual else None
    return {"x": x, "weight": weight, "bias": bias, "residual": res}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_against_reference(style: Style, inputs: dict, grads: tuple | None = None):
    """Outputs and (with grads, one per output) gradients of every leaf vs float64."""
    names = [n for n, t in inputs.items() if t is not None]
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
    wide = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    same = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    dtype = inputs["x"].dtype
    outs = as_tuple(style(norm, **{**inputs, **leaves}))
    truth = as_tuple(style(reference, **{**inputs, **wide}))
    same_outs = as_tuple(style(reference, **{**inputs, **same}))
    for name, k, s, t in zip(("y", "new_residual"), outs, same_outs, truth):
        assert k.dtype == dtype and k.is_contiguous()
        assert_close(name, k, s, t, dtype)
        if dtype != torch.float32:  # same roundings as PyTorch: the results agree bitwise almost everywhere
            assert (k != s).float().mean() < 1e-2, f"{name}: rounded where the reference does not"
    if grads is None:
        return
    got = torch.autograd.grad(outs, list(leaves.values()), grads)
    want = torch.autograd.grad(truth, list(wide.values()), [g.double() for g in grads])
    same_grads = torch.autograd.grad(same_outs, list(same.values()), grads)
    for name, g, s, t in zip(names, got, same_grads, want):
        assert g.dtype == leaves[name].dtype
        assert_close(f"d{name}", g, s, t, dtype)


def random_grads(outs) -> tuple:
    return tuple(torch.randn_like(o) for o in as_tuple(outs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", list(STYLES))
def test_forward_backward(name, residual, shape, dtype):
    style = STYLES[name]
    inputs = make_inputs(style, shape, dtype, residual)
    grads = random_grads(style(norm, **inputs))
    check_against_reference(style, inputs, grads)


@pytest.mark.parametrize("name", list(STYLES))
def test_weight_in_another_dtype(name):
    """float32 weights with float16 x: cast as the reference casts them (to x's dtype, or
    to float32 for Gemma's product); the gradients come back in the weight's dtype."""
    style = STYLES[name]
    inputs = make_inputs(style, (7, 1000), torch.float16, residual=True)
    inputs["weight"] = inputs["weight"].float() + 1e-3 * torch.randn(1000, device=DEVICE)
    if inputs["bias"] is not None:
        inputs["bias"] = inputs["bias"].float() + 1e-3 * torch.randn(1000, device=DEVICE)
    check_against_reference(style, inputs, random_grads(style(norm, **inputs)))


@pytest.mark.parametrize("name", ["gemma2", "layer"])
def test_gradient_of_one_output_only(name):
    """With a residual, either output alone may carry the loss (the other gets no gradient)."""
    style = STYLES[name]
    inputs = make_inputs(style, (7, 100), torch.float32, residual=True)
    x, res = (inputs[n].requires_grad_() for n in ("x", "residual"))
    y, s = style(norm, **inputs)
    y64, s64 = style(reference, **{n: t.double() if t is not None else None for n, t in inputs.items()})
    for out, out64 in ((y, y64), (s, s64)):
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, res), dout, retain_graph=True)
        want = torch.autograd.grad(out64, (x, res), dout.double(), retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- transformers' modules


def _pair(kind: str, hidden: int, dtype):
    """A transformers module with random weights, and ours loaded from its state_dict."""
    if kind == "gemma2":
        theirs, ours = Gemma2RMSNorm(hidden, eps=1e-6), RMSNorm.gemma2(hidden, eps=1e-6)
    elif kind == "glm4":
        theirs, ours = Glm4RMSNorm(hidden, eps=1e-6), RMSNorm.llama(hidden, eps=1e-6)
    else:
        theirs, ours = torch.nn.LayerNorm(hidden), LayerNorm(hidden)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.5 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())  # strict: the parameter names match
    return theirs.to(DEVICE, dtype), ours.to(DEVICE, dtype)


def _reference64(kind: str, module, x: torch.Tensor):
    params = {n: p.detach().double().requires_grad_() for n, p in module.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    if kind == "layer":
        out = reference.layer_norm(x64, params["weight"], params["bias"], module.eps)
    else:
        out = reference.rms_norm(x64, params["weight"], 1e-6, offset=1.0 if kind == "gemma2" else 0.0)
    return out, [x64, *params.values()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gemma2", "glm4", "layer"])
def test_matches_transformers_modules(kind, dtype):
    """Our module (loaded from theirs) vs theirs in the same dtype, both vs float64: the
    FlashAttention criterion on output and gradients, and the rounded outputs agree
    bitwise almost everywhere (a casting mistake flips ~30% of them)."""
    theirs, ours = _pair(kind, 2304, dtype)
    x = torch.randn(3, 43, 2304, device=DEVICE, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(x)
    mine, same = ours(x), theirs(x)
    truth, leaves64 = _reference64(kind, theirs, x)
    assert_close("y", mine, same, truth, dtype)
    if dtype != torch.float32:
        assert (mine != same).float().mean() < 5e-3
    got = torch.autograd.grad(mine, [x, *ours.parameters()], dout)
    same_grads = torch.autograd.grad(same, [x, *theirs.parameters()], dout)
    want = torch.autograd.grad(truth, leaves64, dout.double())
    for name, g, s, t in zip(("dx", "dweight", "dbias"), got, same_grads, want):
        assert_close(name, g, s, t, dtype)


def test_module_init_matches_transformers():
    assert torch.equal(RMSNorm.gemma2(64).weight, Gemma2RMSNorm(64).weight)
    assert torch.equal(RMSNorm.llama(64).weight, Glm4RMSNorm(64).weight)
    ln, theirs = LayerNorm(64, eps=1e-12), torch.nn.LayerNorm(64, eps=1e-12)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-12
    assert all(torch.equal(a, b) for a, b in zip(ln.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("kind", ["gemma2", "glm4", "layer"])
def test_modules_fuse_the_residual(kind):
    """ours(x, residual) == (theirs(x + residual), x + residual), the sum rounded to x's
    dtype before normalising, as transformers' decoder layers add."""
    dtype = torch.float16
    theirs, ours = _pair(kind, 1000, dtype)
    x, res = (torch.randn(2, 7, 1000, device=DEVICE, dtype=dtype) for _ in range(2))
    y, s = ours(x, res)
    assert torch.equal(s, x + res)
    assert (y != theirs(x + res)).float().mean() < 5e-3


@pytest.mark.parametrize("name", list(STYLES))
def test_eps_where_it_matters(name):
    """Rows with mean(x^2) near eps, where a misplaced eps shows."""
    style = STYLES[name]
    inputs = make_inputs(style, (7, 1000), torch.float32, residual=True)
    inputs["x"], inputs["residual"] = 1e-3 * inputs["x"], 1e-3 * inputs["residual"]
    check_against_reference(style, inputs, random_grads(style(norm, **inputs)))


# ----------------------------------------------------------------------------- layouts and launch shapes


def test_strided_inputs():
    """Strided rows, a strided hidden dim and leading dims that do not flatten to one
    stride (copied): every tensor, the gradient outputs included."""
    hidden = 100
    rows_strided = torch.randn(7, 2 * hidden, device=DEVICE)[:, :hidden]
    cols_strided = torch.randn(hidden, 3, 5, device=DEVICE).permute(1, 2, 0)
    unflattenable = torch.randn(4, 5, hidden, device=DEVICE)[:, :3]
    for x in (rows_strided, cols_strided, unflattenable):
        assert not x.is_contiguous()
        res = torch.randn(x.shape[::-1], device=DEVICE).permute(*reversed(range(x.dim())))
        grads = tuple(torch.randn(x.shape[::-1], device=DEVICE).permute(*reversed(range(x.dim()))) for _ in range(2))
        for name in ("gemma2", "layer"):
            inputs = {**make_inputs(STYLES[name], x.shape, torch.float32, residual=True), "x": x, "residual": res}
            check_against_reference(STYLES[name], inputs, grads)


def test_expanded_grad_output():
    """y.sum().backward() hands the backward a stride-0 gradient."""
    inputs = make_inputs(STYLES["layer"], (7, 100), torch.float32, residual=False)
    dout = torch.ones(1, device=DEVICE).expand(7, 100)
    check_against_reference(STYLES["layer"], inputs, (dout,))


def test_empty_input():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = norm.rms_norm(x, w)
    assert y.shape == (0, 64)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64))


def _check_tiles(block_m: int, per_sm: int, names: tuple[str, ...], shape: tuple[int, int]) -> None:
    """Every style in `names` against the reference at BLOCK_M rows per tile and PER_SM
    backward programs per SM, float16 with a residual."""
    fwd = autotune.Config({"BLOCK_M": block_m}, num_warps=1, num_stages=1)
    bwd = autotune.Config({"BLOCK_M": block_m, "PER_SM": per_sm}, num_warps=1, num_stages=1)
    with autotune.override("norm_fwd", fwd), autotune.override("norm_bwd", bwd):
        for name in names:
            inputs = make_inputs(STYLES[name], shape, torch.float16, residual=True)
            check_against_reference(STYLES[name], inputs, random_grads(STYLES[name](norm, **inputs)))


@pytest.mark.parametrize("block_m,per_sm", [(1, 1), (2, 4), (16, 1)])
def test_tile_shapes(block_m, per_sm):
    """Any rows per tile and per backward program: partial tiles, one program or many."""
    _check_tiles(block_m, per_sm, ("llama", "layer"), (37, 100))


# ----------------------------------------------------------------------------- rows split into chunks


def _idle(hidden: int, block_n: int, chunks: int) -> float:
    return 1 - hidden / (block_n * chunks)


def test_row_chunks_leave_few_lanes_idle():
    """The models' hidden sizes waste at most 1/8 of the lanes (one tile of the next power
    of two wastes 44% at Gemma 2's 2304 and 4608); a power of two is one tile, read once."""
    for hidden in (2304, 3584, 4096, 4608, 5120, 6144):
        block_n, chunks = norm.row_chunks(hidden)
        assert _idle(hidden, block_n, chunks) <= 1 / 8, (hidden, block_n, chunks)
    assert norm.row_chunks(2304) == (512, 5) and norm.row_chunks(4608) == (1024, 5)
    assert norm.row_chunks(3584) == (4096, 1)  # 1/8 idle: one read beats two at no waste
    for hidden in (1, 64, 1024, 4096, 8192):
        assert norm.row_chunks(hidden) == (hidden, 1)
    assert norm.row_chunks(65536) == (8192, 8)  # no row wider than MAX_CHUNK in registers


def test_row_chunks_cover_the_row():
    """Any hidden: power-of-two chunks that cover the row, the last one not empty, never
    narrower than asked nor wider than MAX_CHUNK, never more idle lanes than one padded
    tile; below MAX_CHUNK, chunks only where they bring the idle lanes down to 1/8."""
    for narrowest in (16, 256):
        for hidden in [*range(1, 700), *range(700, norm.MAX_HIDDEN + 1, 97), norm.MAX_HIDDEN]:
            block_n, chunks = norm.row_chunks(hidden, narrowest)
            full = triton.next_power_of_2(hidden)
            assert block_n & (block_n - 1) == 0 and (chunks - 1) * block_n < hidden <= chunks * block_n
            assert min(narrowest, full) <= block_n <= norm.MAX_CHUNK
            assert _idle(hidden, block_n, chunks) <= _idle(hidden, full, 1)
            if chunks > 1 and hidden <= norm.MAX_CHUNK:
                assert _idle(hidden, block_n, chunks) <= norm.IDLE < _idle(hidden, full, 1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Rows split into chunks of 32 or 64: the chunked kernels at sizes the interpreter runs fast."""
    monkeypatch.setattr(norm, "MIN_CHUNK", 16)


CHUNKED = {96: (32, 3), 144: (32, 5), 288: (64, 5)}  # hidden: (BLOCK_N, chunks); 96 splits exactly


@pytest.mark.parametrize("hidden", list(CHUNKED))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", list(STYLES))
def test_chunked_rows(small_chunks, name, residual, hidden):
    """Rows read in chunks (two passes): outputs and gradients as close as in one tile,
    the same roundings (Gemma's float32 (1 + w), Llama's cast-then-multiply)."""
    assert norm.row_chunks(hidden) == CHUNKED[hidden]
    style = STYLES[name]
    for dtype in (torch.float16, torch.float32):
        inputs = make_inputs(style, (7, hidden), dtype, residual)
        check_against_reference(style, inputs, random_grads(style(norm, **inputs)))


@pytest.mark.parametrize("block_m,per_sm", [(1, 1), (2, 1), (16, 1)])
def test_chunked_tile_shapes(small_chunks, block_m, per_sm):
    """Chunked rows with several row tiles per backward program (13 rows, 4 programs under
    the interpreter): each program adds every tile's dweight/dbias sums into its row of
    partial sums. Partial row tiles too."""
    _check_tiles(block_m, per_sm, ("gemma2", "layer"), (13, 144))


def test_chunked_layer_norm_far_from_zero(small_chunks):
    """Rows with a mean far larger than their spread: the chunks' statistics are merged
    about their means (no variance as a difference of squares, which cancels here)."""
    inputs = make_inputs(STYLES["layer"], (7, 144), torch.float32, residual=False)
    inputs["x"] = 1000 + inputs["x"]
    check_against_reference(STYLES["layer"], inputs, random_grads(STYLES["layer"](norm, **inputs)))


def test_backward_is_deterministic():
    inputs = make_inputs(STYLES["layer"], (129, 100), torch.float16, residual=True)
    leaves = [inputs[n].requires_grad_() for n in ("x", "residual", "weight", "bias")]
    outs = norm.layer_norm(**inputs)
    grads = random_grads(outs)
    first = torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    second = torch.autograd.grad(outs, leaves, grads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bucket_and_default_configs():
    """Defaults survive their own pruning; every bucket has candidates to tune."""
    for hidden in (100, 1024, 2304, 3584, 4608, 5120, 6144, 40000, 65536):
        for rows in (1, 7, 129, 16384):
            for kernel in (norm.NORM_FWD, norm.NORM_BWD):
                bucket = norm.norm_bucket(hidden=hidden, dtype=torch.bfloat16, rows=rows)
                config = kernel.default(**bucket)
                assert kernel.prune(config, bucket)
                assert kernel.candidates(bucket)


# ----------------------------------------------------------------------------- errors and compile


def _bad_calls():
    x, w = torch.randn(3, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    return {
        "x-not-tensor": (lambda: norm.rms_norm([1.0], w), TypeError, "x: expected a torch.Tensor"),
        "x-0d": (lambda: norm.rms_norm(torch.tensor(1.0, device=DEVICE), w), ValueError, "x: expected a 1-d"),
        "x-int": (lambda: norm.rms_norm(x.long(), w), TypeError, "x: expected dtype"),
        "x-float64": (lambda: norm.layer_norm(x.double(), w), TypeError, "x: expected dtype"),
        "hidden-too-big": (lambda: norm.rms_norm(torch.empty(1, norm.MAX_HIDDEN + 1, device=DEVICE),
                                                 torch.empty(norm.MAX_HIDDEN + 1, device=DEVICE)),
                           ValueError, "x: hidden"),
        "weight-size": (lambda: norm.rms_norm(x, torch.ones(9, device=DEVICE)), ValueError, "weight: expected hidden"),
        "weight-2d": (lambda: norm.layer_norm(x, torch.ones(1, 8, device=DEVICE)), ValueError, "weight: expected a 1-d"),
        "weight-int": (lambda: norm.rms_norm(x, torch.ones(8, dtype=torch.int32, device=DEVICE)), TypeError, "weight: expected dtype"),
        "weight-device": (lambda: norm.rms_norm(x, torch.ones(8, device="meta")), ValueError, "weight: tensor is on meta"),
        "bias-size": (lambda: norm.layer_norm(x, w, torch.zeros(7, device=DEVICE)), ValueError, "bias: expected hidden"),
        "bias-dtype": (lambda: norm.layer_norm(x, w, torch.zeros(8, device=DEVICE).half()), TypeError, "bias: dtype"),
        "residual-shape": (lambda: norm.rms_norm(x, w, residual=x[:2]), ValueError, "residual: shape"),
        "residual-dtype": (lambda: norm.layer_norm(x, w, residual=x.half()), TypeError, "residual: dtype"),
        "residual-not-tensor": (lambda: norm.rms_norm(x, w, residual=1.0), TypeError, "residual: expected"),
        "eps-negative": (lambda: norm.rms_norm(x, w, -1e-6), ValueError, "eps: expected a finite float >= 0"),
        "eps-nan": (lambda: norm.layer_norm(x, w, None, float("nan")), ValueError, "eps: expected"),
        "offset-inf": (lambda: norm.rms_norm(x, w, offset=float("inf")), ValueError, "offset: expected"),
        "multiply-flag": (lambda: norm.rms_norm(x, w, multiply_in_float32=1), TypeError, "multiply_in_float32"),
        "module-2d-shape": (lambda: LayerNorm((4, 8)), ValueError, "normalized_shape"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises_before_launch(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_torch_compile_fullgraph():
    inputs = make_inputs(STYLES["layer"], (2, 7, 100), torch.float32, residual=True)
    leaves = [inputs[n].requires_grad_() for n in ("x", "residual", "weight", "bias")]
    gemma_w = (0.5 * torch.randn(100, device=DEVICE)).requires_grad_()

    def block(x, residual, weight, bias, gemma_w):
        y, s = norm.layer_norm(x, weight, bias, residual=residual)
        z, s = norm.rms_norm(y, gemma_w, offset=1.0, residual=s)
        return z.square().sum() + s.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, gemma_w)
    grads = torch.autograd.grad(loss, [*leaves, gemma_w])
    loss_eager = block(*leaves, gemma_w)
    grads_eager = torch.autograd.grad(loss_eager, [*leaves, gemma_w])
    assert torch.allclose(loss, loss_eager)
    assert all(torch.allclose(a, b) for a, b in zip(grads, grads_eager))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [1024, 2304, 3584, 4096, 4608])
def test_gpu_shapes_default_configs(hidden, dtype):
    """Prefill-sized problems with the compiled default (or tuned) configs."""
    for name in ("gemma2", "llama", "layer"):
        inputs = make_inputs(STYLES[name], (4099, hidden), dtype, residual=True)
        check_against_reference(STYLES[name], inputs, random_grads(STYLES[name](norm, **inputs)))

