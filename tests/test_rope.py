"""apply_rotary and RotaryEmbedding against the float64 reference and against transformers'
own Gemma 2 and GLM-4 rotary functions: full, partial and interleaved, GQA, any strides,
in place and out of place, gradients, per-sequence tables, position offsets, errors."""

from dataclasses import dataclass

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES
from transformers import Gemma2Config, Glm4Config
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.glm4 import modeling_glm4

from tritium import autotune, reference
from tritium.kernels.rope import ROTARY, apply_rotary
from tritium.models.rotary import RotaryEmbedding


@dataclass(frozen=True)
class Case:
    seqlen: int = 7
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 64
    rotary_dim: int = 64
    interleaved: bool = False
    batch: int = 2
    per_batch: bool = False  # cos/sin (batch, seqlen, rotary_dim / 2)


CASES = {
    "gemma2-256": Case(head_dim=256, rotary_dim=256, heads_q=4, heads_kv=2),
    "glm4-128-partial-interleaved": Case(seqlen=129, head_dim=128, rotary_dim=64, interleaved=True, heads_kv=1),
    "full-80-single-token": Case(seqlen=1, head_dim=80, rotary_dim=80, heads_q=3, heads_kv=3),
    "partial-64-halves": Case(head_dim=64, rotary_dim=32, heads_q=5, heads_kv=1),
    "partial-80-interleaved-per-batch": Case(seqlen=33, head_dim=80, rotary_dim=48, interleaved=True, per_batch=True),
    "full-128-interleaved-mha": Case(seqlen=9, head_dim=128, rotary_dim=128, interleaved=True, heads_kv=4),
    "full-80-interleaved": Case(seqlen=3, head_dim=80, rotary_dim=80, interleaved=True, heads_q=3, heads_kv=1),
}


def tables(positions, rotary_dim, dtype=torch.float32, batch=None):
    """Random-ish angles: cos, sin of shape (positions, rotary_dim / 2), or per batch."""
    shape = (positions, rotary_dim // 2) if batch is None else (batch, positions, rotary_dim // 2)
    angles = torch.rand(shape, device=DEVICE, dtype=torch.float64) * 20 - 10
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_inputs(case: Case, dtype, requires_grad=False):
    q = torch.randn(case.batch, case.seqlen, case.heads_q, case.head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(case.batch, case.seqlen, case.heads_kv, case.head_dim, device=DEVICE, dtype=dtype)
    cos, sin = tables(case.seqlen, case.rotary_dim, batch=case.batch if case.per_batch else None)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), cos, sin


def check_against_reference(q, k, cos, sin, *, interleaved, dout=None, **options):
    """Forward (and gradients when dout = (dq, dk) is given) vs float64, FA criterion."""
    q_out, k_out = apply_rotary(q, k, cos, sin, interleaved=interleaved, **options)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k)]
    truth = reference.apply_rotary(*leaves64, cos.double(), sin.double(), interleaved=interleaved)
    same = reference.apply_rotary(*leaves, cos, sin, interleaved=interleaved)
    for name, got, s, t in zip(("q", "k"), (q_out, k_out), same, truth):
        assert got.dtype == q.dtype
        assert_close(name, got, s, t, q.dtype)
    if dout is None:
        return
    grads = torch.autograd.grad((q_out, k_out), (q, k), dout)
    truth_grads = torch.autograd.grad(truth, leaves64, [d.double() for d in dout])
    same_grads = torch.autograd.grad(same, leaves, dout)
    for name, g, s, t in zip(("dq", "dk"), grads, same_grads, truth_grads):
        assert_close(name, g, s, t, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name, dtype):
    case = CASES[name]
    q, k, cos, sin = make_inputs(case, dtype, requires_grad=True)
    dout = (torch.randn_like(q), torch.randn_like(k))
    check_against_reference(q, k, cos, sin, interleaved=case.interleaved, dout=dout)
    # Tables may come in the input's dtype, as transformers casts them.
    check_against_reference(q, k, cos.to(dtype), sin.to(dtype), interleaved=case.interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_matches_out_of_place_and_keeps_pass_through(interleaved):
    """Slices of a packed qkv, rotated in place: v and the pass-through features are left
    bit for bit, and the rotated part equals the out-of-place result."""
    b, s, hq, hkv, d, r = 2, 19, 4, 2, 80, 48
    qkv = torch.randn(b, s, hq + 2 * hkv, d, device=DEVICE, dtype=torch.float16)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    before = qkv.clone()
    cos, sin = tables(s + 3, r)
    expected = apply_rotary(q, k, cos, sin, interleaved=interleaved, seqlen_offsets=3)
    assert torch.equal(qkv, before)  # out of place leaves the inputs alone
    q_out, k_out = apply_rotary(q, k, cos, sin, interleaved=interleaved, seqlen_offsets=3, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[..., r:], before[..., r:]) and torch.equal(v, before[:, :, hq + hkv:])
    assert not torch.equal(qkv[:, :, :hq + hkv, :r], before[:, :, :hq + hkv, :r])


def test_noncontiguous_and_pass_through_copied():
    """Transposed (batch, heads, seqlen, dim) views and packed slices, out of place: the
    pass-through features are copied exactly."""
    b, s, h, d, r = 2, 13, 4, 128, 64
    q = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, s, 2, 3, d + 16, device=DEVICE)[:, :, :, 1, :d]
    assert not q.is_contiguous() and not k.is_contiguous()
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = tables(s, r)
    dout = (torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2), torch.randn(b, s, 2, d, device=DEVICE))
    check_against_reference(q, k, cos, sin, interleaved=True, dout=dout)
    q_out, k_out = apply_rotary(q, k, cos, sin, interleaved=True)
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


