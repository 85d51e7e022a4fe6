"""NF4: quantize bit for bit against bitsandbytes (codes, absmax, the nested state and
the serialization), dequantize bit for bit, the fused matmul on both paths against the
float64 product of the dequantized weight, gradients, loading bitsandbytes/transformers
checkpoints, errors and torch.compile."""

import json

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES

from tritium import autotune
from tritium.kernels import nf4
from tritium.kernels import nf4_tuning as tuning
from tritium.models.nf4_linear import NF4Linear, weight_from_state_dict

try:
    import bitsandbytes as bnb
    from bitsandbytes import functional as F
except ImportError:  # the GPU runs lack it: the bit-exact oracles are then checked on the CPU runs only
    bnb = F = None
NEEDS_BNB = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes, the oracle (it runs on the CPU)")


def reference_dequantize(w: nf4.NF4Weight, dtype=None) -> torch.Tensor:
    """The format's definition in float32 PyTorch (one rounding per step, as
    bitsandbytes): code[nibble] * scale, then rounded into dtype."""
    packed = w.packed.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # the high nibble first
    scale = w.absmax
    if w.double_quant:
        blocks = torch.arange(w.absmax.numel(), device=w.device) // nf4.NESTED_BLOCKSIZE
        scale = w.code2[w.absmax.long()] * w.absmax2[blocks] + w.offset
    numel = torch.Size(w.shape).numel()
    values = w.code[codes[:numel]] * scale.repeat_interleave(w.blocksize)[:numel]
    return values.reshape(w.shape).to(dtype or w.dtype)


def bnb_quantize(weight, blocksize, double_quant):
    return F.quantize_4bit(weight.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_same_state(ours: nf4.NF4Weight, packed, state):
    assert torch.equal(ours.packed.cpu(), packed), "packed codes"
    assert torch.equal(ours.absmax.cpu(), state.absmax), "absmax"
    assert torch.equal(ours.code.cpu(), state.code), "NF4 table"
    assert ours.shape == tuple(state.shape) and ours.dtype == state.dtype and ours.blocksize == state.blocksize
    assert ours.double_quant == state.nested
    if state.nested:
        assert torch.equal(ours.absmax2.cpu(), state.state2.absmax), "nested absmax"
        assert torch.equal(ours.code2.cpu(), state.state2.code), "dynamic map"
        assert torch.equal(ours.offset.cpu(), state.offset), "offset"


# ----------------------------------------------------------------------------- quantize


@NEEDS_BNB
def test_tables_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map(signed=True))


# (shape, blocksize): partial last blocks, odd element counts, rows straddling blocks, and
# enough blocks for several (and a partial) nested 256-block.
QUANT_CASES = {
    "64x128-b64": ((64, 128), 64), "33x70-b64": ((33, 70), 64), "5x7-b32": ((5, 7), 32), "vec3-b64": ((3,), 64),
    "300x170-b128": ((300, 170), 128), "130x96-b256": ((130, 96), 256), "37x200-b512": ((37, 200), 512),
    "20x300-b4096": ((20, 300), 4096), "1000x301-b64": ((1000, 301), 64), "2x3x50-b1024": ((2, 3, 50), 1024),
}


# quantize is PyTorch and compared on the CPU, where bitsandbytes runs: on CUDA the mean
# of absmax (the double quantization offset) may round differently.
@NEEDS_BNB
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_quantize_bit_exact(name, double_quant, dtype):
    shape, blocksize = QUANT_CASES[name]
    weight = (torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))).to(dtype)
    weight.view(-1)[: 2 * blocksize] = 0  # all-zero blocks: absmax 0, and 0 around the nested mean
    assert_same_state(nf4.quantize(weight, blocksize, double_quant), *bnb_quantize(weight, blocksize, double_quant))


