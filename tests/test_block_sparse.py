"""BigBird block-sparse attention against transformers' own module and a dense float64
reference that applies the same block layout, duplicates counted."""

import numpy as np
import pytest
import torch
from accuracy import assert_close
from conftest import DEVICE, DTYPES, nan_padded

import tritium
from tritium import reference
from tritium.kernels.block_sparse import bigbird_random_layout, block_sparse_attention, min_seqlen

BLOCK, RANDOM = 16, 1
SEQLEN = min_seqlen(BLOCK, RANDOM)  # 128: 8 blocks, the shortest sequence with a sparse layout


def transformers_module(heads=2, head_dim=16, seed=0):
    from transformers import BigBirdPegasusConfig
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import BigBirdPegasusBlockSparseAttention

    config = BigBirdPegasusConfig(d_model=heads * head_dim, encoder_attention_heads=heads, block_size=BLOCK,
                                  num_random_blocks=RANDOM, max_position_embeddings=1024, use_bias=False)
    config.hidden_size, config.num_attention_heads = config.d_model, heads
    return BigBirdPegasusBlockSparseAttention(config, seed=seed).to(DEVICE).eval()


def run_transformers(module, hidden, mask):
    from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import BigBirdPegasusEncoder

    blocked, band, from_mask, to_mask = BigBirdPegasusEncoder.create_masks_for_block_sparse_attn(mask.float(), BLOCK)
    with torch.no_grad():
        out, _ = module(hidden, band, from_mask, to_mask, blocked, blocked)
    return out


def run_tritium(module, hidden, mask, rand_attn=None):
    batch, seqlen, _ = hidden.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    q, k, v = (proj(hidden).view(batch, seqlen, heads, head_dim) for proj in (module.query, module.key, module.value))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, block_size=BLOCK, num_random_blocks=RANDOM, rand_attn=rand_attn,
                                     key_padding_mask=mask)
    return out.reshape(batch, seqlen, heads * head_dim)


def padding_mask(batch, seqlen):
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEVICE)
    mask[-1, seqlen - 37:] = False  # the last sequence is padded (a whole block and a part)
    return mask


def test_matches_transformers_eval_layout_with_padding():
    module = transformers_module()
    hidden = torch.randn(2, SEQLEN, module.all_head_size, device=DEVICE)
    for mask in (torch.ones(2, SEQLEN, dtype=torch.bool, device=DEVICE), padding_mask(2, SEQLEN)):
        ours, theirs = run_tritium(module, hidden, mask), run_transformers(module, hidden, mask)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_matches_transformers_training_layout():
    """transformers draws its training layout with numpy from the module's seed: draw the
    same one, hand it to tritium, and compare with the module run in training mode."""
    module = transformers_module(seed=3)
    hidden = torch.randn(2, SEQLEN * 2, module.all_head_size, device=DEVICE)  # 16 blocks, room for randomness
    mask = padding_mask(2, SEQLEN * 2)
    np.random.seed(3)
    plan = module._get_rand_attn_plan(SEQLEN * 2, BLOCK, RANDOM)
    module.train()
    rand_attn = np.stack(module._bigbird_block_rand_mask_with_head(
        from_seq_length=SEQLEN * 2, to_seq_length=SEQLEN * 2, from_block_size=BLOCK, to_block_size=BLOCK,
        num_heads=2, plan_from_length=plan[0], plan_num_rand_blocks=plan[1]))
    assert rand_attn.any(), "the training layout should not be all zeros"
    theirs = run_transformers(module, hidden, mask)
    ours = run_tritium(module, hidden, mask, torch.tensor(rand_attn, device=DEVICE))
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def check_against_reference(q, k, v, rand_attn, mask, dout):
    dtype = q.dtype
    opts = dict(block_size=BLOCK, num_random_blocks=RANDOM, rand_attn=rand_attn, key_padding_mask=mask)
    out, lse = block_sparse_attention(q, k, v, return_lse=True, **opts)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth, lse_truth = reference.block_sparse_attention(*leaves64, return_lse=True, **opts)
    same, lse_same = reference.block_sparse_attention(*leaves, return_lse=True, **opts)
    assert_close("out", out, same, truth, dtype)
    assert_close("lse", lse, lse_same, lse_truth, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, s, t in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(same, leaves, dout),
                             torch.autograd.grad(truth, leaves64, dout.double())):
        assert_close(name, g, s, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["eval", "random", "random-gqa-padded"])
