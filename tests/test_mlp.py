"""linear and gated_mlp: outputs and gradients against the float64 reference and against
transformers' own modules (Gemma2MLP, Glm4MLP, BART's feed-forward, BertGeneration's
intermediate), tile shapes, strides, errors and torch.compile."""

import copy
from functools import partial

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES
from torch import nn

from tritium import autotune, reference
from tritium.kernels import mlp
from tritium.kernels.mlp import GATE_UP, LINEAR, gated_mlp, linear
from tritium.kernels.mlp_tuning import gemm_bucket
from tritium.models.mlp import FeedForward, GatedMLP, Linear, activation_from_hf


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def weight(out_features, in_features, dtype):
    """nn.Linear-scaled, so outputs stay O(1) in float16."""
    return randn(out_features, in_features, dtype=dtype, scale=in_features**-0.5)


def check(op, ref, args, activation, dout):
    """op(*args, activation) and its gradients w.r.t. the tensors of args against ref in
    float64 (tests/accuracy.py's criterion, PyTorch's same-dtype error the yardstick)."""
    dtype = args[0].dtype
    leaves = [a for a in args if a is not None]
    for a in leaves:
        a.requires_grad_()
    out = op(*args, activation)
    assert out.dtype == dtype

    def rerun(convert):
        copies = [None if a is None else convert(a.detach()).requires_grad_() for a in args]
        result = ref(*copies, activation)
        return result, torch.autograd.grad(result, [c for c in copies if c is not None], convert(dout))

    truth, truth_grads = rerun(torch.Tensor.double)
    same, same_grads = rerun(torch.Tensor.clone)
    assert_close("out", out, same, truth, dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    for i, (g, s, t) in enumerate(zip(grads, same_grads, truth_grads)):
        assert g.dtype == dtype
        assert_close(f"grad {i}", g, s, t, dtype)


# (tokens, in_features, out_features, activation, bias)
LINEAR_CASES = {
    "t1-gelu-bias": (1, 200, 160, "gelu", True),
    "t7-gelu_tanh": (7, 96, 300, "gelu_tanh", False),
    "t129-relu-bias": (129, 200, 96, "relu", True),
    "t129-silu": (129, 72, 160, "silu", False),
    "t7-none-bias": (7, 130, 100, None, True),
    "t129-none": (129, 200, 130, None, False),
}
# (tokens, hidden, intermediate, activation)
GATED_CASES = {
    "t1-silu": (1, 200, 300, "silu"),
    "t7-gelu_tanh": (7, 96, 136, "gelu_tanh"),
    "t129-gelu": (129, 72, 200, "gelu"),
    "t129-relu": (129, 130, 96, "relu"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear(name, dtype):
    tokens, k, n, activation, bias = LINEAR_CASES[name]
    args = (randn(tokens, k, dtype=dtype), weight(n, k, dtype), randn(n, dtype=dtype) if bias else None)
    check(linear, reference.linear, args, activation, randn(tokens, n, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GATED_CASES))
def test_gated_mlp(name, dtype):
    tokens, hidden, inter, activation = GATED_CASES[name]
    args = (randn(tokens, hidden, dtype=dtype), weight(2 * inter, hidden, dtype), weight(hidden, inter, dtype))
    check(gated_mlp, reference.gated_mlp, args, activation, randn(tokens, hidden, dtype=dtype))


def nan_padded(*shape, dtype=torch.float32, scale=1.0):
    """A random view into a larger buffer whose other elements are NaN: reading past the
    last dim's end shows in the result."""
    buffer = torch.full((*shape[:-1], shape[-1] + 8), float("nan"), dtype=dtype, device=DEVICE)
    view = buffer[..., : shape[-1]]
    view.copy_(randn(*shape, dtype=dtype, scale=scale))
    return view


def test_strides_and_leading_dims():
    """3-d sliced x, a transposed (column-major) x and weight, a broadcast (stride-0) dout,
    and nothing read past the end of a row."""
    x3 = nan_padded(2, 9, 72)
    xt = randn(72, 11).t()
    wt = weight(72, 100, torch.float32).t()  # (100, 72), column-major
    assert not any(t.is_contiguous() for t in (x3, xt, wt))
    check(linear, reference.linear, (x3, nan_padded(100, 72, scale=0.1), randn(100)), "silu", randn(2, 9, 100))
    check(linear, reference.linear, (xt, wt, None), "gelu", torch.ones(1, device=DEVICE).expand(11, 100))
    args = (x3, nan_padded(2 * 50, 72, scale=0.1), nan_padded(72, 50, scale=0.1))
    check(gated_mlp, reference.gated_mlp, args, "gelu_tanh", torch.ones(1, device=DEVICE).expand(2, 9, 72))


def gated_mlp_pair(x, gate_weight, up_weight, down_weight, activation):
    return gated_mlp(x, (gate_weight, up_weight), down_weight, activation)


def reference_pair(x, gate_weight, up_weight, down_weight, activation):
    return reference.gated_mlp(x, torch.cat((gate_weight, up_weight)), down_weight, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 17])
def test_gated_mlp_pair(tokens, dtype):
    """Gemma 2's gate_proj and up_proj apart, used in place: a column-major gate weight and
    an up weight sliced from a wider buffer; output and the gradients of x and all weights."""
    hidden, inter = 72, 100
    gate = weight(hidden, inter, dtype).t()
    up = nan_padded(inter, hidden, dtype=dtype, scale=hidden**-0.5)
    assert not (gate.is_contiguous() or up.is_contiguous())
    args = (randn(tokens, hidden, dtype=dtype), gate, up, weight(hidden, inter, dtype))
    check(gated_mlp_pair, reference_pair, args, "gelu_tanh", randn(tokens, hidden, dtype=dtype))


def test_gated_mlp_pair_matches_stacked():
    """Gate and up as two tensors give bitwise the output of the same values stacked, and
    the stacked weight's gradient is theirs stacked."""
    x, down = randn(17, 72).requires_grad_(), weight(72, 100, torch.float32).requires_grad_()
    stacked = weight(2 * 100, 72, torch.float32).requires_grad_()
    gate, up = (w.detach().clone().requires_grad_() for w in stacked.chunk(2))
    out, out_pair = gated_mlp(x, stacked, down, "silu"), gated_mlp(x, (gate, up), down, "silu")
    assert torch.equal(out, out_pair)
    dout = randn(17, 72)
    dx, dstacked, ddown = torch.autograd.grad(out, (x, stacked, down), dout)
    dx_pair, dgate, dup, ddown_pair = torch.autograd.grad(out_pair, (x, gate, up, down), dout)
    for name, a, b in (("x", dx, dx_pair), ("gate_up", dstacked, torch.cat((dgate, dup))), ("down", ddown, ddown_pair)):
        torch.testing.assert_close(a, b, msg=f"grad {name}")


def tile_config(block_m, block_n, block_k, group_m, **split_k):
    """An interpreter config of these tiles; the linear GEMM's also needs SPLIT_K."""
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m, **split_k}
    return autotune.Config(meta, num_warps=4, num_stages=1)


@pytest.mark.parametrize("tile", [(16, 16, 16, 2), (64, 32, 32, 1), (16, 64, 128, 8)], ids=str)
def test_tile_shapes(tile):
    """Any tile works: K steps that divide K (no mask) or not, groups of row blocks that do
    not divide the grid, tiles wider than the matrix."""
    with autotune.override("mlp_linear", tile_config(*tile, SPLIT_K=1)), \
            autotune.override("mlp_gate_up", tile_config(*tile)):
        x = randn(70, 64)
        check(linear, reference.linear, (x, weight(90, 64, torch.float32), randn(90)), "gelu", randn(70, 90))
        args = (randn(70, 48), weight(2 * 40, 48, torch.float32), weight(48, 40, torch.float32))
        check(gated_mlp, reference.gated_mlp, args, "silu", randn(70, 48))


@pytest.mark.parametrize("tokens", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_linear_split_k(split_k, dtype, tokens):
    """K = 100 in steps of 32 (4 steps, the last partial) cut into 2, 3 or 4 splits, the
    last one short (2: 64 + 36; 4: 3 x 32 + 4) or empty (3: 64 + 36 + 0); output and
    gradients, through the reduction's epilogue with a bias, the stored pre-activation and
    an activation, and with none of them."""
    with autotune.override("mlp_linear", tile_config(16, 32, 32, 4, SPLIT_K=split_k)):
        for activation, bias in (("silu", True), (None, False)):
            args = (randn(tokens, 100, dtype=dtype), weight(48, 100, dtype), randn(48, dtype=dtype) if bias else None)
            check(linear, reference.linear, args, activation, randn(tokens, 48, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_split_k_deterministic(dtype, monkeypatch):
    """Split-K in inference (no pre-activation stored) runs the reduction; two calls are
    bitwise equal (the splits are added in a fixed order), and the result is as close to
    the float64 truth as one split's (tests/accuracy.py's bound, one split's error the
    yardstick)."""
    x, w, b = randn(5, 300, dtype=dtype), weight(40, 300, dtype), randn(40, dtype=dtype)
    sums = []
    launch_split_sum = mlp.launch_split_sum
    monkeypatch.setattr(mlp, "launch_split_sum", lambda *args: sums.append(args) or launch_split_sum(*args))
    with torch.no_grad():
        with autotune.override("mlp_linear", tile_config(16, 32, 32, 4, SPLIT_K=4)):
            first, second = linear(x, w, b, "gelu_tanh"), linear(x, w, b, "gelu_tanh")
        with autotune.override("mlp_linear", tile_config(16, 32, 32, 4, SPLIT_K=1)):
            one = linear(x, w, b, "gelu_tanh")
    assert len(sums) == 2
    assert torch.equal(first, second)
    truth = reference.linear(x.double(), w.double(), b.double(), "gelu_tanh")
    assert_close("split-K vs one split", first, one, truth, dtype)


def test_no_tokens():
    x = randn(0, 32).requires_grad_()
    w = weight(48, 32, torch.float32).requires_grad_()
    out = linear(x, w, None, "gelu")
    assert out.shape == (0, 48)
    out.sum().backward()
    assert torch.all(w.grad == 0)
    assert gated_mlp(x, weight(96, 32, torch.float32), weight(32, 48, torch.float32), "silu").shape == (0, 32)


def test_no_grad_matches_grad_path():
    """Inference skips storing the pre-activations; the result must not change."""
    x, w, b = randn(7, 40), weight(50, 40, torch.float32), randn(50)
    gu, down = weight(100, 40, torch.float32), weight(40, 50, torch.float32)
    with torch.no_grad():
        out, h = linear(x, w, b, "gelu"), gated_mlp(x, gu, down, "gelu_tanh")
    x.requires_grad_()
    assert torch.equal(out, linear(x, w, b, "gelu")) and torch.equal(h, gated_mlp(x, gu, down, "gelu_tanh"))


def test_torch_compile_fullgraph():
    """linear, and gated_mlp with the stacked weight and with a (gate, up) pair, in one graph."""
    x, w, b = randn(7, 40), weight(50, 40, torch.float32), randn(50)
    gu, gate, up = weight(2 * 50, 50, torch.float32), weight(50, 50, torch.float32), weight(50, 50, torch.float32)
    down = weight(50, 50, torch.float32)
    leaves = (x, w, b, gu, gate, up, down)
    for t in leaves:
        t.requires_grad_()

    def step(x, w, b, gu, gate, up, down):
        h = linear(x, w, b, "gelu")
        return (gated_mlp(h, gu, down, "silu") * gated_mlp(h, (gate, up), down, "gelu_tanh")).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    loss_eager = step(*leaves)
    grads_eager = torch.autograd.grad(loss_eager, leaves)
    assert torch.allclose(loss, loss_eager)
    assert all(torch.allclose(a, b) for a, b in zip(grads, grads_eager))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tuning_declarations(dtype):
    """Token counts share a bucket per power of two; at every size of the suite the
    heuristic default survives the pruning predicate and the space keeps candidates."""
    bucket = partial(gemm_bucket, n=4096, k=1024, dtype=dtype, activation="gelu")
    assert bucket(m=129) == bucket(m=256) != bucket(m=257)
    assert bucket(m=1)["m"] == 16 and bucket(m=1, activation=None)["activation"] is False
    for kernel in (LINEAR, GATE_UP):
        for m in (1, 16, 17, 100, 2048, 16384, 100000):
            for n, k in ((4096, 1024), (9216, 2304), (2304, 9216), (13696, 4096)):
                problem = bucket(m=m, n=n, k=k)
                assert kernel.prune(kernel.default(**problem), problem), (kernel.name, problem)
                assert kernel.candidates(problem), (kernel.name, problem)


def test_split_k_pruning():
    """The linear GEMM splits K only at bucket m <= 64 and with a K step for every split;
    its default never splits (untimed on a GPU); the gated GEMM has no SPLIT_K."""
    decode = gemm_bucket(m=1, n=2304, k=9216, dtype=torch.bfloat16, activation=None)

    def splits(bucket):
        return {c.meta["SPLIT_K"] for c in LINEAR.candidates(bucket)}

    assert splits(decode) == splits({**decode, "m": 64}) == {1, 2, 4, 8}
    assert splits({**decode, "m": 128}) == {1}
    assert splits({**decode, "k": 96}) == {1, 2}  # only BLOCK_K 32 leaves room for 2 splits
    assert LINEAR.default(**decode).meta["SPLIT_K"] == 1
    assert all("SPLIT_K" not in c.meta for c in GATE_UP.candidates(decode))


# ----------------------------------------------------------------------------- errors


def _linear_args(**changes):
    args = dict(x=randn(3, 4, 16), weight=randn(24, 16), bias=randn(24), activation="gelu")
    return {**args, **changes}


def _on_device(value):
    """value with its CPU tensors (a pair's too) moved to DEVICE."""
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    return value.to(DEVICE) if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value


def _gated_args(**changes):
    args = dict(x=randn(5, 16), gate_up_weight=randn(48, 16), down_weight=randn(16, 24), activation="silu")
    return {**args, **changes}


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(x=[1.0]), TypeError, "x: expected a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, "x: expected a 1-d tensor"),
        (dict(x=torch.ones(3, 16, dtype=torch.int32)), TypeError, "x: expected dtype"),
        (dict(weight=torch.randn(24, 16, dtype=torch.float16)), TypeError, "weight: dtype torch.float16 differs from x's"),
        (dict(weight=torch.randn(24, 15)), ValueError, "weight: expected in_features (x's last dim) = 16"),
        (dict(weight=torch.randn(24, 16, 1)), ValueError, "weight: expected a 2-d tensor"),
        (dict(bias=torch.randn(23)), ValueError, "bias: expected out_features (weight's dim 0) = 24"),
        (dict(bias=torch.randn(24, dtype=torch.float64)), TypeError, "bias: expected dtype"),
        (dict(activation="gelu_new"), ValueError, "activation: expected one of 'gelu'"),
    ],
)
def test_linear_errors(changes, error, words):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(error) as info:
        linear(**_linear_args(**changes))
    assert words in str(info.value)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(gate_up_weight=torch.randn(47, 16)), ValueError, "gate_up_weight: dim 0 must be even"),
        (dict(gate_up_weight=torch.randn(48, 17)), ValueError, "gate_up_weight: expected hidden (x's last dim) = 16"),
        (dict(gate_up_weight=torch.randn(48, 16, dtype=torch.float16)), TypeError, "gate_up_weight: dtype"),
        (dict(down_weight=torch.randn(16, 48)), ValueError, "down_weight: expected shape (hidden, intermediate) = (16, 24)"),
        (dict(down_weight=torch.randn(24, 16)), ValueError, "down_weight: expected shape"),
        (dict(down_weight=torch.randn(16, 24, dtype=torch.float16)), TypeError, "down_weight: dtype torch.float16"),
        (dict(activation=None), ValueError, "activation: expected one of"),
        (dict(activation="swish"), ValueError, "activation: expected one of"),
        (dict(gate_up_weight=None), TypeError, "gate_up_weight: expected a torch.Tensor (2 * intermediate, hidden) or a pair"),
        (dict(gate_up_weight=(torch.randn(24, 16),)), ValueError, "expected a pair (gate_weight, up_weight), got a tuple of length 1"),
        (dict(gate_up_weight=(torch.randn(24, 16),) * 3), ValueError, "got a tuple of length 3"),
        (dict(gate_up_weight=(torch.randn(24, 16), None)), TypeError, "up_weight: expected a torch.Tensor"),
        (dict(gate_up_weight=(torch.randn(24, 17), torch.randn(24, 17))), ValueError, "gate_weight: expected hidden (x's last dim) = 16"),
        (dict(gate_up_weight=(torch.randn(24, 16), torch.randn(20, 16))), ValueError, "up_weight: expected intermediate (gate_weight's dim 0) = 24"),
        (dict(gate_up_weight=(torch.randn(24, 16), torch.randn(24, 16, dtype=torch.float16))), TypeError, "up_weight: dtype torch.float16 differs from x's"),
        (dict(gate_up_weight=(torch.randn(24, 16, device="meta"), torch.randn(24, 16))), ValueError, "gate_weight: tensor is on meta"),
        (dict(gate_up_weight=(torch.randn(20, 16), torch.randn(20, 16))), ValueError, "down_weight: expected shape (hidden, intermediate) = (16, 20)"),
    ],
)
def test_gated_mlp_errors(changes, error, words):
    changes = {k: _on_device(v) for k, v in changes.items()}
    with pytest.raises(error) as info:
        gated_mlp(**_gated_args(**changes))
    assert words in str(info.value)