def straddling(absmax: float) -> torch.Tensor:
    """Values x (|x| < absmax) with x / absmax and x * (1 / absmax) on either side of an
    NF4 midpoint in float32: they tell bitsandbytes' division from its multiplication."""
    scale = torch.tensor(absmax)
    code = nf4.nf4_code()
    midpoints = ((code[:-1] + code[1:]) / 2).repeat(3)
    x = midpoints[:15] * scale
    x = torch.cat([x, torch.nextafter(x, scale), torch.nextafter(x, -scale)])
    return x[(x / scale <= midpoints) != (x * (1.0 / scale) <= midpoints)]


@NEEDS_BNB
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_quantize_ties(double_quant):
    """Values exactly on the midpoint of two NF4 codes (which go to the lower one) in full
    blocks with power-of-two absmax (exact scaling); values whose code depends on scaling
    by the reciprocal (full blocks) or dividing (the partial last block)."""
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    block = torch.cat([torch.ones(1), midpoints, -midpoints, code[:-1]]).repeat(2)[:64]  # absmax 1
    reciprocal = torch.cat([torch.tensor([3.0]), straddling(3.0)])
    divided = torch.cat([torch.tensor([1.3]), straddling(1.3)])
    assert reciprocal.numel() > 1 and divided.numel() > 1
    full = torch.nn.functional.pad(reciprocal, (0, 64 - reciprocal.numel()))
    weight = torch.cat([block * 2.0**e for e in range(-8, 8)] + [full, divided])
    assert_same_state(nf4.quantize(weight, 64, double_quant), *bnb_quantize(weight, 64, double_quant))


@NEEDS_BNB
def test_double_quantization_rounding():
    """The 8-bit step of double quantization against bitsandbytes' quantize_blockwise on
    values at and next to the edges of its rounding table and the dynamic map's
    midpoints, in blocks of 256 led by 1.0 (absmax 1: the values are their own scaled
    values)."""
    steps = torch.arange(0, 65537, 5, dtype=torch.float32)
    edges = -1.0 + (2.0 * steps - 1.0) / 65535.0
    code = nf4.dynamic_map()
    points = torch.cat([edges, (code[:-1] + code[1:]) / 2]).clamp(-1, 1)
    points = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))])
    blocks = torch.nn.functional.pad(points, (0, -points.numel() % 255)).view(-1, 255).clamp(-1, 1)
    values = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    codes, absmax2 = nf4._quantize_dynamic(values)
    expected, state = F.quantize_blockwise(values, blocksize=256)
    assert torch.equal(absmax2, state.absmax) and torch.equal(codes, expected)


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("name", ["33x70-b64", "5x7-b32", "130x96-b256", "1000x301-b64", "2x3x50-b1024"])
def test_dequantize_bit_exact(name, double_quant, dtype):
    shape, blocksize = QUANT_CASES[name]
    w = nf4.quantize(torch.randn(shape, device=DEVICE).to(dtype), blocksize, double_quant)
    out = nf4.dequantize(w)
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert torch.equal(out, reference_dequantize(w))
    assert torch.equal(nf4.dequantize(w, torch.float32), reference_dequantize(w, torch.float32))


@NEEDS_BNB
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((48, 512), 256), ((16, 96), 32)])
def test_dequantize_matches_bitsandbytes(shape, blocksize, double_quant, dtype):
    # bitsandbytes 0.50's AVX-512 CPU kernel indexes absmax per row when the last dim is a
    # multiple of 16, which is wrong unless it is also a multiple of the block size: its
    # output is the oracle only for such shapes (reference_dequantize covers the others).
    weight = torch.randn(shape, dtype=dtype)
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    ours = nf4.dequantize(nf4.quantize(weight, blocksize, double_quant).to(DEVICE))
    assert torch.equal(ours.cpu(), F.dequantize_4bit(packed, state))


# ----------------------------------------------------------------------------- matmul


def nf4_weight(out_features, in_features, blocksize=64, double_quant=True, dtype=torch.float32):
    """An nn.Linear-scaled weight, so outputs stay O(1) in float16."""
    weight = torch.randn(out_features, in_features, device=DEVICE) * in_features**-0.5
    return nf4.quantize(weight.to(dtype), blocksize, double_quant)