def test_expanded_grad_output_and_k_none():
    """out.sum().backward() hands the backward stride-0 gradients; k may be left out."""
    q, k, cos, sin = make_inputs(Case(seqlen=11, head_dim=64, rotary_dim=32), torch.float32, requires_grad=True)
    dout = tuple(torch.ones(1, device=DEVICE).expand(x.shape) for x in (q, k))
    check_against_reference(q, k, cos, sin, interleaved=False, dout=dout)
    q_out, k_out = apply_rotary(q, None, cos, sin)
    assert k_out is None
    q64 = q.detach().double().requires_grad_()
    assert_close("q", q_out, reference.rotary(q.detach(), cos, sin), reference.rotary(q64, cos.double(), sin.double()),
                 torch.float32)
    (dq,) = torch.autograd.grad(q_out.sum(), q)
    (dq64,) = torch.autograd.grad(reference.rotary(q64, cos.double(), sin.double()).sum(), q64)
    assert_close("dq", dq, dq64.float(), dq64, torch.float32)


@pytest.mark.parametrize("per_batch", [False, True])
def test_seqlen_offsets(per_batch):
    """Decode with a KV cache: cos/sin cover the whole cache, sequence b starts at
    offsets[b]. The same as slicing the tables, for an int and for a tensor."""
    case = Case(seqlen=5, head_dim=64, rotary_dim=64, batch=3)
    q, k, _, _ = make_inputs(case, torch.float32, requires_grad=True)
    cos, sin = tables(40, 64, batch=3 if per_batch else None)
    offsets = torch.tensor([0, 17, 35], dtype=torch.int32, device=DEVICE)
    out = apply_rotary(q, k, cos, sin, seqlen_offsets=offsets)
    dout = (torch.randn_like(q), torch.randn_like(k))
    grads = torch.autograd.grad(out, (q, k), dout)
    for b, start in enumerate(offsets.tolist()):
        rows = slice(start, start + case.seqlen)
        cos_b, sin_b = (cos[b, rows], sin[b, rows]) if per_batch else (cos[rows], sin[rows])
        qb, kb = q[b:b + 1].detach().requires_grad_(), k[b:b + 1].detach().requires_grad_()
        want = apply_rotary(qb, kb, cos_b, sin_b)
        assert all(torch.equal(x[b:b + 1], w) for x, w in zip(out, want))
        want_grads = torch.autograd.grad(want, (qb, kb), [d[b:b + 1] for d in dout])
        assert all(torch.equal(g[b:b + 1], w) for g, w in zip(grads, want_grads))
    shifted = apply_rotary(q, k, cos, sin, seqlen_offsets=35)
    assert torch.equal(shifted[0][2], out[0][2]) and torch.equal(shifted[1][2], out[1][2])