# ----------------------------------------------------------------------------- transformers' modules


class BartFeedForward(nn.Module):
    """A transformers BART layer's feed-forward as the layer computes it (its fc1, its
    activation, its fc2; activation_dropout is 0)."""

    def __init__(self, layer):
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = layer.fc1, layer.activation_fn, layer.fc2

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class Intermediate(nn.Module):
    """How a BertGeneration layer uses `Linear`: intermediate.dense keeps its name."""

    def __init__(self, hidden_size, intermediate_size, activation):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size, activation=activation)

    def forward(self, x):
        return self.dense(x)


def hf_pair(name):
    """(ours, transformers' module) for a family's MLP, ours loaded from theirs' state dict."""
    import transformers as hf
    from transformers.models.bart.modeling_bart import BartDecoderLayer
    from transformers.models.bert_generation.modeling_bert_generation import BertGenerationIntermediate

    if name == "gemma2":
        config = hf.Gemma2Config(hidden_size=96, intermediate_size=200, hidden_activation="gelu_pytorch_tanh")
        theirs = hf.models.gemma2.modeling_gemma2.Gemma2MLP(config)
        ours = GatedMLP(96, 200, activation_from_hf(config.hidden_activation), separate_gate_up=True)
    elif name == "glm4":
        config = hf.Glm4Config(hidden_size=96, intermediate_size=136, hidden_act="silu")
        theirs = hf.models.glm4.modeling_glm4.Glm4MLP(config)
        ours = GatedMLP(96, 136, activation_from_hf(config.hidden_act))
    elif name.startswith("bart"):  # bart-gelu (BART, MVP), bart-gelu_new (BigBird-Pegasus)
        act = name.split("-")[1]
        config = hf.BartConfig(d_model=72, decoder_ffn_dim=200, decoder_attention_heads=2, activation_function=act)
        theirs = BartFeedForward(BartDecoderLayer(config))
        ours = FeedForward(72, 200, activation_from_hf(act))
    else:
        config = hf.BertGenerationConfig(hidden_size=64, intermediate_size=160, hidden_act="gelu")
        theirs = BertGenerationIntermediate(config)
        ours = Intermediate(64, 160, activation_from_hf(config.hidden_act))
    ours.load_state_dict(theirs.state_dict())
    return ours.to(DEVICE), theirs.to(DEVICE)