def check_matmul(x, w, bias, dy=None, **options):
    """Output (and with dy the gradients of x and bias) against the float64 product of
    the dequantized weight, PyTorch's same-dtype product (of the weight dequantized into
    x's dtype, as bitsandbytes does) the yardstick."""
    dtype = x.dtype
    leaves = [t for t in (x, bias) if t is not None]
    for t in leaves:
        t.requires_grad_()
    out = nf4.matmul(x, w, bias, **options)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], w.shape[0])

    def rerun(convert):
        copies = [convert(t.detach()).requires_grad_() for t in leaves]
        weight = convert(reference_dequantize(w, torch.float32))
        result = torch.nn.functional.linear(copies[0], weight, copies[1] if bias is not None else None)
        grads = None if dy is None else torch.autograd.grad(result, copies, convert(dy))
        return result, grads

    truth, truth_grads = rerun(torch.Tensor.double)
    same, same_grads = rerun(lambda t: t.to(dtype))
    assert_close("out", out, same, truth, dtype)
    if dy is not None:
        for name, g, s, t in zip(("dx", "dbias"), torch.autograd.grad(out, leaves, dy), same_grads, truth_grads):
            assert g.dtype == dtype and g.shape == t.shape
            assert_close(name, g, s, t, dtype)


# (rows, out_features, in_features, blocksize, double_quant, bias)
MATMUL_CASES = {
    "m1-aligned": (1, 80, 128, 64, True, True),
    "m3-k-not-block-multiple": (3, 48, 100, 64, True, False),
    "m5-b32-plain": (5, 40, 96, 32, False, True),
    "m16-n-odd": (16, 37, 192, 64, False, False),
    "m37-k-odd-tiles": (37, 72, 70, 64, True, True),
    "m70-b128": (70, 64, 256, 128, False, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("name", list(MATMUL_CASES))
def test_matmul(name, path, dtype):
    m, n, k, blocksize, double_quant, bias = MATMUL_CASES[name]
    w = nf4_weight(n, k, blocksize, double_quant)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    check_matmul(x, w, b, torch.randn(m, n, device=DEVICE, dtype=dtype), path=path)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("kernel,config", [
    ("nf4_gemv", {"BLOCK_N": 32, "BLOCK_K": 64}),
    ("nf4_gemm", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}),
])
def test_matmul_configs(kernel, config, split_k):
    """Other tiles than the interpreter's, with and without split-K (3: uneven splits)."""
    w = nf4_weight(72, 320, 64, True)
    x = torch.randn(2, 9, 320, device=DEVICE)  # 3-d input: rows are flattened
    override = autotune.Config({**config, "SPLIT_K": split_k}, num_warps=4, num_stages=1)
    with autotune.override(kernel, override):
        check_matmul(x, w, torch.randn(72, device=DEVICE), path=kernel[4:])


def every_byte_weight(shape, blocksize, double_quant) -> nf4.NF4Weight:
    """A weight whose packed bytes take all 256 values (each of the 16 codes in both
    nibbles, next to every other code), in a random order, with random scales."""
    n, k = shape
    generator = torch.Generator().manual_seed(0)
    nbytes = n * k // 2
    order = torch.randperm(nbytes, generator=generator)
    packed = (torch.arange(nbytes) % 256)[order].to(torch.uint8).reshape(-1, 1)
    blocks = -(-n * k // blocksize)
    code = nf4.nf4_code()
    if not double_quant:
        absmax = torch.rand(blocks, generator=generator) * 4 + 0.01
        state = (packed, absmax, blocksize, shape, torch.float32, code)
    else:
        absmax = torch.randint(0, 256, (blocks,), generator=generator, dtype=torch.uint8)
        absmax2 = torch.rand(-(-blocks // nf4.NESTED_BLOCKSIZE), generator=generator) + 0.5
        state = (packed, absmax, blocksize, shape, torch.float32, code, absmax2, nf4.dynamic_map(), torch.tensor(0.25))
    w = nf4.NF4Weight(*[t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in state])
    assert torch.equal(torch.unique(w.packed.cpu()), torch.arange(256, dtype=torch.uint8))
    return w


# (shape, blocksize): whole blocks along K (one scale per row and K step); K not a
# multiple of the block size and an odd number of rows (a scale per byte, masked K tail).
EVERY_CODE_CASES = {"16x64-b64": ((16, 64), 64), "9x70-b32": ((9, 70), 32)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("name", list(EVERY_CODE_CASES))
def test_every_code_decodes_exactly(name, double_quant, dtype):
    """Every code in both nibbles dequantizes to its table value times its scale, bit for
    bit, in dequantize and inside both matmul paths: x = I makes the product the
    dequantized weight itself (one product by 1 per output, the rest 0)."""
    shape, blocksize = EVERY_CODE_CASES[name]
    w = every_byte_weight(shape, blocksize, double_quant)
    expected = reference_dequantize(w, dtype)
    assert torch.equal(nf4.dequantize(w, dtype), expected)
    eye = torch.eye(shape[1], device=DEVICE, dtype=dtype)
    for path in ("gemv", "gemm"):
        out = nf4.matmul(eye, w, path=path)
        assert torch.equal(out, expected.T), path


@pytest.mark.parametrize("rows", tuning.GEMV_BUCKETS)
def test_gemv_default_tiles(rows):
    """The GEMV at its heuristic default tile for every token bucket (BLOCK_N up to 128,
    K steps down to 8, 4 and 8 warps), plain and double-quantized."""
    for double_quant in (False, True):
        w = nf4_weight(40, 192, 64, double_quant)
        bucket = tuning.matmul_bucket(m=rows, n=40, k=192, dtype=torch.float32, blocksize=64)
        with autotune.override("nf4_gemv", tuning.gemv_default(**bucket)):
            check_matmul(torch.randn(rows, 192, device=DEVICE), w, None, path="gemv")


def test_matmul_noncontiguous_and_empty():
    w = nf4_weight(40, 64)
    x = torch.randn(64, 12, device=DEVICE).t()  # (12, 64) with strides (1, 12)
    check_matmul(x, w, None)
    assert nf4.matmul(x[:0], w).shape == (0, 40)


def test_auto_path_follows_token_buckets(monkeypatch):
    assert [tuning.path(m) for m in (1, 2, 9, 16, 17, 4096)] == ["gemv"] * 4 + ["gemm"] * 2
    taken = []
    launch = nf4.launch_matmul
    monkeypatch.setattr(nf4, "launch_matmul", lambda *args: taken.append(args[-1]) or launch(*args))
    w = nf4_weight(32, 64)
    for m in (1, 16, 17):
        nf4.matmul(torch.randn(m, 64, device=DEVICE), w)
    assert taken == ["gemv", "gemv", "gemm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_tuning_declarations(blocksize, dtype):
    """At the model shapes, every token bucket has candidates, and the heuristic default
    is one of them (so it passes the pruning predicates)."""
    for out_features, in_features in ((9216, 2304), (2304, 9216), (27392, 4096), (4096, 13696), (2048, 2304)):
        for m in (1, 3, 16, 17, 64, 256, 4096):
            kernel = nf4.GEMV if tuning.path(m) == "gemv" else nf4.GEMM
            bucket = tuning.matmul_bucket(m=m, n=out_features, k=in_features, dtype=dtype, blocksize=blocksize)
            candidates = kernel.candidates(bucket)
            assert kernel.default(**bucket) in candidates, (kernel.name, bucket)
    assert all(len(k.source_hash) == 16 for k in (nf4.GEMV, nf4.GEMM, nf4.DEQUANTIZE))


def test_compile_fullgraph():
    w = nf4_weight(48, 128)
    bias = torch.randn(48, device=DEVICE, requires_grad=True)
    x = torch.randn(5, 128, device=DEVICE, requires_grad=True)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 48).to(DEVICE))

    def step(x):
        return (nf4.matmul(x, w, bias) ** 2).sum() + layer(x).sum() + nf4.dequantize(w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(step(x), (x, bias))
    compiled_grads = torch.autograd.grad(compiled(x), (x, bias))
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e)


# ----------------------------------------------------------------------------- NF4Linear and loading


def bnb_linear(linear: torch.nn.Linear, double_quant: bool, quant_type: str = "nf4"):
    """bitsandbytes' Linear4bit holding `linear`, quantized on the CPU (it quantizes on .to)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def on_device(state_dict: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in state_dict.items()}


@NEEDS_BNB
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_state_dict_is_bitsandbytes(double_quant):
    """NF4Linear.from_linear saves what bitsandbytes' Linear4bit saves, byte for byte, and
    loads it back (load_state_dict into an empty layer, and from_state_dict)."""
    linear = torch.nn.Linear(100, 48)
    theirs = bnb_linear(linear, double_quant).state_dict()
    ours = NF4Linear.from_linear(linear, 64, double_quant).state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    empty = NF4Linear(100, 48, double_quant=not double_quant, dtype=torch.float16)  # replaced by the checkpoint's
    empty.load_state_dict(theirs)
    parent = torch.nn.Sequential(torch.nn.Identity(), NF4Linear(100, 48))  # keys under a prefix, strict
    parent.load_state_dict({"1." + k: v for k, v in theirs.items()})
    expected = F.dequantize_4bit(theirs["weight"], bnb_state(theirs))
    for layer in (empty, parent[1], NF4Linear.from_state_dict(theirs)):
        assert torch.equal(nf4.dequantize(layer.to(DEVICE).quantized).cpu(), expected)


def bnb_state(state_dict: dict, prefix: str = "weight"):
    quant = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    return F.QuantState.from_dict(quant, device=torch.device("cpu"))


def test_nf4_linear_forward_and_dtype_cast():
    linear = torch.nn.Linear(96, 40).to(DEVICE)
    layer = NF4Linear.from_linear(linear, 32, True).to(torch.float16)  # quant state must survive the cast
    assert layer.quantized.code.dtype == torch.float32 and layer.bias.dtype == torch.float16
    w = nf4.quantize(linear.weight.detach(), 32, True)
    assert torch.equal(nf4.dequantize(layer.quantized), nf4.dequantize(w))
    x = torch.randn(3, 96, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, nf4.matmul(x, w, layer.bias))
    out.sum().backward()
    assert x.grad is not None and layer.bias.grad is not None


@NEEDS_BNB
def test_loads_transformers_checkpoint(tmp_path):
    """A tiny Gemma 2 quantized by transformers with BitsAndBytesConfig (nf4, double
    quantization) and saved: every 4-bit layer loads into NF4Linear with the weights
    bitsandbytes itself dequantizes, and computes with them."""
    pytest.importorskip("accelerate")  # transformers' bitsandbytes integration needs it
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, Gemma2Config, Gemma2ForCausalLM

    # Sizes multiples of the block size: see test_dequantize_matches_bitsandbytes.
    config = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = Gemma2ForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization)
    model.save_pretrained(tmp_path / "nf4")
    state = load_file(tmp_path / "nf4" / "model.safetensors")
    prefixes = sorted(k[: -len("weight.quant_state.bitsandbytes__nf4")] for k in state if k.endswith("__nf4"))
    assert len(prefixes) == 7  # q, k, v, o, gate, up, down
    for prefix in prefixes:
        layer = NF4Linear.from_state_dict(on_device(state), prefix)
        expected = F.dequantize_4bit(state[prefix + "weight"], bnb_state(state, prefix + "weight"))
        assert torch.equal(nf4.dequantize(layer.quantized).cpu(), expected), prefix
        x = torch.randn(4, layer.in_features, device=DEVICE)
        torch.testing.assert_close(layer(x), x @ expected.to(DEVICE).T, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors


@NEEDS_BNB
def test_fp4_is_refused():
    fp4 = bnb_linear(torch.nn.Linear(64, 32), True, quant_type="fp4").state_dict()
    with pytest.raises(ValueError, match="fp4 is not supported, only nf4"):
        NF4Linear.from_state_dict(fp4)
    with pytest.raises(ValueError, match="fp4 is not supported, only nf4"):
        NF4Linear(64, 32).load_state_dict(fp4)


def serialized(double_quant=True, **meta_changes) -> dict:
    state = NF4Linear.from_linear(torch.nn.Linear(64, 32).to(DEVICE), 64, double_quant).state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = {**json.loads(bytes(state[key].tolist()).decode()), **meta_changes}
    state[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


@pytest.mark.parametrize("changes,error,match", [
    ({"quant_type": "fp4"}, ValueError, "fp4 is not supported, only nf4"),
    ({"blocksize": 48}, ValueError, "blocksize: expected one of"),
    ({"blocksize": 128}, ValueError, "NF4Weight.absmax: expected 16 "),
    ({"shape": [32, 62]}, ValueError, "NF4Weight.packed: expected 992 "),
    ({"nested_blocksize": 128}, ValueError, "nested_blocksize 128 is not supported"),
    ({"dtype": "int8"}, ValueError, "dtype: expected 'float16'"),
])
def test_bad_checkpoint_state(changes, error, match):
    with pytest.raises(error, match=match):
        NF4Linear.from_state_dict(serialized(**changes))


def test_load_errors():
    state = serialized()
    with pytest.raises(ValueError, match=r"holds a \(32, 64\) weight, this layer is \(64, 32\)"):
        NF4Linear(32, 64).load_state_dict(state)
    with pytest.raises(ValueError, match="no bitsandbytes quant state"):
        NF4Linear(64, 32).load_state_dict(torch.nn.Linear(64, 32).state_dict())
    del state["weight.absmax"]
    with pytest.raises(KeyError, match="weight.absmax: missing"):
        weight_from_state_dict(state)


def test_quantize_errors():
    weight = torch.randn(8, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"blocksize: expected one of \(32, 64"):
        nf4.quantize(weight, blocksize=48)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        nf4.quantize(weight.int())
    with pytest.raises(ValueError, match="rank >= 1"):  # an empty weight is fine (tests/test_empty.py)
        nf4.quantize(weight[0, 0])
    w = nf4.quantize(weight)
    with pytest.raises(ValueError, match="NF4Weight.absmax: expected 8 float32"):
        nf4.NF4Weight(w.packed, w.absmax.half(), 64, (8, 64), torch.float32, w.code)
    with pytest.raises(ValueError, match="NF4Weight.packed: expected 256 uint8"):
        nf4.NF4Weight(w.packed[1:], w.absmax, 64, (8, 64), torch.float32, w.code)
    with pytest.raises(ValueError, match="come together"):
        nf4.NF4Weight(w.packed, w.absmax, 64, (8, 64), torch.float32, w.code, absmax2=w.absmax)


def test_matmul_errors():
    w = nf4_weight(32, 64)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x: last dim 60 must equal w's in_features 64"):
        nf4.matmul(x[:, :60], w)
    with pytest.raises(TypeError, match="x: expected dtype"):
        nf4.matmul(x.int(), w)
    with pytest.raises(TypeError, match="w: expected an NF4Weight"):
        nf4.matmul(x, torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"bias: expected \(32,\) torch.float32"):
        nf4.matmul(x, w, torch.randn(32, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"bias: expected \(32,\)"):
        nf4.matmul(x, w, torch.randn(31, device=DEVICE))
    with pytest.raises(ValueError, match="in_features = 63 is odd"):
        nf4.matmul(torch.randn(3, 63, device=DEVICE), nf4.quantize(torch.randn(32, 63, device=DEVICE)))
    with pytest.raises(ValueError, match="expected a 2-d"):
        nf4.matmul(x, nf4.quantize(torch.randn(2, 32, 64, device=DEVICE)))
    with pytest.raises(ValueError, match="path: expected one of"):
        nf4.matmul(x, w, path="splitk")
    with pytest.raises(TypeError, match="dtype: expected"):
        nf4.dequantize(w, torch.int8)