def test_tensor_offsets_past_the_table_do_not_rotate():
    q, k, _, _ = make_inputs(Case(seqlen=4, batch=1), torch.float32)
    cos, sin = tables(6, 64)
    q_out, k_out = apply_rotary(q, k, cos, sin, seqlen_offsets=torch.tensor([4], dtype=torch.int32, device=DEVICE))
    assert torch.equal(q_out[:, 2:], q[:, 2:]) and torch.equal(k_out[:, 2:], k[:, 2:])
    assert not torch.equal(q_out[:, :2], q[:, :2])


@pytest.mark.parametrize("block_s,block_h,seqlen", [(1, 1, 5), (8, 2, 21), (32, 8, 21)])
def test_tile_shapes(block_s, block_h, seqlen):
    """Every tile shape, partial blocks of tokens and of q and k heads included (the
    interpreter runs each program in Python: few of them)."""
    config = autotune.Config({"BLOCK_S": block_s, "BLOCK_H": block_h}, num_warps=4, num_stages=1)
    case = Case(seqlen=seqlen, heads_q=5, heads_kv=3, head_dim=80, rotary_dim=48, interleaved=True, batch=1)
    q, k, cos, sin = make_inputs(case, torch.float32, requires_grad=True)
    with autotune.override("rotary", config):
        check_against_reference(q, k, cos, sin, interleaved=True, dout=(torch.randn_like(q), torch.randn_like(k)))


def test_default_configs_are_in_the_space():
    """The heuristic default of each model shape is a config the tuner would also try."""
    for hq, hkv, d, r in [(8, 4, 256, 256), (32, 2, 128, 64), (16, 8, 256, 256), (4, 0, 64, 64)]:
        for tokens in (1, 7, 1024, 16384):
            bucket = ROTARY.key(head_dim=d, rotary_dim=r, dtype=torch.bfloat16, interleaved=False,
                                heads_q=hq, heads_kv=hkv, tokens=tokens)
            assert ROTARY.default(**bucket) in ROTARY.candidates(bucket), bucket


def test_inplace_needs_no_grad():
    q, k, cos, sin = make_inputs(Case(), torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        apply_rotary(q, k, cos, sin, inplace=True)
    with torch.no_grad():
        expected = apply_rotary(q, k, cos, sin)
        q2, k2 = q.detach().clone(), k.detach().clone()
        assert all(torch.equal(a, b) for a, b in zip(apply_rotary(q2, k2, cos, sin, inplace=True), expected))


def test_torch_compile_fullgraph():
    case = CASES["glm4-128-partial-interleaved"]
    q, k, cos, sin = make_inputs(case, torch.float32, requires_grad=True)

    def step(q, k, cos, sin):
        q_out, k_out = apply_rotary(q, k, cos, sin, interleaved=True)
        return q_out.square().sum() + (k_out * k_out.detach()).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, cos, sin)
    grads = torch.autograd.grad(loss, (q, k))
    loss_eager = step(q, k, cos, sin)
    grads_eager = torch.autograd.grad(loss_eager, (q, k))
    assert torch.allclose(loss, loss_eager) and all(torch.allclose(a, b) for a, b in zip(grads, grads_eager))

    def decode(q, k, cos, sin, offsets):
        apply_rotary(q, k, cos, sin, seqlen_offsets=offsets, interleaved=True, inplace=True)
        return q * 2

    offsets = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    q2, k2 = (x[:, :1].detach().clone() for x in (q, k))
    expected = apply_rotary(q2, k2, cos, sin, seqlen_offsets=offsets, interleaved=True)
    doubled = torch.compile(decode, fullgraph=True, backend="aot_eager")(q2, k2, cos, sin, offsets)
    assert torch.equal(q2, expected[0]) and torch.equal(k2, expected[1]) and torch.equal(doubled, 2 * q2)