def run_module(module, x, dout):
    """module(x), and its gradients w.r.t. x and each parameter by name."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    names, params = zip(*module.named_parameters())
    dx, *grads = torch.autograd.grad(out, (x, *params), dout)
    return out, dx, dict(zip(names, grads))


def in_layout(module, grads):
    """Gradients named as `module`'s parameters (in the gradients' dtype), mapped through
    its load_state_dict (which stacks Gemma 2's gate_proj and up_proj)."""
    module = copy.deepcopy(module).to(next(iter(grads.values())).dtype)
    module.load_state_dict(grads)
    return dict(module.named_parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 43)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["gemma2", "glm4", "bart-gelu", "bart-gelu_new", "bert_generation"])
def test_against_transformers(name, shape, dtype):
    """Output and gradients (input and every parameter) vs the transformers module run in
    the same dtype and in float64."""
    ours, theirs = hf_pair(name)
    ours, theirs = ours.to(dtype), theirs.to(dtype)  # float64 truth from the same rounded weights
    x = randn(*shape, next(theirs.parameters()).shape[1], dtype=dtype)
    dout = torch.randn_like(theirs(x))
    out, dx, grads = run_module(ours, x, dout)
    same = run_module(theirs, x, dout)
    truth = run_module(copy.deepcopy(theirs).double(), x.double(), dout.double())
    assert_close("out", out, same[0], truth[0], dtype)
    assert_close("dx", dx, same[1], truth[1], dtype)
    same_grads, truth_grads = in_layout(ours, same[2]), in_layout(ours, truth[2])
    assert grads.keys() == truth_grads.keys()
    for key, g in grads.items():
        assert_close(key, g, same_grads[key], truth_grads[key], dtype)