def test_forward_backward_against_dense_reference(layout, dtype):
    heads_kv = 1 if layout.endswith("gqa-padded") else 2
    seqlen = SEQLEN + 2 * BLOCK
    q = torch.randn(2, seqlen, 2, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, seqlen, heads_kv, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    rand_attn = None if layout == "eval" else bigbird_random_layout(seqlen, BLOCK, RANDOM, 2, generator=generator, device=DEVICE)
    mask = padding_mask(2, seqlen) if layout.endswith("padded") else None
    check_against_reference(q, k, v, rand_attn, mask, torch.randn(q.shape, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [4, 12, 40, 160])
def test_padded_head_dims(head_dim, dtype):
    """Forward, dQ and dK/dV on head_dims padded to BLOCK_D (a subset: the interpreter is
    slow here). q, k, v and dout are NaN past head_dim: a load of a padded column shows."""
    q, k, v = (nan_padded((1, SEQLEN, 1, head_dim), dtype).requires_grad_() for _ in range(3))
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    rand_attn = bigbird_random_layout(SEQLEN, BLOCK, RANDOM, 1, generator=generator, device=DEVICE)
    check_against_reference(q, k, v, rand_attn, padding_mask(1, SEQLEN), nan_padded(q.shape, dtype))


def test_noncontiguous_inputs_and_duplicates():
    """Transposed views; a layout listing the same random block twice counts it twice."""
    q, k, v = (torch.randn(1, 2, SEQLEN, 32, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    # Every middle row lists key block 5 at random: query blocks 4, 5 and 6 then list it twice
    # (once in their window), the others once.
    rand_attn = torch.full((2, SEQLEN // BLOCK - 2, RANDOM), 5, device=DEVICE)
    check_against_reference(q, k, v, rand_attn, padding_mask(1, SEQLEN), torch.randn(1, SEQLEN, 2, 32, device=DEVICE))


def test_random_layout_respects_transformers_candidates():
    seqlen, heads, r = 32 * BLOCK, 4, 3
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    layout = bigbird_random_layout(seqlen, BLOCK, r, heads, generator=generator, device=DEVICE)
    again = bigbird_random_layout(seqlen, BLOCK, r, heads, generator=torch.Generator(device=DEVICE).manual_seed(0),
                                  device=DEVICE)
    assert torch.equal(layout, again) and layout.shape == (heads, 30, r)
    last = seqlen // BLOCK - 1
    for row in range(layout.shape[1]):
        i = row + 1
        for h in range(heads):
            picked = layout[h, row].tolist()
            assert len(set(picked)) == r and all(1 <= j < last for j in picked)
            if i == 1:
                assert min(picked) >= 3
            elif i == 2:
                assert min(picked) >= 4
            elif i < last - 2:
                assert all(abs(j - i) >= 2 for j in picked)


def test_eval_layout_is_all_zeros():
    q, k, v = (torch.randn(1, SEQLEN, 2, 16, device=DEVICE) for _ in range(3))
    zeros = torch.zeros(2, SEQLEN // BLOCK - 2, RANDOM, dtype=torch.long, device=DEVICE)
    kwargs = dict(block_size=BLOCK, num_random_blocks=RANDOM)
    assert torch.equal(block_sparse_attention(q, k, v, **kwargs), block_sparse_attention(q, k, v, rand_attn=zeros, **kwargs))


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(seqlen=SEQLEN + 5), ValueError, "not a multiple of block_size 16"),
        (dict(seqlen=SEQLEN - BLOCK), ValueError, "too short for the block-sparse layout"),
        (dict(block_size=24), ValueError, "block_size: expected a power of two >= 16"),
        (dict(rand_attn=torch.zeros(2, 5, RANDOM, dtype=torch.long)), ValueError, "rand_attn: expected shape"),
        (dict(rand_attn=torch.full((2, 6, RANDOM), 8)), ValueError, "rand_attn: block indices must lie in [0, 7]"),
        (dict(rand_attn=torch.zeros(2, 6, RANDOM)), TypeError, "rand_attn: expected dtype int32, int64"),
        (dict(key_padding_mask=torch.ones(1, SEQLEN)), TypeError, "key_padding_mask: expected dtype bool"),
        (dict(kv_seqlen=SEQLEN + BLOCK), ValueError, "block-sparse attention is self-attention"),
    ],
)
def test_errors(changes, error, words):
    seqlen = changes.pop("seqlen", SEQLEN)
    q = torch.randn(1, seqlen, 2, 16, device=DEVICE)
    k = v = torch.randn(1, changes.pop("kv_seqlen", seqlen), 2, 16, device=DEVICE)
    kwargs = dict(block_size=BLOCK, num_random_blocks=RANDOM)
    kwargs.update({n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in changes.items()})
    with pytest.raises(error) as info:
        block_sparse_attention(q, k, v, **kwargs)
    assert words in str(info.value)
    if "too short" in words:
        assert f"minimum {SEQLEN}" in str(info.value) and "flash_attention" in str(info.value)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, SEQLEN, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return tritium.block_sparse_attention(q, k, v, block_size=BLOCK, num_random_blocks=RANDOM).square().sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    assert all(torch.allclose(a, b) for a, b in zip(grads, eager))
