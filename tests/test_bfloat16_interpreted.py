"""bfloat16 on every run, the CPU's too: one or two small cases per op, forward and
backward, against the float64 reference with tests/accuracy.py's bound.

The dtype matrices of the other files run bfloat16 on a GPU only (the interpreter is slow).
Under the interpreter Triton computes tl.dot and bfloat16 arithmetic on bit patterns and
truncates float32 to bfloat16 unless the kernels go through tritium/kernels/tiles.py:
these cases catch a kernel that does not."""

import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE
from test_attention import Case as AttentionCase
from test_attention import check_against_reference as check_attention
from test_attention import make_inputs as attention_inputs
from test_attention import options
from test_attention_kvcache import expected as kvcache_expected
from test_block_sparse import BLOCK, RANDOM, SEQLEN, padding_mask
from test_block_sparse import check_against_reference as check_block_sparse
from test_mlp import check as check_mlp
from test_mlp import randn, weight
from test_nf4 import check_matmul, nf4_weight, reference_dequantize
from test_norm import STYLES, make_inputs, random_grads
from test_norm import check_against_reference as check_norm
from test_rope import Case as RotaryCase
from test_rope import check_against_reference as check_rotary
from test_rope import make_inputs as rotary_inputs

import tritium
from tritium import reference
from tritium.kernels import nf4, norm
from tritium.kernels.block_sparse import bigbird_random_layout
from tritium.kernels.mlp import gated_mlp, linear

BF16 = torch.bfloat16

ATTENTION_CASES = {
    "gqa-causal-window-softcap": AttentionCase(seqlen_q=37, seqlen_k=53, heads_q=4, heads_kv=2, head_dim=40,
                                               causal=True, window=(16, 0), softcap=30.0, batch=1),
    "padding": AttentionCase(seqlen_q=33, seqlen_k=45, head_dim=64, mask="random"),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_flash_attention(name):
    case = ATTENTION_CASES[name]
    q, k, v, mask = attention_inputs(case, BF16)
    check_attention(q, k, v, mask, options(case), torch.randn(q.shape, device=DEVICE, dtype=BF16))


def test_kvcache_decode():
    """Append one token per sequence (copied bit for bit), then the split-KV decode."""
    batch, max_seqlen, heads_q, heads_kv, head_dim = 2, 90, 4, 2, 64
    k_cache, v_cache = (torch.randn(batch, max_seqlen, heads_kv, head_dim, device=DEVICE, dtype=BF16) for _ in range(2))
    q = torch.randn(batch, 1, heads_q, head_dim, device=DEVICE, dtype=BF16)
    k_new, v_new = (torch.randn(batch, 1, heads_kv, head_dim, device=DEVICE, dtype=BF16) for _ in range(2))
    cached = torch.tensor([20, 71], dtype=torch.int32, device=DEVICE)
    opts = dict(causal=True, softcap=20.0)
    out = tritium.flash_attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new, **opts)
    for b, n in enumerate(cached.tolist()):
        assert torch.equal(k_cache[b, n], k_new[b, 0]) and torch.equal(v_cache[b, n], v_new[b, 0])
    truth, same = kvcache_expected(q, k_cache, v_cache, (cached + 1).tolist(), opts)
    assert_close("out", out, same, truth, BF16)


def test_block_sparse_attention():
    """A random layout, GQA, the last keys padded."""
    q = torch.randn(1, SEQLEN, 2, 32, device=DEVICE, dtype=BF16, requires_grad=True)
    k, v = (torch.randn(1, SEQLEN, 1, 32, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(2))
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    rand_attn = bigbird_random_layout(SEQLEN, BLOCK, RANDOM, 2, generator=generator, device=DEVICE)
    check_block_sparse(q, k, v, rand_attn, padding_mask(1, SEQLEN), torch.randn(q.shape, device=DEVICE, dtype=BF16))


@pytest.mark.parametrize("tokens", [3, 37])
def test_linear(tokens):
    args = (randn(tokens, 96, dtype=BF16), weight(80, 96, BF16), randn(80, dtype=BF16))
    check_mlp(linear, reference.linear, args, "gelu_tanh", randn(tokens, 80, dtype=BF16))


def test_gated_mlp():
    args = (randn(7, 96, dtype=BF16), weight(2 * 136, 96, BF16), weight(96, 136, BF16))
    check_mlp(gated_mlp, reference.gated_mlp, args, "silu", randn(7, 96, dtype=BF16))


@pytest.mark.parametrize("rows,path", [(3, "gemv"), (37, "gemm")])
def test_nf4_matmul(rows, path):
    w = nf4_weight(48, 128, 64, double_quant=True, dtype=BF16)
    x = torch.randn(rows, 128, device=DEVICE, dtype=BF16)
    check_matmul(x, w, torch.randn(48, device=DEVICE, dtype=BF16), torch.randn(rows, 48, device=DEVICE, dtype=BF16),
                 path=path)


def test_nf4_dequantize_bit_exact():
    w = nf4.quantize(torch.randn(33, 70, device=DEVICE).to(BF16), 64, True)
    assert torch.equal(nf4.dequantize(w), reference_dequantize(w))


@pytest.mark.parametrize("name", ["gemma2", "offset-cast-first", "layer"])
def test_norm_with_residual(name):
    style = STYLES[name]
    inputs = make_inputs(style, (7, 100), BF16, residual=True)
    check_norm(style, inputs, random_grads(style(norm, **inputs)))


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary(interleaved):
    case = RotaryCase(seqlen=9, head_dim=64, rotary_dim=48, interleaved=interleaved)
    q, k, cos, sin = rotary_inputs(case, BF16, requires_grad=True)
    check_rotary(q, k, cos, sin, interleaved=interleaved, dout=(torch.randn_like(q), torch.randn_like(k)))