# ----------------------------------------------------------------------------- transformers


def hf_check(hf_apply, hf_rotary, ours: RotaryEmbedding, case: Case, dtype):
    """Our kernel on transformers' own cos/sin, and our module, against transformers'
    apply_rotary_pos_emb, which takes (batch, heads, seqlen, head_dim) and cos/sin
    (batch, seqlen, rotary_dim) holding [freqs, freqs]: ours are the first half. The
    model hands apply_rotary_pos_emb tables cast to q's dtype; our module keeps them in
    float32, so its truth is computed from the float32 tables."""
    q, k, _, _ = make_inputs(case, dtype, requires_grad=True)
    half = case.rotary_dim // 2
    positions = torch.arange(case.seqlen, device=DEVICE)[None] + torch.tensor([[0], [100]], device=DEVICE)
    cos32, sin32 = hf_rotary(q.float(), positions)
    # Bit-identical on one device; a table built on the CPU and moved may differ by an ulp.
    torch.testing.assert_close(ours.cos[positions], cos32[..., :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sin[positions], sin32[..., :half], atol=1e-6, rtol=0)
    cos, sin = hf_rotary(q, positions)
    leaves64 = [x.detach().double().transpose(1, 2).requires_grad_() for x in (q, k)]
    leaves = [x.detach().transpose(1, 2).requires_grad_() for x in (q, k)]
    dout = (torch.randn_like(q), torch.randn_like(k))
    same = hf_apply(*leaves, cos, sin)
    same_grads = torch.autograd.grad(same, leaves, [d.transpose(1, 2) for d in dout])
    runs = [
        (apply_rotary(q, k, cos[..., :half], sin[..., :half], interleaved=case.interleaved), cos, sin),
        (ours(q, k, positions), cos32, sin32),
    ]
    for got, cos_truth, sin_truth in runs:
        truth = hf_apply(*leaves64, cos_truth.double(), sin_truth.double())
        truth_grads = torch.autograd.grad(truth, leaves64, [d.double().transpose(1, 2) for d in dout])
        grads = torch.autograd.grad(got, (q, k), dout)
        for name, g, s, t in zip(("q", "k", "dq", "dk"), (*got, *grads), (*same, *same_grads), (*truth, *truth_grads)):
            assert_close(name, g, s.transpose(1, 2), t.transpose(1, 2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma2_matches_transformers(dtype):
    config = Gemma2Config(head_dim=256, hidden_size=512, num_attention_heads=4, num_key_value_heads=2)
    ours = RotaryEmbedding(256, base=config.rope_parameters["rope_theta"],
                           max_position_embeddings=config.max_position_embeddings).to(DEVICE)
    hf_check(modeling_gemma2.apply_rotary_pos_emb, modeling_gemma2.Gemma2RotaryEmbedding(config).to(DEVICE), ours,
             Case(seqlen=7, head_dim=256, rotary_dim=256), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glm4_matches_transformers(dtype):
    """GLM-4 rotates the first head_dim * partial_rotary_factor features as interleaved
    pairs: its apply_rotary_pos_emb keeps cos[..., :rotary_dim / 2] and repeats each
    value twice, so the convention maps one to one onto ours."""
    config = Glm4Config(head_dim=128, hidden_size=512, num_attention_heads=4, num_key_value_heads=1)
    rotary_dim = int(config.head_dim * config.rope_parameters["partial_rotary_factor"])
    ours = RotaryEmbedding(rotary_dim, base=config.rope_parameters["rope_theta"],
                           max_position_embeddings=config.max_position_embeddings, interleaved=True).to(DEVICE)
    hf_check(modeling_glm4.apply_rotary_pos_emb, modeling_glm4.Glm4RotaryEmbedding(config).to(DEVICE), ours,
             Case(seqlen=129, head_dim=128, rotary_dim=rotary_dim, interleaved=True, heads_kv=1), dtype)


def test_module_offsets_equal_positions():
    """Decode through the module: offsets into the whole table (int or per sequence) give
    what explicit position ids give; the module has nothing to load."""
    rotary = RotaryEmbedding(32, max_position_embeddings=64, interleaved=True).to(DEVICE)
    assert rotary.state_dict() == {} and rotary.cos.shape == (64, 16) and rotary.cos.dtype == torch.float32
    q, k, _, _ = make_inputs(Case(seqlen=3, head_dim=64, rotary_dim=32), torch.float16)
    offsets = torch.tensor([5, 60], dtype=torch.int32, device=DEVICE)
    positions = torch.arange(3, device=DEVICE)[None] + offsets[:, None]
    expected = rotary(q, k, positions)
    assert all(torch.equal(a, b) for a, b in zip(rotary(q, k, seqlen_offsets=offsets), expected))
    assert all(torch.equal(a, b) for a, b in zip(rotary(q, k, seqlen_offsets=5), rotary(q, k, positions[0])))
    with pytest.raises(ValueError, match="position_ids and seqlen_offsets"):
        rotary(q, k, positions, seqlen_offsets=offsets)


# ----------------------------------------------------------------------------- errors


def call(**changes):
    q, k, cos, sin = make_inputs(Case(batch=2, seqlen=8, head_dim=64, rotary_dim=32), torch.float32)
    args = dict(q=q, k=k, cos=cos, sin=sin)
    args.update({name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in changes.items()})
    return apply_rotary(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
        (dict(q=torch.randn(2, 8, 64)), ValueError, "q: expected a 4-d tensor"),
        (dict(q=torch.ones(2, 8, 4, 64, dtype=torch.int32)), TypeError, "q: expected dtype"),
        (dict(k=torch.randn(2, 8, 2, 64, dtype=torch.float16)), TypeError, "k: dtype torch.float16 differs from q"),
        (dict(k=torch.randn(3, 8, 2, 64)), ValueError, "k: expected batch (as q)"),
        (dict(k=torch.randn(2, 9, 2, 64)), ValueError, "k: expected seqlen (as q)"),
        (dict(k=torch.randn(2, 8, 2, 32)), ValueError, "k: expected head_dim (as q)"),
        (dict(cos=torch.ones(8, 16, dtype=torch.float16)), TypeError, "cos: expected dtype float32"),
        (dict(cos=torch.ones(16)), ValueError, "cos: expected a 2-d tensor"),
        (dict(sin=torch.ones(8, 8)), ValueError, "sin: shape (8, 8) must equal cos's (8, 16)"),
        (dict(sin=torch.ones(8, 16, dtype=torch.float64)), TypeError, "sin: expected dtype"),
        (dict(cos=torch.ones(3, 8, 16), sin=torch.ones(3, 8, 16)), ValueError, "cos: expected batch = 1 or 2"),
        (dict(cos=torch.ones(7, 16), sin=torch.ones(7, 16)), ValueError, "cos: 7 positions (dim -2) do not cover"),
        (dict(cos=torch.ones(8, 40), sin=torch.ones(8, 40)), ValueError, "rotary_dim = 2 * cos.shape[-1] = 80 must be in"),
        (dict(cos=torch.ones(8, 0), sin=torch.ones(8, 0)), ValueError, "rotary_dim = 2 * cos.shape[-1] = 0"),
        (dict(rotary_dim=31), ValueError, "rotary_dim: expected a positive even int, got 31"),
        (dict(rotary_dim=64), ValueError, "rotary_dim: 64 must equal 2 * cos.shape[-1] = 32"),
        (dict(interleaved=1), TypeError, "interleaved: expected bool"),
        (dict(seqlen_offsets=-1), TypeError, "seqlen_offsets: expected an int >= 0"),
        (dict(seqlen_offsets=1), ValueError, "do not cover seqlen_offsets + seqlen = 1 + 8"),
        (dict(seqlen_offsets=torch.zeros(2, dtype=torch.int64)), TypeError, "seqlen_offsets: expected dtype int32"),
        (dict(seqlen_offsets=torch.zeros(3, dtype=torch.int32)), ValueError, "seqlen_offsets: expected batch"),
    ],
)
def test_errors(changes, error, words):
    with pytest.raises(error) as info:
        call(**changes)
    assert words in str(info.value)