def test_gemma2_state_dict_round_trip():
    """What GatedMLP(separate_gate_up=True) saves is what Gemma2MLP loads; GLM-4's keys are
    gate_up_proj/down_proj; a half-stacked checkpoint fails strictly, naming the keys."""
    ours, theirs = hf_pair("gemma2")
    saved = ours.state_dict()
    assert sorted(saved) == sorted(theirs.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in theirs.state_dict().items())
    glm, glm_theirs = hf_pair("glm4")
    assert sorted(glm.state_dict()) == sorted(glm_theirs.state_dict()) == ["down_proj.weight", "gate_up_proj.weight"]
    half = {k: v for k, v in theirs.state_dict().items() if k != "up_proj.weight"}
    with pytest.raises(RuntimeError, match="gate_up_proj.weight"):
        ours.load_state_dict(half)


def test_feed_forward_dropout_and_activation_names():
    ff = FeedForward(16, 32, "relu", activation_dropout=1.0).to(DEVICE)
    x = randn(3, 16)
    assert torch.equal(ff.train()(x), ff.fc2.bias.expand(3, 16))  # every activation dropped
    assert torch.equal(ff.eval()(x), ff.fc2(ff.fc1(x)))
    names = {n: activation_from_hf(n) for n in ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "relu")}
    assert names == {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu",
                     "swish": "silu", "relu": "relu"}
    with pytest.raises(ValueError, match="'quick_gelu' has no tritium kernel"):
        activation_from_hf("quick_gelu")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 16, 333, 2048])
def test_gpu_shapes_default_configs(tokens, dtype):
    """The compiled kernels with their heuristic tiles at BART-large / Gemma 2-like widths."""
    x = randn(tokens, 1024, dtype=dtype)
    check(linear, reference.linear, (x, weight(4096, 1024, dtype), randn(4096, dtype=dtype)), "gelu",
          randn(tokens, 4096, dtype=dtype))
    args = (x, weight(2 * 2752, 1024, dtype), weight(1024, 2752, dtype))
    check(gated_mlp, reference.gated_mlp, args, "gelu_tanh", randn(tokens, 1024, dtype=dtype))
